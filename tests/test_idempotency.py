"""Idempotency-Key on POST /segment: a retry gets the stored answer, another body with the same key gets 409."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.storage import InspectionRecord, InspectionStore
from service.storage.models import IdempotencyEntry

from .api_fixtures import make_settings, png_file, wait_ready


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with TestClient(create_app(make_settings(tmp_path_factory.mktemp("idem-data")))) as c:
        wait_ready(c)
        yield c


def count(client) -> int:
    return client.get("/health").json()["counts"]["stored"]


def test_same_key_and_body_returns_the_stored_answer(client):
    files = [png_file("a.png", 1), png_file("b.png", 2)]
    first = client.post("/segment", files=files, data={"product": "p1"}, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    stored = count(client)
    again = client.post("/segment", files=files, data={"product": "p1"}, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    ids = [r["id"] for r in first.json()["results"]]
    assert [r["id"] for r in again.json()["results"]] == ids and count(client) == stored
    assert [r["score"] for r in again.json()["results"]] == [r["score"] for r in first.json()["results"]]


def test_same_key_with_another_body_is_409(client):
    headers = {"Idempotency-Key": "k-2"}
    assert client.post("/segment", files=[png_file("a.png", 3)], headers=headers).status_code == 200
    other = client.post("/segment", files=[png_file("a.png", 4)], headers=headers)
    assert other.status_code == 409 and other.json()["type"] == "urn:dhrclip:problem:idempotency-key-reused"
    fields = client.post("/segment", files=[png_file("a.png", 3)], data={"line": "L2"}, headers=headers)
    assert fields.status_code == 409


def test_a_png_answer_is_replayed_byte_for_byte(client):
    headers = {"Idempotency-Key": "k-3"}
    first = client.post("/segment?output=mask", files=[png_file("m.png", 5)], headers=headers)
    again = client.post("/segment?output=mask", files=[png_file("m.png", 5)], headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and again.headers["x-inspection-id"] == first.headers["x-inspection-id"]


def test_an_invalid_key_is_422(client):
    r = client.post("/segment", files=[png_file("x.png", 6)], headers={"Idempotency-Key": "has space"})
    assert r.status_code == 422


def test_the_key_commits_with_the_record_or_not_at_all(tmp_path):
    def record() -> InspectionRecord:
        return InspectionRecord(
            width=4, height=4, score=0.1, threshold=0.5, verdict="ok", image_score="reference",
            pixel_threshold=0.5, defect_area_ratio=0.0,
        )  # fmt: skip

    with InspectionStore(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "data") as store:
        first = record()
        store.add(first, {"mask": b"png"}, IdempotencyEntry("k", "f" * 64, [first.id]))
        with pytest.raises(ValueError, match="idempotency key"):
            second = record()
            store.add(second, {"mask": b"png"}, IdempotencyEntry("k", "e" * 64, [second.id]))
        assert store.count() == 1 and store.get_idempotency("k").inspection_ids == [first.id]
        assert not any(p.name == second.id for p in (tmp_path / "data").rglob("*"))
