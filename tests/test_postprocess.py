"""Postprocessing of anomaly maps: regions in original coordinates, PNG contents, edge-case sizes.

Hand computation used below (OpenCV bilinear, pixel-centre aligned): upscaling an 8 x 8 map to W=16, H=32
samples ``sx = x / 2 - 0.25`` and ``sy = y / 4 - 0.375``. A source rectangle of value v covering columns c0..c1 and
rows r0..r1 (away from the border) becomes ``v * wx(x) * wy(y)`` with
wx = [0.25, 0.75, 1, ..., 1, 0.75, 0.25] starting at x = 2*c0 - 1 and
wy = [0.125, 0.375, 0.625, 0.875, 1, ..., 1, 0.875, 0.625, 0.375, 0.125] starting at y = 4*r0 - 3.
With threshold t and 0.375 < t / v <= 0.75 * 0.625 the kept pixels are exactly x in [2*c0, 2*c1 + 1],
y in [4*r0, 4*r1 + 3]: the scaled rectangle. For a 2 x 2 source blob: area 4*2 * 2*2 = 32 and
mean = v * mean(0.75, 1, 1, 0.75) * mean(0.625, 0.875, 1, 1, 1, 1, 0.875, 0.625) = v * 0.875 * 0.875.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.engine.postprocess import Region, colorize, find_regions, overlay, postprocess, resize_map

JET_0 = (0, 0, 128)  # dark blue
JET_1 = (128, 0, 0)  # dark red


def _png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _two_blob_map() -> np.ndarray:
    m = np.zeros((8, 8), np.float32)
    m[1:3, 1:3] = 1.0  # rows 1-2, cols 1-2
    m[4:6, 5:7] = 0.9  # rows 4-5, cols 5-6
    return m


def _gray_image(h: int, w: int, value: int = 100) -> np.ndarray:
    gray = np.full((h, w), value, np.uint8)
    return np.stack([gray, gray, gray], axis=-1)


def test_two_blobs_give_two_regions_in_original_coordinates():
    res = postprocess(_two_blob_map(), _gray_image(32, 16), pixel_threshold=0.4)
    assert len(res.regions) == 2
    first, second = res.regions
    assert first.bbox == (2, 4, 4, 8)  # x 2..5, y 4..11
    assert second.bbox == (10, 16, 4, 8)  # x 10..13, y 16..23
    assert first.area == 32 and second.area == 32
    assert first.area_ratio == pytest.approx(32 / 512)
    assert first.max_score == pytest.approx(1.0, abs=1e-6)
    assert second.max_score == pytest.approx(0.9, abs=1e-6)
    assert first.mean_score == pytest.approx(1.0 * 0.765625, abs=1e-5)
    assert second.mean_score == pytest.approx(0.9 * 0.765625, abs=1e-5)
    assert res.defect_area_ratio == pytest.approx(64 / 512)
    assert res.map_max == pytest.approx(1.0, abs=1e-6)
    for region in res.regions:
        x, y, w, h = region.bbox
        assert 3 <= len(region.polygon) <= 64
        assert all(x <= px < x + w and y <= py < y + h for px, py in region.polygon)
    assert sorted(first.polygon) == [(2, 4), (2, 11), (5, 4), (5, 11)]

    mask = np.asarray(_png(res.mask_png))
    assert mask.shape == (32, 16)
    assert set(np.unique(mask).tolist()) == {0, 255}
    expected = np.zeros((32, 16), np.uint8)
    expected[4:12, 2:6] = 255
    expected[16:24, 10:14] = 255
    np.testing.assert_array_equal(mask, expected)


def test_region_to_dict_is_json_ready():
    region = find_regions(np.full((3, 4), 0.7, np.float32), np.ones((3, 4), bool))[0]
    d = region.to_dict()
    assert d["bbox"] == [0, 0, 4, 3]
    assert d["area"] == 12 and d["area_ratio"] == 1.0
    assert d["max_score"] == pytest.approx(0.7) and d["mean_score"] == pytest.approx(0.7)
    assert sorted(map(tuple, d["polygon"])) == [(0, 0), (0, 2), (3, 0), (3, 2)]


def test_threshold_above_max_gives_nothing():
    res = postprocess(_two_blob_map(), _gray_image(32, 16), pixel_threshold=1.01)
    assert res.regions == []
    assert res.defect_area_ratio == 0.0
    mask = np.asarray(_png(res.mask_png))
    assert mask.shape == (32, 16) and mask.max() == 0


def test_min_region_area_drops_small_components_from_regions_and_mask():
    m = np.zeros((20, 20), np.float32)
    m[2:8, 2:8] = 0.9  # 36 px
    m[15, 15] = 0.95  # 1 px
    image = _gray_image(20, 20)
    all_res = postprocess(m, image, pixel_threshold=0.5)
    assert [r.area for r in all_res.regions] == [1, 36]  # sorted by max score, the speck scores higher
    res = postprocess(m, image, pixel_threshold=0.5, min_region_area=2)
    assert [r.area for r in res.regions] == [36]
    assert res.defect_area_ratio == pytest.approx(36 / 400)
    assert np.count_nonzero(np.asarray(_png(res.mask_png))) == 36


def test_diagonal_pixels_are_one_region_with_8_connectivity():
    mask = np.zeros((5, 5), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True
    regions = find_regions(np.where(mask, 0.8, 0.0).astype(np.float32), mask)
    assert len(regions) == 1
    assert regions[0].bbox == (1, 1, 3, 3) and regions[0].area == 3


def test_regions_sort_by_max_score_then_area_then_top_then_left():
    m = np.zeros((10, 20), np.float32)
    m[7:9, 12:14] = 0.9  # D: the highest score
    m[5:8, 5:8] = 0.8  # C: 9 px
    m[1:3, 1:3] = 0.8  # B: 4 px at y 1, x 1
    m[1:3, 15:17] = 0.8  # A: 4 px at y 1, x 15
    m[4:6, 0:2] = 0.8  # E: 4 px at y 4, x 0
    regions = find_regions(m, m > 0)
    assert [(r.bbox[:2], r.area) for r in regions] == [
        ((12, 7), 4),
        ((5, 5), 9),
        ((1, 1), 4),
        ((15, 1), 4),
        ((0, 4), 4),
    ]


def test_a_ragged_outline_is_simplified_to_at_most_64_points():
    """A comb of 50 teeth 20 px tall: its contour keeps the teeth at the first tolerance (0.5 % of the ~2400 px
    perimeter = 12 px < 20 px), about 200 points; the tolerance doubles until 64 points or fewer remain."""
    mask = np.zeros((40, 210), bool)
    mask[25:35, 5:205] = True
    for x in range(5, 205, 4):
        mask[5:25, x : x + 2] = True
    (region,) = find_regions(np.where(mask, 0.8, 0.0).astype(np.float32), mask)
    assert region.bbox == (5, 5, 200, 30) and region.area == 50 * 40 + 2000
    assert 4 <= len(region.polygon) <= 64
    assert all(5 <= px < 205 and 5 <= py < 35 for px, py in region.polygon)


def test_heatmap_uses_absolute_scale():
    image = _gray_image(9, 13)
    zero = postprocess(np.zeros((4, 4), np.float32), image, include=("heatmap",))
    heat0 = _png(zero.heatmap_png)
    assert heat0.mode == "RGB" and heat0.size == (13, 9)
    assert (np.asarray(heat0) == JET_0).all()
    assert zero.mask_png is None and zero.overlay_png is None

    one = postprocess(np.ones((4, 4), np.float32), image, include=("heatmap",))
    assert (np.asarray(_png(one.heatmap_png)) == JET_1).all()
    # no per-image min-max normalisation: 0.1 has the same blue colour alone or next to a 1.0
    low = colorize(np.full((2, 2), 0.1, np.float32))
    mixed = colorize(np.array([[0.1, 1.0]], np.float32))
    assert (low == mixed[0, 0]).all()
    assert mixed[0, 0, 2] > 200 and mixed[0, 0, 0] == 0  # blue, no red
    assert tuple(mixed[0, 1]) == JET_1


def test_overlay_blends_and_marks_hot_area():
    m = np.zeros((16, 16), np.float32)
    m[6:10, 6:10] = 1.0
    image = _gray_image(64, 48, value=100)
    res = postprocess(m, image, pixel_threshold=0.5)
    out = np.asarray(_png(res.overlay_png))
    assert out.shape == (64, 48, 3)
    heat = np.asarray(_png(res.heatmap_png))
    hot = np.asarray(_png(res.mask_png)) > 0
    assert hot.any()
    assert (np.abs(out[hot].astype(int) - 100).max(axis=-1) > 10).all()
    # far from the defect: an exact 50/50 blend of grey and dark blue (0, 0, 128), no outline
    np.testing.assert_allclose(out[0, 0].astype(int), [50, 50, 114], atol=1)
    np.testing.assert_array_equal(heat[0, 0], JET_0)
    # outline drawn in white on the region border
    x, y, w, _ = res.regions[0].bbox
    assert tuple(out[y, x + w // 2]) == (255, 255, 255)


def test_overlay_function_without_mask_is_plain_blend():
    image = _gray_image(3, 5, value=200)
    heat = np.zeros((3, 5, 3), np.uint8)
    out = overlay(image, heat, alpha=0.25)
    assert (out == 150).all()
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, heat, alpha=1.5)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 300), (257, 1), (3, 700)])
def test_extreme_sizes(h, w):
    m = np.full((8, 8), 0.8, np.float32)
    res = postprocess(m, _gray_image(h, w))
    for data, mode in ((res.heatmap_png, "RGB"), (res.mask_png, "L"), (res.overlay_png, "RGB")):
        img = _png(data)
        assert img.size == (w, h) and img.mode == mode
    assert len(res.regions) == 1
    assert res.regions[0].bbox == (0, 0, w, h) and res.regions[0].area == h * w
    assert res.defect_area_ratio == 1.0


def test_resize_map_shape_and_range():
    m = np.random.default_rng(0).random((7, 7)).astype(np.float32)
    out = resize_map(m, 20, 5)
    assert out.shape == (5, 20) and out.dtype == np.float32
    assert out.min() >= m.min() - 1e-6 and out.max() <= m.max() + 1e-6


def test_bad_inputs_raise_clear_errors():
    image = _gray_image(4, 4)
    with pytest.raises(ValueError, match="NaN"):
        postprocess(np.full((2, 2), np.nan, np.float32), image)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        postprocess(np.full((2, 2), 3.0, np.float32), image)
    with pytest.raises(ValueError, match="shape"):
        postprocess(np.zeros((2, 2), np.float32), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        postprocess(np.zeros((2, 2), np.float32), np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="unknown artefact"):
        postprocess(np.zeros((2, 2), np.float32), image, include=("heatmap", "thumbnail"))
    with pytest.raises(ValueError, match="mask shape"):
        find_regions(np.zeros((2, 2), np.float32), np.zeros((3, 2), bool))


def test_region_is_frozen():
    region = Region(bbox=(0, 0, 1, 1), area=1, area_ratio=1.0, max_score=1.0, mean_score=1.0, polygon=[(0, 0)])
    with pytest.raises(AttributeError):
        region.area = 2  # type: ignore[misc]
