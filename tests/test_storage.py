"""InspectionStore: round trips, restart, filters, keyset pagination, profiles, retention, failed writes.

Every test runs on SQLite, and on PostgreSQL when ``DHR_TEST_POSTGRES_URL`` names an empty throw-away database
(``.ci/run`` starts one; see tests/databases.py).
"""

from __future__ import annotations

import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from service.storage import InspectionRecord, InspectionStore, ProductProfile, new_inspection_id
from service.storage.artefacts import ArtefactMissingError, ArtefactStore, LocalArtefactStore, S3ArtefactStore
from service.storage.idempotency import IdempotencyEntry
from service.storage.models import utcnow

T0 = datetime(2024, 3, 10, 12, 0, 0, 123456, tzinfo=UTC)
PNG_A = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PNG_B = b"\x89PNG\r\n\x1a\n" + b"mask" * 100


def _record(created_at: datetime = T0, **overrides) -> InspectionRecord:
    fields = {
        "id": new_inspection_id(created_at),
        "created_at": created_at,
        "product": "bottle",
        "line": "L1",
        "part_id": "P-0001",
        "filename": "part.png",
        "width": 640,
        "height": 480,
        "score": 0.8125,
        "threshold": 0.5,
        "verdict": "defect",
        "image_score": "max",
        "pixel_threshold": 0.45,
        "defect_area_ratio": 0.0123,
        "regions": [{"bbox": [1, 2, 3, 4], "area": 12, "max_score": 0.9, "polygon": [[1, 2], [3, 5]]}],
        "model": {"backbone": "ViT-L-14-336", "checkpoint": "abc123"},
        "timing_ms": {"decode": 1.5, "model": 40.25},
    }
    fields.update(overrides)
    return InspectionRecord(**fields)


@pytest.fixture
def paths(request, database_url: str, tmp_path: Path) -> tuple[str, ArtefactStore]:
    """(database URL, artefact store): SQLite with a local folder, PostgreSQL with an S3 bucket (moto).

    The two halves of the scale-out pairing; tests/test_artefacts.py checks each artefact backend on its own.
    """
    if database_url.startswith("sqlite"):
        return database_url, LocalArtefactStore(tmp_path / "artefacts")
    return database_url, S3ArtefactStore(request.getfixturevalue("s3_bucket"), "plant")


@pytest.fixture
def store(paths, tmp_path):
    s = InspectionStore(*paths)
    yield s
    s.close()


