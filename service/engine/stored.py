"""What an inspection keeps, and the pictures rendered from it later (on first request).

An inspection stores the uploaded bytes as they came (``original``, never re-encoded) and its (T, T) anomaly map as
float16 (``map``): exactly the values its regions, mask and ratios were computed from. Heatmap, mask and overlay PNGs
and the console thumbnail are rendered from those two with the functions of the request path
(:func:`~service.engine.postprocess.analyse_map`, :func:`~service.engine.postprocess.render_artefacts`), so a PNG
rendered later is byte-identical to the one a request could have asked for inline.

The map's stored form is lossless for float16 and small (a smooth map costs about 1.6 bits per pixel)::

    b = float16(map).view(uint16)                                   # (T, T) bit patterns, monotone in the value
    s[i, j] = b[i, j] - b[i-1, j] - b[i, j-1] + b[i-1, j-1]  (mod 2^16, b[-1, .] = b[., -1] = 0)
    z = (s << 1) ^ (s >> 15)                                         # zigzag: small |s| -> small z, int16 -> uint16
    d = min(z, 5)                                                    # a base-6 digit; 5 = escape
    c[r, j] = 36 d[3r, j] + 6 d[3r+1, j] + d[3r+2, j]                # three rows in one byte (rows padded with 0)
    e = z - 5 where d == 5, row-major                                # the escaped values, uint16
    PNG (8-bit grey, T x ceil(T/3), filter None, deflate) of c
      + private chunk "dhEs": version 2, T rows (>BI), deflate of [e >> 8 ; e & 255]

Almost every z is below 5 (float16 rounding noise of a smooth map), so a byte holds three vertically adjacent
residuals and deflate's Huffman codes see their joint statistics: 1.6 bits per pixel instead of 1.8 for a byte per
plane. The file is still a valid PNG (``map.f16.png``; viewers show the packed bytes and skip the private chunk).

Decoding unpacks the digits, adds the escaped values back in order, and inverts each line:
``s = (z >> 1) ^ -(z & 1)``, ``b = cumsum_rows(cumsum_cols(s)) mod 2^16``. Maps stored in the first form (version 1:
no "dhEs" chunk, a 2T x T PNG of the high byte plane of z above its low byte plane, deflate RLE) still decode.
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

from .decode import DecodeLimits, decode_image
from .postprocess import analyse_map, overlay_bgr, render_artefacts

MAP_DTYPE = np.float16
MAP_ZLIB_LEVEL = 3  # of the packed digits: 6 saves 1 % for 2.5x the time (672 x 672: ~4 ms at 3)
MAP_ESCAPE = 5  # digits 0..4 are z itself, 5 says "z - 5 is the next escaped value"
MAP_CHUNK = b"dhEs"  # private ancillary chunk: version, map rows, deflated escaped values
THUMB_SIZE = 192  # long side of a console thumbnail, pixels
THUMB_QUALITY = 80

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _deflate(data: bytes, level: int, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> bytes:
    packer = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
    return packer.compress(data) + packer.flush()


def _grey_png(rows: np.ndarray, level: int, strategy: int, extra: bytes = b"") -> bytes:
    """An 8-bit greyscale PNG of ``rows`` (H, W) uint8, every row with filter type 0 (None); ``extra`` chunks
    (already framed) go before the image data."""
    h, w = rows.shape
    raw = np.zeros((h, w + 1), np.uint8)  # column 0: the filter type byte of each row
    raw[:, 1:] = rows
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8 bits, grey, deflate, adaptive filters, no interlace
    idat = _deflate(raw.tobytes(), level, strategy)
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _zigzag_residuals(score_map: np.ndarray) -> np.ndarray:
    """(T, T) uint16 z of the module docstring; the arithmetic runs in int16, whose wrap-around is the mod 2^16."""
    bits = np.ascontiguousarray(score_map, dtype=MAP_DTYPE).view(np.int16)
    s = np.diff(np.diff(bits, axis=0, prepend=np.int16(0)), axis=1, prepend=np.int16(0))
    return ((s << 1) ^ (s >> 15)).view(np.uint16)


def _map_from_residuals(z: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_zigzag_residuals`: z (T, T) int32 -> (T, T) float16."""
    s = (z >> 1) ^ -(z & 1)
    return (np.cumsum(np.cumsum(s, axis=0), axis=1) & 0xFFFF).astype(np.uint16).view(MAP_DTYPE)


