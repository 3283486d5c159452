"""Views made by torch on the model's device (``DHR_PREPROCESS=device|device-decode``), checked on CPU tensors.

The torch views follow Pillow's bicubic in float32 where Pillow uses fixed-point arithmetic; measured here on the
fixture images and 12 real photos at presets mvtec and fast: at most 7 grey levels apart (sharp random fixture
texture; 2 on the photos), mean 0.3 level or less. torchvision's CPU JPEG decoder gives Pillow's pixels exactly on
these photos (nvJPEG on an H200 was up to 11 levels off on single pixels, bench/results/device_check_h200.md).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.api import create_app
from service.engine.decode import DecodedImage, DecodeLimits, ImageError, decode_image
from service.engine.device_views import DeviceViews, resolve_preprocess
from service.model.config import PRESETS
from service.model.preprocess import make_views, make_views_torch, prepare_image, stack_views

from .api_fixtures import encode, make_settings, synthetic_image, wait_ready
from .paths import FIXTURES, REAL_DEFECTS

MAX_LEVELS, MEAN_LEVELS = 8, 0.35  # torch views vs Pillow views (measured 7 and 0.29, module doc)


def _photos(n: int = 6) -> list:
    return sorted(p for p in REAL_DEFECTS.rglob("*.jpg") if "ground_truth" not in p.parts)[:n]


def _chw(img: Image.Image) -> torch.Tensor:
    t = torch.from_numpy(np.array(img))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def _diff(a, b) -> np.ndarray:
    return np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))


@pytest.mark.parametrize("preset", ["mvtec", "fast"])
def test_torch_views_match_the_pillow_views(preset):
    files = [*sorted(FIXTURES.glob("*.png")), *_photos()]
    modes = set()
    for path in files:
        img = prepare_image(Image.open(path))
        modes.add(img.mode)
        ref, got = make_views(img, PRESETS[preset]), make_views_torch(_chw(img), PRESETS[preset])
        for field in ("whole", "crops"):
            assert getattr(got, field).dtype == torch.uint8
            assert getattr(got, field).shape == getattr(ref, field).shape
            d = _diff(getattr(ref, field), getattr(got, field))
            assert d.max() <= MAX_LEVELS and d.mean() <= MEAN_LEVELS, (path.name, field, d.max(), d.mean())
    assert modes == {"RGB", "L"}


def test_deferred_jpeg_is_checked_then_decoded_on_the_device_like_pillow():
    dv = DeviceViews("cpu", PRESETS["fast"], decode_jpegs=True)
    for path in _photos(4):
        data = path.read_bytes()
        deferred = decode_image(data, path.name, defer_jpeg=True)
        assert deferred.prepared is None and deferred.data is data
        pillow = decode_image(data, path.name)
        assert (deferred.width, deferred.height, deferred.mode) == (pillow.width, pillow.height, pillow.mode)
        assert np.array_equal(np.asarray(deferred.image), np.asarray(pillow.image))  # the lazy Pillow decode
        got, ref = dv(deferred), make_views_torch(_chw(pillow.image), PRESETS["fast"])
        assert _diff(ref.whole, got.whole).max() <= 2 and _diff(ref.crops, got.crops).max() <= 2
        assert got.whole.shape == (336, 336, 3) and got.crops.shape == (4, 224, 224, 3)


def test_only_plain_jpegs_are_deferred_and_every_check_runs_first():
    rgb = synthetic_image(3, (128, 96))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    kept = {
        "png": encode(rgb, "PNG"),
        "rotated jpeg": encode(rgb, "JPEG", exif=exif.tobytes()),
        "cmyk jpeg": encode(rgb.convert("CMYK"), "JPEG"),
    }
    for what, data in kept.items():
        assert decode_image(data, what, defer_jpeg=True).prepared is not None, what
    plain = encode(rgb, "JPEG")
    assert decode_image(plain, "grey", defer_jpeg=True).prepared is None
    assert decode_image(encode(rgb.convert("L"), "JPEG"), "grey", defer_jpeg=True).prepared is None
    lenient = DecodeLimits(accept_truncated=True)
    assert decode_image(plain, "lenient", lenient, defer_jpeg=True).prepared is not None  # Pillow's lenient decode
    with pytest.raises(ImageError) as cut:
        decode_image(plain[: len(plain) // 2], "cut.jpg", defer_jpeg=True)
    assert cut.value.kind == "corrupt"
    with pytest.raises(ImageError) as big:
        decode_image(plain, "big.jpg", DecodeLimits(max_pixels=1000), defer_jpeg=True)
    assert big.value.kind == "too_large"


def test_a_device_decoder_failure_is_a_corrupt_image():
    bogus = DecodedImage("bogus.jpg", 128, 96, "JPEG", "RGB", None, b"\xff\xd8\xff\xdb not a jpeg \xff\xd9")
    with pytest.raises(ImageError) as e:
        DeviceViews("cpu", PRESETS["fast"], decode_jpegs=True)(bogus)
    assert e.value.kind == "corrupt" and "bogus.jpg" in str(e.value)
    with pytest.raises(ImageError):
        bogus.image  # noqa: B018 - the lazy Pillow decode refuses it the same way


def test_preprocess_auto_and_mixed_batches():
    assert resolve_preprocess("auto", "cpu") == "cpu"
    assert resolve_preprocess("auto", torch.device("cuda", 1)) == "device-decode"
    assert resolve_preprocess("device", "cpu") == "device"
    img = prepare_image(synthetic_image(1, (128, 96)))
    host, dev = make_views(img, PRESETS["fast"]), make_views_torch(_chw(img), PRESETS["fast"])
    whole, crops = stack_views([host, dev])
    assert whole.shape == (2, 336, 336, 3) and crops.shape == (2, 4, 224, 224, 3)
    assert torch.equal(whole[0], torch.from_numpy(host.whole)) and torch.equal(crops[1], dev.crops)


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """Two services on the same weights: Pillow views (cpu) and torch views with the JPEG decoded by torchvision."""
    out = {}
    with (
        TestClient(create_app(make_settings(tmp_path_factory.mktemp("pil"), preprocess="cpu"))) as pil,
        TestClient(create_app(make_settings(tmp_path_factory.mktemp("dev"), preprocess="device-decode"))) as dev,
    ):
        for name, c in (("cpu", pil), ("device-decode", dev)):
            wait_ready(c)
            out[name] = c
        yield out


def test_service_with_device_views_answers_like_the_pillow_path(apps):
    data = _photos(1)[0].read_bytes()
    answers = {}
    for name, client in apps.items():
        r = client.post("/segment", files=[("image", ("photo.jpg", data, "image/jpeg"))])
        assert r.status_code == 200, r.text
        answers[name] = r.json()["results"][0]
    a, b = answers["cpu"], answers["device-decode"]
    assert (a["width"], a["height"]) == (b["width"], b["height"])
    assert a["score"] == pytest.approx(b["score"], abs=2e-3)  # measured 6.8e-4 (0.48843 vs 0.48775)
    assert a["verdict"] == b["verdict"]


def test_hostile_jpegs_are_still_422_with_device_decode(apps):
    client = apps["device-decode"]
    whole = encode(synthetic_image(6, (128, 96)), "JPEG")
    for cut in (whole[:-2], whole[: len(whole) // 2]):
        r = client.post("/segment", files=[("image", ("cut.jpg", cut, "image/jpeg"))])
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"] == "urn:dhrclip:problem:corrupt-image"
    buf = io.BytesIO(b"\xff\xd8\xff\xe0garbage")
    r = client.post("/segment", files=[("image", ("junk.jpg", buf.getvalue(), "image/jpeg"))])
    assert r.status_code == 422