class FailingPuts:
    """An artefact store that fails the n-th put (1-based) with OSError("disk full"), else forwards."""

    def __init__(self, inner: ArtefactStore, fail_at: int) -> None:
        self.inner, self.fail_at, self.puts = inner, fail_at, 0
        self.location = inner.location

    def put(self, key: str, data: bytes) -> None:
        self.puts += 1
        if self.puts == self.fail_at:
            raise OSError("disk full")
        self.inner.put(key, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_add_get_round_trip_and_artefacts(store, paths):
    rec = _record(created_at=datetime(2024, 3, 10, 13, 0, 0, 5, tzinfo=timezone(timedelta(hours=1))))
    stored = store.add(rec, {"heatmap": PNG_A, "mask": PNG_B})
    assert stored.artefacts == ["heatmap", "mask"]
    got = store.get(rec.id)
    assert got == stored  # dataclass equality: every field
    assert got.created_at.tzinfo == UTC and got.created_at == datetime(2024, 3, 10, 12, 0, 0, 5, tzinfo=UTC)
    assert store.artefact_key(rec.id, "heatmap") == f"2024/03/10/{rec.id}/heatmap.png"
    assert paths[1].keys() == [f"2024/03/10/{rec.id}/heatmap.png", f"2024/03/10/{rec.id}/mask.png"]
    assert store.read_artefact(rec.id, "heatmap") == PNG_A
    assert store.read_artefact(rec.id, "mask") == PNG_B
    assert store.read_artefact(rec.id, "overlay") is None
    assert store.read_artefact(rec.id, "../../etc") is None
    assert store.read_artefact("0" * 28, "heatmap") is None
    assert store.get("0" * 28) is None
    assert store.count() == 1
    paths[1].delete(f"2024/03/10/{rec.id}/mask.png")  # a damaged store: the row lists what is gone
    with pytest.raises(ArtefactMissingError, match=f"artefact 'mask' of inspection {rec.id} is missing"):
        store.read_artefact(rec.id, "mask")


def test_originals_maps_and_cached_renderings_go_with_their_record(store, paths):
    """Lean layout: original.bin + map.f16.png stored; renderings cached beside them (not listed) and deleted by
    retention with the record, on either backend."""
    now = datetime(2024, 3, 20, tzinfo=UTC)
    old, new = (
        store.add(_record(now - timedelta(days=d)), {"original": b"\xff\xd8jpeg", "map": PNG_B}) for d in (9, 1)
    )
    for stored in (old, new):
        assert stored.artefacts == ["original", "map"] and stored.viewable == ("overlay", "heatmap", "mask")
        store.put_derived(stored, "heatmap.png", PNG_A)
        store.put_derived(stored, "thumb.jpg", b"\xff\xd8thumb")
    prefix = f"2024/03/11/{old.id}/"
    assert paths[1].keys(prefix) == [prefix + n for n in ("heatmap.png", "map.f16.png", "original.bin", "thumb.jpg")]
    assert store.read_artefact(old.id, "original") == store.read_artefact(old, "original") == b"\xff\xd8jpeg"
    assert store.read_derived(old, "heatmap.png") == PNG_A and store.read_derived(old, "mask.png") is None
    with pytest.raises(ValueError, match="is a stored artefact"):
        store.put_derived(old, "map.f16.png", b"x")  # a rendering never replaces what it is rendered from
    assert store.enforce_retention(max_age_days=7, max_count=None, now=now) == 1
    assert paths[1].keys(prefix) == [] and len(paths[1].keys(f"2024/03/19/{new.id}/")) == 4
    store.put_derived(old, "mask.png", PNG_B)  # a rendering finished after retention removed its record
    assert paths[1].keys(prefix) == []


def test_local_layout_is_the_data_dir_by_date(tmp_path):
    with InspectionStore(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "data") as store:
        rec = store.add(_record(), {"heatmap": PNG_A})
        folder = tmp_path / "data" / "2024" / "03" / "10" / rec.id
        assert [p.name for p in folder.iterdir()] == ["heatmap.png"]
        assert (folder / "heatmap.png").read_bytes() == PNG_A


def test_wal_mode_and_restart_sees_same_data(paths):
    first = InspectionStore(*paths)
    rec = first.add(_record(), {"overlay": PNG_A})
    first.put_product(ProductProfile(name="bottle", image_threshold=0.6, pixel_threshold=0.4, image_score="max"))
    first.close()
    if paths[0].startswith("sqlite:///"):
        db_file = paths[0].removeprefix("sqlite:///")
        assert sqlite3.connect(db_file).execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    second = InspectionStore(*paths)
    assert second.get(rec.id) == rec
    assert second.read_artefact(rec.id, "overlay") == PNG_A
    assert second.get_product("bottle").image_threshold == 0.6
    assert second.count() == 1
    second.close()


def test_list_filters(store):
    recs = [
        _record(T0 + timedelta(minutes=0), product="bottle", line="L1", verdict="ok"),
        _record(T0 + timedelta(minutes=1), product="bottle", line="L2", verdict="defect"),
        _record(T0 + timedelta(minutes=2), product="cable", line="L1", verdict="defect"),
        _record(T0 + timedelta(minutes=3), product="bottle", line="L1", verdict="defect"),
        _record(T0 + timedelta(minutes=4), product=None, line=None, verdict="ok"),
    ]
    for r in recs:
        store.add(r, {})

    def ids(**kw):
        page, cursor = store.list(**kw)
        assert cursor is None
        return [r.id for r in page]

    assert ids() == [r.id for r in reversed(recs)]
    assert ids(product="bottle") == [recs[3].id, recs[1].id, recs[0].id]
    assert ids(product="bottle", line="L1") == [recs[3].id, recs[0].id]
    assert ids(product="bottle", line="L1", verdict="defect") == [recs[3].id]
    assert ids(verdict="ok") == [recs[4].id, recs[0].id]
    assert ids(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3)) == [recs[2].id, recs[1].id]
    # same instant written in another zone: since is inclusive
    assert ids(since=(T0 + timedelta(minutes=3)).astimezone(timezone(timedelta(hours=-5)))) == [
        recs[4].id,
        recs[3].id,
    ]
    with pytest.raises(ValueError, match="timezone-aware"):
        store.list(since=datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="verdict"):
        store.list(verdict="bad")
    with pytest.raises(ValueError, match="limit"):
        store.list(limit=0)