def encode_map(score_map: np.ndarray) -> bytes:
    """A (T, T) map as the PNG of the module docstring (version 2); exact for float16 (a float32 map is rounded to it
    first)."""
    z = _zigzag_residuals(score_map)
    rows = z.shape[0]
    digits = np.zeros((-(-rows // 3) * 3, z.shape[1]), np.uint8)
    digits[:rows] = np.minimum(z, MAP_ESCAPE)
    triples = digits.reshape(-1, 3, z.shape[1])
    packed = triples[:, 0] * np.uint8(36) + triples[:, 1] * np.uint8(6) + triples[:, 2]
    escaped = z[z >= MAP_ESCAPE] - np.uint16(MAP_ESCAPE)
    tail = struct.pack(">BI", 2, rows) + _deflate(np.concatenate([escaped >> 8, escaped]).astype(np.uint8).tobytes(), 6)
    return _grey_png(packed, MAP_ZLIB_LEVEL, zlib.Z_DEFAULT_STRATEGY, _chunk(MAP_CHUNK, tail))


def encode_map_v1(score_map: np.ndarray) -> bytes:
    """The first stored form (version 1 of the module docstring), kept for benchmarks and for tests that write
    records of that layout."""
    z = _zigzag_residuals(score_map)
    return _grey_png(np.concatenate([(z >> 8).astype(np.uint8), z.astype(np.uint8)]), 6, zlib.Z_RLE)


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


def _decode_v2(chunks: dict[bytes, bytes]) -> np.ndarray:
    width, height, depth, colour = struct.unpack_from(">IIBB", chunks[b"IHDR"])
    version, rows = struct.unpack_from(">BI", chunks[MAP_CHUNK])
    try:
        raw = np.frombuffer(zlib.decompress(chunks.get(b"IDAT", b"")), np.uint8)
        escaped = np.frombuffer(zlib.decompress(chunks[MAP_CHUNK][5:]), np.uint8).astype(np.int32)
    except zlib.error as exc:
        raise ValueError(f"stored map is not an 8-bit grey PNG (deflate: {exc})") from None
    if (version, depth, colour) != (2, 8, 0) or raw.size != height * (width + 1) or height != -(-rows // 3):
        raise ValueError(f"stored map: version {version}, {width} x {height} {depth}-bit does not hold {rows} rows")
    raw = raw.reshape(height, width + 1)
    packed = raw[:, 1:]
    if raw[:, 0].any() or packed.max(initial=0) >= 216:
        raise ValueError("stored map: packed digits out of range")
    digits = np.stack([packed // 36, packed // 6 % 6, packed % 6], axis=1).reshape(-1, width)[:rows]
    z = digits.astype(np.int32)
    escape = digits == MAP_ESCAPE
    if 2 * escape.sum() != escaped.size:
        raise ValueError(f"stored map: {escape.sum()} escapes but {escaped.size} bytes of escaped values")
    z[escape] += (escaped[: escaped.size // 2] << 8) | escaped[escaped.size // 2 :]
    return _map_from_residuals(z)


def decode_map(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_map` and :func:`encode_map_v1`: (T, T) float16; ValueError for bytes that are not a
    stored map."""
    chunks = _png_chunks(data)
    if MAP_CHUNK in chunks:
        return _decode_v2(chunks)
    planes = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if planes is None or planes.dtype != np.uint8 or planes.ndim != 2 or planes.shape[0] % 2:
        raise ValueError("stored map is not an 8-bit grey PNG of 2T x T bytes")
    half = planes.shape[0] // 2
    return _map_from_residuals((planes[:half].astype(np.int32) << 8) | planes[half:])


def stored_analysis(map_png: bytes, width: int, height: int, pixel_threshold: float):
    """The :class:`~service.engine.postprocess.MapAnalysis` of a stored map at the original size."""
    return analyse_map(decode_map(map_png), width, height, pixel_threshold)


def decode_original(original: bytes, width: int, height: int, name: str = "original") -> np.ndarray:
    """(H, W, 3) uint8 RGB of a stored upload, decoded as it was at upload: its recorded size is the only one
    admitted, and a JPEG accepted without its end marker (``DHR_ACCEPT_TRUNCATED``) decodes the same way again."""
    limits = DecodeLimits(width * height, max(width, height), max(width, height) / min(width, height), True)
    decoded = decode_image(original, name, limits)
    if (decoded.width, decoded.height) != (width, height):
        raise ValueError(f"{name}: stored original is {decoded.width}x{decoded.height}, recorded {width}x{height}")
    return decoded.rgb()


def render_stored(
    map_png: bytes,
    original: bytes | None,
    width: int,
    height: int,
    pixel_threshold: float,
    kinds: list[str],
    anchor: tuple[float, float] | None = None,
    name: str = "original",
) -> dict[str, bytes]:
    """PNGs of ``kinds`` for a stored inspection; ``original`` is decoded only for "overlay"."""
    analysis = stored_analysis(map_png, width, height, pixel_threshold)
    rgb = None
    if "overlay" in kinds:
        if original is None:
            raise ValueError(f"{name}: the original image is not stored, so no overlay can be rendered")
        rgb = decode_original(original, width, height, name)
    return render_artefacts(analysis, rgb, kinds, anchor=anchor)


def thumbnail_jpeg(bgr: np.ndarray, size: int = THUMB_SIZE) -> bytes:
    """JPEG of a (H, W, 3) uint8 BGR picture scaled (area average, aspect kept) to a long side of at most ``size``."""
    h, w = bgr.shape[:2]
    scale = min(1.0, size / max(h, w))
    if scale < 1.0:
        bgr = cv2.resize(bgr, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, THUMB_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for a thumbnail of shape {bgr.shape}")
    return buf.tobytes()


def stored_thumbnail(
    map_png: bytes | None,
    picture: bytes,
    width: int,
    height: int,
    pixel_threshold: float,
    anchor: tuple[float, float] | None = None,
    name: str = "original",
) -> bytes:
    """The console thumbnail: the overlay (part with its regions outlined) scaled down, as JPEG.

    With ``map_png`` the overlay is made in memory from the map and the original ``picture`` (no overlay PNG is
    encoded or stored); without, ``picture`` is a stored overlay PNG (inspections kept in the first layout).
    """
    if map_png is None:
        bgr = cv2.imdecode(np.frombuffer(picture, np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"{name}: the stored overlay is not a readable PNG")
        return thumbnail_jpeg(bgr)
    analysis = stored_analysis(map_png, width, height, pixel_threshold)
    return thumbnail_jpeg(overlay_bgr(analysis, decode_original(picture, width, height, name), anchor))
