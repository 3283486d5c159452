"""Pure math of tiling and scoring on hand-made tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from service.model import get_preset, make_views, prepare_image
from service.model.config import Preset
from service.model.scoring import gaussian_blur, map_topk, minmax, reference_image_score, token_probs
from service.model.tiling import stitch


def test_stitch_without_overlap_places_crops_row_major():
    p = Preset("t", 14, 14, 28)
    crops = torch.arange(1, 5, dtype=torch.float32).view(1, 4, 1, 1, 1).expand(1, 4, 1, 14, 14)
    canvas = stitch(crops, p)[0, 0]
    assert canvas[0, 0] == 1 and canvas[0, 27] == 2 and canvas[27, 0] == 3 and canvas[27, 27] == 4
    assert canvas.sum() == 14 * 14 * (1 + 2 + 3 + 4)


def test_stitch_overlap_band_is_halved_and_centre_quartered():
    p = Preset("t", 28, 28, 42)  # o = 2P - T = 14: crops overlap on rows/cols [14, 28)
    canvas = stitch(torch.ones(1, 4, 1, 28, 28), p)[0, 0]
    assert canvas[0, 0] == 1  # one crop
    assert canvas[0, 20] == 1  # two crops, halved
    assert canvas[20, 20] == 1  # four crops, divided by 4
    assert canvas[41, 41] == 1
    assert torch.all(canvas == 1)


def test_crops_are_cut_where_they_are_pasted():
    p = Preset("t", 28, 28, 42)
    arr = np.arange(42 * 42, dtype=np.uint32).reshape(42, 42)
    img = Image.fromarray((arr % 251).astype(np.uint8), mode="L")
    v = make_views(img, p)
    squashed = np.asarray(img.resize((42, 42)))
    assert np.array_equal(v.crops[3][..., 0], squashed[14:42, 14:42])  # bottom-right at T - P = 14
    assert np.array_equal(v.crops[1][..., 0], squashed[0:28, 14:42])


@pytest.mark.parametrize("shape", [(672, 672), (120, 90), (40, 30)])
def test_gaussian_equals_scipy_reflect(shape):
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)) * 4
    ours = gaussian_blur(x, 8.0).numpy()
    ref = np.stack([gaussian_filter(x[i].numpy(), 8.0) for i in range(2)])
    assert np.abs(ours - ref).max() <= 1e-6


def test_minmax_guards_constant_maps():
    m = torch.stack([torch.full((4, 4), 3.0), torch.arange(16.0).view(4, 4)])
    out = minmax(m)
    assert torch.all(out[0] == 0)
    assert out[1].min() == 0 and out[1].max() == 1 and out[1][0, 1] == pytest.approx(1 / 15)


def test_map_topk_mean_of_top_percent():
    m = torch.zeros(1, 10, 10)
    m[0, 0, :3] = torch.tensor([1.0, 0.5, 0.25])
    assert map_topk(m, 0.01).item() == 1.0  # 1 pixel
    assert map_topk(m, 0.02).item() == 0.75  # 2 pixels


def test_token_probs_and_reference_score_by_hand():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tokens = torch.tensor([[[3.0, 0.0], [0.0, 2.0]]])  # cos = [1, 0] and [0, 1]
    p = token_probs(tokens, text, 0.07)
    e = np.exp(1 / 0.07)
    assert p[0, 0, 0].item() == pytest.approx(e / (e + 1))
    whole = torch.tensor([[2.0, 0.0]])  # normalised -> [1, 0]: z_g = [1, 0]
    crops = torch.tensor([[[0.0, 4.0]] * 4])  # unnormalised: z_l = [0, 4]
    score = reference_image_score(whole, crops, text, 0.75, 0.07)
    z = np.array([0.75, 0.25 * 4]) / 0.07
    assert score.item() == pytest.approx(np.exp(z[1]) / np.exp(z).sum(), rel=1e-5)


def test_prepare_image_modes():
    g16 = Image.fromarray(np.array([[0, 257 * 100, 257 * 200, 65535]], dtype=np.uint16))
    assert g16.mode in ("I;16", "I")
    out = np.asarray(prepare_image(g16))
    assert out.tolist() == [[0, 100, 200, 255]]  # scaled by 1/257 (1/256 would give 201 and clip 256), never clipped
    rgba = Image.new("RGBA", (2, 1), (200, 100, 50, 0))
    rgba.putpixel((1, 0), (200, 100, 50, 255))
    assert np.asarray(prepare_image(rgba)).tolist() == [[[0, 0, 0], [200, 100, 50]]]  # composited on black
    f32 = Image.fromarray(np.array([[-1.0, 0.0, 3.0]], dtype=np.float32))  # float: min-max to [0, 255]
    assert f32.mode == "F" and np.asarray(prepare_image(f32)).tolist() == [[0, 64, 255]]  # 63.75 rounds to 64
    flat = Image.fromarray(np.full((1, 2), 5.0, dtype=np.float32))
    assert np.asarray(prepare_image(flat)).tolist() == [[0, 0]]
    wide = Image.fromarray(np.array([[0, 100_000, 200_000]], dtype=np.int32))  # 32-bit beyond 16 bits: min-max
    assert wide.mode == "I" and np.asarray(prepare_image(wide)).tolist() == [[0, 128, 255]]
    la = Image.new("LA", (2, 1), (200, 0))
    la.putpixel((1, 0), (200, 255))
    out = prepare_image(la)
    assert out.mode == "L" and np.asarray(out).tolist() == [[0, 200]]  # grey with alpha: composited, stays grey
    clear = Image.new("P", (2, 1))
    clear.putpalette([10, 20, 30, 40, 50, 60] * 128)
    clear.putpixel((1, 0), 1)
    clear.info["transparency"] = 0  # palette entry 0 is transparent: composited on black too
    assert np.asarray(prepare_image(clear)).tolist() == [[[0, 0, 0], [40, 50, 60]]]
    pal = Image.new("P", (1, 1))
    pal.putpalette([10, 20, 30] * 256)
    assert prepare_image(pal).mode == "RGB" and np.asarray(prepare_image(pal))[0, 0].tolist() == [10, 20, 30]
    rot = Image.new("RGB", (4, 2))
    exif = rot.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    import io

    buf = io.BytesIO()
    rot.save(buf, "JPEG", exif=exif)
    assert prepare_image(Image.open(buf)).size == (2, 4)


def test_views_shapes_for_every_preset():
    img = Image.new("RGB", (123, 77), (10, 20, 30))
    for name in ("mvtec", "visa", "fast"):
        p = get_preset(name)
        v = make_views(img, p)
        assert v.whole.shape == (p.image_size, p.image_size, 3)
        assert v.crops.shape == (4, p.crop_size, p.crop_size, 3)
