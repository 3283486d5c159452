"""The lean request path: what an inspection stores, PNGs rendered on first request, regions, durability.

- stored: the upload's own bytes (``original.bin``) and the float16 (T, T) map (``map.f16.png``), no PNG;
- a PNG rendered later (GET) is byte-identical to the one the request got inline (``include=``) and is cached;
  so is the heatmap of a calibrated product (colours anchored at its calibration);
- ``DHR_STORE_ORIGINALS=false``: no upload bytes kept, the overlay PNG stored instead;
- inspections of the first layout (three PNGs) are still served; the console shows lean ones (thumbnail cached);
- the map codec is exact for float16; regions from the stored map match the float32 ones within a pixel on the
  real photos;
- an inspection acknowledged by a server killed with SIGKILL right after the answer is there after a restart.
"""

from __future__ import annotations

import base64
import io

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api import create_app
from service.engine.decode import decode_image, views_for
from service.engine.map_codec import decode_map, encode_map
from service.engine.postprocess import analyse_map, postprocess
from service.engine.stored import render_stored
from service.model import build_model, load_backbone, load_checkpoint, stack_views
from service.storage.models import CalibrationRecord, ProductProfile, utcnow

from .api_fixtures import encode, make_record, make_settings, png_file, synthetic_image, wait_ready
from .paths import REAL_DEFECTS, REF_PROMPTS, TINY_CLIP
from .server_process import ServerProcess

KINDS = ("overlay", "heatmap", "mask")


def _record_dir(data_dir, rid):
    found = [p for p in data_dir.rglob(rid) if p.is_dir()]
    assert len(found) == 1
    return found[0]


def test_store_keeps_original_and_map_and_renders_pngs_on_first_request(tmp_path):
    jpeg = encode(synthetic_image(3, (90, 70)), "JPEG", quality=85)
    with TestClient(create_app(make_settings(tmp_path, pixel_threshold=0.3))) as client:
        wait_ready(client)
        r = client.post("/segment", files=[("image", ("part.jpg", jpeg, "image/jpeg"))], data={"include": "mask"})
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert set(res["images"]) == {"mask"}  # only the asked-for kind is rendered inline
        folder = _record_dir(tmp_path, res["id"])
        assert sorted(p.name for p in folder.iterdir()) == ["map.f16.png", "original.bin"]
        assert (folder / "original.bin").read_bytes() == jpeg  # as uploaded, never re-encoded
        stored_map = decode_map((folder / "map.f16.png").read_bytes())
        t = client.app.state.ctx.engine.runner.preset.target_size
        assert stored_map.dtype == np.float16 and stored_map.shape == (t, t)
        lazy = {k: client.get(f"/inspections/{res['id']}/{k}.png") for k in KINDS}
        assert all(v.status_code == 200 and v.headers["content-type"] == "image/png" for v in lazy.values())
        assert lazy["mask"].content == base64.b64decode(res["images"]["mask"])
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["heatmap.png", "map.f16.png", "mask.png", "original.bin", "overlay.png"]
        for k in KINDS:  # the cached file is what was served, and is served again
            assert (folder / f"{k}.png").read_bytes() == lazy[k].content
            assert client.get(f"/inspections/{res['id']}/{k}.png").content == lazy[k].content
        record = client.app.state.ctx.store.get(res["id"])
        assert record.artefacts == ["original", "map"]  # renderings are cached, not listed


def test_lazy_pngs_are_byte_identical_to_inline_ones(tmp_path):
    files = [png_file("a.png", 5, (80, 60)), png_file("b.png", 6, (50, 70), "L")]
    with TestClient(create_app(make_settings(tmp_path, pixel_threshold=0.3))) as client:
        wait_ready(client)
        r = client.post("/segment", files=files, data={"include": ",".join(KINDS)})
        assert r.status_code == 200, r.text
        for res in r.json()["results"]:
            for k in KINDS:
                inline = base64.b64decode(res["images"][k])
                assert client.get(f"/inspections/{res['id']}/{k}.png").content == inline
            png = client.post("/segment?output=overlay", files=[files[0]])
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        first = r.json()["results"][0]
        assert png.content == base64.b64decode(first["images"]["overlay"])  # same image, same bytes