def test_keyset_pagination_visits_every_record_once(store):
    # 7 records, two pairs share a created_at so the id tie-breaker matters
    stamps = [T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=1), T0 + timedelta(seconds=2)]
    stamps += [T0 + timedelta(seconds=3)] * 2 + [T0 + timedelta(seconds=4)]
    recs = [_record(ts) for ts in stamps]
    for r in recs:
        store.add(r, {})
    expected = [r.id for r in sorted(recs, key=lambda r: (r.created_at, r.id), reverse=True)]

    seen, cursor, pages = [], None, 0
    while True:
        page, cursor = store.list(limit=3, cursor=cursor)
        pages += 1
        seen += [r.id for r in page]
        if cursor is None:
            break
    assert pages == 3 and seen == expected
    with pytest.raises(ValueError, match="invalid cursor"):
        store.list(cursor="not-a-cursor")


def test_limit_is_capped(store):
    for i in range(3):
        store.add(_record(T0 + timedelta(seconds=i)), {})
    page, cursor = store.list(limit=10_000)
    assert len(page) == 3 and cursor is None


def test_product_upsert(store):
    assert store.get_product("bottle") is None
    before = utcnow()
    p1 = store.put_product(ProductProfile(name="bottle", image_threshold=0.6, pixel_threshold=0.4, image_score="max"))
    assert p1.updated_at >= before
    store.put_product(ProductProfile(name="cable", image_threshold=0.7, pixel_threshold=0.5, image_score="mean"))
    p2 = store.put_product(ProductProfile(name="bottle", image_threshold=0.65, pixel_threshold=0.35, image_score="x"))
    got = store.get_product("bottle")
    assert got == p2 and got.image_threshold == 0.65 and got.image_score == "x"
    assert got.updated_at >= p1.updated_at and got.updated_at.tzinfo == UTC
    assert [p.name for p in store.list_products()] == ["bottle", "cable"]
    with pytest.raises(ValueError, match="pixel_threshold"):
        store.put_product(ProductProfile(name="bad", image_threshold=0.5, pixel_threshold=1.5, image_score="max"))


def test_retention_by_age_and_count(store, paths):
    now = datetime(2024, 3, 20, tzinfo=UTC)
    recs = [_record(now - timedelta(days=d)) for d in (10, 8, 6, 4, 2, 1)]  # oldest first
    for r in recs:
        store.add(r, {"heatmap": PNG_A})

    def kept() -> list[str]:
        return [k.split("/")[3] for k in paths[1].keys()]

    assert store.enforce_retention(max_age_days=7, max_count=None, now=now) == 2
    assert store.get(recs[0].id) is None and store.get(recs[1].id) is None
    assert kept() == [r.id for r in recs[2:]]
    if isinstance(paths[1], LocalArtefactStore):
        assert not (paths[1].root / "2024" / "03" / "10").exists()  # empty date folder pruned

    assert store.enforce_retention(max_age_days=None, max_count=3, now=now) == 1
    assert store.get(recs[2].id) is None and kept() == [r.id for r in recs[3:]]
    assert [r.id for r in store.list()[0]] == [recs[5].id, recs[4].id, recs[3].id]

    assert store.enforce_retention(max_age_days=3, max_count=1, now=now) == 2  # age hits rec 3, count hits 3 and 4
    assert store.count() == 1 and store.get(recs[5].id) is not None
    assert store.enforce_retention(max_age_days=None, max_count=None, now=now) == 0
    assert store.read_artefact(recs[5].id, "heatmap") == PNG_A


