"""Regression tests of the defects a hostile campaign found (issue #8), one block per defect, in-process.

Each test sends the triggering request of the issue (or the smallest equivalent) and checks the answer: status,
problem type and the limit named in the detail.
"""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api import create_app
from service.engine.admission import Admission, OverloadedError, TooManyImagesError
from service.engine.batcher import DynamicBatcher
from service.engine.decode import DecodeLimits, ImageError, decode_image
from service.engine.postprocess import postprocess
from service.storage.models import NAME_RE, check_name

from .api_fixtures import encode, make_settings, png_file, synthetic_image, wait_ready


def png_header_only(width: int, height: int, mode: int = 0) -> bytes:
    """A valid PNG of ``width`` x ``height`` (grey 8-bit, colour type ``mode``) whose pixels are all zero.

    The IDAT holds the zlib stream of every filter byte + zero row, so it is small for thin images; for huge
    sizes only the header matters (the server refuses before decoding).
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0)
    row = b"\x00" * (1 + width * (3 if mode == 2 else 1))
    raw = zlib.compress(row * height, 9) if width * height <= 50_000_000 else zlib.compress(row, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("hostile-data"), max_upload_mb=2.0)
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def problem(r, status: int, slug: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    if slug is not None:
        assert body["type"] == f"urn:dhrclip:problem:{slug}", body
    return body


def upload(name: str, data: bytes, mime: str = "image/png"):
    return [("image", (name, data, mime))]


# 1 + 2: degenerate shapes are refused from the header, naming the limit; nothing is decoded ------------------------
def test_degenerate_shapes_are_refused_from_the_header(client):
    thin = png_header_only(1, 39_999_999)  # the 77 KB file that took the server down
    assert len(thin) < 100_000
    t0 = time.perf_counter()
    body = problem(client.post("/segment", files=upload("thin.png", thin)), 413, "image-too-large")
    assert time.perf_counter() - t0 < 5.0 and "DHR_MAX_SIDE" in body["detail"]
    body = problem(client.post("/segment", files=upload("wide.png", png_header_only(2_000_000, 1))), 413)
    assert "32768" in body["detail"]
    body = problem(client.post("/segment", files=upload("strip.png", png_header_only(20_000, 100))), 422, "image-shape")
    assert "DHR_MAX_ASPECT_RATIO" in body["detail"] and "200" in body["detail"]
    assert client.get("/inspections").json()["items"] == []


def test_limits_are_settings_with_sane_bounds():
    s = make_settings(__import__("pathlib").Path("/tmp/unused"))
    assert (s.max_pixels, s.max_side, s.max_aspect_ratio, s.accept_truncated) == (40_000_000, 32_768, 64.0, False)
    with pytest.raises(ValueError, match="max_side"):
        make_settings(__import__("pathlib").Path("/tmp/unused"), max_side=2_000_000)  # PNG encoders stop at 1e6


def test_postprocess_refuses_a_buffer_over_the_pixel_limit_and_stops_at_a_checkpoint():
    image = np.zeros((40, 30, 3), np.uint8)
    score = np.full((8, 8), 0.7, np.float32)
    with pytest.raises(ValueError, match="over the limit of 1000"):
        postprocess(score, image, max_pixels=1000)
    calls = []

    def checkpoint():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("abandoned")

    with pytest.raises(RuntimeError, match="abandoned"):
        postprocess(score, image, checkpoint=checkpoint)
    assert len(calls) == 2  # stopped after the regions, before any PNG was encoded


# 3: dates that overflow in UTC ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "query",
    [
        "since=0001-01-01T00:00:00%2B01:00",
        "until=0001-01-01T00:00:00%2B01:00",
        "since=9999-12-31T23:59:59-01:00",
        "until=9999-12-31T23:59:59-01:00",
    ],
)
def test_dates_out_of_range_in_utc_are_422(client, query):
    body = problem(client.get(f"/inspections?{query}"), 422, "validation-error")
    assert "out of range" in body["detail"]


def test_a_cursor_holding_an_overflowing_date_is_422(client):
    raw = f"9999-12-31T23:59:59-01:00|{'a' * 28}".encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    problem(client.get(f"/inspections?cursor={cursor}"), 422)
    problem(client.get("/inspections?cursor=" + "A" * 89), 422)  # the schema's maxLength, not a server error


# 4: the status of a too-large image does not depend on other traffic -------------------------------------------------
def test_too_large_is_413_whatever_other_threads_decode():
    big = png_header_only(10_000, 10_000)  # 100 Mpx: above Pillow's own warning level
    huge = png_header_only(20_000, 20_000)  # 400 Mpx: above Pillow's own error level (178 Mpx)
    ok = encode(synthetic_image(1, (640, 480)), "JPEG")
    limits = DecodeLimits(max_pixels=40_000_000, max_side=32_768)
    kinds: list[str] = []

    def worker(data: bytes) -> None:
        for _ in range(5):
            try:
                decode_image(data, "x", limits)
                kinds.append("ok")
            except ImageError as exc:
                kinds.append(exc.kind)

    threads = [threading.Thread(target=worker, args=(d,)) for d in (big, huge, ok, big, ok, huge)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(kinds)) == ["ok", "too_large"] and kinds.count("too_large") == 20


# 5 + 7: admission by count and by expected wait, fair batches --------------------------------------------------------
def test_admission_refuses_by_expected_wait_with_retry_after_from_the_drain_rate():
    adm = Admission(queue_size=64, max_batch_size=4, max_wait_s=1.0, deadline_s=10.0)
    first = adm.admit(10)  # nothing measured yet: only the count applies
    for _ in range(3):
        adm.observe_batch(4, 0.5)  # 8 images/s in full batches
    assert adm.drain_s(10) == pytest.approx(2 * 0.5 + 0.5 * 2 / 4)
    with pytest.raises(OverloadedError) as err:
        adm.admit(1)  # the 10 images ahead need 1.25 s > 1 s
    assert err.value.retry_after_s == 2  # ceil(1.25 s)
    first.done(4)
    second = adm.admit(2)  # the 6 images ahead need 0.75 s <= 1 s
    first.release()
    second.release()
    assert adm.outstanding == 0
    adm.observe_batch(1, 50.0)  # one absurd batch time cannot lock an idle service out
    adm.admit(1).release()
    with pytest.raises(TooManyImagesError) as big:
        adm.check(60)  # 60 images need 7.5 s alone, over half the 10 s deadline
    assert big.value.allowed == 40 and adm.images_per_request == 40


def test_the_default_wait_bound_is_half_a_single_image_call_at_least_a_tenth_of_a_second():
    running: list[tuple[int, float]] = []  # (images, seconds since start) of the batch the model runs now
    adm = Admission(queue_size=64, max_batch_size=4, max_wait_s=None, deadline_s=10.0, running=lambda: running)
    assert adm.wait_bound_s == 0.1  # nothing measured: the floor
    adm.observe_batch(1, 0.4)
    assert adm.wait_bound_s == pytest.approx(0.2)
    first = adm.admit(1)  # idle: no wait
    running[:] = [(1, 0.1)]  # its call has run 0.1 s of 0.4 s
    with pytest.raises(OverloadedError, match="0.30 s exceeds 0.20 s"):
        adm.admit(1)
    running[:] = [(1, 0.25)]  # past half-way: 0.15 s left
    second = adm.admit(1)
    with pytest.raises(OverloadedError, match="0.55 s exceeds"):
        adm.admit(1)  # 0.15 s left, then the waiting image's 0.4 s
    running[:] = []
    first.release()
    second.release()
    door = adm.admit(1)
    adm.resize(door, 3)  # the request's own place is given back, then 3 images are checked: nothing ahead
    assert (door.held, adm.outstanding) == (3, 3)
    with pytest.raises(OverloadedError, match="1.20 s exceeds"):
        adm.admit(1)  # 3 images ahead
    with pytest.raises(TooManyImagesError):
        adm.resize(door, 65)
    assert (door.held, adm.outstanding) == (0, 0)  # a refused resize holds nothing
    fast = Admission(queue_size=64, max_batch_size=8, max_wait_s=None, deadline_s=10.0)
    fast.observe_batch(1, 0.01)
    fast.observe_batch(8, 0.019)  # an accelerator: 8 images cost twice one
    assert fast.wait_bound_s == 0.1
    admitted = 0
    with pytest.raises(OverloadedError):
        while True:
            fast.admit(1)
            admitted += 1
    assert admitted == 35  # 34 images may wait ahead of the last one: 4 full calls and one of 2, 0.096 s


def test_batches_are_filled_round_robin_between_requests():
    async def main():
        seen: list[list[str]] = []
        batcher = DynamicBatcher(
            lambda items: seen.append(list(items)) or items, max_batch_size=4, max_wait_ms=50, queue_size=100
        )
        await batcher.start()
        big = [asyncio.create_task(batcher.submit(f"big{i}", key="big")) for i in range(12)]
        await asyncio.sleep(0)
        small = [asyncio.create_task(batcher.submit(f"small{i}", key=f"s{i}")) for i in range(3)]
        await asyncio.gather(*big, *small)
        await batcher.stop()
        return seen

    seen = asyncio.run(main())
    first_small = min(i for i, batch in enumerate(seen) if any(x.startswith("small") for x in batch))
    assert first_small <= 1, seen  # not behind all 12 images of the big request
    assert [x for b in seen for x in b if x.startswith("big")] == [f"big{i}" for i in range(12)]  # order kept


def test_a_request_larger_than_the_deadline_allows_is_413_before_decoding(tmp_path):
    app = create_app(make_settings(tmp_path, request_timeout_s=1.0, queue_size=16))
    with TestClient(app) as c:
        wait_ready(c)
        engine = app.state.ctx.engine
        for _ in range(3):
            engine.admission.observe_batch(1, 0.2)  # measured: 0.2 s per image
        files = [png_file(f"m{i}.png", i) for i in range(6)]  # 1.2 s of model time > half of 1 s
        body = problem(c.post("/segment", files=files), 413, "too-many-images")
        assert body["max_images"] == 2 and "DHR_REQUEST_TIMEOUT_S" in body["detail"]
        assert engine.batcher.items_total == 0 and engine.admission.outstanding == 0


# 6: a client that disconnects is 499, not 500 ------------------------------------------------------------------------
def test_client_disconnect_while_uploading_is_counted_as_499(tmp_path):
    app = create_app(make_settings(tmp_path))
    with TestClient(app) as c:
        wait_ready(c)

    async def main():
        async with app.router.lifespan_context(app):
            while not app.state.ctx.ready:
                await asyncio.sleep(0.05)
            body = b'--xx\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG'
            messages = [
                {"type": "http.request", "body": body, "more_body": True},
                {"type": "http.disconnect"},
            ]
            sent: list[dict] = []

            async def receive():
                return messages.pop(0) if messages else {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            scope = {
                "type": "http",
                "method": "POST",
                "path": "/segment",
                "raw_path": b"/segment",
                "query_string": b"",
                "headers": [(b"content-type", b"multipart/form-data; boundary=xx")],
                "scheme": "http",
                "server": ("test", 80),
                "client": ("test", 1),
                "root_path": "",
                "http_version": "1.1",
                "app": app,
            }
            await app(scope, receive, send)
            return sent, app.state.ctx.metrics.render().decode()

    sent, metrics = asyncio.run(main())
    assert sent == []  # nobody to answer
    assert 'route="/segment",status="499"} 1.0' in metrics and 'status="500"' not in metrics


# 8: one name grammar for product, line and part ids ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["%00", "%20", "a%20", "%20a", "a%00b", "_x", "a%0A", "x" * 201])
def test_odd_product_names_are_refused(client, name):
    problem(client.put(f"/products/{name}", json={"image_threshold": 0.5, "pixel_threshold": 0.5}), 422)


def test_names_in_the_form_and_filters_follow_the_grammar(client):
    one = [png_file("n.png", 1)]
    for field in ("product", "line", "part_id"):
        for bad in (" lead", "trail ", "nul\x00", "tab\tx"):
            problem(client.post("/segment", files=one, data={field: bad}), 422, "validation-error")
    problem(client.get("/inspections?product=%00"), 422)
    ok = client.post("/segment", files=one, data={"product": "Gehäuse 7", "line": "L-1", "part_id": "SN:0042"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["results"][0]["product"] == "Gehäuse 7"


def test_the_grammar_is_enforced_by_the_store_too():
    for good in ("a", "A-1", "lot 42", "SN:0042#7", "x" * 200):
        check_name(good, "product")
    for bad in ("", " ", "a ", "\x00", "a\nb", "a\n", "x" * 201, "a/b"):
        assert not NAME_RE.fullmatch(bad)
        with pytest.raises(ValueError, match="not a valid name"):
            check_name(bad, "product")


def test_filenames_with_control_characters_are_cleaned(client):
    head = b'--xx\r\nContent-Disposition: form-data; name="image"; filename="a\x00b\x1f.png"\r\n\r\n'
    body = head + encode(synthetic_image(3)) + b"\r\n--xx--\r\n"
    r = client.post("/segment", content=body, headers={"content-type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 200 and r.json()["results"][0]["filename"] == "a?b?.png"


# 9: silently wrong images ---------------------------------------------------------------------------------------------
def jpeg_claiming(width: int, height: int) -> bytes:
    """A 128x96 JPEG whose frame header claims ``width`` x ``height``."""
    data = bytearray(encode(synthetic_image(5, (128, 96)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_nan_float_tiff_is_422(client):
    pixels = np.full((32, 48), np.nan, np.float32)
    pixels[:4] = 1.0
    buf = io.BytesIO()
    Image.fromarray(pixels, "F").save(buf, "TIFF")
    body = problem(client.post("/segment", files=upload("nan.tif", buf.getvalue(), "image/tiff")), 422, "corrupt-image")
    assert "NaN" in body["detail"]


def test_truncated_and_inflated_jpegs_are_422_corrupt_image(client):
    problem(
        client.post("/segment", files=upload("big.jpg", jpeg_claiming(2000, 2000), "image/jpeg")), 422, "corrupt-image"
    )
    whole = encode(synthetic_image(6, (128, 96)), "JPEG")
    for cut in (whole[:-2], whole[: len(whole) // 2]):
        body = problem(client.post("/segment", files=upload("cut.jpg", cut, "image/jpeg")), 422, "corrupt-image")
        assert "DHR_ACCEPT_TRUNCATED" in body["detail"]


def test_accept_truncated_decodes_a_jpeg_without_its_end_marker():
    whole = encode(synthetic_image(6, (128, 96)), "JPEG")
    with pytest.raises(ImageError):
        decode_image(whole[:-2], "cut.jpg")
    decoded = decode_image(whole[:-2], "cut.jpg", DecodeLimits(accept_truncated=True))
    reference = decode_image(whole, "whole.jpg")
    assert np.array_equal(np.asarray(decoded.image), np.asarray(reference.image))


def test_a_png_with_a_flipped_bit_is_422(client):
    data = bytearray(encode(synthetic_image(7), "PNG"))
    data[len(data) // 2] ^= 0x10  # inside IDAT: only the chunk CRC tells
    problem(client.post("/segment", files=upload("flip.png", bytes(data))), 422, "corrupt-image")
