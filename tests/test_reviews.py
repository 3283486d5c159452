"""Reviews: storage (table, filters, oldest-first paging, retention), the review route, CSV export, roles, metrics.

The API tests run an app whose weights are missing (nothing to load), with records written straight into its store.
"""

from __future__ import annotations

import csv
import hashlib
import io
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from service.api import create_app, routes_reviews
from service.storage import InspectionRecord, InspectionStore
from service.storage.reviews import MAX_NOTE_CHARS, Review, ReviewNotAllowed

from .api_fixtures import make_record, make_settings

T0 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)


def _record(minutes: int, verdict: str = "defect", **kw) -> InspectionRecord:
    return make_record(T0 + timedelta(minutes=minutes), verdict, **kw)


@pytest.fixture
def store(tmp_path):
    with InspectionStore(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "data") as s:
        yield s


def test_reviews_are_stored_filtered_and_removed_with_their_inspection(store):
    recs = [store.add(_record(i, "ok" if i == 1 else "defect"), {"mask": b"m"}) for i in range(4)]
    first = store.add_review(Review(inspection_id=recs[0].id, decision="false_reject", note="dust", reviewer="ann"))
    second = store.add_review(Review(inspection_id=recs[0].id, decision="confirm_defect", role="admin"))
    store.add_review(Review(inspection_id=recs[1].id, decision="escape", key_id="abc"))
    assert first.id is not None and second.id > first.id
    got = store.reviews_of([recs[0].id, recs[2].id])
    assert list(got) == [recs[0].id]
    assert [(r.decision, r.note, r.reviewer, r.role) for r in got[recs[0].id]] == [
        ("false_reject", "dust", "ann", "open"),
        ("confirm_defect", "", "", "admin"),
    ]
    assert store.review_counts() == {"confirm_defect": 1, "false_reject": 1, "escape": 1}

    page, cursor = store.list(reviewed=False, verdict="defect", oldest_first=True)
    assert [r.id for r in page] == [recs[2].id, recs[3].id] and cursor is None
    assert {r.id for r in store.list(reviewed=True)[0]} == {recs[0].id, recs[1].id}
    # oldest-first keyset pages visit every record once, in order
    seen, cursor = [], None
    while True:
        page, cursor = store.list(limit=3, cursor=cursor, oldest_first=True)
        seen += [r.id for r in page]
        if cursor is None:
            break
    assert seen == [r.id for r in recs]

    assert store.enforce_retention(None, max_count=2) == 2  # the two oldest go, with their three reviews
    assert store.reviews_of([recs[0].id, recs[1].id]) == {}
    assert store.review_counts() == {"confirm_defect": 0, "false_reject": 0, "escape": 0}


def test_console_summaries_count_by_filter_and_class_scores_by_the_latest_review(store):
    """verdict_counts (since inclusive, product, line), facets, the review-queue length, and scores_by_truth: the
    newest review decides good/defect, a rejected part without one is unreviewed."""
    recs = [
        store.add(_record(0, "defect", score=0.9), {}),
        store.add(_record(1, "defect", score=0.8), {}),
        store.add(_record(2, "ok", score=0.1), {}),
        store.add(_record(3, "ok", score=0.2, line="L2"), {}),
        store.add(_record(4, "review", score=0.45, product="cap"), {}),
        store.add(_record(5, "defect", score=0.7, line="L2"), {}),
        store.add(_record(6, "ok", score=0.3, product="cap", line=None), {}),
    ]
    for i, decision in ((0, "false_reject"), (0, "confirm_defect"), (1, "confirm_defect"), (1, "false_reject")):
        store.add_review(Review(inspection_id=recs[i].id, decision=decision))
    store.add_review(Review(inspection_id=recs[2].id, decision="escape"))
    assert store.verdict_counts() == {"ok": 3, "review": 1, "defect": 3}
    assert store.verdict_counts(product="bottle") == {"ok": 2, "review": 0, "defect": 3}
    assert store.verdict_counts(line="L2") == {"ok": 1, "review": 0, "defect": 1}
    assert store.verdict_counts(since=recs[3].created_at) == {"ok": 2, "review": 1, "defect": 1}
    assert store.verdict_counts(since=recs[2].created_at, product="bottle", line="L1") == {
        "ok": 1,
        "review": 0,
        "defect": 0,
    }
    assert store.facets() == {"products": ["bottle", "cap"], "lines": ["L1", "L2"]}  # no None line
    assert store.unreviewed_count(("review", "defect")) == 2
    # newest first: 0.7 unreviewed, 0.2 good (ok), 0.1 escape, 0.8 false reject last, 0.9 confirmed last
    assert store.scores_by_truth("bottle") == {"good": [0.2, 0.8], "defect": [0.1, 0.9], "unreviewed": [0.7]}
    assert store.scores_by_truth("bottle", limit=2) == {"good": [0.2], "defect": [], "unreviewed": [0.7]}


