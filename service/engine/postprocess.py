"""Turn a model anomaly map into what an operator sees: heatmap, binary mask, overlay and defect regions.

The model scores an image squashed to a T x T square (aspect ratio not kept) and returns a service anomaly map
``score_map`` of shape (T, T), float32, values in [0, 1]. The values are probabilities on an absolute scale, never
min-max normalised per image, so a good part stays blue in the heatmap and a threshold means the same on every image.

Pipeline for one image of size (H, W)::

    map_full = bilinear_resize(score_map, W, H)          # (H, W) float32, undoes the square squash
    mask     = map_full >= pixel_threshold                # (H, W) bool
    regions  = 8-connected components of mask with area >= min_region_area
    mask     = union of the kept regions                  # small specks are removed from the mask as well
    heat     = JET(round(255 * clip(map_full, 0, 1)))     # (H, W, 3) uint8 RGB, fixed scale 0..1
    overlay  = (1 - alpha) * image + alpha * heat, with the region outlines drawn on top

All PNGs are produced at the original image size. No torch and no HTTP here: numpy and OpenCV only.

Memory: every buffer above is (H, W) or (H, W, 3), at most 4 bytes per channel, so one call holds about
``18 * H * W`` bytes at its peak (map, labels, mask, heat, overlay, image); ``max_pixels`` refuses a larger image
before any of them is made. ``checkpoint`` (optional) is called between the steps so that the caller can stop
work nobody waits for any more (it raises).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from service.inspection import ARTEFACT_KINDS

from .regions import Region, components, outer_contours, regions_from

OUTLINE_RGB = (255, 255, 255)
OUTLINE_THICKNESS = 2
PNG_COMPRESSION = 1  # zlib level: 1 is several times faster than the default 3 for a few % larger files


@dataclass(frozen=True)
class PostResult:
    """Everything derived from one anomaly map. A PNG field is None when its kind was not in ``include``.

    ``defect_area_ratio`` is the fraction of image pixels in the final mask (after ``min_region_area``);
    ``map_max`` is the maximum of the resized (H, W) map, the one the mask is thresholded on, so
    ``map_max >= pixel_threshold`` exactly when the unfiltered mask is non-empty.
    """

    heatmap_png: bytes | None
    mask_png: bytes | None
    overlay_png: bytes | None
    regions: list[Region]
    defect_area_ratio: float
    map_max: float

    def png(self, kind: str) -> bytes | None:
        """The PNG of an artefact kind (``heatmap_png`` etc.)."""
        if kind not in ARTEFACT_KINDS:
            raise ValueError(f"unknown artefact kind {kind!r}; choose from {', '.join(ARTEFACT_KINDS)}")
        return getattr(self, f"{kind}_png")


def _check_map(score_map: np.ndarray, name: str = "score_map") -> np.ndarray:
    arr = np.asarray(score_map)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.ascontiguousarray(arr)


def _check_image(image_rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(image_rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"image_rgb must have shape (H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"image_rgb must be uint8, got {arr.dtype}")
    return np.ascontiguousarray(arr)


def resize_map(score_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of a (T, T) map back to the original (height, width); returns (H, W) float32.

    OpenCV samples pixel centres: ``dst(x) = src((x + 0.5) * T / W - 0.5)`` with edge replication, so a
    constant map stays constant and values never leave the input range.
    """
    src = _check_map(score_map)
    if int(width) < 1 or int(height) < 1:
        raise ValueError(f"target size must be at least 1x1, got width={width} height={height}")
    return cv2.resize(src, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)


def anchored(values: np.ndarray, anchor: tuple[float, float] | None) -> np.ndarray:
    """Display scale of a calibrated product: piecewise linear through (0, 0), (good, 1/8), (pixel, 1/2), (1, 1).

    ``anchor = (good level, pixel threshold)`` from the calibration: the usual level of good pixels renders cold
    (dark blue), the pixel threshold mid-scale (green), so the colours mean the same on every calibrated product.
    None, or levels not ordered 0 < good < pixel < 1: the values unchanged (fixed scale 0..1).
    """
    if anchor is None or not 0.0 < anchor[0] < anchor[1] < 1.0:
        return values
    return np.interp(values, [0.0, anchor[0], anchor[1], 1.0], [0.0, 0.125, 0.5, 1.0]).astype(np.float32)


def colorize(map_full: np.ndarray, anchor: tuple[float, float] | None = None) -> np.ndarray:
    """JET colours of a map on the fixed scale 0..1 (or :func:`anchored`): (H, W) float -> (H, W, 3) uint8 RGB.

    ``level = round(255 * clip(v, 0, 1))``; 0 is dark blue (0, 0, 128), 1 is dark red (128, 0, 0).
    """
    return cv2.cvtColor(_heat_bgr(map_full, anchor), cv2.COLOR_BGR2RGB)


