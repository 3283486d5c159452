"""What an inspection keeps, and the pictures rendered from it later (on first request).

An inspection stores the uploaded bytes as they came (``original``, never re-encoded) and its (T, T) anomaly map as
float16 (``map``, in the lossless form of :mod:`service.engine.map_codec`): exactly the values its regions, mask and
ratios were computed from. Heatmap, mask and overlay PNGs and the console thumbnail are rendered from those two with
the functions of the request path (:func:`~service.engine.postprocess.analyse_map`,
:func:`~service.engine.postprocess.render_artefacts`), so a PNG rendered later is byte-identical to the one a request
could have asked for inline.
"""

from __future__ import annotations

import cv2
import numpy as np

from .decode import DecodeLimits, decode_image
from .map_codec import decode_map
from .postprocess import analyse_map, overlay_bgr, render_artefacts

THUMB_SIZE = 192  # long side of a console thumbnail, pixels
THUMB_QUALITY = 80


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