def test_retention_by_age_removes_the_idempotency_keys_as_old(store):
    """A key lives as long as the inspections it answers for: the age limit removes both, a younger key stays."""
    written = utcnow()  # a key is stamped when its record commits
    rec = _record(written - timedelta(days=1))
    store.add(rec, {"heatmap": PNG_A}, IdempotencyEntry("k", "0" * 64, [rec.id]))
    assert store.get_idempotency("k").inspection_ids == [rec.id]
    assert store.enforce_retention(max_age_days=7, max_count=None, now=written + timedelta(days=6)) == 0
    assert store.get_idempotency("k").inspection_ids == [rec.id]
    assert store.enforce_retention(max_age_days=7, max_count=None, now=written + timedelta(days=8)) == 1
    assert store.get(rec.id) is None and store.get_idempotency("k") is None


def test_failed_artefact_write_leaves_no_row_and_no_artefacts(paths):
    with InspectionStore(paths[0], FailingPuts(paths[1], fail_at=2)) as store:
        rec = _record()
        with pytest.raises(OSError, match="disk full"):
            store.add(rec, {"heatmap": PNG_A, "mask": PNG_B})  # heatmap put, mask fails: heatmap removed
        assert store.get(rec.id) is None and store.count() == 0
    assert paths[1].keys() == []
    if isinstance(paths[1], LocalArtefactStore):
        assert list(paths[1].root.rglob("*")) == []  # no temp files, no folders left behind


def test_duplicate_id_is_refused_before_and_during_the_insert(store, paths, monkeypatch):
    rec = store.add(_record(), {"mask": PNG_B})
    clash = _record(id=rec.id, created_at=T0 + timedelta(days=1))  # same id, other folder
    with pytest.raises(ValueError, match="already exists"):
        store.add(clash, {"heatmap": PNG_A})
    monkeypatch.setattr(store, "get", lambda record_id: None)  # a concurrent insert won the race: the row clashes
    with pytest.raises(ValueError, match="already exists"):
        store.add(clash, {"heatmap": PNG_A})
    assert store.count() == 1
    assert paths[1].keys() == [f"2024/03/10/{rec.id}/mask.png"]  # the clash's artefacts removed, the first kept


def test_unwritable_data_dir_leaves_no_row(tmp_path):
    paths = (f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "artefacts")
    store = InspectionStore(*paths)
    rec = _record()
    (paths[1] / "2024").write_bytes(b"")  # a file where the year folder must go: mkdir fails, also as root
    with pytest.raises(OSError):
        store.add(rec, {"heatmap": PNG_A})
    assert store.get(rec.id) is None and store.count() == 0
    assert [p.name for p in paths[1].iterdir()] == ["2024"]
    store.close()


def test_concurrent_adds_from_a_thread_pool(store):
    def work(worker: int) -> list[str]:
        out = []
        for i in range(15):
            rec = _record(T0 + timedelta(seconds=i), id=new_inspection_id(), line=f"L{worker}")
            out.append(store.add(rec, {"mask": PNG_B}).id)
            assert store.get(out[-1]) is not None
        return out

    with ThreadPoolExecutor(max_workers=4) as pool:
        written = [i for ids in pool.map(work, range(4)) for i in ids]
    assert store.count() == 60 and len(set(written)) == 60
    page, _ = store.list(line="L2", limit=500)
    assert len(page) == 15


