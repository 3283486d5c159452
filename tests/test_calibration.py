"""Calibration math on hand-made score lists: exact order-statistic thresholds, refusals, escape rate, versions."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.calibration import (
    HISTOGRAM_BINS,
    SampleTooSmall,
    calibrate,
    check_rates,
    lowest_threshold,
    min_sample,
)

GOOD20 = np.array([i / 100 for i in range(20, 0, -1)])  # 0.20, 0.19, ..., 0.01 (order must not matter)


def test_reject_threshold_is_just_above_the_order_statistic():
    t = lowest_threshold(GOOD20, 0.05)  # r = floor(0.05 * 20) = 1: only 0.20 may be rejected
    assert t == np.nextafter(0.19, 1.0)
    assert (GOOD20 >= t).sum() == 1
    t10 = lowest_threshold(GOOD20, 0.10)  # r = 2: 0.20 and 0.19
    assert t10 == np.nextafter(0.18, 1.0) and (GOOD20 >= t10).sum() == 2
    hundred = np.arange(100) / 1000.0
    t1 = lowest_threshold(hundred, 0.01)  # r = 1 of 100
    assert t1 == np.nextafter(0.098, 1.0) and (hundred >= t1).sum() == 1


def test_ties_reject_fewer_never_more():
    good = np.array([0.1] * 15 + [0.7] * 5)
    t = lowest_threshold(good, 0.05)  # r = 1, but the top five tie: threshold above them, nothing rejected
    assert t == np.nextafter(0.7, 1.0) and (good >= t).sum() == 0


def test_a_sample_too_small_for_the_rate_is_refused():
    assert (min_sample(0.01), min_sample(0.05), min_sample(0.3)) == (100, 20, 4)
    with pytest.raises(SampleTooSmall, match="20 good images cannot support a false-reject rate of 0.01: at least 100"):
        lowest_threshold(GOOD20, 0.01)
    with pytest.raises(SampleTooSmall, match="at least 100"):
        lowest_threshold(np.zeros(99), 0.01)
    assert lowest_threshold(np.zeros(100), 0.01) == np.nextafter(0.0, 1.0)


def test_calibrate_thresholds_escape_rate_pixels_and_histograms():
    pixels = (np.arange(200, dtype=np.float32) / 200).reshape(2, 10, 10)
    defects = np.array([0.15, 0.195, 0.3, 0.9])
    cal = calibrate(
        GOOD20, list(pixels), "map_max", defect_scores=defects, target_frr=0.05, review_frr=0.1, pixel_quantile=0.99
    )
    assert cal.reject_threshold == np.nextafter(0.19, 1.0)
    assert cal.review_threshold == np.nextafter(0.18, 1.0)
    assert cal.good_frr == 0.05
    assert cal.escape_rate == 0.25  # 0.15 lies below the reject threshold
    # pixel quantile 0.99 of 200 pixels: 2 pixels may lie at or above the threshold
    assert cal.pixel_threshold == float(np.nextafter(np.float32(197 / 200), np.float32(1)))
    assert (pixels >= cal.pixel_threshold).sum() == 2
    assert (cal.n_good, cal.n_defect, cal.image_score, cal.source) == (20, 4, "map_max", "good_images")
    assert len(cal.histogram_edges) == HISTOGRAM_BINS + 1 and (cal.histogram_edges[0], cal.histogram_edges[-1]) == (
        0,
        1,
    )
    assert sum(cal.good_histogram) == 20 and sum(cal.defect_histogram) == 4
    assert cal.good_histogram[0] == 2  # 0.01 and 0.02 in [0, 0.025)
    assert cal.defect_histogram[7] == 1  # 0.195 in [0.175, 0.2)
    assert len(cal.version) == 16


def test_review_defaults_to_reject_and_versions_follow_content():
    maps = [np.linspace(0, 1, 2000, dtype=np.float32)]
    a = calibrate(GOOD20, maps, "reference", target_frr=0.05)
    b = calibrate(GOOD20, maps, "reference", target_frr=0.05)
    c = calibrate(GOOD20, maps, "reference", target_frr=0.1)
    assert a.review_threshold == a.reject_threshold and a.escape_rate is None
    assert a.version == b.version != c.version


@pytest.mark.parametrize(
    ("target", "review", "quantile", "message"),
    [
        (0.0, None, 0.999, r"target_frr must be in \(0, 0.5\), got 0.0"),
        (0.5, None, 0.999, r"target_frr must be in \(0, 0.5\), got 0.5"),
        (0.1, 0.05, 0.999, r"review_frr must be in \[target_frr, 0.5\) = \[0.1, 0.5\), got 0.05"),
        (0.1, None, 1.0, r"pixel_quantile must be in \[0.5, 1\), got 1.0"),
    ],
)
def test_rates_out_of_range_or_order_are_named(target, review, quantile, message):
    with pytest.raises(ValueError, match=message):
        check_rates(target, review, quantile)


def test_empty_or_non_finite_samples_are_refused():
    with pytest.raises(ValueError, match="no good images"):
        calibrate(np.array([]), [], "reference", target_frr=0.1)
    with pytest.raises(ValueError, match="finite"):
        calibrate(np.array([0.1] * 9 + [np.nan]), [np.zeros(4)], "reference", target_frr=0.1)


def test_anchored_colour_scale_puts_good_levels_cold_and_the_pixel_threshold_mid_scale():
    from service.engine.postprocess import anchored, colorize

    values = np.array([[0.0, 0.1, 0.3, 0.2, 1.0]], dtype=np.float32)
    got = anchored(values, (0.1, 0.3))
    assert np.allclose(got, [[0.0, 0.125, 0.5, 0.3125, 1.0]])
    assert anchored(values, None) is values and anchored(values, (0.3, 0.1)) is values  # unordered: unchanged
    rgb = colorize(np.array([[0.3]], dtype=np.float32), (0.1, 0.3))
    assert tuple(rgb[0, 0]) == tuple(colorize(np.array([[128 / 255]], dtype=np.float32))[0, 0])


def test_calibration_records_the_median_good_pixel():
    maps = [np.linspace(0, 1, 2001, dtype=np.float32)]
    assert calibrate(GOOD20, maps, "reference", target_frr=0.05).pixel_good_level == np.float32(0.5)
