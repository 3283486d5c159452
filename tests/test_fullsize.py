"""Full-size smoke test (slow, not in CI): ViT-L-14-336-quickgelu with random weights through `predict`."""

from __future__ import annotations

import time

import pytest
import torch

from service.engine.runner import ModelRunner
from service.model import build_model, random_backbone
from service.predict.command import PredictOptions, predict_files

from .paths import FIXTURES

pytestmark = pytest.mark.slow


def test_vit_l_336_random_predict_mvtec(tmp_path):
    clip = random_backbone("ViT-L-14-336-quickgelu")
    vis = clip.visual
    assert (vis.conv1.out_channels, len(vis.transformer.resblocks), vis.proj.shape) == (1024, 24, (1024, 768))
    assert type(vis.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    model, info = build_model(clip, "ensemble", preset="mvtec")
    assert model.tower.first_vv == 5 and model.text_features.shape == (2, 768)
    t0 = time.perf_counter()
    failures = predict_files([FIXTURES / "img0_rgb_700x700.png"], ModelRunner(model), info, PredictOptions(tmp_path))
    dt = time.perf_counter() - t0
    print(f"\nfull-size ViT-L/14@336 predict, preset mvtec, CPU ({torch.get_num_threads()} threads): {dt:.1f} s/image")
    assert failures == 0 and (tmp_path / "img0_rgb_700x700.overlay.png").is_file()