def test_invalid_records_are_rejected(store):
    with pytest.raises(ValueError, match="verdict"):
        store.add(_record(verdict="maybe"), {})
    with pytest.raises(ValueError, match="timezone-aware"):
        store.add(_record(created_at=datetime(2024, 1, 1)), {})
    with pytest.raises(ValueError, match="artefact kind"):
        store.add(_record(), {"../x": PNG_A})
    with pytest.raises(ValueError, match="differ"):
        store.add(_record(artefacts=["heatmap"]), {"mask": PNG_B})
    with pytest.raises(ValueError, match="score"):
        store.add(_record(score=float("nan")), {})
    assert store.count() == 0


def test_ids_are_unique_and_time_ordered():
    ids = [new_inspection_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 28 and int(i, 16) >= 0 for i in ids)
    early = new_inspection_id(datetime(2020, 1, 1, tzinfo=UTC))
    late = new_inspection_id(datetime(2020, 1, 1, 0, 0, 0, 1000, tzinfo=UTC))
    assert early[:12] == f"{1577836800000:012x}" and late[:12] == f"{1577836800001:012x}"
    assert early < late < ids[0]
    default = InspectionRecord(
        width=1,
        height=1,
        score=0.0,
        threshold=0.5,
        verdict="ok",
        image_score="max",
        pixel_threshold=0.5,
        defect_area_ratio=0.0,
    )
    assert default.id > ids[-1] and default.created_at.tzinfo is UTC


def _ref(product: str = "bottle"):
    from service.storage.models import ReferenceImage

    return ReferenceImage(
        product=product, filename="a.png", sha256="0" * 64, width=4, height=3, nbytes=5, model_key="k"
    )


def _memory(version: str, tokens: int = 7):
    from service.storage.models import MemoryInfo

    return MemoryInfo(version=version, product="bottle", model_key="k", n_references=2, tokens=tokens, nbytes=9)


def test_references_and_memories_live_in_the_artefact_store(store, paths):
    """References all-or-nothing, memories replacing each other: every byte under its key in the artefact store
    (a local folder with SQLite, an S3 bucket with PostgreSQL)."""
    artefacts = paths[1]
    store.put_product(ProductProfile(name="bottle", image_threshold=0.5, pixel_threshold=0.5, image_score="max"))
    with pytest.raises(ValueError, match="no profile for product 'nope'"):
        store.add_references([(_ref(), b"img-1", b"feat-1"), (_ref("nope"), b"img-2", b"feat-2")])
    assert store.list_references("bottle") == [] and artefacts.keys() == []
    stored = store.add_references([(_ref(), b"img-1", b"feat-1"), (_ref(), b"img-2", b"feat-2")])
    assert [r.id for r in store.list_references("bottle")] == [r.id for r in stored]
    a, b = (r.id for r in stored)
    assert artefacts.keys() == [f"references/{a}/features.safetensors", f"references/{a}/image.bin"] + [
        f"references/{b}/features.safetensors",
        f"references/{b}/image.bin",
    ]
    assert store.read_reference_features(b) == b"feat-2" and store.read_reference_image(a) == b"img-1"
    with pytest.raises(ValueError, match=f"reference {a} already exists"):
        store.add_references([(replace(stored[0], filename="again.png"), b"x", b"y")])
    assert store.read_reference_image(a) == b"img-1"

    assert store.set_memory("bottle", _memory("a" * 16), b"mem-a").memory_version == "a" * 16
    store.set_memory("bottle", _memory("b" * 16, tokens=3), b"mem-b")
    assert store.get_memory("a" * 16) is None and not artefacts.exists("memories/" + "a" * 16 + ".safetensors")
    assert store.read_memory("b" * 16) == b"mem-b" and store.get_memory("b" * 16).tokens == 3
    assert store.delete_reference("bottle", a) and not store.delete_reference("other", b)
    assert artefacts.keys("references/") == [f"references/{b}/features.safetensors", f"references/{b}/image.bin"]
    with pytest.raises(ArtefactMissingError, match=a):
        store.read_reference_image(a)
    assert store.set_memory("bottle", None).memory_version is None and store.get_memory("b" * 16) is None
    assert artefacts.keys("memories/") == []


