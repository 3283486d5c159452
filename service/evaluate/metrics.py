"""Segmentation and image-level metrics of the DHR-CLIP evaluation protocol (spec B §6), computed per class.

Pixel metrics pool every pixel of every image of a class: ``masks`` bool ``(N, H, W)`` (ground truth) against
``maps`` float ``(N, H, W)`` (anomaly scores). Image metrics take ``labels`` ``(N,)`` in {0, 1} and ``scores``
``(N,)``. A metric that needs both classes raises :class:`ValueError` when one is missing; :func:`compute_metrics`
reports such values as ``None`` instead of inventing a number.

AUROC and F1-max pool all pixels and equal scikit-learn's ``roc_auc_score`` and the maximum finite
``2PR / (P + R)`` of ``precision_recall_curve`` (what the reference computes), but are computed from the sorted
anomalous and normal scores alone, which is several times faster than scikit-learn on tens of millions of pixels:

    AUROC  = (#{(a, n) : s_a > s_n} + 1/2 #{(a, n) : s_a = s_n}) / (|A| |N|)          (Mann-Whitney form)
    F1-max = max_u 2 TP(u) / (TP(u) + FP(u) + |A|),  prediction s >= u,  u over the anomalous scores

(with ``P = TP / (TP + FP)``, ``R = TP / |A|``: ``2PR / (P + R) = 2 TP / (TP + FP + |A|)``; lowering ``u`` to a
normal score only adds false positives, so the maximum sits at an anomalous score; points with ``TP = 0`` have
``F1 = 0`` or are the NaN points the reference drops).

AUPRO (per-region overlap): thresholds ``t_k = np.arange(lo, hi, (hi - lo) / num_thresholds)`` with ``lo, hi`` the
min and max over all maps; prediction ``map > t_k``. For the GT regions ``r`` (8-connected components of every
mask, ``skimage.measure.label`` full connectivity) and the GT-normal pixels ``n``::

    PRO(t_k) = mean_r |{p in r : map_p > t_k}| / |r|        FPR(t_k) = |{p in n : map_p > t_k}| / |n|

Only points with ``FPR < fpr_limit`` count. Two ways to turn them into one number:

* ``"reference"`` (what DHR-CLIP / AnomalyCLIP / cflow-ad print): the kept FPRs are min-max rescaled to [0, 1]
  and ``sklearn.metrics.auc(FPR', PRO)`` is returned. Undefined (NaN) when the kept FPRs do not span a range,
  e.g. no kept point, or a binary map whose kept points all share one FPR; the reference divides by zero there.
* ``"standard"`` (the MVTec AD definition on this threshold grid): the curve starts at the highest-threshold
  point, runs through the kept points in order of rising FPR, and ends at ``FPR = fpr_limit`` with the PRO
  interpolated linearly between the last kept point and the next point of the curve (the next threshold, or the
  point ``(1, 1)`` where every pixel is positive). ``AUPRO = trapz(PRO, FPR) / fpr_limit``, in [0, 1]; the strip
  between FPR 0 and the first point counts as zero area. 0.0 when no threshold reaches ``FPR < fpr_limit``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.measure import label as label_regions
from sklearn.metrics import auc, average_precision_score, roc_auc_score

from .choices import DEFAULT_ESCAPE_RATE, IMAGE_KEYS

AUPRO_VARIANTS = ("standard", "reference")


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """ROC AUC of all pixels pooled, equal to ``roc_auc_score(masks.ravel(), maps.ravel())``."""
    masks, maps = _check_pixels(masks, maps)
    return _auroc_sorted(*_split_sorted(masks, maps))


def pixel_f1_max(masks: np.ndarray, maps: np.ndarray) -> float:
    """Maximum F1 over all thresholds, all pixels pooled."""
    masks, maps = _check_pixels(masks, maps)
    return _f1_max_sorted(*_split_sorted(masks, maps))


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of image scores against image labels (0 good, 1 anomalous)."""
    labels, scores = _check_images(labels, scores)
    return float(roc_auc_score(labels, scores))


