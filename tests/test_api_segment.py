"""POST /segment through the real app (lifespan, engine, store) with the tiny CLIP at preset "fast"."""

from __future__ import annotations

import base64
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api import create_app
from service.engine.postprocess import resize_map
from service.engine.runner import ModelRunner
from service.model import load_model, load_views

from .api_fixtures import PRESET, decode_png, encode, make_settings, png_file, synthetic_image, wait_ready
from .databases import DATABASES, fresh_database_url
from .paths import FIXTURES, REF_PROMPTS, TINY_CLIP

PARITY_IMAGE = FIXTURES / "img1_rgb_640x480.png"


@pytest.fixture(scope="module", params=DATABASES)
def client(request, tmp_path_factory):
    """The app on SQLite and on PostgreSQL (when DHR_TEST_POSTGRES_URL is set)."""
    data_dir = tmp_path_factory.mktemp("segment-data")
    database_url = fresh_database_url(request.param, data_dir, request.config)
    settings = make_settings(
        data_dir,
        database_url=database_url,
        max_upload_mb=1.0,
        max_pixels=1_000_000,
        max_batch_size=8,
        replica_name="seg-1",
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def direct_model():
    """The model alone, loaded the way the service loads it."""
    model, _ = load_model(TINY_CLIP, REF_PROMPTS, preset=PRESET, device="cpu")
    return ModelRunner(model)


def check_result(res: dict, filename: str, size: tuple[int, int]) -> None:
    """Every field of one /segment result, with values in range and consistent with each other."""
    w, h = size
    assert res["filename"] == filename
    assert (res["width"], res["height"]) == (w, h)
    assert len(res["id"]) == 28 and int(res["id"], 16) >= 0
    assert res["created_at"].endswith("Z") or "+00:00" in res["created_at"]
    assert 0.0 <= res["score"] <= 1.0
    assert 0.0 <= res["threshold"] <= 1.0 and 0.0 <= res["pixel_threshold"] <= 1.0
    assert res["verdict"] == ("defect" if res["score"] >= res["threshold"] else "ok")
    assert res["image_score"] in ("reference", "map_max", "map_topk")
    assert 0.0 <= res["defect_area_ratio"] <= 1.0
    area = 0
    for reg in res["regions"]:
        x, y, bw, bh = reg["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h and 0 < reg["area"] <= bw * bh
        assert reg["area_ratio"] == pytest.approx(reg["area"] / (w * h))
        assert res["pixel_threshold"] <= reg["mean_score"] <= reg["max_score"] <= 1.0
        assert all(x <= px <= x + bw and y <= py <= y + bh for px, py in reg["polygon"])
        area += reg["area"]
    assert area / (w * h) == pytest.approx(res["defect_area_ratio"], abs=1e-12)  # mask = union of the regions
    model = res["model"]
    assert model["backbone"] == "clip_tiny_openai_format.pt" and len(model["backbone_sha256"]) == 64
    assert model["prompts"] == "prompt_learner_checkpoint" and model["prompts_kind"] == "learned"
    assert (model["preset"], model["precision"], model["device"]) == (PRESET, "fp32", "cpu")
    t = res["timing_ms"]
    for key in ("decode", "queue", "inference", "postprocess", "store", "total"):
        assert t[key] >= 0.0, key
    assert t["batch_size"] >= 1
    assert t["total"] >= t["decode"] + t["inference"] + t["postprocess"] + t["store"] - 1e-3
    rid = res["id"]
    assert res["links"] == {
        "self": f"/inspections/{rid}",
        "overlay": f"/inspections/{rid}/overlay.png",
        "heatmap": f"/inspections/{rid}/heatmap.png",
        "mask": f"/inspections/{rid}/mask.png",
    }


def test_single_image_every_field_and_artefacts(client):
    img = synthetic_image(1, (96, 64))
    r = client.post(
        "/segment",
        files=[("image", ("part.png", encode(img), "image/png"))],
        data={"product": "widget", "line": "L1", "part_id": "SN-001", "include": "overlay, mask"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    (res,) = r.json()["results"]
    check_result(res, "part.png", (96, 64))
    assert (res["product"], res["line"], res["part_id"]) == ("widget", "L1", "SN-001")
    assert (res["threshold"], res["pixel_threshold"], res["image_score"]) == (0.5, 0.5, "reference")
    assert set(res["images"]) == {"overlay", "mask"}
    for kind in ("overlay", "heatmap", "mask"):
        stored = client.get(res["links"][kind])
        assert stored.status_code == 200 and stored.headers["content-type"] == "image/png"
        png = decode_png(stored.content)
        assert png.size == (96, 64)
        assert png.mode == ("L" if kind == "mask" else "RGB")
        if kind in res["images"]:
            assert base64.b64decode(res["images"][kind]) == stored.content
    mask = np.asarray(decode_png(client.get(res["links"]["mask"]).content))
    assert set(np.unique(mask)) <= {0, 255}
    assert np.count_nonzero(mask) / mask.size == pytest.approx(res["defect_area_ratio"], abs=1e-12)
    back = client.get(res["links"]["self"])
    assert back.status_code == 200
    expected = {k: v for k, v in res.items() if k not in ("images", "timing_ms")}
    got = back.json()
    assert {k: v for k, v in got.items() if k != "timing_ms"} == expected
    assert {k: got["timing_ms"][k] for k in ("decode", "queue", "inference", "postprocess", "batch_size")} == {
        k: res["timing_ms"][k] for k in ("decode", "queue", "inference", "postprocess", "batch_size")
    }
    assert got["timing_ms"]["store"] is None and got["timing_ms"]["total"] is None


def test_multi_image_one_result_per_file_in_order(client):
    files = [
        png_file("a.png", 11, (80, 60)),
        png_file("b.png", 12, (64, 96), "L"),
        ("image", ("c.jpg", encode(synthetic_image(13, (100, 50)), "JPEG", quality=90), "image/jpeg")),
    ]
    r = client.post("/segment", files=files, data={"image_score": "map_topk"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["a.png", "b.png", "c.jpg"]
    for res, size in zip(results, [(80, 60), (64, 96), (100, 50)], strict=True):
        check_result(res, res["filename"], size)
        assert res["image_score"] == "map_topk" and res["images"] == {}
    assert len({x["id"] for x in results}) == 3
    assert len({round(x["score"], 9) for x in results}) == 3  # three different images, three different scores
    assert max(x["timing_ms"]["batch_size"] for x in results) >= 2  # the images of a request share batches


def test_png_answer_for_output_and_accept(client):
    img = synthetic_image(21, (120, 72))
    r = client.post("/segment?output=heatmap", files=[("image", ("h.png", encode(img), "image/png"))])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert decode_png(r.content).size == (120, 72)
    rid = r.headers["x-inspection-id"]
    score, threshold = float(r.headers["x-score"]), float(r.headers["x-threshold"])
    assert r.headers["x-verdict"] == ("defect" if score >= threshold else "ok")
    record = client.get(f"/inspections/{rid}").json()
    assert record["score"] == score and record["verdict"] == r.headers["x-verdict"]
    assert client.get(f"/inspections/{rid}/heatmap.png").content == r.content

    r2 = client.post(
        "/segment", files=[("image", ("o.png", encode(img), "image/png"))], headers={"Accept": "image/png"}
    )
    assert r2.status_code == 200 and r2.headers["content-type"] == "image/png"
    assert decode_png(r2.content).size == (120, 72)
    assert client.get(f"/inspections/{r2.headers['x-inspection-id']}/overlay.png").content == r2.content
    assert float(r2.headers["x-score"]) == pytest.approx(score, abs=1e-5)  # same image, same score


def test_scores_equal_the_model_alone_for_every_variant(client, direct_model):
    """Same numbers as ImageResult of the model run directly; the product profile picks the variant and
    the request's image_score overrides it."""
    data = PARITY_IMAGE.read_bytes()
    with Image.open(PARITY_IMAGE) as img:
        alone = direct_model.run([load_views(img, direct_model.preset)])[0]
    assert (
        client.put(
            "/products/parity", json={"image_threshold": 0.4, "pixel_threshold": 0.6, "image_score": "map_max"}
        ).status_code
        == 200
    )
    file = [("image", ("p.png", data, "image/png"))]
    ref = client.post("/segment", files=file).json()["results"][0]
    by_profile = client.post("/segment", files=file, data={"product": "parity"}).json()["results"][0]
    override = client.post("/segment", files=file, data={"product": "parity", "image_score": "map_topk"}).json()
    override = override["results"][0]
    assert ref["image_score"] == "reference" and ref["score"] == pytest.approx(alone.scores.reference, abs=1e-5)
    assert by_profile["image_score"] == "map_max" and by_profile["score"] == pytest.approx(
        alone.scores.map_max, abs=1e-5
    )
    assert override["image_score"] == "map_topk" and override["score"] == pytest.approx(alone.scores.map_topk, abs=1e-5)
    assert (by_profile["threshold"], by_profile["pixel_threshold"]) == (0.4, 0.6)
    assert by_profile["verdict"] == ("defect" if alone.scores.map_max >= 0.4 else "ok")
    # the stored mask is the model's map resized to 640x480 and thresholded at the profile's 0.6
    mask = np.asarray(decode_png(client.get(by_profile["links"]["mask"]).content)) > 0
    expected = resize_map(alone.anomaly_map, 640, 480) >= 0.6
    assert mask.shape == (480, 640)
    assert np.mean(mask != expected) < 1e-3  # only pixels within float noise of the threshold may differ


def test_product_thresholds_take_effect(client):
    for name, body in {
        "always": {"image_threshold": 0.0, "pixel_threshold": 0.0},
        "never": {"image_threshold": 1.0, "pixel_threshold": 1.0, "image_score": "map_topk"},
    }.items():
        r = client.put(f"/products/{name}", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["name"] == name and r.json()["image_threshold"] == body["image_threshold"]
    files = [png_file("x.png", 31)]
    always = client.post("/segment", files=files, data={"product": "always"}).json()["results"]
    assert [x["verdict"] for x in always] == ["defect"]
    for x in always:  # pixel threshold 0: the whole image is one region
        assert x["threshold"] == 0.0 and x["defect_area_ratio"] == 1.0
        assert [reg["bbox"] for reg in x["regions"]] == [[0, 0, 96, 64]]
    never = client.post("/segment", files=files, data={"product": "never"}).json()["results"]
    assert [x["verdict"] for x in never] == ["ok"]
    assert all(x["score"] < 1.0 and x["image_score"] == "map_topk" for x in never)
    unknown = client.post("/segment", files=files, data={"product": "no-profile"}).json()["results"][0]
    assert (unknown["threshold"], unknown["pixel_threshold"], unknown["image_score"]) == (0.5, 0.5, "reference")

    listed = client.get("/products").json()["items"]
    names = [p["name"] for p in listed]
    assert names == sorted(names) and {"always", "never"} <= set(names)
    got = client.get("/products/never").json()
    assert (got["image_threshold"], got["pixel_threshold"], got["image_score"]) == (1.0, 1.0, "map_topk")


def test_listing_filters_and_cursor_pages(client):
    a = client.post(
        "/segment", files=[png_file(f"a{i}.png", 40 + i) for i in range(2)], data={"product": "pager", "line": "A"}
    ).json()["results"]
    b = client.post(
        "/segment", files=[png_file(f"b{i}.png", 50 + i) for i in range(2)], data={"product": "pager", "line": "B"}
    ).json()["results"]
    newest_first = [x["id"] for x in reversed(a + b)]
    pages, cursor = [], None
    while True:
        params = {"product": "pager", "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/inspections", params=params).json()
        pages.append([x["id"] for x in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [newest_first[0:3], newest_first[3:4]]
    line_a = client.get("/inspections", params={"product": "pager", "line": "A"}).json()
    assert [x["id"] for x in line_a["items"]] == [x["id"] for x in reversed(a)] and line_a["next_cursor"] is None
    for verdict in ("ok", "defect"):
        items = client.get("/inspections", params={"product": "pager", "verdict": verdict}).json()["items"]
        assert {x["id"] for x in items} == {x["id"] for x in a + b if x["verdict"] == verdict}
    first = client.get(f"/inspections/{b[0]['id']}").json()["created_at"]
    since = client.get("/inspections", params={"product": "pager", "since": first}).json()["items"]
    assert [x["id"] for x in since] == [b[1]["id"], b[0]["id"]]
    until = client.get("/inspections", params={"product": "pager", "until": first}).json()["items"]
    assert [x["id"] for x in until] == [x["id"] for x in reversed(a)]
    assert client.get("/inspections", params={"product": "nothing-here"}).json() == {"items": [], "next_cursor": None}


def test_health_livez_readyz_and_metrics(client):
    from prometheus_client.parser import text_string_to_metric_families

    r = client.post("/segment", files=[png_file("m.png", 61)])
    assert r.status_code == 200 and r.headers["x-dhr-replica"] == "seg-1"
    rid = r.json()["results"][0]["id"]
    assert client.get(f"/inspections/{rid}").status_code == 200
    assert client.get("/livez").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready"}
    health = client.get("/health")
    assert health.status_code == 200
    h = health.json()
    assert h["status"] == "ok" and h["model"]["prompts_kind"] == "learned"
    assert (h["device"], h["precision"], h["preset"]) == ("cpu", "fp32", PRESET)
    assert (h["queue_depth"], h["queue_size"], h["max_batch_size"]) == (0, 64, 8)
    assert h["uptime_s"] > 0 and h["last_inference_at"] is not None and h["warmup_s"] is None
    counts = h["counts"]
    assert counts["total"] == counts["ok"] + counts["defect"] == counts["stored"] >= 1
    assert h["replica"] == "seg-1" and h["pid"] == os.getpid()  # the TestClient runs the app in this process

    text = client.get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(text.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    key = ("dhr_http_requests_total", (("method", "POST"), ("route", "/segment"), ("status", "200")))
    assert samples[key] >= 1
    get_key = (
        "dhr_http_requests_total",
        (("method", "GET"), ("route", "/inspections/{inspection_id}"), ("status", "200")),
    )
    assert samples[get_key] >= 1
    assert samples[("dhr_images_total", (("replica", "seg-1"), ("verdict", "ok")))] == counts["ok"]
    assert samples[("dhr_images_total", (("replica", "seg-1"), ("verdict", "defect")))] == counts["defect"]
    assert samples[("dhr_inflight_requests", (("replica", "seg-1"),))] == 0  # /metrics itself is not counted
    assert samples[("dhr_batch_size_count", ())] == samples[("dhr_batches_total", ())] >= 1
    assert samples[("dhr_inference_seconds_count", ())] >= 1
    assert samples[("dhr_queue_depth", (("replica", "seg-1"),))] == 0 and samples[("dhr_model_ready", ())] == 1
    info = [labels for (name, labels), _ in samples.items() if name == "dhr_model_info"]
    assert dict(info[0])["prompts_kind"] == "learned" and dict(info[0])["preset"] == PRESET


def test_request_id_and_one_access_log_line(client, caplog):
    import json

    caplog.set_level("INFO", logger="dhrclip.access")
    r = client.post(
        "/segment", files=[png_file("r1.png", 71), png_file("r2.png", 72)], headers={"X-Request-ID": "line-7:part.42"}
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "line-7:part.42"
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "dhrclip.access"]
    mine = [x for x in lines if x["request_id"] == "line-7:part.42"]
    assert len(mine) == 1
    assert {k: mine[0][k] for k in ("method", "path", "route", "status", "n_images", "replica")} == {
        "method": "POST",
        "path": "/segment",
        "route": "/segment",
        "status": 200,
        "n_images": 2,
        "replica": "seg-1",
    }
    assert mine[0]["duration_ms"] > 0
    generated = client.get("/livez").headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert (
        client.get("/livez", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
        != "bad id\twith spaces"
    )
    missing = client.get("/inspections/0")
    assert missing.status_code == 404 and len(missing.headers["x-request-id"]) == 32
    assert missing.json()["request_id"] == missing.headers["x-request-id"]