def test_reference_pages_newest_first_and_renderings_go_with_their_reference(store, paths):
    """The gallery's queries: one page of a product's references newest first (LIMIT/OFFSET), their count, one by
    id; a rendering cached beside a reference's bytes is removed with it, also when it lands after the removal."""
    artefacts = paths[1]
    for name in ("bottle", "cap"):
        store.put_product(ProductProfile(name=name, image_threshold=0.5, pixel_threshold=0.5, image_score="max"))
    refs = [replace(_ref(), id=new_inspection_id(T0 + timedelta(seconds=i)), filename=f"{i}.png") for i in range(7)]
    store.add_references([(r, b"img", b"feat") for r in refs[::-1]] + [(_ref("cap"), b"img", b"feat")])
    newest = [r.id for r in refs[::-1]]
    assert [store.count_references(p) for p in ("bottle", "cap", "none")] == [7, 1, 0]
    pages = [store.list_references("bottle", newest_first=True, limit=3, offset=o) for o in (0, 3, 6, 9)]
    assert [[r.id for r in page] for page in pages] == [newest[:3], newest[3:6], newest[6:], []]
    assert [r.id for r in store.list_references("bottle")] == newest[::-1]  # the API's listing: all, oldest first
    assert store.get_reference("bottle", refs[2].id) == pages[1][1] and pages[1][1].filename == "2.png"
    assert store.get_reference("cap", refs[2].id) is None and store.get_reference("bottle", "0" * 28) is None
    assert store.get_reference("bottle", "../x") is None

    ref, prefix = refs[0], f"references/{refs[0].id}/"
    assert store.read_reference_derived(ref.id, "thumb.jpg") is None
    store.put_reference_derived(ref, "thumb.jpg", b"\xff\xd8thumb")
    assert store.read_reference_derived(ref.id, "thumb.jpg") == b"\xff\xd8thumb"
    assert artefacts.keys(prefix) == [prefix + n for n in ("features.safetensors", "image.bin", "thumb.jpg")]
    with pytest.raises(ValueError, match="stored file of reference"):
        store.put_reference_derived(ref, "image.bin", b"x")
    assert store.read_reference_image(ref.id) == b"img" and store.delete_reference("bottle", ref.id)
    assert artefacts.keys(prefix) == [] and store.read_reference_derived(ref.id, "thumb.jpg") is None
    store.put_reference_derived(ref, "thumb.jpg", b"late")  # a rendering finished after the removal: deleted again
    assert artefacts.keys(prefix) == [] and store.count_references("bottle") == 6
    if isinstance(artefacts, LocalArtefactStore):
        assert not (artefacts.root / prefix).exists()


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_a_failed_reference_put_leaves_no_object_and_no_row(paths, fail_at):
    failing = FailingPuts(paths[1], fail_at=fail_at)
    with InspectionStore(paths[0], failing) as store:
        store.put_product(ProductProfile(name="bottle", image_threshold=0.5, pixel_threshold=0.5, image_score="max"))
        with pytest.raises(OSError, match="disk full"):
            store.add_references([(_ref(), b"img-1", b"feat-1"), (_ref(), b"img-2", b"feat-2")])
        assert store.list_references("bottle") == [] and paths[1].keys() == []


def test_a_failed_memory_commit_removes_its_object(store, paths):
    with pytest.raises(ValueError, match="no profile for product 'bottle'"):
        store.set_memory("bottle", _memory("c" * 16), b"mem-c")
    assert paths[1].keys() == [] and store.get_memory("c" * 16) is None


