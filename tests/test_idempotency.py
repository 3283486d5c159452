"""Idempotency-Key on POST /segment: a retry gets the stored answer, another body with the same key gets 409.

The key is claimed in the database (a pending row), so replicas sharing it see each other's keys; every inspection
of a request is stored with its key as one unit. Database tests run on SQLite and, with DHR_TEST_POSTGRES_URL, on
PostgreSQL.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from service.api import create_app
from service.api.idempotency import fingerprint
from service.api.pipeline import Upload
from service.api.routes_segment import SegmentForm
from service.storage import InspectionRecord, InspectionStore
from service.storage.idempotency import ClaimLostError, IdempotencyEntry
from service.storage.schema import alembic_config

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
    renamed = client.post("/segment", files=[png_file("b.png", 3)], headers=headers)  # same bytes, another name
    assert renamed.status_code == 409 and renamed.json()["type"] == "urn:dhrclip:problem:idempotency-key-reused"
    as_png = client.post("/segment?output=mask", files=[png_file("a.png", 3)], headers=headers)  # another answer
    assert as_png.status_code == 409 and as_png.headers["content-type"] == "application/problem+json"


def test_a_png_answer_is_replayed_byte_for_byte(client):
    headers = {"Idempotency-Key": "k-3"}
    first = client.post("/segment?output=mask", files=[png_file("m.png", 5)], headers=headers)
    again = client.post("/segment?output=mask", files=[png_file("m.png", 5)], headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and again.headers["x-inspection-id"] == first.headers["x-inspection-id"]


def test_an_invalid_key_is_422(client):
    r = client.post("/segment", files=[png_file("x.png", 6)], headers={"Idempotency-Key": "has space"})
    assert r.status_code == 422


def record() -> InspectionRecord:
    return InspectionRecord(
        width=4, height=4, score=0.1, threshold=0.5, verdict="ok", image_score="reference",
        pixel_threshold=0.5, defect_area_ratio=0.0,
    )  # fmt: skip


def test_the_key_commits_with_the_record_or_not_at_all(tmp_path):
    with InspectionStore(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "data") as store:
        first = record()
        store.add(first, {"mask": b"png"}, IdempotencyEntry("k", "f" * 64, [first.id]))
        with pytest.raises(ValueError, match="idempotency key"):
            second = record()
            store.add(second, {"mask": b"png"}, IdempotencyEntry("k", "e" * 64, [second.id]))
        assert store.count() == 1 and store.get_idempotency("k").inspection_ids == [first.id]
        assert not any(p.name == second.id for p in (tmp_path / "data").rglob("*"))


def files_of(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png"))


def test_a_claim_is_one_row_that_every_replica_sees(database_url, tmp_path):
    art = tmp_path / "art"
    with InspectionStore(database_url, art) as a, InspectionStore(database_url, art) as b:
        claim, mine = a.claim_idempotency("k", "f" * 64, 60.0)
        assert mine and (claim.state, claim.inspection_ids, len(claim.claim)) == ("pending", [], 32)
        seen, mine_b = b.claim_idempotency("k", "f" * 64, 60.0)  # another replica: the pending row, not a claim
        assert not mine_b and (seen.state, seen.claim) == ("pending", claim.claim)
        a.release_idempotency(claim)
        again, mine_b = b.claim_idempotency("k", "e" * 64, 60.0)
        assert mine_b and again.claim != claim.claim and b.get_idempotency("k").fingerprint == "e" * 64

        stale, _ = a.claim_idempotency("s", "f" * 64, 60.0)  # its process dies; the claim goes stale
        time.sleep(0.01)
        taken, mine_b = b.claim_idempotency("s", "f" * 64, 0.005)
        assert mine_b and taken.claim != stale.claim
        late = [record(), record()]
        with pytest.raises(ClaimLostError):
            a.add_many([(r, {"mask": b"png"}) for r in late], replace(stale, inspection_ids=[r.id for r in late]))
        assert a.count() == 0 and files_of(art) == []  # the request that lost its claim stored nothing

        both = [record(), record()]
        b.add_many([(r, {"mask": b"png"}) for r in both], replace(taken, inspection_ids=[r.id for r in both]))
        done = a.get_idempotency("s")
        assert (done.state, done.claim, done.inspection_ids) == ("done", None, [r.id for r in both])
        b.release_idempotency(taken)  # freeing a key that is done is a no-op
        assert a.get_idempotency("s").state == "done" and a.count() == 2 and len(files_of(art)) == 2
        assert a.claim_idempotency("s", "f" * 64, 0.0)[1] is False  # a done key is never taken over


def test_the_whole_request_and_its_key_are_one_unit(database_url, tmp_path, monkeypatch):
    art = tmp_path / "art"
    with InspectionStore(database_url, art) as store:
        claim, _ = store.claim_idempotency("k", "f" * 64, 60.0)
        first, second = record(), record()
        entry = replace(claim, inspection_ids=[first.id, second.id])
        with pytest.raises(ValueError, match="exists"):  # the second row collides: the first is not kept either
            store.add_many([(first, {"mask": b"png"}), (replace(second, id=first.id), {"mask": b"png"})], entry)
        assert store.count() == 0 and files_of(art) == [] and store.get_idempotency("k").state == "pending"
        real_put, puts = store.artefacts.put, []

        def failing_put(key, data):
            puts.append(key)
            if len(puts) == 2:
                raise OSError("disk full")
            real_put(key, data)

        monkeypatch.setattr(store.artefacts, "put", failing_put)
        with pytest.raises(OSError, match="disk full"):
            store.add_many([(first, {"mask": b"png"}), (second, {"mask": b"png"})], entry)
        assert store.count() == 0 and files_of(art) == []
        monkeypatch.undo()
        store.add_many([(first, {"mask": b"png"}), (second, {"mask": b"png"})], entry)
        assert store.count() == 2 and store.get_idempotency("k").inspection_ids == [first.id, second.id]


def test_a_key_pending_on_another_replica_is_409_and_a_failed_request_frees_its_key(database_url, tmp_path):
    settings = make_settings(tmp_path / "data", database_url=database_url)
    with TestClient(create_app(settings)) as c, InspectionStore(database_url, tmp_path / "data") as replica:
        wait_ready(c)
        files = [png_file("a.png", 11), png_file("b.png", 12)]
        headers = {"Idempotency-Key": "shared-key"}
        other = c.post("/segment", files=[png_file("a.png", 11)], headers={"Idempotency-Key": "other-key"})
        uploads = [Upload(i, name, data) for i, (_, (name, data, _)) in enumerate(files)]
        fp = fingerprint(SegmentForm().model_dump(mode="json"), uploads, None)
        claim, _ = replica.claim_idempotency("shared-key", fp, 600.0)  # another replica runs this request now
        busy = c.post("/segment", files=files, headers=headers)
        assert busy.status_code == 409 and busy.headers["retry-after"] == "1"
        assert busy.json()["type"] == "urn:dhrclip:problem:idempotency-key-in-flight"
        reused = c.post("/segment", files=files[:1], headers=headers)
        assert reused.status_code == 409 and reused.json()["type"] == "urn:dhrclip:problem:idempotency-key-reused"
        replica.release_idempotency(claim)

        store = c.app.state.ctx.require_store()
        real_put, puts = store.artefacts.put, []

        def failing_put(key, data):  # the disk fails while the second image's PNGs are written
            puts.append(key)
            if len(puts) == 4:
                raise OSError("disk full")
            real_put(key, data)

        store.artefacts.put = failing_put
        try:
            failed = c.post("/segment", files=files, headers=headers)
            assert failed.status_code == 503 and failed.headers["retry-after"] == "5"
            assert failed.headers["content-type"] == "application/problem+json"
            assert failed.json()["type"] == "urn:dhrclip:problem:storage-unavailable"
            assert "OSError" in failed.json()["detail"] and "disk full" not in failed.json()["detail"]
        finally:
            store.artefacts.put = real_put
        assert replica.count() == 1 and replica.get_idempotency("shared-key") is None  # nothing kept, key free

        first = c.post("/segment", files=files, headers=headers)
        assert first.status_code == 200 and len(first.json()["results"]) == 2
        again = c.post("/segment", files=files, headers=headers)
        assert again.headers["idempotent-replayed"] == "true" and again.json()["results"] == [
            {**r, "timing_ms": {**r["timing_ms"], "store": None, "total": None}} for r in first.json()["results"]
        ]
        assert replica.count() == 3 and other.status_code == 200
        done = replica.get_idempotency("shared-key")
        assert done.state == "done" and done.inspection_ids == [r["id"] for r in first.json()["results"]]


OLD_KEY = {
    "key": "old",
    "fingerprint": "f" * 64,
    "inspection_ids": '["0123456789abcdef0123456789ab"]',
    "created_at": "2026-11-29 12:00:00.000000",
}


def database_at(url: str, revision: str, rows: list[dict]) -> None:
    """A new database migrated only up to ``revision``, with ``rows`` (``{column: value}``) in ``idempotency_keys``."""
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        for row in rows:
            names = ", ".join(row)
            conn.execute(
                text(f"INSERT INTO idempotency_keys ({names}) VALUES ({', '.join(f':{n}' for n in row)})"), row
            )
    engine.dispose()


def test_keys_of_a_database_before_claims_upgrade_as_done(database_url, tmp_path):
    database_at(database_url, "0004_product_knowledge", [OLD_KEY])
    with InspectionStore(database_url, tmp_path / "art") as store:
        old = store.get_idempotency("old")
        assert (old.state, old.claim, old.inspection_ids) == ("done", None, ["0123456789abcdef0123456789ab"])
        assert store.claim_idempotency("old", "f" * 64, 0.0) == (old, False)