def image_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (``sklearn.metrics.average_precision_score``) of image scores."""
    labels, scores = _check_images(labels, scores)
    return float(average_precision_score(labels, scores))


def image_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Maximum F1 over all thresholds of the image scores."""
    labels, scores = _check_images(labels, scores)
    return _f1_max_sorted(*_split_sorted(labels == 1, scores))


def overkill_at_escape(labels: np.ndarray, scores: np.ndarray, escape_rate: float = DEFAULT_ESCAPE_RATE) -> float:
    """False-reject rate of good images at the highest threshold that lets at most ``escape_rate`` of the
    defective images escape.

    With the defect scores sorted ``d_1 <= ... <= d_m`` and ``r = floor(escape_rate * m)`` escapes allowed, the
    threshold is ``t = d_(r + 1)`` (``score >= t`` rejects, so at most r defects lie below it) and the result is
    ``mean(good >= t)``.
    """
    labels, scores = _check_images(labels, scores)
    if not 0.0 <= escape_rate < 1.0:
        raise ValueError(f"escape_rate must be in [0, 1), got {escape_rate}")
    defects = np.sort(scores[labels == 1])
    allowed = int(np.floor(escape_rate * defects.size + 1e-9))
    return float(np.mean(scores[labels == 0] >= defects[allowed]))


def image_metrics(labels: np.ndarray, scores: np.ndarray, escape_rate: float = DEFAULT_ESCAPE_RATE) -> dict:
    """``{key: value}`` of :data:`IMAGE_KEYS` for one image-score variant; all None unless both labels occur."""
    _check_images(labels, scores, require_both=False)
    if not np.isin([0, 1], labels).all():
        return dict.fromkeys(IMAGE_KEYS)
    return {
        "image_auroc": image_auroc(labels, scores),
        "image_ap": image_ap(labels, scores),
        "image_f1_max": image_f1_max(labels, scores),
        "overkill_at_escape": overkill_at_escape(labels, scores, escape_rate),
    }