def _within_one_pixel(a: np.ndarray, b: np.ndarray) -> bool:
    """Every pixel of each mask lies within one pixel (8-neighbourhood) of the other mask."""
    k = np.ones((3, 3), np.uint8)
    grow_a, grow_b = cv2.dilate(a.astype(np.uint8), k) > 0, cv2.dilate(b.astype(np.uint8), k) > 0
    return bool(np.all(~a | grow_b) and np.all(~b | grow_a))


def test_regions_from_the_stored_map_match_float32_within_a_pixel_on_real_photos():
    clip, info = load_backbone(TINY_CLIP)
    model, _ = build_model(clip, load_checkpoint(REF_PROMPTS), preset="fast", backbone_info=info)
    photos = sorted(p for p in REAL_DEFECTS.rglob("*.jpg") if "ground_truth" not in p.parts)[::8]
    assert len(photos) >= 6
    decoded = [decode_image(p.read_bytes(), p.name) for p in photos]
    maps = model(*stack_views([views_for(d, model.cfg.preset) for d in decoded])).anomaly_map.clamp(0, 1).numpy()
    compared = 0
    for dec, m32 in zip(decoded, maps, strict=True):
        threshold = float(np.quantile(m32, 0.97))  # a threshold that makes regions on the random-weight model
        before = postprocess(m32, dec.rgb(), threshold, include=("mask",))
        stored = decode_map(encode_map(m32))
        assert np.array_equal(stored, m32.astype(np.float16))  # lossless for float16
        after = analyse_map(stored, dec.width, dec.height, threshold)
        mask_before = np.asarray(Image.open(io.BytesIO(before.mask_png))) > 0
        assert _within_one_pixel(mask_before, after.mask), dec.name
        assert len(after.regions) == len(before.regions), dec.name
        by_place = lambda regions: sorted(regions, key=lambda r: r.bbox)  # noqa: E731 - ties in max_score may swap
        for ra, rb in zip(by_place(after.regions), by_place(before.regions), strict=True):
            assert np.abs(np.subtract(ra.bbox, rb.bbox)).max() <= 1, (dec.name, ra.bbox, rb.bbox)
            assert abs(ra.max_score - rb.max_score) <= 1e-3
        compared += len(before.regions)
    assert compared >= len(photos)


def test_map_codec_is_exact_for_float16_and_small_for_smooth_maps():
    rng = np.random.default_rng(0)
    every = np.arange(0, 0x3C01, dtype=np.uint16).view(np.float16)  # every float16 in [0, 1], in some order
    for m in (every[: 117 * 131].reshape(117, 131), rng.permutation(every)[:4096].reshape(64, 64), np.zeros((1, 1))):
        back = decode_map(encode_map(m))
        assert back.dtype == np.float16 and back.shape == m.shape
        assert np.array_equal(back.view(np.uint16), m.astype(np.float16).view(np.uint16))
    y, x = np.mgrid[0:448, 0:448] / 448.0
    smooth = (0.3 + 0.2 * np.sin(6 * x) * np.cos(4 * y)).astype(np.float32)
    assert len(encode_map(smooth)) < 448 * 448 * 2 / 8  # well under 2 bits per pixel (raw float16: 16)
    with pytest.raises(ValueError, match="not an 8-bit grey PNG"):
        decode_map(encode(synthetic_image(1, (8, 8))))


def test_without_originals_the_overlay_is_stored_and_the_rest_rendered_later(tmp_path):
    with TestClient(create_app(make_settings(tmp_path, pixel_threshold=0.3, store_originals=False))) as client:
        wait_ready(client)
        r = client.post("/segment", files=[png_file("a.png", 4, (70, 50))], data={"include": "heatmap"})
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        folder = _record_dir(tmp_path, res["id"])
        assert sorted(p.name for p in folder.iterdir()) == ["map.f16.png", "overlay.png"]
        assert client.app.state.ctx.store.get(res["id"]).artefacts == ["map", "overlay"]
        inline = client.post("/segment?output=overlay", files=[png_file("a.png", 4, (70, 50))])
        assert (folder / "overlay.png").read_bytes() == inline.content  # the same rendering as an inline one
        for k in KINDS:
            got = client.get(f"/inspections/{res['id']}/{k}.png")
            assert got.status_code == 200 and got.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert client.get(f"/inspections/{res['id']}/heatmap.png").content == base64.b64decode(res["images"]["heatmap"])
        assert sorted(p.name for p in folder.iterdir()) == ["heatmap.png", "map.f16.png", "mask.png", "overlay.png"]