def test_invalid_reviews_write_nothing(store):
    ok_rec = store.add(_record(0, "ok"), {})
    bad_rec = store.add(_record(1, "defect"), {})
    with pytest.raises(LookupError, match="no inspection"):
        store.add_review(Review(inspection_id="0" * 28, decision="escape"))
    with pytest.raises(ReviewNotAllowed, match="escape applies to verdicts ok; this inspection's verdict is defect"):
        store.add_review(Review(inspection_id=bad_rec.id, decision="escape"))
    with pytest.raises(ReviewNotAllowed, match="false_reject applies to verdicts review or defect; this"):
        store.add_review(Review(inspection_id=ok_rec.id, decision="false_reject"))
    with pytest.raises(ValueError, match="decision must be one of"):
        store.add_review(Review(inspection_id=bad_rec.id, decision="maybe"))
    with pytest.raises(ValueError, match=f"at most {MAX_NOTE_CHARS}"):
        store.add_review(Review(inspection_id=bad_rec.id, decision="confirm_defect", note="x" * (MAX_NOTE_CHARS + 1)))
    assert store.reviews_of([ok_rec.id, bad_rec.id]) == {}


def _app(tmp_path, **kw):
    return TestClient(create_app(make_settings(tmp_path / "data", backbone=str(tmp_path / "none.pt"), **kw)))