def aupro(
    masks: np.ndarray,
    maps: np.ndarray,
    fpr_limit: float = 0.3,
    num_thresholds: int = 200,
    variant: str = "standard",
) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit`` (module docstring gives both variants).

    Returns NaN where the variant is undefined (reference variant with a degenerate FPR range; constant maps).
    Vectorised: every pixel is placed once into the sorted threshold grid, then per-region histograms and a
    reverse cumulative sum give the true-positive count of every region at every threshold.
    """
    if variant not in AUPRO_VARIANTS:  # checked before the (costly) curve
        raise ValueError(f"unknown AUPRO variant {variant!r}; expected one of {', '.join(AUPRO_VARIANTS)}")
    if num_thresholds < 1:
        raise ValueError(f"num_thresholds must be >= 1, got {num_thresholds}")
    fpr, pro = pro_curve(masks, maps, num_thresholds)
    return aupro_from_curve(fpr, pro, fpr_limit, variant)


def aupro_from_curve(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float = 0.3, variant: str = "standard") -> float:
    """AUPRO of a :func:`pro_curve` (``(K,)`` arrays, ascending thresholds); NaN where the variant is undefined."""
    if variant not in AUPRO_VARIANTS:
        raise ValueError(f"unknown AUPRO variant {variant!r}; expected one of {', '.join(AUPRO_VARIANTS)}")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if fpr.size == 0:
        return float("nan")
    keep = fpr < fpr_limit
    if variant == "reference":
        kept_fpr, kept_pro = fpr[keep], pro[keep]
        if kept_fpr.size < 2 or kept_fpr.max() == kept_fpr.min():
            return float("nan")
        scaled = (kept_fpr - kept_fpr.min()) / (kept_fpr.max() - kept_fpr.min())
        return float(auc(scaled, kept_pro))
    return _standard_area(fpr, pro, fpr_limit)


def pro_curve(
    masks: np.ndarray | Sequence[np.ndarray], maps: np.ndarray | Sequence[np.ndarray], num_thresholds: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """``(FPR, PRO)``, each ``(K,)``, at the reference thresholds ``t_k`` in ascending order (so FPR falls).

    ``masks``/``maps``: ``(N, H, W)`` arrays, or sequences of ``(H_i, W_i)`` arrays for images of different sizes
    (regions are per image, FPR is pooled over all images either way).

    ``K`` is the length of ``np.arange(lo, hi, (hi - lo) / num_thresholds)`` (200 or 201 by float rounding), 0
    for constant maps. Each pixel with value ``v`` is positive at exactly the thresholds ``t_k < v``, i.e. at
    ``k < c(v) = searchsorted(t, v)``; with ``hist[r, c]`` the number of pixels of region ``r`` with count ``c``,
    ``TP[r, k] = sum_{c > k} hist[r, c]``. Row 0 of the histogram (label 0) is the GT-normal pixels.
    """
    if isinstance(masks, np.ndarray) and isinstance(maps, np.ndarray):
        masks, maps = _check_pixels(masks, maps)
    lo, hi = min(m.min() for m in maps), max(m.max() for m in maps)  # numpy scalars of the maps' dtype
    if hi == lo:
        return np.zeros(0), np.zeros(0)
    thresholds = np.arange(lo, hi, (hi - lo) / num_thresholds)  # (K,), maps' dtype, as the reference builds it
    n_bins = thresholds.size + 1
    normal_hist = np.zeros(n_bins, dtype=np.int64)
    region_hists = []
    for mask, amap in zip(masks, maps, strict=True):
        regions, n_regions = label_regions(np.asarray(mask, dtype=bool), connectivity=2, return_num=True)  # (H, W)
        counts = np.searchsorted(thresholds, amap.ravel(), side="left")  # (H*W,) thresholds below each value
        hist = np.bincount(regions.ravel() * n_bins + counts, minlength=(n_regions + 1) * n_bins)
        hist = hist.reshape(n_regions + 1, n_bins)  # (1 + R_i, K + 1)
        normal_hist += hist[0]
        region_hists.append(hist[1:])
    hists = np.concatenate(region_hists)  # (R, K + 1)
    if hists.shape[0] == 0 or normal_hist.sum() == 0:
        raise ValueError("pro_curve needs both anomalous and normal pixels")
    above = np.cumsum(hists[:, ::-1], axis=1)[:, ::-1]  # above[r, j] = sum_{c >= j} hist[r, c]
    tp = above[:, 1:]  # (R, K): pixels of region r positive at threshold k
    pro = (tp / hists.sum(axis=1, keepdims=True)).mean(axis=0)
    fp = np.cumsum(normal_hist[::-1])[::-1][1:]  # (K,)
    return fp / normal_hist.sum(), pro


def compute_metrics(
    masks: np.ndarray,
    maps: np.ndarray,
    labels: np.ndarray,
    scores_by_variant: dict[str, np.ndarray],
    escape_rate: float = DEFAULT_ESCAPE_RATE,
) -> dict:
    """All metrics of one class.

    Returns ``{"pixel_auroc", "pixel_aupro" (standard), "pixel_aupro_ref" (reference), "pixel_f1_max",
    v: {"image_auroc", "image_ap", "image_f1_max", "overkill_at_escape"} for every image-score variant v}``.
    Pixel metrics are ``None`` when the masks hold only one class of pixel; image metrics are ``None`` when the
    labels hold only one class (e.g. a class with only anomalous images); an undefined AUPRO (NaN) is ``None``.
    """
    masks, maps = _check_pixels(masks, maps, require_both=False)
    labels = np.asarray(labels)
    if labels.shape != (masks.shape[0],):
        raise ValueError(f"labels must have shape ({masks.shape[0]},) like the masks, got {labels.shape}")
    result: dict = {"pixel_auroc": None, "pixel_aupro": None, "pixel_aupro_ref": None, "pixel_f1_max": None}
    if masks.any() and not masks.all():
        anomalous, normal = _split_sorted(masks, maps)
        result["pixel_auroc"] = _auroc_sorted(anomalous, normal)
        result["pixel_f1_max"] = _f1_max_sorted(anomalous, normal)
        fpr, pro = pro_curve(masks, maps)
        for key, variant in (("pixel_aupro", "standard"), ("pixel_aupro_ref", "reference")):
            value = aupro_from_curve(fpr, pro, variant=variant)
            result[key] = None if np.isnan(value) else value
    for name, scores in scores_by_variant.items():
        if name in result:
            raise ValueError(f"image-score variant name {name!r} clashes with a pixel metric key")
        result[name] = image_metrics(labels, scores, escape_rate)
    return result


def _standard_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Normalised trapezoid area of PRO over FPR in [first point, fpr_limit] (curve order: rising FPR)."""
    fpr = np.append(fpr[::-1], 1.0)  # highest threshold first, then the all-positive point (1, 1)
    pro = np.append(pro[::-1], 1.0)
    n_kept = int(np.count_nonzero(fpr < fpr_limit))  # a prefix, since FPR does not fall along the curve
    if n_kept == 0:
        return 0.0
    x0, x1, y0, y1 = fpr[n_kept - 1], fpr[n_kept], pro[n_kept - 1], pro[n_kept]
    end_pro = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)  # x1 >= fpr_limit > x0
    xs = np.append(fpr[:n_kept], fpr_limit)
    ys = np.append(pro[:n_kept], end_pro)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2) / fpr_limit)  # trapezoid rule


