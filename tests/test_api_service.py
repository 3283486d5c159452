"""Service life: settings, weights resolution, missing weights, API keys, durability across restarts, retention,
and ``serve`` running uvicorn in a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api import Settings, create_app
from service.api.server import run_serve
from service.api.settings import settings_error_line
from service.api.weights import WeightsError, choose_weights
from service.model.backbone import openai_cache_candidates
from service.storage import InspectionRecord

from .api_fixtures import decode_png, make_settings, png_file, wait_ready
from .paths import REF_PROMPTS, ROOT, TINY_CLIP


def test_settings_from_environment_and_env_file(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("DHR_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("DHR_API_KEYS", " k1, k2 ,,")
    monkeypatch.setenv("DHR_MAX_PIXELS", "40e6")
    monkeypatch.setenv("DHR_RETENTION_DAYS", "")
    monkeypatch.setenv("DHR_PROTECT_OPS", "true")
    monkeypatch.setenv("DHR_DATA_DIR", str(tmp_path / "d"))
    env_file = tmp_path / "service.env"
    env_file.write_text("DHR_QUEUE_SIZE=7\nDHR_PRESET=fast\nDHR_IMAGE_SCORE=map_max\n")
    s = Settings(_env_file=env_file)
    assert s.api_keys == ["k1", "k2"] and s.auth_enabled and s.protect_ops
    assert s.max_pixels == 40_000_000 and s.retention_days is None and not s.retention_enabled
    assert (s.queue_size, s.preset, s.image_score) == (7, "fast", "map_max")
    assert (s.max_batch_size, s.max_wait_ms, s.max_upload_mb, s.request_timeout_s) == (8, 10.0, 20.0, 30.0)
    assert (s.image_threshold, s.pixel_threshold, s.precision, s.device) == (0.5, 0.5, "auto", "auto")
    assert s.resolved_database_url() == f"sqlite:///{(tmp_path / 'd' / 'inspections.db').resolve()}"
    assert s.max_upload_bytes == 20 * 1024 * 1024

    app = create_app()  # the factory reads the environment when it is called, not at import
    assert app.state.ctx.settings.api_keys == ["k1", "k2"] and app.state.ctx.settings.data_dir == tmp_path / "d"

    monkeypatch.setenv("DHR_PRESET", "huge")
    monkeypatch.setenv("DHR_PIXEL_THRESHOLD", "1.5")
    with pytest.raises(ValidationError) as info:
        Settings(_env_file=None)
    line = settings_error_line(info.value)
    assert "DHR_PRESET: Value error, unknown preset 'huge'" in line and "DHR_PIXEL_THRESHOLD" in line


def test_serve_command_rejects_invalid_settings(monkeypatch, capsys, tmp_path):
    import argparse

    monkeypatch.setenv("DHR_PRECISION", "fp8")
    args = argparse.Namespace(host="127.0.0.1", port=0, env_file=None, log_level="info")
    assert run_serve(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("dhrclip serve: invalid settings: DHR_PRECISION") and err.count("\n") == 1
    args.env_file = str(tmp_path / "missing.env")
    assert run_serve(args) == 2 and "file not found" in capsys.readouterr().err


def test_a_misspelt_setting_is_named_not_ignored(monkeypatch, capsys, caplog, tmp_path):
    """DHR_PRESTE=fast (a typo) was ignored without a word: the service ran with the default preset. In an env file
    it is refused (every line of it is meant as a setting); in the environment it is a warning at start-up."""
    import argparse

    env_file = tmp_path / "service.env"
    env_file.write_text("DHR_PRESET=fast\nDHR_PRESTE=fast\nDHR_THREAD_POLICY=passive\nOTHER=1\n")
    args = argparse.Namespace(host="127.0.0.1", port=0, env_file=str(env_file), log_level="info")
    assert run_serve(args) == 2
    assert capsys.readouterr().err == (
        f"dhrclip serve: --env-file {env_file}: DHR_PRESTE is not a setting (dhrclip serve --help-settings)\n"
    )
    monkeypatch.setenv("DHR_PRESTE", "fast")
    monkeypatch.setenv("dhr_max_batchsize", "4")
    monkeypatch.setenv("DHR_TEST_POSTGRES_URL", "postgresql://x")  # read by the tests, the Ray wrapper and torch's
    monkeypatch.setenv("DHR_RAY_MAX_REPLICAS", "2")  # thread policy: not settings, not misspelt
    monkeypatch.setenv("DHR_THREAD_POLICY", "passive")
    with caplog.at_level("WARNING", logger="dhrclip.api"):
        create_app(make_settings(tmp_path))
    assert "DHR_MAX_BATCHSIZE, DHR_PRESTE: not settings, ignored" in caplog.text


@pytest.mark.parametrize("name", ["DHR_MAX_UPLOAD_MB", "DHR_RETENTION_DAYS", "DHR_REQUEST_TIMEOUT_S"])
def test_an_infinite_setting_is_one_line(monkeypatch, capsys, name):
    """``inf`` passed every bound: DHR_MAX_UPLOAD_MB=inf was an OverflowError traceback at start-up,
    DHR_RETENTION_DAYS=inf a retention pass failing every hour (only in the log)."""
    import argparse

    monkeypatch.setenv(name, "inf")
    args = argparse.Namespace(host="127.0.0.1", port=0, env_file=None, log_level="info")
    assert run_serve(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dhrclip serve: invalid settings: {name}: ") and "finite" in err and err.count("\n") == 1


def test_serve_help_settings_prints_the_table_made_from_the_settings_model(capsys):
    from service.cli import main

    assert main(["serve", "--help-settings"]) == 0
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == {f"DHR_{name.upper()}" for name in Settings.model_fields}
    assert rows["DHR_QUEUE_SIZE"][0] == "64" and rows["DHR_WARMUP"][0] == "true"
    assert rows["DHR_PRESET"] == ["mvtec", "mvtec | visa | fast: DHR geometry"]


def test_weights_resolution_from_model_weights_dir(tmp_path):
    root = tmp_path / "mw"
    (root / "backbone").mkdir(parents=True)
    (root / "prompts").mkdir()
    (root / "backbone" / ".gitkeep").write_text("")
    s = Settings(_env_file=None, model_weights_dir=root, device="cpu")
    c = choose_weights(s)
    assert (c.backbone, c.backbone_source, c.prompts, c.prompts_source) == ("openai", "default", "ensemble", "default")
    (root / "backbone" / "tiny.pt").symlink_to(TINY_CLIP)
    (root / "prompts" / "ref.pth").symlink_to(REF_PROMPTS)
    c = choose_weights(s)
    assert (c.backbone, c.prompts) == (str(root / "backbone" / "tiny.pt"), str(root / "prompts"))
    assert (c.backbone_source, c.prompts_source, c.device) == ("model_weights", "model_weights", "cpu")
    (root / "backbone" / "other.pt").write_bytes(b"x")
    with pytest.raises(WeightsError, match="holds 2 files \\(other.pt, tiny.pt\\); keep one backbone"):
        choose_weights(s)
    explicit = Settings(_env_file=None, model_weights_dir=root, backbone=str(TINY_CLIP), prompts="ensemble")
    c = choose_weights(explicit)
    assert (c.backbone, c.backbone_source, c.prompts, c.prompts_source) == (
        str(TINY_CLIP),
        "setting",
        "ensemble",
        "setting",
    )
    import torch

    auto = choose_weights(Settings(_env_file=None, model_weights_dir=root, device="auto", backbone="x.pt"))
    assert auto.device == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="DHR_DEVICE cuda: torch sees no CUDA device"):
            choose_weights(Settings(_env_file=None, model_weights_dir=root, device="cuda", backbone="x.pt"))


def test_without_prompt_checkpoint_the_ensemble_is_served_and_health_says_so(tmp_path):
    root = tmp_path / "mw"
    (root / "backbone").mkdir(parents=True)
    (root / "prompts").mkdir()
    (root / "backbone" / "clip.pt").symlink_to(TINY_CLIP)
    settings = make_settings(tmp_path / "data", backbone=None, prompts=None, model_weights_dir=root)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        model = client.get("/health").json()["model"]
    assert (model["prompts"], model["prompts_kind"], model["prompts_sha256"]) == ("ensemble", "ensemble", None)
    assert model["backbone"] == "clip.pt"


def test_missing_weights_keep_the_service_up_with_the_reason(tmp_path):
    missing = tmp_path / "ViT-L-14-336px-missing.pt"
    with TestClient(create_app(make_settings(tmp_path / "data", backbone=str(missing)))) as client:
        deadline = time.monotonic() + 60
        while (h := client.get("/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert h.status_code == 503 and h.json()["status"] == "error"
        assert str(missing) in h.json()["reason"] and "not found" in h.json()["reason"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json() == h.json()
        seg = client.post("/segment", files=[png_file("x.png", 1)])
        assert seg.status_code == 503 and seg.headers["content-type"] == "application/problem+json"
        assert seg.json()["title"] == "Model unavailable" and str(missing) in seg.json()["detail"]
        assert client.get("/livez").status_code == 200
        assert client.get("/inspections").json() == {"items": [], "next_cursor": None}
        assert "dhr_model_ready 0.0" in client.get("/metrics").text


def test_no_weights_anywhere_explains_how_to_provide_them(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # open_clip's ~/.cache/clip: empty here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert not any(p.is_file() for p in openai_cache_candidates())  # runs (not skipped) where weights are cached
    settings = make_settings(tmp_path / "data", backbone=None, prompts=None, model_weights_dir=tmp_path / "mw")
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while (h := client.get("/health")).json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    reason = h.json()["reason"]
    assert h.status_code == 503 and "ViT-L-14-336px.pt" in reason and "model_weights/backbone/" in reason


def test_api_keys(tmp_path):
    with TestClient(create_app(make_settings(tmp_path / "a", api_keys="k1,k2"))) as client:
        wait_ready(client)
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
            r = client.post("/segment", files=[png_file("x.png", 1)], headers=headers)
            assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
            assert r.headers["www-authenticate"] == 'ApiKey header="X-API-Key"'
            assert client.get("/inspections", headers=headers).status_code == 401
            assert (
                client.put(
                    "/products/p", json={"image_threshold": 0.1, "pixel_threshold": 0.1}, headers=headers
                ).status_code
                == 401
            )
        assert client.post("/segment", files=[png_file("x.png", 1)]).json()["title"] == "Missing API key"
        ok = client.post("/segment", files=[png_file("x.png", 1)], headers={"X-API-Key": "k1"})
        assert ok.status_code == 200
        rid = ok.json()["results"][0]["id"]
        assert client.get(f"/inspections/{rid}/mask.png", headers={"X-API-Key": "k2"}).status_code == 200
        assert client.get(f"/inspections/{rid}/mask.png").status_code == 401
        for path in ("/health", "/livez", "/readyz", "/metrics"):
            assert client.get(path).status_code == 200, path  # operational routes stay open by default

    settings = make_settings(tmp_path / "b", api_keys=["k1"], protect_ops=True, backbone=str(tmp_path / "none.pt"))
    with TestClient(create_app(settings)) as client:
        for path in ("/health", "/livez", "/readyz", "/metrics"):
            assert client.get(path).status_code == 401, path
        assert client.get("/livez", headers={"X-API-Key": "k1"}).status_code == 200
        assert client.get("/metrics", headers={"X-API-Key": "k1"}).status_code == 200


def test_acknowledged_inspections_survive_a_restart(tmp_path, database_url):
    settings = make_settings(tmp_path / "data", database_url=database_url)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        r = client.post(
            "/segment",
            files=[png_file("d1.png", 1, (70, 50)), png_file("d2.png", 2, (40, 60), "L")],
            data={"product": "durable", "line": "L9"},
        )
        assert r.status_code == 200
        before = {}
        for res in r.json()["results"]:
            before[res["id"]] = {
                "record": client.get(res["links"]["self"]).json(),
                **{k: client.get(res["links"][k]).content for k in ("overlay", "heatmap", "mask")},
            }
    with TestClient(create_app(settings)) as client:  # a new app on the same data dir and database
        for rid, saved in before.items():
            assert client.get(f"/inspections/{rid}").json() == saved["record"]
            for kind in ("overlay", "heatmap", "mask"):
                png = client.get(f"/inspections/{rid}/{kind}.png")
                assert png.status_code == 200 and png.content == saved[kind]
                assert decode_png(png.content).size == (saved["record"]["width"], saved["record"]["height"])
        listed = client.get("/inspections", params={"product": "durable"}).json()["items"]
        assert sorted(x["id"] for x in listed) == sorted(before)


def test_retention_task_deletes_beyond_max_count(tmp_path, database_url):
    settings = make_settings(
        tmp_path / "data",
        database_url=database_url,
        backbone=str(tmp_path / "none.pt"),
        retention_max_count=1,
        retention_interval_s=0.05,
    )
    with TestClient(create_app(settings)) as client:
        store = client.app.state.ctx.store
        ids = []
        for i in range(3):
            rec = InspectionRecord(
                width=4,
                height=4,
                score=0.1 * i,
                threshold=0.5,
                verdict="ok",
                image_score="reference",
                pixel_threshold=0.5,
                defect_area_ratio=0.0,
            )
            ids.append(store.add(rec, {"mask": b"png-bytes"}).id)
        deadline = time.monotonic() + 30
        while [x["id"] for x in client.get("/inspections").json()["items"]] != ids[-1:]:
            assert time.monotonic() < deadline, "retention did not run"
            time.sleep(0.05)
        assert client.get(f"/inspections/{ids[0]}").status_code == 404
        assert client.get(f"/inspections/{ids[2]}/mask.png").content == b"png-bytes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_uvicorn_and_logs_json_lines(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "DHR_BACKBONE": str(tmp_path / "absent.pt"),
        "DHR_DATA_DIR": str(tmp_path / "data"),
        "DHR_PRESET": "fast",
        "DHR_DEVICE": "cpu",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.api.server", "--port", str(port)],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/livez", headers={"X-Request-ID": "probe-1"}, timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        assert r.status_code == 200 and r.headers["x-request-id"] == "probe-1"
        while (h := httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)).json()["status"] == "loading":
            time.sleep(0.05)
        assert h.status_code == 503 and "absent.pt" in h.json()["reason"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM), err  # uvicorn re-raises the signal after a clean shutdown
    lines = [json.loads(x) for x in err.splitlines()]  # every line is JSON
    assert any(x["logger"].startswith("uvicorn") and "shutdown complete" in x["msg"] for x in lines)
    access = [x for x in lines if x["logger"] == "dhrclip.access" and x.get("request_id") == "probe-1"]
    assert len(access) == 1 and access[0]["status"] == 200 and access[0]["path"] == "/livez"
    assert any(x["logger"] == "dhrclip.api" and x["level"] == "error" and "absent.pt" in x["msg"] for x in lines)


def test_routes_answer_503_when_the_lifespan_never_ran(tmp_path):
    client = TestClient(create_app(make_settings(tmp_path)))  # no `with`: start-up never happens
    r = client.get("/inspections")
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["title"] == "Service not started"
    seg = client.post("/segment", files=[png_file("x.png", 1)])
    assert seg.status_code == 503 and seg.headers["retry-after"] == "5"
    assert client.get("/readyz").json()["status"] == "loading"
