"""Every client error is application/problem+json with the right status, a clear title and a detail."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api import create_app
from service.storage.models import NAME_PATTERN

from .api_fixtures import encode, make_settings, png_file, synthetic_image, wait_ready

LIMIT_MB = 0.25  # 262144 bytes


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = make_settings(
        tmp_path_factory.mktemp("errors-data"), max_upload_mb=LIMIT_MB, max_pixels=1_000_000, queue_size=4
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def assert_problem(r, status: int, title: str | None = None, path: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert {"type", "title", "status", "detail"} <= set(body)
    assert body["status"] == status and body["detail"] and body["title"]
    if title is not None:
        assert body["title"] == title
    if path is not None:
        assert body["instance"] == path
    assert body["request_id"] == r.headers["x-request-id"]
    return body


def test_400_without_image_or_with_an_empty_file(client):
    body = assert_problem(client.post("/segment", data={"product": "x"}), 400, "No image", "/segment")
    assert "'image'" in body["detail"]
    assert_problem(
        client.post("/segment", content=b'{"image": 1}', headers={"content-type": "application/json"}), 400, "No image"
    )
    assert_problem(
        client.post("/segment", data={"image": "not a file"}, files=[("other", ("o.png", b"x"))]),
        400,
        "Image is not a file",
    )
    body = assert_problem(
        client.post("/segment", files=[("image", ("empty.png", b"", "image/png"))]), 400, "Empty upload"
    )
    assert "empty.png" in body["detail"]


def test_415_for_a_file_that_is_not_an_image(client):
    r = client.post("/segment", files=[("image", ("notes.txt", b"hello, this is text", "text/plain"))])
    body = assert_problem(r, 415, "Unsupported image format")
    assert "notes.txt" in body["detail"] and body["type"] == "urn:dhrclip:problem:unsupported-media-type"


def test_422_for_corrupt_image_data(client):
    data = encode(synthetic_image(3, (200, 150)))
    body = assert_problem(
        client.post("/segment", files=[("image", ("cut.png", data[: len(data) // 2]))]), 422, "Corrupt image data"
    )
    assert "cut.png" in body["detail"]


def test_multi_image_request_fails_as_a_whole_on_the_first_bad_file(client):
    files = [png_file("good.png", 1), ("image", ("bad.txt", b"not an image")), ("image", ("empty.png", b""))]
    body = assert_problem(client.post("/segment", files=files), 415)
    assert "bad.txt" in body["detail"]
    assert client.get("/inspections").json()["items"] == []  # nothing of a failed request is stored


def test_413_for_an_image_over_the_pixel_limit(client):
    big = encode(Image.new("L", (1200, 1000), 128))  # 1.2 MP > 1 MP, only a few KB as PNG
    body = assert_problem(client.post("/segment", files=[("image", ("big.png", big))]), 413, "Image too large")
    assert "1200x1000" in body["detail"] and "1000000" in body["detail"]


def test_413_for_a_body_over_the_upload_limit(client):
    blob = bytes(300_000)
    body = assert_problem(client.post("/segment", files=[("image", ("huge.bmp", blob))]), 413, "Upload too large")
    assert "262144" in body["detail"]

    def chunks():  # no Content-Length: the bytes received are counted
        boundary = b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="s.bin"\r\n\r\n'
        yield boundary
        for _ in range(10):
            yield bytes(40_000)
        yield b"\r\n--XyZ--\r\n"

    r = client.post("/segment", content=chunks(), headers={"content-type": "multipart/form-data; boundary=XyZ"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_problem(r, 413, "Upload too large")
    files = [png_file(f"{i}.png", i, (16, 16)) for i in range(5)]
    body = assert_problem(client.post("/segment", files=files), 413, "Too many images")
    assert "DHR_QUEUE_SIZE" in body["detail"]
    assert client.get("/readyz").status_code == 200


def test_422_for_invalid_form_and_query_values(client):
    one = [png_file("v.png", 5)]
    body = assert_problem(client.post("/segment", files=one, data={"image_score": "foo"}), 422, "Invalid request")
    assert body["errors"][0]["loc"] == "body.image_score" and "reference" in body["detail"]
    body = assert_problem(client.post("/segment", files=one, data={"include": "overlay,xray"}), 422)
    assert "xray" in body["detail"]
    assert_problem(client.post("/segment", files=one, data={"product": "p" * 201}), 422)
    assert_problem(client.post("/segment?output=jpeg", files=one), 422)
    assert_problem(client.post("/segment?output=mask", files=one * 2), 422, "One image needed")
    assert_problem(client.post("/segment", files=one * 2, headers={"Accept": "image/png"}), 406)
    # form fields in the query, or a misspelt field, would be ignored without a word: both are refused, by name
    body = assert_problem(client.post("/segment?include=mask&product=p", files=one), 422, "Invalid request")
    assert [e["loc"] for e in body["errors"]] == ["query.include", "query.product"]
    assert "multipart form field" in body["errors"][0]["msg"]
    body = assert_problem(client.post("/segment", files=one, data={"prodcut": "p", "line": "l1"}), 422)
    assert [e["loc"] for e in body["errors"]] == ["body.prodcut"]
    assert (
        body["errors"][0]["msg"] == "unknown field; the form takes image, product, line, part_id, image_score, include"
    )
    for params in (
        {"limit": 0},
        {"limit": 501},
        {"verdict": "maybe"},
        {"since": "yesterday"},
        {"since": "2026-01-01T00:00:00"},
        {"cursor": "not-a-cursor"},
    ):
        assert_problem(client.get("/inspections", params=params), 422, path="/inspections")


def test_404_and_405(client):
    unknown = "0" * 28
    assert_problem(client.get(f"/inspections/{unknown}"), 404, "Inspection not found")
    assert_problem(client.get(f"/inspections/{unknown}/mask.png"), 404, "Artefact not found")
    assert_problem(client.get(f"/inspections/{unknown}/xray.png"), 404, "Artefact not found")
    assert_problem(client.get("/products/none-such"), 404, "Product not found")
    assert_problem(client.get("/no/such/route"), 404, "Not Found", "/no/such/route")
    body = assert_problem(client.get("/segment"), 405, "Method Not Allowed")
    assert "GET" in body["detail"]
    assert_problem(client.delete("/products/x"), 405)


def test_product_validation(client):
    for bad in (
        {"image_threshold": 1.5, "pixel_threshold": 0.5},
        {"image_threshold": 0.5, "pixel_threshold": -0.1},
        {"image_threshold": 0.5, "pixel_threshold": 0.5, "image_score": "best"},
        {"image_threshold": 0.5, "pixel_threshold": 0.5, "colour": "red"},
        {"pixel_threshold": 0.5},
    ):
        body = assert_problem(client.put("/products/p", json=bad), 422, "Invalid request", "/products/p")
        assert body["errors"]
    assert_problem(client.put("/products/p", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert_problem(client.get("/products/p"), 404)  # nothing was stored
    ok = client.put("/products/p", json={"image_threshold": 0.25, "pixel_threshold": 0.75})
    assert ok.status_code == 200 and ok.json()["image_score"] == "reference"


def test_openapi_lists_the_routes(client):
    doc = client.get("/openapi.json").json()
    assert {
        "/segment",
        "/inspections",
        "/inspections/{inspection_id}",
        "/products/{name}",
        "/health",
        "/metrics",
    } <= set(doc["paths"])
    form = doc["paths"]["/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and form["properties"]["image"]["items"]["format"] == "binary"
    assert set(form["properties"]) == {"image", "product", "line", "part_id", "image_score", "include"}
    assert form["properties"]["image_score"]["enum"] == ["reference", "map_max", "map_topk"]
    assert form["properties"]["product"] == {
        "type": "string",
        "maxLength": 200,
        "pattern": NAME_PATTERN,
        "description": "product name; its profile (PUT /products/{name}) sets thresholds",
    }
    assert form["properties"]["image"]["minItems"] == 1
    assert form["properties"]["include"]["type"] == "string"


def test_an_unknown_list_filter_is_422_not_the_whole_list(client):
    """?prodcut=x was ignored: the list (or the CSV export) of every product came back as if filtered."""
    for path in ("/inspections", "/inspections.csv"):
        body = assert_problem(client.get(path, params={"prodcut": "x", "product": "x"}), 422, path=path)
        assert [e["loc"] for e in body["errors"]] == ["query.prodcut"], body
    r = client.get("/inspections", params={"product": "x", "limit": 5, "order": "oldest"})
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}