def test_inspections_of_the_first_layout_are_still_served(tmp_path):
    pngs = {k: encode(synthetic_image(i, (40, 30)), "PNG") for i, k in enumerate(KINDS)}
    with TestClient(create_app(make_settings(tmp_path / "data", backbone=str(tmp_path / "none.pt")))) as client:
        store = client.app.state.ctx.store
        old = store.add(make_record(utcnow(), width=40, height=30), pngs)
        for k in KINDS:
            got = client.get(f"/inspections/{old.id}/{k}.png")
            assert got.status_code == 200 and got.content == pngs[k]
        thumb = client.get(f"/ui/thumbs/{old.id}.jpg", headers={"X-API-Key": "x"})
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
        assert store.read_derived(old, "thumb.jpg") == thumb.content and store.get(old.id).artefacts == list(KINDS)


def test_lazy_heatmap_of_a_calibrated_product_keeps_its_colour_anchor(tmp_path):
    with TestClient(create_app(make_settings(tmp_path))) as client:
        wait_ready(client)
        store = client.app.state.ctx.store
        profile = store.put_product(
            ProductProfile(name="cap", image_threshold=0.5, pixel_threshold=0.4, image_score="reference")
        )
        cal = CalibrationRecord(version="c0ffee", product="cap", memory_version=None, content={"pixel_good_level": 0.2})
        store.put_calibration(cal, ProductProfile(**{**profile.__dict__, "pixel_good_level": 0.2}))
        r = client.post(
            "/segment", files=[png_file("a.png", 8, (60, 44))], data={"product": "cap", "include": "heatmap"}
        )
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["calibration_version"] == "c0ffee"
        lazy = client.get(f"/inspections/{res['id']}/heatmap.png").content
        assert lazy == base64.b64decode(res["images"]["heatmap"])
        record = store.get(res["id"])
        plain = render_stored(store.read_artefact(record, "map"), None, 60, 44, 0.4, ["heatmap"])["heatmap"]
        assert plain != lazy  # the anchor changes the colours, and the lazy rendering kept it


def test_console_shows_a_lean_inspection_and_caches_its_thumbnail(tmp_path):
    jpeg = encode(synthetic_image(5, (120, 80)), "JPEG", quality=90)
    smooth = np.linspace(0.0, 0.9, 448 * 448, dtype=np.float32).reshape(448, 448)
    with TestClient(create_app(make_settings(tmp_path / "data", backbone=str(tmp_path / "none.pt")))) as client:
        store = client.app.state.ctx.store
        rec = store.add(make_record(utcnow(), width=120, height=80), {"original": jpeg, "map": encode_map(smooth)})
        client.cookies.set("dhr_console", "")  # open console (no keys configured)
        page = client.get(f"/ui/inspections/{rec.id}")
        assert page.status_code == 200
        for k in KINDS:
            assert f"/ui/inspections/{rec.id}/{k}.png" in page.text
            got = client.get(f"/ui/inspections/{rec.id}/{k}.png")
            assert got.status_code == 200 and got.content == client.get(f"/inspections/{rec.id}/{k}.png").content
        thumb = client.get(f"/ui/thumbs/{rec.id}.jpg")
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
        assert store.read_derived(rec, "thumb.jpg") == thumb.content
        assert f"/ui/thumbs/{rec.id}.jpg" in client.get("/ui/queue").text


def test_acknowledged_inspection_survives_kill_9(tmp_path):
    server = ServerProcess(tmp_path / "data", warmup="false").start()
    try:
        jpeg = encode(synthetic_image(9, (64, 48)), "JPEG")
        r = httpx.post(f"{server.url}/segment", files={"image": ("k.jpg", jpeg, "image/jpeg")}, timeout=60)
        server.kill()  # right after the answer: no shutdown, no flush
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    answered = r.json()["results"][0]
    with server:
        got = httpx.get(f"{server.url}/inspections/{answered['id']}", timeout=10)
        assert got.status_code == 200
        assert {k: got.json()[k] for k in ("score", "verdict", "regions")} == {
            k: answered[k] for k in ("score", "verdict", "regions")
        }
        overlay = httpx.get(f"{server.url}/inspections/{answered['id']}/overlay.png", timeout=30)
        assert overlay.status_code == 200 and overlay.content[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", ["overlay", "nope"])
def test_artefact_of_an_unknown_inspection_is_404(tmp_path, kind):
    with TestClient(create_app(make_settings(tmp_path))) as client:
        r = client.get(f"/inspections/{'0' * 28}/{kind}.png")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