def overlay(
    image_rgb: np.ndarray, heat_rgb: np.ndarray, alpha: float = 0.5, mask: np.ndarray | None = None
) -> np.ndarray:
    """Blend ``out = (1 - alpha) * image + alpha * heat`` (rounded) and outline the mask regions.

    image_rgb, heat_rgb: (H, W, 3) uint8; mask: optional (H, W) bool whose outer contours are drawn in
    white, 2 px wide, so the operator sees where the defect is. Returns (H, W, 3) uint8 RGB.
    """
    image = _check_image(image_rgb)
    heat = _check_image(heat_rgb)
    if heat.shape != image.shape:
        raise ValueError(f"heat_rgb shape {heat.shape} differs from image_rgb shape {image.shape}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = cv2.addWeighted(image, 1.0 - float(alpha), heat, float(alpha), 0.0)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != image.shape[:2]:
            raise ValueError(f"mask shape {m.shape} differs from image size {image.shape[:2]}")
        contours = outer_contours(m)
        if contours:
            cv2.drawContours(out, contours, -1, OUTLINE_RGB, OUTLINE_THICKNESS, lineType=cv2.LINE_8)
    return out


def find_regions(map_full: np.ndarray, mask: np.ndarray, min_area_px: int = 0) -> list[Region]:
    """Connected defect regions of ``mask`` (8-connectivity), sorted by ``max_score`` descending.

    map_full: (H, W) float scores; mask: (H, W) bool. Components with fewer than ``min_area_px`` pixels are
    dropped (default 0 keeps every component, even a single pixel).
    """
    scores = _check_map(map_full, "map_full")
    m = np.asarray(mask)
    if m.shape != scores.shape:
        raise ValueError(f"mask shape {m.shape} differs from map shape {scores.shape}")
    labels, stats, kept = components(m, int(min_area_px))
    return regions_from(scores, labels, stats, kept)


def _encode(arr: np.ndarray) -> bytes:
    """PNG bytes of a (H, W) grey or (H, W, 3) BGR uint8 array (OpenCV's channel order: no conversion)."""
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an image of shape {arr.shape}")
    return buf.tobytes()


@dataclass(frozen=True)
class MapAnalysis:
    """What an answer needs from one anomaly map, at the original size (H, W); no PNG is made here.

    ``map_full`` (H, W) float32 resized map; ``mask`` (H, W) bool after ``min_region_area``; ``regions``,
    ``defect_area_ratio`` and ``map_max`` as in :class:`PostResult`.
    """

    map_full: np.ndarray
    mask: np.ndarray
    regions: list[Region]
    defect_area_ratio: float
    map_max: float


def _mask_and_regions(map_full: np.ndarray, above: np.ndarray, min_area_px: int) -> tuple[np.ndarray, list[Region]]:
    """The final mask (components below ``min_area_px`` removed) and the regions of ``above`` (H, W) bool.

    Components are labelled inside the bounding window of ``above`` only (every True pixel lies in it, so they are
    the components of the whole mask); the cost follows the defect's size, not the image's.
    """
    rows = np.flatnonzero(above.any(axis=1))
    if rows.size == 0:
        return above, []
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(above[y0:y1].any(axis=0))
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    labels, stats, kept = components(above[y0:y1, x0:x1], min_area_px)
    regions = regions_from(map_full[y0:y1, x0:x1], labels, stats, kept, (x0, y0), above.size)
    if len(kept) == stats.shape[0] - 1:
        return above, regions  # every component kept
    keep_lut = np.zeros(stats.shape[0], dtype=bool)
    keep_lut[kept] = True
    mask = np.zeros_like(above)
    mask[y0:y1, x0:x1] = keep_lut[labels]
    return mask, regions


def analyse_map(
    score_map: np.ndarray,
    width: int,
    height: int,
    pixel_threshold: float = 0.5,
    min_region_area: int = 0,
    max_pixels: int | None = None,
    checkpoint: Callable[[], None] | None = None,
) -> MapAnalysis:
    """Resize a (T, T) map in [0, 1] to (height, width), threshold it and find the regions (pipeline lines 1-4).

    ``checkpoint`` (optional) is called between the steps; it raises to stop abandoned work.
    """
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(f"image of {width}x{height} pixels is over the limit of {max_pixels}")
    src = _check_map(score_map)
    if src.min() < -1e-6 or src.max() > 1.0 + 1e-6:
        raise ValueError(f"score_map must lie in [0, 1], got range [{src.min():.4g}, {src.max():.4g}]")
    if not np.isfinite(pixel_threshold):
        raise ValueError(f"pixel_threshold must be finite, got {pixel_threshold}")
    step = checkpoint if checkpoint is not None else (lambda: None)
    map_full = resize_map(src, width, height)  # (H, W) float32
    step()
    mask, regions = _mask_and_regions(map_full, map_full >= float(pixel_threshold), int(min_region_area))
    step()
    return MapAnalysis(
        map_full=map_full,
        mask=mask,
        regions=regions,
        defect_area_ratio=float(np.count_nonzero(mask)) / float(height * width),
        map_max=float(map_full.max()),
    )


def _heat_bgr(map_full: np.ndarray, anchor: tuple[float, float] | None) -> np.ndarray:
    """:func:`colorize` in OpenCV's BGR order (no conversion): (H, W) float -> (H, W, 3) uint8 BGR."""
    levels = np.rint(np.clip(anchored(_check_map(map_full, "map"), anchor), 0.0, 1.0) * 255.0).astype(np.uint8)
    return cv2.applyColorMap(levels, cv2.COLORMAP_JET)


def overlay_bgr(
    analysis: MapAnalysis,
    image_rgb: np.ndarray,
    anchor: tuple[float, float] | None = None,
    alpha: float = 0.5,
    heat_bgr: np.ndarray | None = None,
) -> np.ndarray:
    """The overlay of pipeline line 6 as (H, W, 3) uint8 BGR: the one RGB -> BGR conversion of the image.

    Blending and white outlines act on each channel alike, so the pixels are those of :func:`overlay` in BGR order.
    """
    image = _check_image(image_rgb)
    if image.shape[:2] != analysis.mask.shape:
        raise ValueError(f"image size {image.shape[:2]} differs from the map's {analysis.mask.shape}")
    heat = _heat_bgr(analysis.map_full, anchor) if heat_bgr is None else heat_bgr
    return overlay(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), heat, alpha, analysis.mask)