def test_review_route_json_list_csv_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(routes_reviews, "CSV_PAGE", 3)  # the export reads the store a page at a time: two pages here
    two_regions = [
        {"bbox": [0, 0, 2, 2], "area": 4, "area_ratio": 4 / 48, "max_score": 0.9, "mean_score": 0.8, "polygon": []},
        {"bbox": [4, 4, 1, 1], "area": 1, "area_ratio": 1 / 48, "max_score": 0.7, "mean_score": 0.7, "polygon": []},
    ]
    with _app(tmp_path) as client:
        store = client.app.state.ctx.store
        ok_rec = store.add(_record(0, "ok", filename="=HYPERLINK(1).png"), {})
        bad = [
            store.add(_record(i, "defect", filename=f"p{i}.png", regions=two_regions if i == 1 else []), {})
            for i in (1, 2, 3)
        ]

        r = client.post(
            f"/inspections/{bad[0].id}/review", json={"decision": "false_reject", "note": "oil, not a dent"}
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["decision"] == "false_reject" and body["reviewer"] == "open" and body["role"] == "open"
        assert body["key_id"] is None and body["reference_id"] is None and body["inspection_id"] == bad[0].id
        r = client.post(f"/inspections/{ok_rec.id}/review", json={"decision": "escape", "reviewer": "QE Bob"})
        assert r.status_code == 201 and r.json()["reviewer"] == "QE Bob"

        shown = client.get(f"/inspections/{bad[0].id}").json()
        assert [(x["decision"], x["note"]) for x in shown["reviews"]] == [("false_reject", "oil, not a dent")]
        todo = client.get("/inspections", params={"reviewed": "false", "verdict": "defect", "order": "oldest"})
        assert [x["id"] for x in todo.json()["items"]] == [bad[1].id, bad[2].id]
        done = client.get("/inspections", params={"reviewed": "true"}).json()["items"]
        assert [x["id"] for x in done] == [bad[0].id, ok_rec.id] and done[1]["reviews"][0]["decision"] == "escape"
        # a second look: the export shows the newest review of an inspection
        r = client.post(f"/inspections/{bad[0].id}/review", json={"decision": "confirm_defect", "note": "a dent"})
        assert r.status_code == 201
        newest = store.reviews_of([bad[0].id])[bad[0].id][-1]

        r = client.get("/inspections.csv", params={"order": "oldest"})
        assert r.status_code == 200 and r.headers["content-type"] == "text/csv; charset=utf-8"
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert [x["id"] for x in rows] == [ok_rec.id, *(b.id for b in bad)]
        assert rows[0]["filename"] == "'=HYPERLINK(1).png" and rows[0]["review_decision"] == "escape"
        assert (rows[1]["review_decision"], rows[1]["review_note"], rows[1]["score"]) == (
            "confirm_defect",
            "a dent",
            "0.75",
        )
        assert rows[1]["reviewed_at"] == newest.created_at.isoformat() and rows[1]["regions"] == "2"
        assert rows[0]["reviewer"] == "QE Bob" and rows[2]["regions"] == "0"
        assert rows[2]["review_decision"] == "" and rows[2]["filename"] == "p2.png"
        filtered = client.get("/inspections.csv", params={"reviewed": "false", "verdict": "defect"}).text
        assert [x["id"] for x in csv.DictReader(io.StringIO(filtered))] == [bad[2].id, bad[1].id]

        metrics = client.get("/metrics").text
        assert 'dhr_reviews_total{decision="false_reject"} 1.0' in metrics
        assert 'dhr_reviews_total{decision="escape"} 1.0' in metrics
        assert 'dhr_reviews_total{decision="confirm_defect"} 1.0' in metrics


def test_forged_reviews_get_a_clear_4xx_and_write_nothing(tmp_path):
    with _app(tmp_path) as client:
        store = client.app.state.ctx.store
        rec = store.add(_record(0, "defect"), {})
        passed, nameless = store.add(_record(1, "ok"), {}), store.add(_record(2, "defect", product=None), {})
        as_reference = {"decision": "false_reject", "add_reference": True}
        cases = [
            ("0" * 28, {"decision": "confirm_defect"}, 404, "no inspection with id"),
            ("0" * 28, as_reference, 404, "no inspection with id"),
            (rec.id, {"decision": "confirm_defect", "add_reference": True}, 422, "false_reject only"),
            (passed.id, as_reference, 409, "false_reject applies to verdicts review or defect"),
            (nameless.id, as_reference, 409, "names no product"),
            (rec.id, as_reference, 409, "was stored without its uploaded image (DHR_STORE_ORIGINALS=false"),
            (rec.id, {"decision": "approve"}, 422, "body.decision"),
            (rec.id, {"decision": "confirm_defect", "note": "n" * (MAX_NOTE_CHARS + 1)}, 422, "body.note"),
            (rec.id, {"decision": "confirm_defect", "reviewer": "r" * 101}, 422, "body.reviewer"),
            (rec.id, {"decision": "confirm_defect", "verdict": "ok"}, 422, "body.verdict"),
            (rec.id, {"decision": "escape"}, 409, "escape applies to verdicts ok"),
            ("x" * 65, {"decision": "confirm_defect"}, 422, "inspection_id"),
        ]
        for rid, payload, status, detail in cases:
            r = client.post(f"/inspections/{rid}/review", json=payload)
            assert r.status_code == status, (payload, r.text)
            assert r.headers["content-type"] == "application/problem+json" and detail in r.json()["detail"]
        r = client.post(f"/inspections/{rec.id}/review", content=b"decision=escape")
        assert r.status_code == 422
        assert store.reviews_of([rec.id, passed.id, nameless.id]) == {} and store.list_references("bottle") == []
        assert 'dhr_reviews_total{decision="escape"} 0.0' in client.get("/metrics").text


def test_operator_and_admin_keys(tmp_path):
    with _app(tmp_path, api_keys="op1", admin_keys="ad1") as client:
        rec = client.app.state.ctx.store.add(_record(0, "defect"), {})
        product = {"image_threshold": 0.4, "pixel_threshold": 0.3}
        r = client.put("/products/bottle", json=product, headers={"X-API-Key": "op1"})
        assert r.status_code == 403 and r.json()["title"] == "Admin key required"
        assert client.put("/products/bottle", json=product, headers={"X-API-Key": "nope"}).status_code == 401
        r = client.put("/products/bottle", json=product, headers={"X-API-Key": "ad1"})
        assert r.status_code == 200 and r.json()["image_threshold"] == 0.4
        for key in ("op1", "ad1"):
            assert client.get("/inspections", headers={"X-API-Key": key}).status_code == 200
        r = client.post(
            f"/inspections/{rec.id}/review", json={"decision": "confirm_defect"}, headers={"X-API-Key": "op1"}
        )
        assert r.status_code == 201
        assert r.json()["role"] == "operator" and r.json()["key_id"] == hashlib.sha256(b"op1").hexdigest()[:12]
        as_reference = {"decision": "false_reject", "add_reference": True}
        r = client.post(f"/inspections/{rec.id}/review", json=as_reference, headers={"X-API-Key": "op1"})
        assert r.status_code == 403 and "cannot add references" in r.json()["detail"]
        assert len(client.app.state.ctx.store.reviews_of([rec.id])[rec.id]) == 1
        assert client.post(f"/inspections/{rec.id}/review", json={"decision": "confirm_defect"}).status_code == 401
    # without admin keys every operator key keeps the admin rights it had before roles existed
    with _app(tmp_path / "one-role", api_keys="k") as client:
        r = client.put(
            "/products/bottle", json={"image_threshold": 0.4, "pixel_threshold": 0.3}, headers={"X-API-Key": "k"}
        )
        assert r.status_code == 200
