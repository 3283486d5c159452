"""The stored form of an inspection's (H, W) float16 anomaly map: lossless, small, and still a valid PNG.

Every version turns the map into integer residuals r (mod 2^16), zigzags them (``z = (r << 1) ^ (r >> 15)``: 0,
-1, 1, -2, ... -> 0, 1, 2, 3, ...), writes base-b digits ``d = min(z, b - 1)`` several to a byte (the top digit
escapes: ``z - (b - 1)`` goes to a side stream of 16-bit values, high bytes then low bytes), and deflates both::

    version 3   maps in [0, 1] (the service's probabilities; written now)
                r: grid of :mod:`service.engine.map_pyramid` as second differences of its bit patterns, then every
                pass's bits(map) - bits(prediction) in coding order, one stream; b = 4, four digits to a byte
                PNG (8-bit grey, W wide, filter None, deflate: Huffman codes only or runs only) of the bytes
                  + chunk "dhEs": 3, H, W (>BII), deflate of [weights as >i4 ; escaped values]
    version 2   any float16 map (and how maps outside [0, 1] are written)
                r[i, j] = b[i, j] - b[i-1, j] - b[i, j-1] + b[i-1, j-1] of the bit patterns b (zero outside)
                b = 6, three vertically adjacent digits to a byte: PNG of W x ceil(H / 3)
                  + chunk "dhEs": 2, H (>BI), deflate of [escaped values]
    version 1   the first form, still read: PNG of 2H x W, the high byte plane of z above its low byte plane

Version 3 predicts almost every pixel's float16 exactly from its neighbours (under 1 bit per pixel: 48 KB for the
median real photo at 672 x 672, where version 2 took 89 KB); a PNG viewer shows the packed bytes and skips the
private chunk.
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

from . import map_pyramid

MAP_DTYPE = np.float16
MAP_ZLIB_LEVEL = 3  # of version 2's packed digits: 6 saves 1 % for 2.5x the time
MAP_CHUNK = b"dhEs"  # private ancillary chunk: version, shape, deflated side stream
V2_DIGITS = (6, 3)  # base, digits per byte
V3_DIGITS = (4, 4)
# the digits are deflated both ways and the smaller kept: Huffman codes only (noise-like digits: 20 % smaller and 4x
# faster than level 3 with string matches) and runs only (a map with flat areas: their zeros cost nothing)
V3_DEFLATE = (zlib.Z_HUFFMAN_ONLY, zlib.Z_RLE)
MAX_PIXELS = 1 << 26  # a version 3 header claiming more is damage

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _deflate(data: bytes, level: int, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> bytes:
    packer = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
    return packer.compress(data) + packer.flush()


def _inflate(data: bytes, what: str) -> bytes:
    try:
        return zlib.decompress(data)
    except zlib.error as exc:
        raise ValueError(f"stored map is not an 8-bit grey PNG (deflate of {what}: {exc})") from None


def _grey_png(rows: np.ndarray, level: int, strategy: int, extra: bytes = b"") -> bytes:
    """An 8-bit greyscale PNG of ``rows`` (H, W) uint8, every row with filter type 0 (None); ``extra`` chunks
    (already framed) go before the image data."""
    h, w = rows.shape
    raw = np.zeros((h, w + 1), np.uint8)  # column 0: the filter type byte of each row
    raw[:, 1:] = rows
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8 bits, grey, deflate, adaptive filters, no interlace
    idat = _deflate(raw.tobytes(), level, strategy)
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png_chunks(data: bytes) -> dict[bytes, bytes]:
    """Chunk type -> payload of a PNG (IDAT payloads joined); ValueError when the framing is broken."""
    if not data.startswith(_PNG_SIGNATURE):
        raise ValueError("stored map is not an 8-bit grey PNG (no PNG signature)")
    chunks: dict[bytes, bytes] = {}
    at = len(_PNG_SIGNATURE)
    while at + 12 <= len(data):
        (size,), kind = struct.unpack_from(">I", data, at), data[at + 4 : at + 8]
        chunks[kind] = chunks.get(kind, b"") + data[at + 8 : at + 8 + size]
        at += 12 + size
    if at != len(data) or b"IHDR" not in chunks:
        raise ValueError("stored map is not an 8-bit grey PNG (broken chunks)")
    return chunks


# ---- residual stream: zigzag, digits several to a byte, escapes ------------------------------------------------


def _zigzag(r: np.ndarray) -> np.ndarray:
    """int16 residuals (mod 2^16) -> uint16 z: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    s = r.astype(np.int16)
    return ((s << 1) ^ (s >> 15)).view(np.uint16)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.int32)
    return (z >> 1) ^ -(z & 1)