def test_knowledge_files_of_an_earlier_version_stay_readable(tmp_path, paths):
    """Before the artefact store held them, references and memories were files under the data directory: with the
    default local store (root = data dir) they are read where they are; with another store they move into it."""
    from service.storage.artefacts import LocalArtefactStore
    from service.storage.store import open_store

    old = tmp_path / "data"
    ref_id = new_inspection_id()
    (old / "references" / ref_id).mkdir(parents=True)
    (old / "references" / ref_id / "image.bin").write_bytes(b"old-image")
    (old / "references" / ref_id / "features.safetensors").write_bytes(b"old-features")
    (old / "memories").mkdir()
    (old / "memories" / ("d" * 16 + ".safetensors")).write_bytes(b"old-memory")
    files = sorted(p.relative_to(old).as_posix() for p in old.rglob("*") if p.is_file())

    with open_store(paths[0], LocalArtefactStore(old), data_dir=old) as same:  # the default: nothing moves
        assert same.read_reference_image(ref_id) == b"old-image" and same.read_memory("d" * 16) == b"old-memory"
    assert sorted(p.relative_to(old).as_posix() for p in old.rglob("*") if p.is_file()) == files

    with open_store(paths[0], paths[1], data_dir=old) as moved:  # DHR_ARTEFACT_URL elsewhere: adopted on open
        assert paths[1].keys() == files
        assert moved.read_reference_features(ref_id) == b"old-features" and moved.read_memory("d" * 16) == b"old-memory"
    assert sorted(p.name for p in old.iterdir()) == []  # nothing left behind to be confused with the store's copy
    with open_store(paths[0], paths[1], data_dir=old) as again:  # a second open has nothing to move
        assert again.read_reference_image(ref_id) == b"old-image"


def test_a_memory_built_on_one_replica_is_used_by_the_other_within_the_bound(paths):
    """Two stores on one database and one artefact store, as two replicas: the memory version in the product row
    reaches the other within ``refresh_s`` and its bytes come from the shared artefact store."""
    bound = 0.5
    a, b = InspectionStore(*paths, refresh_s=bound), InspectionStore(*paths, refresh_s=bound)
    a.put_product(ProductProfile(name="bottle", image_threshold=0.5, pixel_threshold=0.5, image_score="max"))
    assert b.current_product("bottle").memory_version is None
    for version, data in (("e" * 16, b"mem-e"), ("f" * 16, b"mem-f")):
        changed_at = time.monotonic()
        assert a.set_memory("bottle", _memory(version), data).memory_version == version
        assert a.current_product("bottle").memory_version == version  # the writing replica: at once
        while (seen := b.current_product("bottle").memory_version) != version:
            assert time.monotonic() - changed_at < bound + 0.25, f"the other replica kept memory {seen} too long"
            time.sleep(0.02)
        assert b.read_memory(version) == data
    assert paths[1].keys("memories/") == ["memories/" + "f" * 16 + ".safetensors"]
    a.close()
    b.close()


def test_one_retention_pass_at_a_time_across_replicas(paths):
    """Two stores on one database: while one holds the retention lock (PostgreSQL), the other's pass is skipped."""
    first, second = InspectionStore(*paths), InspectionStore(*paths)
    now = datetime(2024, 3, 20, tzinfo=UTC)
    old = first.add(_record(now - timedelta(days=30)), {"mask": PNG_B})
    with first.retention_lock() as acquired:
        assert acquired
        expected = 0 if first.is_postgres else 1  # SQLite: a single host, no lock to wait for
        assert second.enforce_retention(max_age_days=7, max_count=None, now=now) == expected
    if first.is_postgres:
        assert second.get(old.id) is not None
        assert second.enforce_retention(max_age_days=7, max_count=None, now=now) == 1  # released: now it runs
    assert second.get(old.id) is None and paths[1].keys() == []
    first.close()
    second.close()