def _split_sorted(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted scores of the positive (anomalous) and of the negative (normal) elements, each 1-D."""
    return np.sort(scores[positive], axis=None), np.sort(scores[~positive], axis=None)


def _auroc_sorted(anomalous: np.ndarray, normal: np.ndarray) -> float:
    """Mann-Whitney AUROC of sorted 1-D score arrays (ties count one half)."""
    below = np.searchsorted(normal, anomalous, side="left")  # normal scores < each anomalous score
    not_above = np.searchsorted(normal, anomalous, side="right")  # normal scores <= each anomalous score
    twice_wins = 2 * int(below.sum()) + int((not_above - below).sum())
    return twice_wins / (2 * anomalous.size * normal.size)


def _f1_max_sorted(anomalous: np.ndarray, normal: np.ndarray) -> float:
    """max_u 2 TP / (TP + FP + |A|) over thresholds u = the distinct anomalous scores (prediction s >= u)."""
    first = np.flatnonzero(np.r_[True, anomalous[1:] != anomalous[:-1]])  # first index of each distinct value
    tp = anomalous.size - first  # anomalous scores >= u
    fp = normal.size - np.searchsorted(normal, anomalous[first], side="left")  # normal scores >= u
    return float(np.max(2 * tp / (tp + fp + anomalous.size)))


def _check_pixels(masks: np.ndarray, maps: np.ndarray, require_both: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """bool masks and float maps of the same ``(N, H, W)`` shape, finite; by default both pixel classes present."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks and maps must both be (N, H, W); got {masks.shape} and {maps.shape}")
    if masks.dtype != bool:
        if not np.isin(masks, (0, 1)).all():
            raise ValueError("masks must be boolean or hold only 0 and 1")
        masks = masks.astype(bool)
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    if not np.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values")
    if require_both and not masks.any():
        raise ValueError("masks have no anomalous pixel: pixel metrics are undefined (skip classes without defects)")
    if require_both and masks.all():
        raise ValueError("masks have no normal pixel: pixel metrics are undefined")
    return masks, maps


def _check_images(labels: np.ndarray, scores: np.ndarray, require_both: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` labels in {0, 1} and ``(N,)`` finite scores; by default both labels must occur."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must both be (N,); got {labels.shape} and {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("image labels must be 0 (good) or 1 (anomalous)")
    if not np.isfinite(scores).all():
        raise ValueError("image scores contain NaN or infinite values")
    if require_both and not np.isin([0, 1], labels).all():
        raise ValueError("image metrics need both good (0) and anomalous (1) images")
    return labels.astype(np.int64), scores