def _pack_digits(digits: np.ndarray, base: int, per_byte: int) -> np.ndarray:
    """(n, ...) digits below ``base`` -> (ceil(n / per_byte), ...) bytes sum_i d[k per_byte + i] base^(per_byte-1-i)
    (axis 0 padded with zeros)."""
    padded = np.zeros((-(-digits.shape[0] // per_byte) * per_byte, *digits.shape[1:]), np.uint8)
    padded[: digits.shape[0]] = digits
    groups = padded.reshape(-1, per_byte, *digits.shape[1:])
    packed = groups[:, 0].copy()
    for i in range(1, per_byte):
        packed = packed * np.uint8(base) + groups[:, i]
    return packed


def _unpack_digits(packed: np.ndarray, base: int, per_byte: int) -> np.ndarray:
    """Inverse of :func:`_pack_digits`, padding kept: (k, ...) -> (k per_byte, ...)."""
    if packed.max(initial=0) >= base**per_byte:
        raise ValueError("stored map: packed digits out of range")
    digits = [packed // base ** (per_byte - 1 - i) % base for i in range(per_byte)]
    return np.stack(digits, axis=1).reshape(-1, *packed.shape[1:])


def _escaped(z: np.ndarray, base: int) -> bytes:
    e = z[z >= base - 1] - np.uint16(base - 1)
    return np.concatenate([e >> 8, e]).astype(np.uint8).tobytes()


def _unescape(digits: np.ndarray, side: np.ndarray, base: int) -> np.ndarray:
    """z from digits (any shape) and the escaped values' bytes (high bytes, then low bytes)."""
    z = digits.astype(np.int32)
    escape = digits == base - 1
    if 2 * int(escape.sum()) != side.size:
        raise ValueError(f"stored map: {escape.sum()} escapes but {side.size} bytes of escaped values")
    z[escape] += (side[: side.size // 2].astype(np.int32) << 8) | side[side.size // 2 :]
    return z


def _second_differences(bits: np.ndarray) -> np.ndarray:
    """s[i, j] = b[i, j] - b[i-1, j] - b[i, j-1] + b[i-1, j-1] (mod 2^16, zero outside) of int16 bit patterns."""
    return np.diff(np.diff(bits, axis=0, prepend=np.int16(0)), axis=1, prepend=np.int16(0))


def _integrate(s: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_second_differences`: int32 s -> uint16 bit patterns."""
    return (np.cumsum(np.cumsum(s, axis=0), axis=1) & 0xFFFF).astype(np.uint16)


# ---- version 3: the map predicted coarse to fine (service.engine.map_pyramid) -----------------------------------


def _encode_v3(score_map: np.ndarray) -> bytes:
    bits = score_map.view(np.uint16)
    streams, weights = map_pyramid.residuals(score_map)
    grid = _second_differences(bits[:: map_pyramid.GRID, :: map_pyramid.GRID].view(np.int16))
    z = _zigzag(np.concatenate([grid.ravel(), *streams]))
    height, width = score_map.shape
    packed = _pack_digits(np.minimum(z, V3_DIGITS[0] - 1).astype(np.uint8), *V3_DIGITS)
    rows = np.zeros(-(-packed.size // width) * width, np.uint8)
    rows[: packed.size] = packed
    side = np.concatenate([np.zeros(0, np.int64), *weights]).astype(">i4").tobytes() + _escaped(z, V3_DIGITS[0])
    tail = struct.pack(">BII", 3, height, width) + _deflate(side, 6)
    extra = _chunk(MAP_CHUNK, tail)
    return min((_grey_png(rows.reshape(-1, width), 1, how, extra) for how in V3_DEFLATE), key=len)


def _decode_v3(chunks: dict[bytes, bytes]) -> np.ndarray:
    _, height, width = struct.unpack_from(">BII", chunks[MAP_CHUNK])
    if not 0 < height * width <= MAX_PIXELS:
        raise ValueError(f"stored map: version 3 of {height} x {width} pixels")
    n = height * width
    n_bytes = -(-n // V3_DIGITS[1])
    packed = _image_bytes(chunks, width, -(-n_bytes // width), 3)
    side = np.frombuffer(_inflate(chunks[MAP_CHUNK][9:], "the side stream"), np.uint8)
    n_weights = map_pyramid.n_weights(height, width)
    if side.size < 4 * n_weights:
        raise ValueError(f"stored map: {side.size} bytes of side stream hold no {n_weights} weights")
    weights = side[: 4 * n_weights].view(">i4").astype(np.int64)
    digits = _unpack_digits(packed.ravel(), *V3_DIGITS)[:n]
    r = _unzigzag(_unescape(digits, side[4 * n_weights :], V3_DIGITS[0]))
    grid_shape = (len(range(0, height, map_pyramid.GRID)), len(range(0, width, map_pyramid.GRID)))
    grid = _integrate(r[: grid_shape[0] * grid_shape[1]].reshape(grid_shape))
    return map_pyramid.reconstruct(grid, height, width, r[grid.size :], weights)


# ---- versions 1 and 2: second differences of the bit patterns --------------------------------------------------


def encode_map_v2(score_map: np.ndarray) -> bytes:
    """Version 2 of any (H, W) float16 map (a float32 map is rounded first); :func:`encode_map` writes it for maps
    outside [0, 1]."""
    score_map = np.ascontiguousarray(score_map, dtype=MAP_DTYPE)
    z = _zigzag(_second_differences(score_map.view(np.int16)))
    packed = _pack_digits(np.minimum(z, V2_DIGITS[0] - 1).astype(np.uint8), *V2_DIGITS)  # three rows to a byte
    tail = struct.pack(">BI", 2, z.shape[0]) + _deflate(_escaped(z, V2_DIGITS[0]), 6)
    return _grey_png(packed, MAP_ZLIB_LEVEL, zlib.Z_DEFAULT_STRATEGY, _chunk(MAP_CHUNK, tail))


def _decode_v2(chunks: dict[bytes, bytes]) -> np.ndarray:
    width, height = struct.unpack_from(">II", chunks[b"IHDR"])
    _, rows = struct.unpack_from(">BI", chunks[MAP_CHUNK])
    if height != -(-rows // 3):
        raise ValueError(f"stored map: version 2, {width} x {height} does not hold {rows} rows")
    digits = _unpack_digits(_image_bytes(chunks, width, height, 2), *V2_DIGITS)[:rows]
    side = np.frombuffer(_inflate(chunks[MAP_CHUNK][5:], "the escaped values"), np.uint8)
    return _integrate(_unzigzag(_unescape(digits, side, V2_DIGITS[0]))).view(MAP_DTYPE)


def encode_map_v1(score_map: np.ndarray) -> bytes:
    """The first stored form (version 1), kept for benchmarks and for tests that write records of that layout."""
    z = _zigzag(_second_differences(np.ascontiguousarray(score_map, dtype=MAP_DTYPE).view(np.int16)))
    return _grey_png(np.concatenate([(z >> 8).astype(np.uint8), z.astype(np.uint8)]), 6, zlib.Z_RLE)


def _decode_v1(data: bytes) -> np.ndarray:
    planes = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if planes is None or planes.dtype != np.uint8 or planes.ndim != 2 or planes.shape[0] % 2:
        raise ValueError("stored map is not an 8-bit grey PNG of 2T x T bytes")
    half = planes.shape[0] // 2
    return _integrate(_unzigzag((planes[:half].astype(np.int32) << 8) | planes[half:])).view(MAP_DTYPE)


def _image_bytes(chunks: dict[bytes, bytes], width: int, height: int, version: int) -> np.ndarray:
    """(height, width) uint8 pixels of the PNG's data, which must be 8-bit grey of that size, filter None."""
    w, h, depth, colour = struct.unpack_from(">IIBB", chunks[b"IHDR"])
    raw = np.frombuffer(_inflate(chunks.get(b"IDAT", b""), "the digits"), np.uint8)
    if (w, h, depth, colour) != (width, height, 8, 0) or raw.size != height * (width + 1):
        raise ValueError(f"stored map: version {version}, {w} x {h} {depth}-bit does not hold {width} x {height}")
    raw = raw.reshape(height, width + 1)
    if raw[:, 0].any():
        raise ValueError("stored map: a row filter other than None")
    return raw[:, 1:]


# ---- the stored form ---------------------------------------------------------------------------------------------


def encode_map(score_map: np.ndarray) -> bytes:
    """An (H, W) map as a PNG of the module docstring, exact for float16 (a float32 map is rounded to it first):
    version 3 when every value lies in [0, 1], else version 2."""
    m = np.ascontiguousarray(score_map, dtype=MAP_DTYPE)
    if m.ndim != 2 or not m.size:
        raise ValueError(f"a stored map is a non-empty (H, W) array, not {m.shape}")
    inside = m.view(np.uint16).max() <= 0x3C00  # 0 <= m <= 1 (not -0.0, not NaN)
    return _encode_v3(m) if inside else encode_map_v2(m)


def decode_map(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_map` and :func:`encode_map_v1`: (H, W) float16; ValueError for bytes that are not
    a stored map."""
    chunks = _png_chunks(data)
    if MAP_CHUNK not in chunks:
        return _decode_v1(data)
    version = chunks[MAP_CHUNK][:1]
    if version == b"\x03" and len(chunks[MAP_CHUNK]) >= 9:
        return _decode_v3(chunks)
    if version == b"\x02" and len(chunks[MAP_CHUNK]) >= 5:
        return _decode_v2(chunks)
    raise ValueError(f"stored map: unknown version {version.hex() or 'none'}")
