"""Console without a browser: open mode, sign-in redirects, CSRF on form posts, thumbnails, the calibration plot,
the reference gallery's pages, cached thumbnails and forms.

The apps have no weights (nothing loads; records are written straight into the store), except the gallery's, which
analyses references with the tiny CLIP.
"""

from __future__ import annotations

import io
import re
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api import create_app
from service.api.console import views
from service.api.console.charts import binned_rate_at_or_above, calibration_plot, histogram
from service.engine.calibration import calibrate
from service.storage import ProductProfile
from service.storage.models import CalibrationRecord, ReferenceImage, new_inspection_id, utcnow
from service.storage.reviews import Review

from .api_fixtures import encode, make_record, make_settings, png_file, synthetic_image, wait_ready


def _app(tmp_path, **kw):
    return TestClient(create_app(make_settings(tmp_path / "data", backbone=str(tmp_path / "none.pt"), **kw)))


def _add(store, verdict="defect", minutes_ago=1, **kw):
    png = encode(synthetic_image(3, (120, 80)))
    rec = make_record(utcnow() - timedelta(minutes=minutes_ago), verdict, width=120, height=80, **kw)
    return store.add(rec, {"overlay": png, "heatmap": png, "mask": png})


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]{32})"', html).group(1)


def _problem_page(r, status: int, title: str, *details: str, back: str) -> None:
    """A refused console form post: the same status as the API's problem, an HTML page in the console's layout with
    the title, the (escaped) detail and a link back to the form's page."""
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("text/html")
    assert f"<h1>{title}</h1>" in r.text and f'<a href="{back}">Back to the page</a>' in r.text
    assert "<nav>" in r.text and f"HTTP {status}" in r.text
    for detail in details:
        assert detail in r.text, (detail, r.text)


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
            back = f"/ui/inspections/{rec.id}"
            _problem_page(r, 403, "CSRF check failed", "the form&#39;s csrf token is missing", back=back)
        r = client.post(url, data={"decision": "approve", "csrf": token}, follow_redirects=False)
        _problem_page(r, 422, "Invalid form", "decision: Input should be", back=back)
        r = client.post(url, data={"decision": "confirm_defect", "note": "n" * 2001, "csrf": token})
        _problem_page(r, 422, "Invalid form", "note: String should have at most", back=back)
        r = client.post(f"/ui/inspections/{'0' * 28}/review", data={"decision": "escape", "csrf": token})
        _problem_page(r, 404, "Inspection not found", back=f"/ui/inspections/{'0' * 28}")
        # the same refusals through the JSON API stay problem+json
        r = client.post(f"/inspections/{rec.id}/review", json={"decision": "approve"})
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        assert "decision" in r.json()["detail"]
        assert 'id="as-reference" class="d-false_reject" disabled' in page.text and "was not stored" in page.text
        assert client.post(f"/ui/inspections/{rec.id}/as-reference", data={}).status_code == 403
        r = client.post(f"/ui/inspections/{rec.id}/as-reference", data={"csrf": token, "note": "ok part"})
        _problem_page(r, 409, "Original not stored", back=back)
        assert store.reviews_of([rec.id]) == {} and store.list_references("bottle") == []

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
        png = encode(synthetic_image(5, (400, 100)))  # wider than a thumbnail: long side scaled to 192, aspect kept
        wide = store.add(make_record(utcnow(), "defect", width=400, height=100), {"overlay": png})
        assert _thumb_size(client.get(f"/ui/thumbs/{wide.id}.jpg").content) == (192, 48)


def test_the_original_layer_is_a_cached_jpeg_of_the_stored_upload(tmp_path):
    with _app(tmp_path) as client:
        store = client.app.state.ctx.store
        upload = encode(synthetic_image(4, (120, 80)), "TIFF")  # kept as sent; browsers do not show TIFF
        rec = store.add(make_record(utcnow(), "defect", width=120, height=80), {"original": upload})
        html = client.get(f"/ui/inspections/{rec.id}").text
        assert f'src="/ui/inspections/{rec.id}/original.jpg"' in html and 'data-base="original"' in html
        r = client.get(f"/ui/inspections/{rec.id}/original.jpg")
        assert r.status_code == 200 and _thumb_size(r.content) == (120, 80)
        assert store.read_artefact(rec, "original") == upload and store.read_derived(rec, "original.jpg") == r.content
        store.put_derived(rec, "original.jpg", b"\xff\xd8cached")
        assert client.get(f"/ui/inspections/{rec.id}/original.jpg").content == b"\xff\xd8cached"
        without = _add(store)
        assert client.get(f"/ui/inspections/{without.id}/original.jpg").status_code == 404
        assert 'data-base="overlay"' in client.get(f"/ui/inspections/{without.id}").text


