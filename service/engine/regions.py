"""Defect regions of a binary mask: 8-connected components, their boxes, scores and simplified outlines.

A region is reported in original image pixels: ``bbox`` (x, y, w, h), ``area`` in pixels, ``area_ratio`` of the
image, the maximum and mean of the resized map over its pixels, and its outer contour simplified by Douglas-Peucker
to at most :data:`MAX_POLYGON_POINTS` points. No torch and no HTTP here: numpy and OpenCV only.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

MAX_POLYGON_POINTS = 64


@dataclass(frozen=True)
class Region:
    """One connected defect region, in original image pixels.

    ``bbox`` is (x, y, w, h) of the component; ``area`` its pixel count; ``area_ratio = area / (H * W)``;
    ``max_score`` / ``mean_score`` are taken over the component pixels of the resized map; ``polygon`` is the
    simplified outer contour as (x, y) pixel coordinates lying inside the bbox.
    """

    bbox: tuple[int, int, int, int]
    area: int
    area_ratio: float
    max_score: float
    mean_score: float
    polygon: list[tuple[int, int]]

    def to_dict(self) -> dict:
        """JSON-ready form: tuples become lists."""
        return {
            "bbox": list(self.bbox),
            "area": self.area,
            "area_ratio": self.area_ratio,
            "max_score": self.max_score,
            "mean_score": self.mean_score,
            "polygon": [list(p) for p in self.polygon],
        }


def outer_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Outer contours of a (H, W) bool/uint8 mask, each (N, 1, 2) int32 of (x, y) pixel coordinates."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return list(contours)


def components(mask: np.ndarray, min_area_px: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """8-connected labelling: returns labels (H, W) int32, stats (K+1, 5) and the kept labels (area >= min)."""
    if min_area_px < 0:
        raise ValueError(f"min_area_px must be >= 0, got {min_area_px}")
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    kept = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area_px]
    return labels, stats, kept


def _polygon(component: np.ndarray, x0: int, y0: int) -> list[tuple[int, int]]:
    """Simplified outer contour of a cropped component mask, shifted by (x0, y0) to image coordinates.

    Douglas-Peucker with ``eps = max(1 px, 0.5% of the perimeter)``, doubled until at most 64 points remain.
    """
    contours = outer_contours(component)
    contour = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))  # one outer contour per 8-component
    eps = max(1.0, 0.005 * cv2.arcLength(contour, True))
    poly = cv2.approxPolyDP(contour, eps, True)
    while len(poly) > MAX_POLYGON_POINTS:
        eps *= 2.0
        poly = cv2.approxPolyDP(contour, eps, True)
    return [(int(p[0][0]) + x0, int(p[0][1]) + y0) for p in poly]


def regions_from(
    map_full: np.ndarray,
    labels: np.ndarray,
    stats: np.ndarray,
    kept: list[int],
    origin: tuple[int, int] = (0, 0),
    total: int | None = None,
) -> list[Region]:
    """Regions of the kept labels; ``map_full`` and ``labels`` may be a window at ``origin`` (x, y) of an image of
    ``total`` pixels (default: the window is the image)."""
    total = float(total if total is not None else map_full.shape[0] * map_full.shape[1])
    ox, oy = origin
    regions = []
    for i in kept:
        x, y, w, h, area = (int(v) for v in stats[i, :5])
        comp = labels[y : y + h, x : x + w] == i  # (h, w) bool, crop keeps the cost O(bbox) per component
        scores = map_full[y : y + h, x : x + w][comp]
        regions.append(
            Region(
                bbox=(x + ox, y + oy, w, h),
                area=area,
                area_ratio=area / total,
                max_score=float(scores.max()),
                mean_score=float(scores.mean(dtype=np.float64)),
                polygon=_polygon(comp, x + ox, y + oy),
            )
        )
    regions.sort(key=lambda r: (-r.max_score, -r.area, r.bbox[1], r.bbox[0]))
    return regions
