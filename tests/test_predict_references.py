"""`dhrclip predict --references DIR`: the few-shot memory of a folder of good images, exactly as the model fuses it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from service.cli import main
from service.model import build_model, load_views
from service.model.memory import memory_from_features

from .paths import REAL_DEFECTS, TINY_MODEL_ARGS

TILES = REAL_DEFECTS / "magnetic_tile"


def _argv(refs, out, image) -> list[str]:
    return ["predict", str(image), "--references", str(refs), "--out", str(out), *TINY_MODEL_ARGS]


def _stack(images, preset):
    views = [load_views(im, preset) for im in images]
    return (
        torch.from_numpy(np.stack([np.asarray(v.whole) for v in views])),
        torch.from_numpy(np.stack([np.asarray(v.crops) for v in views])),
    )


def test_predict_with_references_fuses_the_folder_memory(tmp_path, capsys, tiny_clip, ref_checkpoint):
    refs = tmp_path / "refs"
    refs.mkdir()
    good = sorted((TILES / "train" / "good").iterdir())[:2]
    for path in good:
        shutil.copy(path, refs / path.name)
    image = sorted((TILES / "test" / "crack").iterdir())[0]
    assert main(_argv(refs, tmp_path / "out", image)) == 0
    rec = json.loads((tmp_path / "out" / f"{image.stem}.json").read_text())
    assert rec["references"] == 2
    model, _ = build_model(tiny_clip[0], ref_checkpoint, preset="fast")
    with torch.inference_mode():
        memory = memory_from_features(*model.encode_views(*_stack([Image.open(p) for p in good], model.cfg.preset)))
        direct = model(*_stack([Image.open(image)], model.cfg.preset), (), memory, 0.5)
        zero = model(*_stack([Image.open(image)], model.cfg.preset))
    assert rec["score_reference"] == pytest.approx(direct.reference.item(), abs=1e-6)
    assert rec["score_map_max"] == pytest.approx(direct.map_max.item(), abs=1e-6)
    assert abs(rec["score_map_max"] - zero.map_max.item()) > 1e-4  # the references changed the answer

    (refs / "zz_notes.png").write_text("not an image")
    capsys.readouterr()
    assert main(_argv(refs, tmp_path / "out2", image)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dhrclip predict: reference ") and "zz_notes.png" in err[-1]
    assert not (tmp_path / "out2").exists()
