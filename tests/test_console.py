"""Console without a browser: open mode, sign-in redirects, CSRF on form posts, thumbnails, the calibration plot.

The apps have no weights (nothing loads); records are written straight into the store.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.api.console.charts import calibration_plot, histogram
from service.storage.models import utcnow
from service.storage.reviews import Review

from .api_fixtures import encode, make_record, make_settings, synthetic_image


def _app(tmp_path, **kw):
    return TestClient(create_app(make_settings(tmp_path / "data", backbone=str(tmp_path / "none.pt"), **kw)))


def _add(store, verdict="defect", minutes_ago=1, **kw):
    png = encode(synthetic_image(3, (120, 80)))
    rec = make_record(utcnow() - timedelta(minutes=minutes_ago), verdict, width=120, height=80, **kw)
    return store.add(rec, {"overlay": png, "heatmap": png, "mask": png})


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]{32})"', html).group(1)


def test_open_console_forms_need_the_csrf_token(tmp_path):
    with _app(tmp_path) as client:
        store = client.app.state.ctx.store
        rec = _add(store)
        r = client.get("/", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/ui"
        page = client.get(f"/ui/inspections/{rec.id}")
        assert page.status_code == 200 and "role: <b>open</b>" in page.text and "Sign out" not in page.text
        set_cookie = page.headers["set-cookie"]
        assert "dhr_csrf=" in set_cookie and "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie
        token = _csrf(page.text)
        assert client.cookies["dhr_csrf"] == token

        url = f"/ui/inspections/{rec.id}/review"
        for form in ({"decision": "confirm_defect"}, {"decision": "confirm_defect", "csrf": "f" * 32}):
            r = client.post(url, data=form, follow_redirects=False)
            assert r.status_code == 403 and r.json()["title"] == "CSRF check failed"
        r = client.post(url, data={"decision": "approve", "csrf": token}, follow_redirects=False)
        assert r.status_code == 422 and "decision" in r.json()["detail"]
        r = client.post(url, data={"decision": "confirm_defect", "note": "n" * 2001, "csrf": token})
        assert r.status_code == 422 and "note" in r.json()["detail"]
        r = client.post(f"/ui/inspections/{'0' * 28}/review", data={"decision": "escape", "csrf": token})
        assert r.status_code == 404
        assert store.reviews_of([rec.id]) == {}

        form = {"decision": "confirm_defect", "note": "crack", "csrf": token, "next": "https://evil.example/"}
        r = client.post(url, data=form, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui"  # only same-site paths are followed
        assert [v.note for v in store.reviews_of([rec.id])[rec.id]] == ["crack"]
        assert client.get("/ui/queue").text.count("<tr data-id=") == 0
        assert client.get("/ui/inspections/" + "0" * 28).status_code == 404

        evil = _add(store, filename="<script>alert(1)</script>.png")
        store.add_review(Review(inspection_id=evil.id, decision="false_reject", note='"><img src=x>'))
        for url in ("/ui", f"/ui/inspections/{evil.id}"):
            html = client.get(url).text
            assert "<script>alert" not in html and "<img src=x>" not in html, url
            assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in html, url
        assert "&#34;&gt;&lt;img src=x&gt;" in client.get(f"/ui/inspections/{evil.id}").text


def test_keys_configured_pages_ask_for_a_key(tmp_path):
    with _app(tmp_path, api_keys="op", admin_keys="ad") as client:
        rec = _add(client.app.state.ctx.store)
        r = client.get("/ui/queue?x=1", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=%2Fui%2Fqueue%3Fx%3D1"
        assert client.get("/ui/live", headers={"X-Console-Fragment": "1"}).status_code == 401
        assert client.get(f"/ui/thumbs/{rec.id}.jpg", follow_redirects=False).status_code == 303
        login = client.get("/ui/login")
        token = _csrf(login.text)
        assert client.post("/ui/login", data={"key": "op", "next": "/ui/queue"}).status_code == 403  # no csrf
        r = client.post("/ui/login", data={"key": "wrong", "csrf": token})
        assert r.status_code == 401 and "That key is not configured here." in r.text
        r = client.post("/ui/login", data={"key": "op", "csrf": token, "next": "/ui/queue"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/queue"
        assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=strict" in r.headers["set-cookie"]
        assert client.get("/ui/queue").text.count("<tr data-id=") == 1
        # the API itself still wants the header: the cookie is the console's alone
        assert client.get("/inspections").status_code == 401
        r = client.post("/ui/logout", data={"csrf": token}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/login"
        assert client.get("/ui", follow_redirects=False).status_code == 303


def test_thumbnails_are_rendered_once_and_go_with_their_record(tmp_path):
    with _app(tmp_path) as client:
        store = client.app.state.ctx.store
        old, new = _add(store, minutes_ago=10), _add(store, minutes_ago=1)
        r = client.get(f"/ui/thumbs/{old.id}.jpg")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
        cached = store.artefact_key(old.id, "overlay").rsplit("/", 1)[0] + "/thumb.jpg"  # beside the overlay
        assert store.artefacts.get(cached) == r.content
        store.artefacts.put(cached, b"\xff\xd8cached")  # a second request serves the cached one, not a new rendering
        assert client.get(f"/ui/thumbs/{old.id}.jpg").content == b"\xff\xd8cached"
        assert store.enforce_retention(None, max_count=1) == 1
        assert not store.artefacts.exists(cached) and store.read_artefact(new.id, "overlay") is not None
        assert client.get(f"/ui/thumbs/{old.id}.jpg").status_code == 404


def test_calibration_plot_counts_and_rates():
    assert histogram([0.0, 0.05, 0.1, 0.99, 1.0, 1.7, -0.2], bins=10) == [3, 1, 0, 0, 0, 0, 0, 0, 0, 3]
    plot = calibration_plot({"good": [0.1, 0.6, 0.7, 0.2], "defect": [0.9, 0.4]}, {"threshold": 0.5}, bins=10)
    assert plot.false_reject_rate == pytest.approx(0.5) and plot.escape_rate == pytest.approx(0.5)
    assert plot.svg.count("<rect") == 1 + 4 + 2 and "threshold 0.500" in plot.svg
    empty = calibration_plot({"good": [], "defect": []}, {"threshold": 0.5})
    assert empty.false_reject_rate is None and empty.escape_rate is None
