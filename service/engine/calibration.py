"""Calibration from good parts: thresholds with a known false-reject rate, escape rate, histograms, a version.

Pure functions on score lists and maps (numpy); nothing here runs the model or knows HTTP.

Rule (the lowest threshold that rejects at most a fraction ``f`` of the good sample): with the good scores sorted
ascending ``s_1 <= ... <= s_n`` and ``r = floor(f * n)`` images allowed to be rejected, the threshold is the next
float above ``s_(n - r)``; ``score >= threshold`` rejects, so exactly the images strictly above ``s_(n - r)`` are
rejected (at most ``r``; fewer when scores tie). A sample supports ``f`` only when ``r >= 1``, i.e.
``n >= ceil(1 / f)`` good images: 1 % needs 100, 5 % needs 20; a smaller sample is refused (:class:`SampleTooSmall`)
instead of reporting an FRR it cannot measure.

Verdict zones: ``ok`` < ``review`` (review threshold) <= ``review`` < ``reject`` (reject threshold) <= ``defect``;
``review_frr`` >= ``target_frr`` sets the review threshold by the same rule (more good parts reach review than are
rejected), none keeps it equal to the reject threshold (two verdicts).

The pixel threshold is the same rule on the pooled pixels of the good maps with ``f = 1 - pixel_quantile``: at most
that fraction of good pixels lies at or above it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

HISTOGRAM_BINS = 40
DEFAULT_TARGET_FRR = 0.01
DEFAULT_PIXEL_QUANTILE = 0.999
MAX_FRR = 0.5


class SampleTooSmall(ValueError):
    """The good sample cannot support the requested false-reject rate."""


def min_sample(rate: float) -> int:
    """Good images needed to measure a false-reject rate ``rate``: ceil(1 / rate) (one image may be rejected)."""
    return math.ceil(1.0 / rate - 1e-9)


def lowest_threshold(good: np.ndarray, rate: float, what: str = "good images") -> float:
    """The lowest threshold with ``mean(good >= t) <= rate``, from a sample supporting ``rate`` (module doc).

    good: (n,) finite scores; rate in (0, 1). The next float is taken in the dtype of ``good`` (float32 maps are
    compared in float32). Raises SampleTooSmall when ``floor(rate * n) < 1``.
    """
    s = np.asarray(good).ravel()
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    n = s.size
    r = math.floor(rate * n + 1e-9)
    if r < 1:
        raise SampleTooSmall(
            f"{n} {what} cannot support a false-reject rate of {rate:g}: at least {min_sample(rate)} are needed"
        )
    kth = np.partition(s, n - r - 1)[n - r - 1]
    return float(np.nextafter(kth, s.dtype.type(np.inf)))


def fraction_at_or_above(scores: np.ndarray, threshold: float) -> float:
    """mean(scores >= threshold); 0 for an empty list."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    return float((s >= threshold).mean()) if s.size else 0.0


def histogram(scores: np.ndarray, edges: np.ndarray) -> list[int]:
    """Counts of ``scores`` in the bins of ``edges`` (the last bin closed on the right)."""
    return np.histogram(np.asarray(scores, dtype=np.float64), bins=edges)[0].astype(int).tolist()


@dataclass(frozen=True)
class Calibration:
    """A product's calibration. ``version`` is a hash of every other field (16 hex digits)."""

    image_score: str  # the image-score variant the thresholds belong to
    target_frr: float
    review_frr: float | None
    review_threshold: float
    reject_threshold: float
    pixel_threshold: float
    pixel_quantile: float
    pixel_good_level: float  # median pixel of the good maps (the heatmap renders it cold)
    n_good: int
    n_defect: int
    good_frr: float  # fraction of the good sample rejected at reject_threshold (<= target_frr)
    escape_rate: float | None  # fraction of the defect sample below reject_threshold; None without defects
    histogram_edges: list[float]
    good_histogram: list[int]
    defect_histogram: list[int]
    source: str  # "good_images" or "references_leave_one_out"
    version: str = field(default="")

    def __post_init__(self):
        if not self.version:
            object.__setattr__(self, "version", content_version({**asdict(self), "version": ""}))

    def to_dict(self) -> dict:
        return asdict(self)


def content_version(content: dict) -> str:
    """sha256 of the canonical JSON of ``content`` (sorted keys), first 16 hex digits."""
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_rates(target_frr: float, review_frr: float | None, pixel_quantile: float) -> None:
    """Raise ValueError naming the first rate out of range or out of order."""
    if not 0.0 < target_frr < MAX_FRR:
        raise ValueError(f"target_frr must be in (0, {MAX_FRR}), got {target_frr!r}")
    if review_frr is not None and not target_frr <= review_frr < MAX_FRR:
        raise ValueError(
            f"review_frr must be in [target_frr, {MAX_FRR}) = [{target_frr:g}, {MAX_FRR}), got {review_frr!r}"
        )
    if not 0.5 <= pixel_quantile < 1.0:
        raise ValueError(f"pixel_quantile must be in [0.5, 1), got {pixel_quantile!r}")


def calibrate(
    good_scores: np.ndarray,
    good_maps: list[np.ndarray],
    image_score: str,
    *,
    defect_scores: np.ndarray | None = None,
    target_frr: float = DEFAULT_TARGET_FRR,
    review_frr: float | None = None,
    pixel_quantile: float = DEFAULT_PIXEL_QUANTILE,
    source: str = "good_images",
) -> Calibration:
    """Thresholds, rates and histograms from good (and optionally defect) image scores and good anomaly maps.

    good_scores (n,), defect_scores (m,) or None; good_maps: n maps (any shape) in [0, 1].
    Raises ValueError for rates out of range or an empty sample, SampleTooSmall for a sample too small.
    """
    check_rates(target_frr, review_frr, pixel_quantile)
    good = np.asarray(good_scores, dtype=np.float64).ravel()
    defect = np.asarray([] if defect_scores is None else defect_scores, dtype=np.float64).ravel()
    if good.size == 0:
        raise ValueError("the calibration set has no good images")
    if not (np.isfinite(good).all() and np.isfinite(defect).all()):
        raise ValueError("calibration scores must be finite")
    reject = lowest_threshold(good, target_frr)
    review = reject if review_frr is None else min(reject, lowest_threshold(good, review_frr))
    pixels = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in good_maps])
    pixel = min(1.0, lowest_threshold(pixels, 1.0 - pixel_quantile, "good pixels"))
    everything = np.concatenate([good, defect])
    edges = np.linspace(min(0.0, everything.min()), max(1.0, everything.max()), HISTOGRAM_BINS + 1)
    return Calibration(
        image_score=image_score,
        target_frr=float(target_frr),
        review_frr=None if review_frr is None else float(review_frr),
        review_threshold=review,
        reject_threshold=reject,
        pixel_threshold=pixel,
        pixel_quantile=float(pixel_quantile),
        pixel_good_level=float(np.median(pixels)),
        n_good=int(good.size),
        n_defect=int(defect.size),
        good_frr=fraction_at_or_above(good, reject),
        escape_rate=1.0 - fraction_at_or_above(defect, reject) if defect.size else None,
        histogram_edges=edges.tolist(),
        good_histogram=histogram(good, edges),
        defect_histogram=histogram(defect, edges),
        source=source,
    )
