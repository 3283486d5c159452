"""Issue #4 end to end: train 1 epoch on real photos (magnetic_tile + steel_sd900), evaluate on bsdata, and serve
the checkpoint through `dhrclip predict` and the HTTP service. Tiny CLIP, preset fast, CPU."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.cli import main

from .api_fixtures import make_settings, wait_ready
from .paths import REAL_DEFECTS, TINY_CLIP

PIXEL_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_aupro_ref", "pixel_f1_max")
IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1_max", "overkill_at_escape")


def _in_unit(v):
    return v is None or 0.0 <= v <= 1.0


def test_train_evaluate_predict_serve(tmp_path, capsys):
    ckpt = tmp_path / "prompts"
    assert (
        main(
            [
                "train",
                "--data",
                str(REAL_DEFECTS),
                "--classes",
                "magnetic_tile,steel_sd900",
                "--limit",
                "2",
                "--epochs",
                "1",
                "--batch-size",
                "2",
                "--preset",
                "fast",
                "--backbone",
                str(TINY_CLIP),
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(ckpt),
            ]
        )
        == 0
    )
    files = sorted(ckpt.glob("epoch_*.safetensors"))
    assert [f.name for f in files] == ["epoch_001.safetensors"]

    report = tmp_path / "bsdata.json"
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(REAL_DEFECTS),
                "--classes",
                "bsdata",
                "--limit",
                "2",
                "--preset",
                "fast",
                "--backbone",
                str(TINY_CLIP),
                "--prompts",
                str(ckpt),
                "--device",
                "cpu",
                "--no-progress",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    rep = json.loads(report.read_text())
    assert rep["protocol"] == "paper" and rep["model"]["prompts"] == "epoch_001"
    for row in (rep["classes"]["bsdata"], rep["mean"]):
        for k in PIXEL_KEYS:
            assert k in row and _in_unit(row[k]), (k, row[k])
        for variant in ("reference", "map_max", "map_topk"):
            assert set(row[variant]) == set(IMAGE_KEYS) and all(_in_unit(v) for v in row[variant].values())
    assert rep["classes"]["bsdata"]["pixel_auroc"] is not None  # bsdata images all carry pitting masks
    assert rep["classes"]["bsdata"]["reference"]["image_auroc"] is None  # and none is good: no image AUROC
    assert rep["classes"]["bsdata"]["n_images"] == 2

    image = next((REAL_DEFECTS / "bsdata" / "test" / "pitting").glob("*.jpg"))
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                str(image),
                "--backbone",
                str(TINY_CLIP),
                "--prompts",
                str(ckpt),
                "--preset",
                "fast",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    pred = json.loads((out / f"{image.stem}.json").read_text())
    assert pred["model"]["prompts"] == "epoch_001" and pred["model"]["prompts_kind"] == "learned"

    app = create_app(make_settings(tmp_path / "svc", prompts=str(ckpt)))
    with TestClient(app) as client:
        wait_ready(client)
        health = client.get("/health").json()
        assert health["model"]["prompts"] == "epoch_001" and health["model"]["prompts_kind"] == "learned"
        r = client.post("/segment", files={"image": (image.name, image.read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["score"] == pytest.approx(pred["score"], abs=1e-5)
        assert (res["width"], res["height"]) == (pred["width"], pred["height"])
    capsys.readouterr()
