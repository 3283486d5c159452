"""Offline /docs (Swagger UI assets from the package, nothing from a CDN) and the one JSON log format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from fastapi.testclient import TestClient

from service.api import create_app

from .api_fixtures import make_settings
from .paths import ROOT


def test_docs_page_and_its_assets_are_served_from_the_package(tmp_path):
    with TestClient(create_app(make_settings(tmp_path))) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        html = page.text
        assert "cdn" not in html.lower() and "http://" not in html and "https://" not in html
        for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
            assert asset in html
            r = client.get(asset)
            assert r.status_code == 200 and len(r.content) > 10_000
        assert client.get("/redoc").status_code == 404  # its page would load from a CDN
        assert "/docs" not in client.get("/openapi.json").json()["paths"]


def test_every_stderr_line_is_json_including_native_and_warning_output():
    script = textwrap.dedent(
        """
        import importlib.util, logging, os, sys, warnings
        spec = importlib.util.spec_from_file_location("logs", sys.argv[1])  # stdlib only: no torch import
        logs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(logs)
        logs.configure_logging("info")
        logging.getLogger("dhrclip.access").info("x", extra={"access": {"duration_ms": 1.23456789, "status": 200}})
        os.write(2, b"libpng warning: iCCP: known incorrect sRGB profile\\nsecond raw line\\n")
        warnings.warn("numpy: invalid value encountered", RuntimeWarning)
        try:
            1 / 0
        except ZeroDivisionError:
            logging.getLogger("dhrclip.api").exception("boom")
        import time; time.sleep(0.3)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    logs_py = str(ROOT / "service" / "api" / "logs.py")
    done = subprocess.run([sys.executable, "-c", script, logs_py], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # raises on any raw line
    by_logger = {}
    for line in lines:
        by_logger.setdefault(line["logger"], []).append(line)
    assert by_logger["dhrclip.access"][0]["duration_ms"] == 1.235
    assert [x["msg"] for x in by_logger["dhrclip.native"]] == [
        "libpng warning: iCCP: known incorrect sRGB profile",
        "second raw line",
    ]
    assert "invalid value" in by_logger["py.warnings"][0]["msg"]
    assert "ZeroDivisionError" in by_logger["dhrclip.api"][0]["exc"]