def test_calibration_plot_counts_and_rates():
    assert histogram([0.0, 0.05, 0.1, 0.99, 1.0, 1.7, -0.2], bins=10) == [3, 1, 0, 0, 0, 0, 0, 0, 0, 3]
    plot = calibration_plot({"good": [0.1, 0.6, 0.7, 0.2], "defect": [0.9, 0.4]}, {"threshold": 0.5}, bins=10)
    assert plot.false_reject_rate == pytest.approx(0.5) and plot.escape_rate == pytest.approx(0.5)
    assert plot.svg.count("<rect") == 1 + 4 + 2 and "threshold 0.500" in plot.svg
    empty = calibration_plot({"good": [], "defect": []}, {"threshold": 0.5})
    assert empty.false_reject_rate is None and empty.escape_rate is None


def test_binned_rates_spread_each_bin_evenly():
    edges, counts = [0.0, 0.25, 0.5, 0.75, 1.0], [2, 1, 1, 0]
    assert binned_rate_at_or_above(edges, counts, 0.5) == pytest.approx(0.25)
    assert binned_rate_at_or_above(edges, counts, 0.375) == pytest.approx((0.5 + 1) / 4)
    assert binned_rate_at_or_above(edges, counts, -1.0) == 1.0 and binned_rate_at_or_above(edges, counts, 2.0) == 0
    assert binned_rate_at_or_above(edges, [0, 0, 0, 0], 0.5) is None


def _text(html: str, element_id: str) -> str:
    return re.search(rf'id="{element_id}"[^>]*>([^<]*)<', html).group(1)


def test_product_page_plots_the_stored_calibration(tmp_path):
    """No calibration: said so, reviewed scores shown instead. Calibrated: its histograms, its measured rates;
    thresholds set by hand since: rates estimated from its bins at the new threshold."""
    with _app(tmp_path) as client:
        store = client.app.state.ctx.store
        profile = ProductProfile(name="w", image_threshold=0.5, pixel_threshold=0.5, image_score="reference")
        store.put_product(profile)
        html = client.get("/ui/products/w").text
        assert "No calibration for this product" in html and "Reviewed inspections (not a calibration)" in html

        # 100 good scores 0, 0.005, ..., 0.495 (5 in each of the first 20 of 40 bins over [0, 1]); 4 defects
        good, defects = [i / 200 for i in range(100)], [0.3, 0.6, 0.8, 0.9]
        cal = calibrate(good, [0.1 + 0.0 * np.arange(16)] * 100, "reference", defect_scores=defects, target_frr=0.01)
        assert cal.reject_threshold == pytest.approx(0.49) and cal.good_frr == 0.01 and cal.escape_rate == 0.25
        record = CalibrationRecord(version=cal.version, product="w", memory_version=None, content=cal.to_dict())
        store.put_calibration(record, replace(profile, image_threshold=cal.reject_threshold))
        html = client.get("/ui/products/w").text
        assert "No calibration" not in html and cal.version in html and "100 good and 4 defect images" in html
        assert _text(html, "frr") == "1.0 %" and _text(html, "escape") == "25.0 %"
        assert "as measured on the 100 good calibration images" in html and "set by hand" not in html
        assert html.count("<rect") == 1 + 20 + 4  # frame, good bins, defect bins

        store.put_product(replace(profile, image_threshold=0.4))  # by hand: the calibration is no longer in force
        html = client.get("/ui/products/w").text
        assert cal.version in html and 'id="hand-set"' in html and "calibrated reject 0.490" in html
        assert _text(html, "frr") == "20.0 %" and _text(html, "escape") == "25.0 %"
        assert "from the histogram bins of the calibration" in html


