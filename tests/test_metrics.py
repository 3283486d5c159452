"""Evaluation metrics: scikit-learn parity, AUPRO against a brute-force loop implementation, hand-computed cases."""

import itertools
import math

import numpy as np
import pytest
from skimage import measure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from service.evaluate.metrics import (
    aupro,
    compute_metrics,
    image_ap,
    image_auroc,
    image_f1_max,
    pixel_auroc,
    pixel_f1_max,
    pro_curve,
)


def brute_force_curve(masks, maps, num_thresholds=200):
    """(FPR, PRO) per threshold with explicit loops over thresholds and labelled regions."""
    lo, hi = maps.min(), maps.max()
    thresholds = np.arange(lo, hi, (hi - lo) / num_thresholds)
    regions = []  # (image index, boolean region mask)
    for i, mask in enumerate(masks):
        labelled = measure.label(mask, connectivity=2)
        for r in range(1, labelled.max() + 1):
            regions.append((i, labelled == r))
    normal = ~masks
    fprs, pros = [], []
    for th in thresholds:
        pred = maps > th
        overlaps = [pred[i][region].sum() / region.sum() for i, region in regions]
        pros.append(sum(overlaps) / len(overlaps))
        fprs.append((pred & normal).sum() / normal.sum())
    return np.array(fprs), np.array(pros)


def brute_force_reference(masks, maps, limit=0.3):
    fprs, pros = brute_force_curve(masks, maps)
    kept = [(f, p) for f, p in zip(fprs, pros, strict=True) if f < limit]
    lo, hi = min(f for f, _ in kept), max(f for f, _ in kept)
    pts = sorted(((f - lo) / (hi - lo), p) for f, p in kept)  # stable for equal x: PRO rises with FPR
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        area += (x1 - x0) * (y0 + y1) / 2
    return area


