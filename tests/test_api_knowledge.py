"""Product knowledge over HTTP: references (all-or-nothing), memory in /segment, calibration, restart, review zone."""

from __future__ import annotations

import base64
import hashlib
import math
import time

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from service.api import create_app
from service.storage.models import utcnow

from .api_fixtures import encode, make_record, make_settings, wait_ready

SIDE = 224


def _texture(seed: int, foreign: bool = False) -> bytes:
    """Stripes at a random phase with sensor noise (good); ``foreign``: a square of random colours pasted in."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
    dy, dx = rng.uniform(0, 6, 2)
    grey = np.clip(
        128 + 50 * np.sin((xx + dx) / 3.0) + 40 * np.cos((yy + dy) / 4.0) + rng.normal(0, 4, xx.shape), 0, 255
    )
    img = np.stack([grey, 0.8 * grey + 20, 0.6 * grey + 40], -1).astype(np.uint8)
    if foreign:
        img[150:190, 50:90] = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    return encode(Image.fromarray(img))


def _files(field: str, seeds, foreign: bool = False) -> list:
    return [(field, (f"part{s}.png", _texture(s, foreign), "image/png")) for s in seeds]


def _problem(r, status: int, slug: str, text: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"].endswith(slug) and text in body["detail"], body


def test_references_memory_calibration_and_restart(tmp_path):
    settings = make_settings(tmp_path / "data")
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        _problem(client.post("/products/nope/references", files=_files("image", [1])), 404, "not-found", "nope")
        r = client.put("/products/weave", json={"image_threshold": 0.5, "pixel_threshold": 0.5})
        assert r.status_code == 200 and r.json()["memory_version"] is None

        zero = client.post("/segment", data={"product": "weave"}, files=_files("image", [20], foreign=True)).json()
        assert zero["results"][0]["memory_version"] is None

        r = client.post("/products/weave/references", files=_files("image", [1, 2, 3]))
        assert r.status_code == 201, r.text
        added = r.json()
        assert [i["filename"] for i in added["items"]] == ["part1.png", "part2.png", "part3.png"]
        memory = added["memory"]
        # preset fast, tiny CLIP (D = 64, one "final" layer): 24^2 whole + 4 * 16^2 crop tokens per reference
        assert memory["n_references"] == 3 and memory["tokens"] == 3 * (576 + 4 * 256)
        assert memory["nbytes"] == memory["tokens"] * 64 * 4

        bad = [*_files("image", [4]), ("image", ("notes.txt", b"not an image", "text/plain"))]
        r = client.post("/products/weave/references", files=bad)
        assert r.status_code in (400, 415, 422), r.text
        assert "notes.txt" in r.json()["detail"]
        listed = client.get("/products/weave/references").json()
        assert len(listed["items"]) == 3 and listed["memory"]["version"] == memory["version"]  # nothing added
        # the refused request's good image may be inside a model call already: that call runs to its end (only
        # queued images are cancelled), and until it ends admission refuses a lone image (wait > half a call)
        batcher, deadline = client.app.state.ctx.engine.batcher, time.monotonic() + 30
        while batcher.in_flight:
            assert time.monotonic() < deadline, "the refused request's batch never ended"
            time.sleep(0.01)

        seg = client.post("/segment", data={"product": "weave"}, files=_files("image", [21, 20], foreign=True))
        bad_score = seg.json()["results"][1]["score"]
        good = client.post("/segment", data={"product": "weave"}, files=_files("image", [21, 22])).json()["results"]
        assert all(g["memory_version"] == memory["version"] for g in good)
        assert bad_score > max(g["score"] for g in good)

        _problem(
            client.post("/products/weave/calibrate", data={"use_references": "true"}),
            422,
            "sample-too-small",
            "3 good images cannot support a false-reject rate of 0.01: at least 100 are needed",
        )
        _problem(
            client.post("/products/weave/calibrate", data={"use_references": "true", "target_frr": "0.7"}),
            422,
            "invalid-calibration",
            "target_frr must be in (0, 0.5), got 0.7",
        )
        _problem(client.post("/products/weave/calibrate", data={}), 422, "empty-calibration-set", "'good'")
        r = client.post(
            "/products/weave/calibrate",
            data={"use_references": "true", "target_frr": "0.34", "image_score": "map_max"},
            files=_files("defect", [20], foreign=True),
        )
        assert r.status_code == 200, r.text
        product = r.json()
        cal = product["calibration"]
        assert cal["n_good"] == 3 and cal["n_defect"] == 1 and cal["good_frr"] == 1 / 3
        assert cal["current"] and cal["memory_version"] == memory["version"]
        assert product["image_threshold"] == cal["reject_threshold"] == product["review_threshold"]
        assert product["calibration_version"] == cal["version"] and product["image_score"] == "map_max"
        assert sum(cal["good_histogram"]) == 3 and sum(cal["defect_histogram"]) == 1
        assert (
            product["pixel_threshold"]
            == cal["pixel_threshold"]
            > cal["pixel_good_level"]
            == product["pixel_good_level"]
        )
        before = client.post(
            "/segment", data={"product": "weave", "include": "heatmap"}, files=_files("image", [22])
        ).json()["results"][0]
        assert before["calibration_version"] == cal["version"]
        # rendered later from the stored map with the calibration's colour anchor: the bytes answered inline
        stored_heatmap = client.get(before["links"]["heatmap"]).content
        assert stored_heatmap == base64.b64decode(before["images"]["heatmap"])

    with TestClient(create_app(settings)) as client:  # restart on the same data dir and database
        wait_ready(client)
        product = client.get("/products/weave").json()
        assert product["memory"]["version"] == memory["version"] and product["calibration"]["version"] == cal["version"]
        after = client.post("/segment", data={"product": "weave"}, files=_files("image", [22])).json()["results"][0]
        assert after["score"] == before["score"] and after["memory_version"] == memory["version"]

        ref_id = listed["items"][0]["id"]
        assert client.delete(f"/products/weave/references/{ref_id}").status_code == 204
        _problem(client.delete(f"/products/weave/references/{ref_id}"), 404, "not-found", ref_id)
        product = client.get("/products/weave").json()
        assert product["memory"]["n_references"] == 2 and product["memory_version"] != memory["version"]
        assert product["calibration"]["current"] is False


def test_review_zone_verdicts_are_counted_and_thresholds_must_be_ordered(tmp_path):
    with TestClient(create_app(make_settings(tmp_path / "data"))) as client:
        wait_ready(client)
        r = client.put("/products/p", json={"image_threshold": 0.4, "review_threshold": 0.6, "pixel_threshold": 0.5})
        assert r.status_code == 422 and "thresholds out of order" in r.text
        body = {"image_threshold": 1.0, "review_threshold": 0.0, "pixel_threshold": 0.5}
        assert client.put("/products/p", json=body).status_code == 200
        res = client.post("/segment", data={"product": "p"}, files=_files("image", [5])).json()["results"][0]
        assert res["verdict"] == "review" and not math.isnan(res["score"])
        assert client.get("/health").json()["counts"]["review"] == 1
        replica = client.get("/health").json()["replica"]
        assert f'dhr_images_total{{replica="{replica}",verdict="review"}} 1.0' in client.get("/metrics").text


def test_false_reject_adds_the_stored_original_as_a_reference(tmp_path, monkeypatch):
    """Review with add_reference: the inspection's stored original becomes a reference (same bytes), the review
    names it; the same image twice is 409; a review that cannot be stored takes its reference back."""
    with TestClient(create_app(make_settings(tmp_path / "data"))) as client:
        wait_ready(client)
        assert client.put("/products/weave", json={"image_threshold": 0.5, "pixel_threshold": 0.5}).is_success
        store = client.app.state.ctx.store
        original = _texture(5)
        recs = [
            store.add(make_record(utcnow(), "defect", product="weave", filename="part5.png"), {"original": data})
            for data in (original, original, _texture(6))
        ]
        body = {"decision": "false_reject", "add_reference": True, "note": "dust"}
        r = client.post(f"/inspections/{recs[0].id}/review", json=body)
        assert r.status_code == 201, r.text
        ref_id = r.json()["reference_id"]
        listed = client.get("/products/weave/references").json()
        assert [(i["id"], i["filename"]) for i in listed["items"]] == [(ref_id, "part5.png")]
        assert listed["items"][0]["sha256"] == hashlib.sha256(original).hexdigest()
        assert listed["memory"]["n_references"] == 1
        assert client.get(f"/inspections/{recs[0].id}").json()["reviews"][0]["reference_id"] == ref_id

        _problem(client.post(f"/inspections/{recs[1].id}/review", json=body), 409, "already-a-reference", "weave")
        assert store.reviews_of([recs[1].id]) == {}

        def gone(review):
            raise LookupError(f"no inspection with id {review.inspection_id!r}")  # removed by retention meanwhile

        monkeypatch.setattr(store, "add_review", gone)
        _problem(client.post(f"/inspections/{recs[2].id}/review", json=body), 404, "not-found", recs[2].id)
        listed = client.get("/products/weave/references").json()
        assert [i["id"] for i in listed["items"]] == [ref_id] and listed["memory"]["n_references"] == 1


def test_calibrate_refuses_unknown_fields_and_booleans_it_cannot_read(tmp_path):
    """use_references=on (an HTML checkbox) or any other word was read as false: with good files the product was
    calibrated on them alone instead of 422 ambiguous; a misspelt target_frr was ignored (the default applied)."""
    with TestClient(create_app(make_settings(tmp_path / "data"))) as client:
        wait_ready(client)
        assert client.put("/products/weave", json={"image_threshold": 0.5, "pixel_threshold": 0.5}).status_code == 200
        good = _files("good", [5, 6])
        r = client.post("/products/weave/calibrate", data={"use_references": "on"}, files=good)
        _problem(r, 422, "invalid-calibration", "send 'good' files or use_references=true, not both")
        r = client.post("/products/weave/calibrate", data={"use_references": "maybe"}, files=good)
        _problem(r, 422, "validation-error", "use_references must be true or false, got 'maybe'")
        r = client.post("/products/weave/calibrate", data={"target_fr": "0.2"}, files=good)
        _problem(r, 422, "validation-error", "body.target_fr: unknown field")
        assert client.get("/products/weave").json()["calibration"] is None


def test_a_lost_original_is_named_as_lost_not_as_never_stored(tmp_path, caplog):
    """The store had lost the original of an inspection that lists it: the answer was 409 "stored without its
    uploaded image (DHR_STORE_ORIGINALS=false ...)", hiding the damage; now the artefact route's answer: 500
    artefact-missing naming the file, logged as a damaged store. Nothing is written."""
    with TestClient(create_app(make_settings(tmp_path / "data")), raise_server_exceptions=False) as client:
        wait_ready(client)
        assert client.put("/products/weave", json={"image_threshold": 0.5, "pixel_threshold": 0.5}).is_success
        store = client.app.state.ctx.store
        rec = store.add(make_record(utcnow(), "defect", product="weave"), {"original": _texture(5)})
        key = store.artefact_key(rec.id, "original")
        store.artefacts.delete(key)
        body = {"decision": "false_reject", "add_reference": True}
        with caplog.at_level("ERROR", logger="dhrclip.api"):
            _problem(client.post(f"/inspections/{rec.id}/review", json=body), 500, "artefact-missing", key)
        assert "damaged artefact store" in caplog.text
        assert store.reviews_of([rec.id]) == {} and client.get("/products/weave/references").json()["items"] == []


def test_references_are_all_or_nothing_when_the_storage_fails(tmp_path, monkeypatch):
    """A storage failure while adding references was a bare 500; when the memory rebuild failed, the references
    stayed stored while the memory in use did not hold them. Now 503 storage-unavailable and nothing is kept."""

    with TestClient(create_app(make_settings(tmp_path / "data")), raise_server_exceptions=False) as client:
        wait_ready(client)
        assert client.put("/products/weave", json={"image_threshold": 0.5, "pixel_threshold": 0.5}).is_success
        store = client.app.state.ctx.store

        def full_disk(*args):
            raise OSError(28, "No space left on device")

        for target in ("add_references", "set_memory"):
            with monkeypatch.context() as m:
                m.setattr(store, target, full_disk)
                r = client.post("/products/weave/references", files=_files("image", [1, 2]))
            _problem(r, 503, "storage-unavailable", "the references could not be stored (OSError); nothing was kept")
            listed = client.get("/products/weave/references").json()
            assert listed == {"items": [], "memory": None}, target
            assert list(store.artefacts.keys("references/")) == [], target


def test_a_removal_whose_memory_cannot_be_rebuilt_keeps_the_reference(tmp_path, monkeypatch):
    """The reference was deleted first: when the memory rebuild then failed (500), the memory in use kept judging
    with the deleted image and a retry was 404. Now the memory without it is built first; a failure is 503 with the
    reference and the memory as they were, and the retry completes."""
    with TestClient(create_app(make_settings(tmp_path / "data")), raise_server_exceptions=False) as client:
        wait_ready(client)
        assert client.put("/products/weave", json={"image_threshold": 0.5, "pixel_threshold": 0.5}).is_success
        added = client.post("/products/weave/references", files=_files("image", [1, 2])).json()
        first, version = added["items"][0]["id"], added["memory"]["version"]
        store = client.app.state.ctx.store

        def full_disk(*args):
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as m:
            m.setattr(store, "set_memory", full_disk)
            r = client.delete(f"/products/weave/references/{first}")
        _problem(r, 503, "storage-unavailable", "the removal could not be stored (OSError)")
        listed = client.get("/products/weave/references").json()
        assert len(listed["items"]) == 2 and listed["memory"]["version"] == version
        assert client.delete(f"/products/weave/references/{first}").status_code == 204
        listed = client.get("/products/weave/references").json()
        assert [i["id"] for i in listed["items"]] == [added["items"][1]["id"]]
        assert listed["memory"]["n_references"] == 1 and listed["memory"]["version"] != version