def _thumb_size(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG"
    return img.size


def _range(html: str) -> str:
    """The gallery's "references 25 to 48 of 130" line (an en dash between the numbers), with a plain hyphen."""
    return _text(html, "ref-range").replace("\u2013", "-")


def _gallery(client, query: str = "") -> tuple[str, list[str]]:
    """The product page ``w`` (200) and the reference ids its gallery shows, in order."""
    r = client.get("/ui/products/w" + query)
    assert r.status_code == 200, r.text[:300]
    return r.text, re.findall(r'<li data-id="([0-9a-f]{28})">', r.text)


def test_reference_gallery_pages_newest_first_and_thumbnails_are_cached(tmp_path, monkeypatch):
    """50 references stored straight into the store (40x30 PNGs, one 300x200; placeholder features: the pages never read
    them): pages of views.GALLERY_PAGE newest first, counts in the text, links only where there is a page, a page
    past the last clamped, a bad page number 422 like any bad query value; a thumbnail decoded once, then served
    from the artefact store."""
    assert views.GALLERY_PAGE == 24
    with _app(tmp_path) as client:
        store = client.app.state.ctx.store
        store.put_product(ProductProfile(name="w", image_threshold=0.5, pixel_threshold=0.5, image_score="max"))
        png, t0 = encode(synthetic_image(5, (40, 30))), utcnow() - timedelta(hours=1)
        refs = [
            ReferenceImage(
                id=new_inspection_id(t0 + timedelta(seconds=i)),
                product="w",
                filename=f"r{i}.png",
                sha256="0" * 64,
                width=40,
                height=30,
                nbytes=len(png),
                model_key="k",
            )
            for i in range(50)
        ]
        big = encode(synthetic_image(6, (300, 200)))  # the seventh's upload: its thumbnail is scaled down
        store.add_references([(r, big if i == 7 else png, b"feat") for i, r in enumerate(refs)])
        newest = [r.id for r in reversed(refs)]
        link = '<a id="ref-{}" rel="{}" href="/ui/products/w{}#references">'
        html, ids = _gallery(client)
        assert ids == newest[:24] and _range(html) == "references 1-24 of 50"
        assert 'id="ref-count" data-count="50"' in html and "(page 1 of 3, newest first)" in html
        assert link.format("next", "next", "?page=2") in html and 'id="ref-prev"' not in html
        assert html.count('<input type="hidden" name="page" value="1">') == 24  # each remove form comes back here
        html, ids = _gallery(client, "?page=2")
        assert ids == newest[24:48] and _range(html) == "references 25-48 of 50"
        assert link.format("prev", "prev", "") in html and link.format("next", "next", "?page=3") in html
        html, ids = _gallery(client, "?page=3")
        assert ids == newest[48:] == [refs[1].id, refs[0].id] and _range(html) == "references 49-50 of 50"
        assert link.format("prev", "prev", "?page=2") in html and 'id="ref-next"' not in html
        clamped, ids = _gallery(client, "?page=999999")
        assert ids == newest[48:] and 'name="page" value="3"' in clamped and 'id="ref-next"' not in clamped
        for bad in ("0", "-1", "abc", "2.5", ""):
            r = client.get(f"/ui/products/w?page={bad}")
            assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", bad
            assert r.json()["detail"].startswith("query.page: ")

        decoded, real = [], views.jpeg_preview
        monkeypatch.setattr(views, "jpeg_preview", lambda *a, **kw: decoded.append(a[1]) or real(*a, **kw))
        url, key = f"/ui/products/w/references/{refs[7].id}.jpg", f"references/{refs[7].id}/"
        first = client.get(url)
        assert first.status_code == 200 and _thumb_size(first.content) == (128, 85) and decoded == ["r7.png"]
        assert first.headers["cache-control"] == "private, max-age=86400, immutable"
        on_disk = tmp_path / "data" / key / "thumb.jpg"  # the default artefact store: the data directory
        assert on_disk.read_bytes() == first.content and store.read_reference_image(refs[7].id) == big
        on_disk.write_bytes(b"\xff\xd8cached")  # the second request serves the cached object, decodes nothing
        second = client.get(url)
        assert second.status_code == 200 and second.content == b"\xff\xd8cached" and decoded == ["r7.png"]
        assert client.get(f"/ui/products/other/references/{refs[7].id}.jpg").status_code == 404
        assert not (tmp_path / "data" / "references" / refs[8].id / "thumb.jpg").exists()  # only what was asked


def test_reference_gallery_forms_need_csrf_and_an_admin_key(tmp_path, monkeypatch):
    with TestClient(create_app(make_settings(tmp_path / "data", api_keys="op", admin_keys="ad"))) as client:
        wait_ready(client)
        admin = {"X-API-Key": "ad"}
        assert client.put(
            "/products/w", json={"image_threshold": 0.5, "pixel_threshold": 0.5}, headers=admin
        ).is_success
        client.cookies.set("dhr_key", "op")
        page = client.get("/ui/products/w").text
        token = _csrf(page)
        assert "Only an admin key can add or remove references." in page and 'id="ref-count" data-count="0"' in page
        url, files = "/ui/products/w/references", [png_file("a.png", 1, (120, 90)), png_file("b.png", 2, (60, 80))]
        r = client.post(url, data={"csrf": token}, files=files)
        _problem_page(r, 403, "Admin key required", back="/ui/products/w")
        client.cookies.set("dhr_key", "ad")
        _problem_page(client.post(url, files=files), 403, "CSRF check failed", back="/ui/products/w")
        bad = [("image", ("c.png", b"not an image", "image/png"))]
        r = client.post(url, data={"csrf": token}, files=files + bad)  # all or nothing
        _problem_page(r, 415, "Unsupported image format", "c.png", back="/ui/products/w")
        assert client.get(url[3:], headers=admin).json()["items"] == []

        r = client.post(url, data={"csrf": token}, files=files, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/products/w#references"
        refs = client.get(url[3:], headers=admin).json()
        assert [i["filename"] for i in refs["items"]] == ["a.png", "b.png"] and refs["memory"]["n_references"] == 2
        first, second = (i["id"] for i in refs["items"])
        page, ids = _gallery(client)
        assert 'id="ref-count" data-count="2"' in page and ids == [second, first]  # newest first
        thumb = client.get(f"/ui/products/w/references/{first}.jpg")
        assert thumb.status_code == 200 and _thumb_size(thumb.content) == (120, 90)
        folder = tmp_path / "data" / "references"  # the default artefact store: the data directory
        assert (folder / first / "thumb.jpg").read_bytes() == thumb.content  # cached beside the reference
        assert client.get(f"/ui/products/other/references/{first}.jpg").status_code == 404

        # one reference a page; a third one (stored directly, with the second's bytes and features) is the newest
        monkeypatch.setattr(views, "GALLERY_PAGE", 1)
        store = client.app.state.ctx.store
        third = replace(store.get_reference("w", second), id=new_inspection_id(), filename="c.png")
        store.add_references([(third, store.read_reference_image(second), store.read_reference_features(second))])
        assert [_gallery(client, f"?page={n}")[1] for n in (1, 2, 3)] == [[third.id], [second], [first]]
        delete = f"/ui/products/w/references/{second}/delete"
        client.cookies.set("dhr_key", "op")
        assert client.post(delete, data={"csrf": token, "page": "2"}).status_code == 403
        client.cookies.set("dhr_key", "ad")
        assert client.post(delete, data={"page": "2"}).status_code == 403
        r = client.post(delete, data={"csrf": token, "page": "x"})
        _problem_page(r, 422, "Invalid form", "page: Input should be a valid integer", back="/ui/products/w")
        r = client.post(delete, data={"csrf": token, "page": "2"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/ui/products/w?page=2#references"
        assert _gallery(client, "?page=2")[1] == [first]  # page 2 still exists: the operator is back on it
        assert (folder / first / "thumb.jpg").is_file() and not (folder / second).exists()
        r = client.post(f"/ui/products/w/references/{first}/delete", data={"csrf": token, "page": "2"})
        assert r.status_code == 200 and r.url.path == "/ui/products/w" and r.url.query == b"page=2"
        assert re.findall(r'<li data-id="([0-9a-f]{28})">', r.text) == [third.id]  # page 2 is gone: the last one
        assert _range(r.text) == "references 1-1 of 1" and 'id="ref-prev"' not in r.text
        assert sorted(p.name for p in folder.iterdir()) == [third.id]  # the removed ones' thumbnails went too
        assert client.post(delete, data={"csrf": token}).status_code == 404
        refs = client.get(url[3:], headers=admin).json()
        assert [i["id"] for i in refs["items"]] == [third.id] and refs["memory"]["n_references"] == 1


def test_without_stored_originals_a_false_reject_cannot_become_a_reference(tmp_path):
    """DHR_STORE_ORIGINALS=false: the page shows the overlay underneath and the reference button disabled; the
    review with add_reference is refused (409 problem), nothing is written."""
    with TestClient(create_app(make_settings(tmp_path / "data", store_originals=False))) as client:
        wait_ready(client)
        assert client.put("/products/w", json={"image_threshold": 0.0, "pixel_threshold": 0.5}).is_success
        r = client.post("/segment", data={"product": "w"}, files=[png_file("a.png", 1, (120, 90))])
        rid = r.json()["results"][0]["id"]
        page = client.get(f"/ui/inspections/{rid}").text
        assert 'data-base="overlay"' in page and 'id="as-reference" class="d-false_reject" disabled' in page
        r = client.post(f"/ui/inspections/{rid}/as-reference", data={"csrf": _csrf(page)})
        _problem_page(r, 409, "Original not stored", "DHR_STORE_ORIGINALS=false", back=f"/ui/inspections/{rid}")
        api = client.post(f"/inspections/{rid}/review", json={"decision": "false_reject", "add_reference": True})
        assert api.status_code == 409 and api.headers["content-type"] == "application/problem+json"
        assert "DHR_STORE_ORIGINALS=false" in api.json()["detail"]
        assert client.get(f"/inspections/{rid}").json()["reviews"] == []
        assert client.get("/products/w/references").json()["items"] == []


def test_refused_thresholds_form_is_a_page_and_the_api_still_answers_problem_json(tmp_path):
    with _app(tmp_path, api_keys="op", admin_keys="ad") as client:
        client.cookies.set("dhr_key", "op")
        token = _csrf(client.get("/ui/products/w").text)
        url, form = "/ui/products/w/thresholds", {"image_threshold": "0.5", "pixel_threshold": "0.5", "csrf": token}
        r = client.post(url, data=form)
        _problem_page(r, 403, "Admin key required", "change thresholds", back="/ui/products/w")
        assert "dhr_csrf" not in r.headers.get("set-cookie", "")  # the browser's token stays valid
        api = client.put(
            "/products/w", json={"image_threshold": 0.5, "pixel_threshold": 0.5}, headers={"X-API-Key": "op"}
        )
        assert api.status_code == 403 and api.headers["content-type"] == "application/problem+json"
        assert api.json()["title"] == "Admin key required"

        client.cookies.set("dhr_key", "ad")
        r = client.post(url, data={**form, "image_threshold": "high"})
        _problem_page(r, 422, "Invalid form", "image_threshold: Input should be a valid number", back="/ui/products/w")
        r = client.post(url, data={**form, "csrf": ""})
        _problem_page(r, 403, "CSRF check failed", back="/ui/products/w")
        assert client.get("/products/w", headers={"X-API-Key": "ad"}).status_code == 404  # nothing was written
        api = client.put(
            "/products/w", json={"image_threshold": "high", "pixel_threshold": 0.5}, headers={"X-API-Key": "ad"}
        )
        assert api.status_code == 422 and api.headers["content-type"] == "application/problem+json"
        assert "image_threshold" in api.json()["detail"]


def test_the_thresholds_form_keeps_what_it_does_not_show(tmp_path):
    """The form sends image/pixel threshold and score only: saving it reset the review zone to none and the fusion
    weight to 0.5 without a word (parts meant for review passed as ok)."""
    with _app(tmp_path) as client:
        store = client.app.state.ctx.store
        store.put_product(
            ProductProfile(
                name="w", image_threshold=0.5, pixel_threshold=0.5, image_score="reference",
                review_threshold=0.3, fusion_weight=0.8,
            )
        )  # fmt: skip
        token = _csrf(client.get("/ui/products/w").text)
        form = {"image_threshold": "0.6", "pixel_threshold": "0.4", "image_score": "map_max", "csrf": token}
        assert client.post("/ui/products/w/thresholds", data=form, follow_redirects=False).status_code == 303
        p = store.get_product("w")
        assert (p.image_threshold, p.pixel_threshold, p.image_score) == (0.6, 0.4, "map_max")
        assert (p.review_threshold, p.fusion_weight) == (0.3, 0.8)
        r = client.post("/ui/products/w/thresholds", data={**form, "image_threshold": "0.2"})
        _problem_page(r, 422, "Invalid form", "review_threshold 0.3 &gt; image_threshold 0.2", back="/ui/products/w")
