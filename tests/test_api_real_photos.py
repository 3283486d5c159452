"""Every real photo of the development set (grayscale JPEG, 8-bit BMP, large RGB JPEG) through /segment."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from PIL import Image

from service.api import create_app

from .api_fixtures import decode_png, make_settings, wait_ready
from .paths import REAL_DEFECTS

CHUNK = 8  # files per request; with max_batch_size 8 each request is one model call


def real_photos() -> list:
    files = sorted(
        p
        for pattern in ("*/test/*/*", "*/train/good/*")
        for p in REAL_DEFECTS.glob(pattern)
        if p.is_file() and "ground_truth" not in p.parts
    )
    return files


def test_every_real_photo_is_inspected(tmp_path):
    files = real_photos()
    assert len(files) == 78
    assert {p.suffix.lower() for p in files} == {".jpg", ".bmp"}
    settings = make_settings(tmp_path, max_batch_size=CHUNK, max_wait_ms=20, request_timeout_s=300)
    t0 = time.perf_counter()
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        results = []
        for start in range(0, len(files), CHUNK):
            chunk = files[start : start + CHUNK]
            r = client.post(
                "/segment",
                files=[("image", (p.name, p.read_bytes())) for p in chunk],
                data={"product": "real", "line": "dev"},
            )
            assert r.status_code == 200, (chunk[0], r.text)
            got = r.json()["results"]
            assert [x["filename"] for x in got] == [p.name for p in chunk]
            results.extend(zip(chunk, got, strict=True))
        modes = set()
        for path, res in results:
            with Image.open(path) as img:
                size, mode = img.size, img.mode
            modes.add(mode)
            assert (res["width"], res["height"]) == size, path
            assert 0.0 <= res["score"] <= 1.0 and 0.0 <= res["defect_area_ratio"] <= 1.0
            assert res["verdict"] == ("defect" if res["score"] >= res["threshold"] else "ok")
        largest = max(results, key=lambda pr: pr[1]["width"] * pr[1]["height"])[1]
        overlay = decode_png(client.get(largest["links"]["overlay"]).content)
        assert overlay.size == (largest["width"], largest["height"]) and overlay.mode == "RGB"
        assert client.get("/health").json()["counts"]["stored"] == 78
    assert {"L", "RGB"} <= modes
    elapsed = time.perf_counter() - t0
    print(f"\n78 real photos through /segment in {elapsed:.1f} s ({78 / elapsed:.2f} images/s)")
