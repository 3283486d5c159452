"""Precision: ``auto`` resolves by device (bf16 on CUDA, fp32 elsewhere) everywhere it can be set, and bf16 keeps
the min-max eval map within 1e-2 of the CPU fp32 golden fixture (the issue's bf16 bound), measured here on the CPU.

The half-precision tower runs its matmuls in bf16/fp16 with fp32 LayerNorms, residual streams and output projection
(``service.model.vision``); with bf16 residual streams this deviation was 1.01e-2 on the same three images.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from service.api.settings import Settings
from service.cli_options import add_model_arguments
from service.model import EXTRA_MAPS, build_model, load_views
from service.model.config import PRECISION_CHOICES, PRECISIONS, resolve_precision

from .paths import FIXTURES


def test_auto_is_bf16_on_cuda_and_fp32_elsewhere():
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cuda:1") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "mps") == "fp32"
    assert [resolve_precision(p, "cuda") for p in PRECISIONS] == list(PRECISIONS)  # explicit names stay


def test_settings_and_cli_offer_auto_as_the_default():
    assert Settings().precision == "auto"
    assert Settings(precision="fp16").precision == "fp16"
    with pytest.raises(ValidationError, match="choose one of auto, fp32, bf16, fp16"):
        Settings(precision="int4")
    infer, train = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_model_arguments(infer, backend=True)
    add_model_arguments(train, prompts=False, precision_default="fp32")
    assert infer.parse_args([]).precision == "auto"
    assert infer.parse_args(["--precision", "bf16"]).precision == "bf16"
    assert train.parse_args([]).precision == "fp32"
    choices = {a.dest: a.choices for a in (*infer._actions, *train._actions) if a.dest == "precision"}
    assert tuple(choices["precision"]) in (PRECISION_CHOICES, PRECISIONS)
    with pytest.raises(SystemExit):
        train.parse_args(["--precision", "auto"])  # training and export name their precision


@pytest.fixture(scope="module")
def fixture_views(expected):
    images = [Image.open(FIXTURES / str(name)) for name in expected["image_files"]]
    from service.model import get_preset

    views = [load_views(img, get_preset("mvtec")) for img in images]
    return torch.from_numpy(np.stack([v.whole for v in views])), torch.from_numpy(np.stack([v.crops for v in views]))


def _maps(model, views) -> dict[str, np.ndarray]:
    out = model(*views, EXTRA_MAPS)
    return {k: v.float().numpy() for k, v in out._asdict().items() if v is not None}


def test_auto_on_the_cpu_is_the_fp32_reference(tiny_clip, ref_checkpoint, fixture_views, expected):
    clip, info = tiny_clip
    model, minfo = build_model(clip, ref_checkpoint, precision="auto", backbone_info=info)
    assert minfo.precision == "fp32" and model.tower.visual.conv1.weight.dtype == torch.float32
    out = _maps(model, fixture_views)
    assert np.abs(out["eval_map"][:, ::2, ::2] - expected["A_final_map_stride2"]).max() <= 2e-5


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_eval_map_within_1e_2_of_the_golden_fixture(
    tiny_clip, ref_checkpoint, fixture_views, expected, precision
):
    clip, info = tiny_clip
    ref = _maps(build_model(clip, ref_checkpoint, backbone_info=info)[0], fixture_views)
    model, minfo = build_model(clip, ref_checkpoint, precision=precision, backbone_info=info)
    assert minfo.precision == precision
    out = _maps(model, fixture_views)
    golden = np.abs(out["eval_map"][:, ::2, ::2] - expected["A_final_map_stride2"]).max()
    service = np.abs(out["anomaly_map"] - ref["anomaly_map"]).max()
    score = np.abs(out["reference"] - expected["A_image_score"]).max()
    # measured on this CPU: bf16 4.1e-3 / 3.8e-3 / 4.3e-3, fp16 3.8e-4 / 3.3e-4 / 4.7e-4
    assert 0 < golden <= 1e-2, golden
    assert 0 < service <= 1e-2, service
    assert score <= 1e-2, score
