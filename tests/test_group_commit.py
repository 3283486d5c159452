"""Group commit: records finished together share one transaction; a failing group fails alone; all or nothing.

Runs on SQLite, and on PostgreSQL when ``DHR_TEST_POSTGRES_URL`` is set (tests/databases.py). Transactions are
counted at the database driver (SQLAlchemy's ``commit`` event), not by the committer's own counter.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event

from service.storage import InspectionStore
from service.storage.idempotency import IdempotencyEntry
from service.storage.models import utcnow

from .api_fixtures import make_record

ART = {"original": b"\xff\xd8bytes", "map": b"\x89PNG\r\n\x1a\nmap"}


@pytest.fixture
def store(database_url, tmp_path):
    s = InspectionStore(database_url, tmp_path / "artefacts")
    commits: list[int] = []
    event.listen(s._engine, "commit", lambda conn: commits.append(1))
    s.commits = commits
    yield s
    s.close()


def _key(name: str) -> IdempotencyEntry:
    return IdempotencyEntry(key=name, fingerprint="0" * 64, inspection_ids=[])


def _together(store: InspectionStore, jobs: list) -> list:
    """Run ``jobs`` (callables) so that all of them wait for the commit lock at once, then let them go."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        with store._group._commit_lock:  # released before the pool waits for its jobs
            futures = [pool.submit(job) for job in jobs]
            deadline = time.monotonic() + 30
            while len(store._group._waiting) < len(jobs):
                assert time.monotonic() < deadline, "writers did not queue"
                time.sleep(0.01)
    return [f.exception() or f.result() for f in futures]


def test_records_finished_together_share_one_transaction(store):
    records = [make_record(utcnow()) for _ in range(5)]
    before = len(store.commits)
    jobs = [lambda r=r: store.add(r, ART) for r in records[:3]]
    jobs.append(lambda: store.add_many([(records[3], ART), (records[4], ART)], _key("k-1")))
    out = _together(store, jobs)
    assert len(store.commits) - before == 1  # five rows and one idempotency key: one commit
    assert [r.id for r in out[:3]] == [r.id for r in records[:3]] and [r.id for r in out[3]] == [
        r.id for r in records[3:]
    ]
    assert store.count() == 5 and store.get_idempotency("k-1") is not None


def test_a_failing_group_fails_alone_and_leaves_nothing(store, tmp_path):
    store.add(make_record(utcnow()), ART, _key("taken"))
    good, bad = [make_record(utcnow()) for _ in range(3)], [make_record(utcnow()) for _ in range(2)]
    before = len(store.commits)
    jobs = [lambda r=r: store.add(r, ART) for r in good]
    jobs.append(lambda: store.add_many([(r, ART) for r in bad], _key("taken")))
    out = _together(store, jobs)
    assert isinstance(out[3], ValueError) and "already exists" in str(out[3])
    assert len(store.commits) - before == 3  # the shared transaction failed; each good group again on its own
    assert all(store.get(r.id) is not None for r in good) and all(store.get(r.id) is None for r in bad)
    assert store.count() == 4
    stored_keys = store.artefacts.keys()
    assert not any(r.id in k for r in bad for k in stored_keys)  # the failed group's artefacts removed
    assert sum(r.id in k for r in good for k in stored_keys) == 2 * len(good)


def test_a_writer_alone_commits_its_own_group(store):
    threads = threading.active_count()
    before = len(store.commits)
    rec = store.add(make_record(utcnow()), ART)
    assert len(store.commits) - before == 1 and store.get(rec.id) == rec
    assert not store._group._waiting and not store._group._commit_lock.locked()
    assert threading.active_count() == threads  # no committer thread: the writer commits itself
