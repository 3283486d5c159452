"""A pending Idempotency-Key whose process died is free at once: owners, heartbeats and the dead-after rule.

Every service process beats in the ``instances`` table (``service.storage.instances``); a pending key names its
owner. A retry takes over the key of an owner silent for DEAD_AFTER_BEATS intervals (or whose row is gone), never
that of a live one; the request whose claim was taken over stores nothing. Database tests run on SQLite and, with
DHR_TEST_POSTGRES_URL, on PostgreSQL. The subprocess test kills a server with SIGKILL while it holds a key.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from service.api import create_app
from service.api.idempotency import fingerprint
from service.api.pipeline import Upload
from service.api.routes_segment import SegmentForm
from service.storage import InspectionStore
from service.storage.heartbeat import Heartbeat
from service.storage.idempotency import ClaimLostError
from service.storage.instances import DEAD_AFTER_BEATS, Instance

from .api_fixtures import make_settings, png_file, wait_ready
from .server_process import ServerProcess
from .test_idempotency import OLD_KEY, database_at, files_of, record

FP = "f" * 64
SHORT = 0.02  # s: an owner beating at this interval is dead DEAD_AFTER_BEATS * SHORT after its beat


def dead(store: InspectionStore, name: str) -> Instance:
    """An instance that beat once, at a short interval, and then fell silent long enough to count as dead."""
    instance = Instance.new(name)
    store.beat(instance, SHORT)
    time.sleep(DEAD_AFTER_BEATS * SHORT + 0.05)
    return instance


def test_a_dead_owners_key_is_taken_over_at_once_a_live_owners_never(database_url, tmp_path):
    art = tmp_path / "art"
    with InspectionStore(database_url, art) as a, InspectionStore(database_url, art) as b:
        live = Instance.new("a")
        a.beat(live, 60.0)
        claim, mine = a.claim_idempotency("live", FP, 600.0, live.id)
        assert mine and claim.owner == live.id and a.get_idempotency("live").owner == live.id
        seen, mine_b = b.claim_idempotency("live", FP, 600.0, "b" * 32)
        assert not mine_b and (seen.state, seen.claim, seen.owner) == ("pending", claim.claim, live.id)
        assert b.instance_alive(live.id) and not b.instance_alive("0" * 32)

        crashed = dead(a, "crashed")
        held, _ = a.claim_idempotency("k", FP, 600.0, crashed.id)
        assert not b.instance_alive(crashed.id)
        taken, mine_b = b.claim_idempotency("k", FP, 600.0, live.id)  # long before the 600 s backstop
        assert mine_b and taken.claim != held.claim and b.get_idempotency("k").owner == live.id
        late = [record(), record()]
        with pytest.raises(ClaimLostError):  # the dead owner's request, had it lived on, stores nothing
            a.add_many([(r, {"mask": b"png"}) for r in late], replace(held, inspection_ids=[r.id for r in late]))
        assert a.count() == 0 and files_of(art) == []
        mine_now = [record()]
        b.add_many([(r, {"mask": b"png"}) for r in mine_now], replace(taken, inspection_ids=[mine_now[0].id]))
        done = a.get_idempotency("k")
        assert (done.state, done.claim, done.owner, done.inspection_ids) == ("done", None, None, [mine_now[0].id])
        assert a.count() == 1 and len(files_of(art)) == 1

        gone = Instance.new("stopped")  # a clean shutdown deletes the row: its keys are free at once
        a.beat(gone, 60.0)
        a.claim_idempotency("g", FP, 600.0, gone.id)
        assert b.claim_idempotency("g", FP, 600.0, live.id)[1] is False
        a.forget_instance(gone.id)
        assert b.claim_idempotency("g", FP, 600.0, live.id)[1] is True

        a.claim_idempotency("unowned", FP, 600.0)  # no owner (a store without heartbeat): only its age counts
        assert b.claim_idempotency("unowned", FP, 600.0, live.id)[1] is False
        assert a.claim_idempotency("k", FP, 0.0, live.id)[1] is False  # a done key is never taken over


def test_the_heartbeat_beats_on_its_thread_until_stopped(database_url, tmp_path):
    with InspectionStore(database_url, tmp_path / "art") as store:
        heartbeat = Heartbeat(store, "beating", 0.3).start()
        engine = create_engine(database_url)
        try:

            def beat_at():
                with engine.connect() as conn:
                    sql = text("SELECT heartbeat_at FROM instances WHERE id = :id")
                    return conn.execute(sql, {"id": heartbeat.instance.id}).scalar()

            first = beat_at()
            time.sleep(DEAD_AFTER_BEATS * 0.3 + 0.1)  # past the first beat's dead-after: alive only by beating again
            assert heartbeat.running and store.instance_alive(heartbeat.instance.id) and beat_at() != first
            heartbeat.stop()
            assert not heartbeat.running and beat_at() is None and not store.instance_alive(heartbeat.instance.id)
        finally:
            engine.dispose()


def request_files(seed: int):
    files = [png_file("part.png", seed)]
    uploads = [Upload(0, name, data) for _, (name, data, _) in files]
    return files, fingerprint(SegmentForm().model_dump(mode="json"), uploads, None)


def test_a_retry_takes_over_a_dead_replicas_key_and_waits_for_a_live_one(database_url, tmp_path):
    settings = make_settings(tmp_path / "data", database_url=database_url)
    with TestClient(create_app(settings)) as c, InspectionStore(database_url, tmp_path / "data") as replica:
        wait_ready(c)
        heartbeat = c.app.state.ctx.heartbeat
        assert heartbeat.running and replica.instance_alive(heartbeat.instance.id)

        files, fp = request_files(31)
        other = Heartbeat(replica, "other", 60.0).start()  # another replica, alive, runs this request now
        try:
            replica.claim_idempotency("busy", fp, 600.0, other.instance.id)
            busy = c.post("/segment", files=files, headers={"Idempotency-Key": "busy"})
            assert busy.status_code == 409 and busy.headers["retry-after"] == "1"
            assert busy.headers["content-type"] == "application/problem+json"
            assert busy.json()["type"] == "urn:dhrclip:problem:idempotency-key-in-flight"
            assert busy.json()["status"] == 409 and "still being processed" in busy.json()["detail"]
        finally:
            other.stop()
        assert replica.count() == 0

        files, fp = request_files(32)
        held, _ = replica.claim_idempotency("crashed", fp, 600.0, dead(replica, "crashed").id)
        retry = c.post("/segment", files=files, headers={"Idempotency-Key": "crashed"})
        assert retry.status_code == 200 and "idempotent-replayed" not in retry.headers
        ids = [r["id"] for r in retry.json()["results"]]
        done = replica.get_idempotency("crashed")
        assert replica.count() == 1 and (done.state, done.inspection_ids, done.owner) == ("done", ids, None)
        again = c.post("/segment", files=files, headers={"Idempotency-Key": "crashed"})
        assert again.headers["idempotent-replayed"] == "true" and [r["id"] for r in again.json()["results"]] == ids
        assert replica.count() == 1
    assert not heartbeat.running and not replica.instance_alive(heartbeat.instance.id)  # stopped at shutdown


def test_pending_and_done_keys_of_a_database_before_owners_upgrade_in_place(database_url, tmp_path):
    held = {**OLD_KEY, "key": "held", "inspection_ids": "[]", "state": "pending", "claim": "c" * 32}
    database_at(database_url, "0005_idempotency_claims", [{**OLD_KEY, "state": "done"}, held])
    with InspectionStore(database_url, tmp_path / "art") as store:
        old, held = store.get_idempotency("old"), store.get_idempotency("held")
        assert (old.state, old.claim, old.owner, old.inspection_ids) == (
            "done",
            None,
            None,
            ["0123456789abcdef0123456789ab"],
        )
        assert (held.state, held.claim, held.owner) == ("pending", "c" * 32, None)
        live = Heartbeat(store, "new", 60.0).start()
        try:
            assert store.claim_idempotency("held", FP, 10 * 365 * 86400.0, live.instance.id)[1] is False
            taken, mine = store.claim_idempotency("held", FP, 3600.0, live.instance.id)  # written 2026-11-29: stale
            assert mine and taken.owner == live.instance.id
            assert store.claim_idempotency("old", FP, 0.0, live.instance.id) == (old, False)
        finally:
            live.stop()


def segment_in_thread(url: str, files, key: str) -> list:
    """POST /segment in a thread; the list gets the response or the transport error."""
    out: list = []

    def post() -> None:
        try:
            out.append(httpx.post(f"{url}/segment", files=files, headers={"Idempotency-Key": key}, timeout=60))
        except httpx.TransportError as exc:
            out.append(exc)

    threading.Thread(target=post, daemon=True).start()
    return out


def test_a_key_held_by_a_server_killed_mid_request_is_answered_by_another_within_seconds(tmp_path):
    data = tmp_path / "data"
    beat_s = 0.5
    # the batcher holds a lone image 3 s for companions: the request is surely in flight when the server dies
    server = ServerProcess(data, warmup="false", heartbeat_s=beat_s, max_wait_ms=3000).start()
    with TestClient(create_app(make_settings(data))) as other:
        wait_ready(other)
        store = other.app.state.ctx.store
        files, _ = request_files(41)
        try:
            sent = segment_in_thread(server.url, files, "photo-1")
            deadline = time.monotonic() + 30
            while (held := store.get_idempotency("photo-1")) is None:
                assert time.monotonic() < deadline and not sent, sent
                time.sleep(0.01)
            assert held.state == "pending" and store.instance_alive(held.owner)
            busy = other.post("/segment", files=files, headers={"Idempotency-Key": "photo-1"})
            assert busy.status_code == 409 and busy.headers["retry-after"] == "1"
            server.kill()
            killed_at = time.monotonic()
        finally:
            server.stop()
        while (retry := other.post("/segment", files=files, headers={"Idempotency-Key": "photo-1"})).status_code == 409:
            assert time.monotonic() - killed_at < 15, "the dead server's key was not taken over"
            time.sleep(0.1)
        waited = time.monotonic() - killed_at
        assert retry.status_code == 200 and waited < DEAD_AFTER_BEATS * beat_s + 5, waited
        deadline = time.monotonic() + 10
        while not sent:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert isinstance(sent[0], httpx.TransportError)  # the killed server never answered
        ids = [r["id"] for r in retry.json()["results"]]
        assert store.count() == 1 and store.get_idempotency("photo-1").inspection_ids == ids
        print(f"key of the killed server taken over {waited:.2f} s after SIGKILL (heartbeat {beat_s} s)")
