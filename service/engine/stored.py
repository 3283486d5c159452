"""What an inspection keeps, and the pictures rendered from it later (on first request).

An inspection stores the uploaded bytes as they came (``original``, never re-encoded) and its (T, T) anomaly map as
float16 (``map``): exactly the values its regions, mask and ratios were computed from. Heatmap, mask and overlay PNGs
and the console thumbnail are rendered from those two with the functions of the request path
(:func:`~service.engine.postprocess.analyse_map`, :func:`~service.engine.postprocess.render_artefacts`), so a PNG
rendered later is byte-identical to the one a request could have asked for inline.

The map's stored form is lossless for float16 and small (a smooth map costs about 2 bits per pixel)::

    b = float16(map).view(uint16)                                   # (T, T) bit patterns, monotone in the value
    s[i, j] = b[i, j] - b[i-1, j] - b[i, j-1] + b[i-1, j-1]  (mod 2^16, b[-1, .] = b[., -1] = 0)
    z = (s << 1) ^ (s >> 15)                                         # zigzag: small |s| -> small z, int16 -> uint16
    PNG (8-bit grey, 2T x T, filter None, deflate RLE) of [z >> 8 ; z & 255]   # high bytes above low bytes

Decoding inverts each line: ``s = (z >> 1) ^ -(z & 1)``, ``b = cumsum_rows(cumsum_cols(s)) mod 2^16``.
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

from .decode import DecodeLimits, decode_image
from .postprocess import analyse_map, overlay_bgr, render_artefacts

MAP_DTYPE = np.float16
MAP_ZLIB_LEVEL = 6  # with the RLE strategy every level gives the same size; 6 is the fastest here
THUMB_SIZE = 192  # long side of a console thumbnail, pixels
THUMB_QUALITY = 80

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _grey_png(rows: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of ``rows`` (H, W) uint8, every row with filter type 0 (None), deflate RLE."""
    h, w = rows.shape
    raw = np.zeros((h, w + 1), np.uint8)  # column 0: the filter type byte of each row
    raw[:, 1:] = rows
    packer = zlib.compressobj(MAP_ZLIB_LEVEL, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = packer.compress(raw.tobytes()) + packer.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8 bits, grey, deflate, adaptive filters, no interlace
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def encode_map(score_map: np.ndarray) -> bytes:
    """A (T, T) map as the PNG of the module docstring; exact for float16 (a float32 map is rounded to it first).

    The arithmetic runs in int16, whose wrap-around is the mod 2^16 of the docstring.
    """
    bits = np.ascontiguousarray(score_map, dtype=MAP_DTYPE).view(np.int16)
    s = np.diff(np.diff(bits, axis=0, prepend=np.int16(0)), axis=1, prepend=np.int16(0))
    z = ((s << 1) ^ (s >> 15)).view(np.uint16)
    return _grey_png(np.concatenate([(z >> 8).astype(np.uint8), z.astype(np.uint8)]))


def decode_map(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_map`: (T, T) float16; ValueError for bytes that are not a stored map."""
    planes = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if planes is None or planes.dtype != np.uint8 or planes.ndim != 2 or planes.shape[0] % 2:
        raise ValueError("stored map is not an 8-bit grey PNG of 2T x T bytes")
    half = planes.shape[0] // 2
    z = (planes[:half].astype(np.int32) << 8) | planes[half:]
    s = (z >> 1) ^ -(z & 1)
    bits = (np.cumsum(np.cumsum(s, axis=0), axis=1) & 0xFFFF).astype(np.uint16)
    return bits.view(MAP_DTYPE)


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