def render_artefacts(
    analysis: MapAnalysis,
    image_rgb: np.ndarray | None,
    include: Iterable[str] = ARTEFACT_KINDS,
    alpha: float = 0.5,
    checkpoint: Callable[[], None] | None = None,
    anchor: tuple[float, float] | None = None,
) -> dict[str, bytes]:
    """``{kind: PNG bytes}`` of the asked-for kinds (pipeline lines 5-6); ``image_rgb`` (H, W, 3) uint8 is needed
    for "overlay" only. ``anchor``: the colour scale of a calibrated product (:func:`anchored`).

    Colours are converted once: the JET heat stays in BGR and the image is turned to BGR once, so the encoder needs
    no further conversion (the PNG pixels are the RGB values of the module's pipeline).
    """
    kinds = list(dict.fromkeys(include))
    unknown = set(kinds) - set(ARTEFACT_KINDS)
    if unknown:
        raise ValueError(f"unknown artefact kinds {sorted(unknown)}; expected a subset of {list(ARTEFACT_KINDS)}")
    if "overlay" in kinds:
        _check_image(image_rgb)
    step = checkpoint if checkpoint is not None else (lambda: None)
    heat = _heat_bgr(analysis.map_full, anchor) if {"heatmap", "overlay"} & set(kinds) else None
    out: dict[str, bytes] = {}
    for kind in ARTEFACT_KINDS:
        if kind in kinds:
            step()
            if kind == "heatmap":
                out[kind] = _encode(heat)
            elif kind == "mask":
                out[kind] = _encode(analysis.mask.astype(np.uint8) * 255)
            else:
                out[kind] = _encode(overlay_bgr(analysis, image_rgb, anchor, alpha, heat))
    return out


def postprocess(
    score_map: np.ndarray,
    image_rgb: np.ndarray,
    pixel_threshold: float = 0.5,
    min_region_area: int = 0,
    include: Iterable[str] = ARTEFACT_KINDS,
    alpha: float = 0.5,
    max_pixels: int | None = None,
    checkpoint: Callable[[], None] | None = None,
    anchor: tuple[float, float] | None = None,
) -> PostResult:
    """Build the operator artefacts of one image from its (T, T) anomaly map: :func:`analyse_map`, then
    :func:`render_artefacts`.

    score_map: (T, T) float in [0, 1]; image_rgb: (H, W, 3) uint8 original image. The mask PNG is 8-bit L with
    values {0, 255}; heatmap and overlay PNGs are RGB; all are H x W. ``include`` picks which PNGs to encode
    (any of :data:`~service.inspection.ARTEFACT_KINDS`); regions and ratios are always computed. ``anchor``: the
    colour scale of a calibrated product (:func:`anchored`).
    """
    image = _check_image(image_rgb)
    height, width = image.shape[:2]
    analysis = analyse_map(score_map, width, height, pixel_threshold, min_region_area, max_pixels, checkpoint)
    png = render_artefacts(analysis, image, include, alpha, checkpoint, anchor)
    return PostResult(
        heatmap_png=png.get("heatmap"),
        mask_png=png.get("mask"),
        overlay_png=png.get("overlay"),
        regions=analysis.regions,
        defect_area_ratio=analysis.defect_area_ratio,
        map_max=analysis.map_max,
    )