def brute_force_standard(masks, maps, limit=0.3):
    fprs, pros = brute_force_curve(masks, maps)
    pts = list(zip(fprs[::-1], pros[::-1], strict=True)) + [(1.0, 1.0)]  # highest threshold first, then all-positive
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 >= limit:
            break
        if x1 >= limit:  # interpolate the PRO at exactly the limit and stop
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def random_problem(seed, n=4, size=32, dtype=np.float64, quantise=False):
    """Masks with several rectangular regions per image, maps = noise + signal inside the regions."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        for _ in range(rng.integers(2, 5)):
            y, x = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 7, 2)
            masks[i, y : y + h, x : x + w] = True
    maps = rng.random((n, size, size)) + 0.6 * masks * rng.random((n, size, size))
    if quantise:  # many exact ties, some of them on threshold values
        maps = np.round(maps * 40) / 40
    return masks, maps.astype(dtype)


def hand_case():
    """Two 4x4 images, values worked out by hand in test_hand_computed_case."""
    masks = np.zeros((2, 4, 4), dtype=bool)
    maps = np.zeros((2, 4, 4))
    masks[0, 0, 0] = masks[0, 1, 1] = True  # R1: diagonal neighbours, one 8-connected region of area 2
    maps[0, 0, 0], maps[0, 1, 1] = 1.0, 0.6
    maps[0, 0, 3], maps[0, 2, 2] = 0.8, 0.3  # normal pixels
    masks[1, 3, 3] = True  # R2: area 1
    maps[1, 3, 3] = 0.4
    masks[1, 0, 0] = masks[1, 0, 1] = True  # R3: area 2
    maps[1, 0, 0], maps[1, 0, 1] = 0.9, 0.1
    maps[1, 1, 3] = 0.55  # normal pixel
    return masks, maps


def test_hand_computed_case():
    masks, maps = hand_case()
    # 5 anomalous pixels (1.0, 0.6, 0.4, 0.9, 0.1) vs 27 normal (0.8, 0.3, 0.55 and 24 zeros).
    # AUROC: normals below each positive: 27 + 26 + 25 + 27 + 24 = 129 of 5 * 27 = 135 pairs.
    assert pixel_auroc(masks, maps) == pytest.approx(129 / 135, abs=1e-12)
    # Descending: 1.0 P, 0.9 P, 0.8 N, 0.6 P, 0.55 N, 0.4 P, 0.3 N, 0.1 P. Best cut at >= 0.1: P = 5/8, R = 1,
    # F1 = 2 * 5/8 / (13/8) = 10/13 (others: 4/7, 2/3, 8/11, and 10/37 at >= 0).
    assert pixel_f1_max(masks, maps) == pytest.approx(10 / 13, abs=1e-12)
    # num_thresholds = 4 -> t = 0, 0.25, 0.5, 0.75. PRO = mean over R1, R2, R3; FPR = normal hits / 27.
    #   t = 0:    R1 2/2, R2 1/1, R3 2/2 -> PRO 1;    FP 3 -> 3/27
    #   t = 0.25: R1 1,   R2 1,   R3 1/2 -> PRO 5/6;  FP 3 -> 3/27
    #   t = 0.5:  R1 1,   R2 0,   R3 1/2 -> PRO 1/2;  FP 2 -> 2/27
    #   t = 0.75: R1 1/2, R2 0,   R3 1/2 -> PRO 1/3;  FP 1 -> 1/27
    fpr, pro = pro_curve(masks, maps, num_thresholds=4)
    np.testing.assert_allclose(fpr, [3 / 27, 3 / 27, 2 / 27, 1 / 27], atol=1e-15)
    np.testing.assert_allclose(pro, [1, 5 / 6, 1 / 2, 1 / 3], atol=1e-15)
    # reference: all FPR < 0.3, rescaled to (1, 1, 0.5, 0); trapezoids 0.5*(1/3+1/2)/2 + 0.5*(1/2+5/6)/2 = 13/24
    assert aupro(masks, maps, num_thresholds=4, variant="reference") == pytest.approx(13 / 24, abs=1e-12)
    # standard: (1/27, 1/3) -> (2/27, 1/2) -> (3/27, 5/6) -> (3/27, 1) -> PRO 1 up to 0.3 (towards (1, 1)):
    # area = (1/27)(5/12) + (1/27)(2/3) + (0.3 - 3/27) * 1 = 0.3 - 23/324, divided by 0.3
    assert aupro(masks, maps, num_thresholds=4) == pytest.approx((0.3 - 23 / 324) / 0.3, abs=1e-12)


@pytest.mark.parametrize(
    "seed,dtype,quantise",
    [(0, np.float64, False), (1, np.float32, False), (2, np.float64, True), (3, np.float32, True)],
)
def test_aupro_matches_brute_force(seed, dtype, quantise):
    masks, maps = random_problem(seed, dtype=dtype, quantise=quantise)
    fpr, pro = pro_curve(masks, maps)
    ref_fpr, ref_pro = brute_force_curve(masks, maps)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, rtol=0, atol=1e-12)
    standard = aupro(masks, maps)
    reference = aupro(masks, maps, variant="reference")
    assert standard == pytest.approx(brute_force_standard(masks, maps), abs=1e-9)
    assert reference == pytest.approx(brute_force_reference(masks, maps), abs=1e-9)
    assert 0.05 < standard < 0.95 and 0.05 < reference < 0.95  # a non-trivial curve, not a saturated one


def test_aupro_other_limit_matches_brute_force():
    masks, maps = random_problem(7)
    assert aupro(masks, maps, fpr_limit=0.1) == pytest.approx(brute_force_standard(masks, maps, 0.1), abs=1e-9)
    assert aupro(masks, maps, fpr_limit=0.1, variant="reference") == pytest.approx(
        brute_force_reference(masks, maps, 0.1), abs=1e-9
    )


def test_pixel_metrics_match_sklearn():
    masks, maps = random_problem(4, n=3, size=24)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    precision, recall, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    f1 = np.array([2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True) if p + r > 0])
    assert pixel_f1_max(masks, maps) == pytest.approx(f1.max(), abs=1e-12)


def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 60)
    scores = rng.random(60) + 0.3 * labels
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.array([2 * p * r / (p + r) for p, r in zip(precision, recall, strict=True) if p + r > 0])
    assert image_f1_max(labels, scores) == pytest.approx(f1.max(), abs=1e-12)
    assert 0.6 < image_auroc(labels, scores) < 0.95


def test_perfect_and_inverted_maps():
    masks, _ = random_problem(6)
    rng = np.random.default_rng(6)
    perfect = np.where(masks, 0.6 + 0.4 * rng.random(masks.shape), 0.5 * rng.random(masks.shape))
    assert pixel_auroc(masks, perfect) == 1.0
    assert pixel_f1_max(masks, perfect) == 1.0
    assert aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, perfect, variant="reference") == pytest.approx(1.0, abs=1e-12)
    inverted = -perfect
    assert pixel_auroc(masks, inverted) < 0.1
    assert aupro(masks, inverted) < 0.1
    assert aupro(masks, inverted, variant="reference") < 0.1
    # a binary map equal to the mask: every kept point has FPR 0, so the reference rescaling divides by zero
    binary = masks.astype(np.float64)
    assert aupro(masks, binary) == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(aupro(masks, binary, variant="reference"))
    result = compute_metrics(masks, binary, np.ones(len(masks), dtype=int), {})
    assert result["pixel_aupro"] == pytest.approx(1.0) and result["pixel_aupro_ref"] is None


def test_compute_metrics_keys_and_undefined_values():
    masks, maps = random_problem(8)
    labels = np.array([0, 1, 1, 0])
    scores = {"reference": np.array([0.1, 0.9, 0.7, 0.3]), "map_max": np.array([0.5, 0.4, 0.8, 0.2])}
    out = compute_metrics(masks, maps, labels, scores)
    assert set(out) == {"pixel_auroc", "pixel_aupro", "pixel_aupro_ref", "pixel_f1_max", "reference", "map_max"}
    assert out["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert out["pixel_aupro"] == pytest.approx(brute_force_standard(masks, maps), abs=1e-9)
    assert out["pixel_aupro_ref"] == pytest.approx(brute_force_reference(masks, maps), abs=1e-9)
    assert out["reference"] == {"image_auroc": 1.0, "image_ap": 1.0, "image_f1_max": 1.0, "overkill_at_escape": 0.0}
    # map_max: anomalous 0.4, 0.8 vs good 0.5, 0.2 -> pairs won 1 + 2 of 4 = 0.75
    assert out["map_max"]["image_auroc"] == pytest.approx(0.75)
    only_anomalous = compute_metrics(masks, maps, np.ones(4, dtype=int), scores)
    assert only_anomalous["reference"] == dict.fromkeys(
        ("image_auroc", "image_ap", "image_f1_max", "overkill_at_escape")
    )
    no_defect = compute_metrics(np.zeros_like(masks), maps, labels, scores)
    assert [no_defect[k] for k in ("pixel_auroc", "pixel_aupro", "pixel_aupro_ref", "pixel_f1_max")] == [None] * 4


def test_errors_are_clear():
    masks, maps = random_problem(9)
    with pytest.raises(ValueError, match="no anomalous pixel"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="no normal pixel"):
        pixel_auroc(np.ones_like(masks), maps)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        pixel_auroc(masks, maps[:, :-1])
    with pytest.raises(ValueError, match="NaN"):
        pixel_f1_max(masks, np.full(maps.shape, np.nan))
    with pytest.raises(ValueError, match="unknown AUPRO variant"):
        aupro(masks, maps, variant="cflow")
    with pytest.raises(ValueError, match="both good"):
        image_auroc(np.ones(3, dtype=int), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="labels must have shape"):
        compute_metrics(masks, maps, np.zeros(3, dtype=int), {})
    assert math.isnan(aupro(masks, np.full(maps.shape, 0.5)))  # constant maps: no threshold grid


def test_large_problem_completes():
    masks, maps = random_problem(10, n=200, size=128, dtype=np.float32)
    fpr, pro = pro_curve(masks, maps)
    assert fpr.shape == pro.shape and fpr.size in (200, 201)
    assert np.all(np.diff(fpr) <= 0) and np.all(np.diff(pro) <= 0)  # both fall as the threshold rises
    assert 0.0 < aupro(masks, maps) < 1.0


def test_overkill_at_escape_hand_checked():
    from service.evaluate.metrics import overkill_at_escape

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.25, 0.5, 0.6, 0.7])
    # 2 % of 4 defects: none may escape -> threshold 0.25 (the lowest defect) rejects goods 0.3 and 0.4
    assert overkill_at_escape(labels, scores) == 0.5
    # 25 %: one defect (0.25) may escape -> threshold 0.5, no good part rejected
    assert overkill_at_escape(labels, scores, escape_rate=0.25) == 0.0
    # a good part tied with the threshold is rejected (score >= threshold)
    assert overkill_at_escape(labels, np.array([0.1, 0.2, 0.3, 0.5, 0.25, 0.5, 0.6, 0.7]), 0.25) == 0.25
    with pytest.raises(ValueError, match=r"escape_rate must be in \[0, 1\), got 1.0"):
        overkill_at_escape(labels, scores, escape_rate=1.0)
