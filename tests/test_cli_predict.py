"""`dhrclip predict` and `dhrclip weights import` end to end on the tiny CLIP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from service.cli import main
from service.model import build_model, load_views

from .paths import FIXTURES, REAL_DEFECTS, REF_PROMPTS, TINY_MODEL_ARGS


def _inputs(tmp_path):
    files = {
        "rgb": FIXTURES / "img1_rgb_640x480.png",
        "gray_bmp": next((REAL_DEFECTS / "steel_sd900" / "test" / "scratches").glob("*.bmp")),
    }
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (90, 60), (255, 0, 0, 128)).save(rgba)
    g16 = tmp_path / "g16.png"
    Image.fromarray(np.arange(50 * 40, dtype=np.uint16).reshape(40, 50) * 30).save(g16)
    pal = tmp_path / "pal.png"
    Image.new("RGB", (33, 21), (0, 128, 255)).convert("P").save(pal)
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("not an image")
    return [files["rgb"], files["gray_bmp"], rgba, g16, pal, bogus]


def test_predict_writes_every_output_and_survives_a_bad_file(tmp_path, capsys, tiny_clip, ref_checkpoint):
    inputs = _inputs(tmp_path)
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            *map(str, inputs),
            *TINY_MODEL_ARGS,
            "--out",
            str(out),
            "--save-maps",
            "--batch-size",
            "2",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "notes.jpg" in err[0] and "not an image format" in err[0]
    for path in inputs[:-1]:
        stem = path.stem
        rec = json.loads((out / f"{stem}.json").read_text())
        w, h = Image.open(path).size
        assert (rec["width"], rec["height"]) == (w, h) and rec["preset"] == "fast"
        assert 0 <= rec["score"] <= 1 and 0 <= rec["score_map_max"] <= 1 and 0 <= rec["score_map_topk"] <= 1
        assert rec["score_map_topk"] <= rec["score_map_max"] + 1e-6
        assert set(rec["timing_ms"]) >= {"decode", "inference", "postprocess"}
        for kind in ("heatmap", "mask", "overlay"):
            png = Image.open(out / f"{stem}.{kind}.png")
            assert png.size == (w, h), (stem, kind)
        with np.load(out / f"{stem}.maps.npz") as z:
            assert {k: z[k].shape for k in z.files} == {k: (448, 448) for k in ("raw_map", "anomaly_map", "eval_map")}
            assert z["eval_map"].min() == 0 and z["eval_map"].max() == pytest.approx(1)
            assert np.allclose(z["anomaly_map"].max(), rec["score_map_max"], atol=1e-6)
    # the CLI computes exactly what the model computes
    rec = json.loads((out / "img1_rgb_640x480.json").read_text())
    model, _ = build_model(tiny_clip[0], ref_checkpoint, preset="fast")
    v = load_views(Image.open(inputs[0]), model.cfg.preset)
    direct = model(torch.from_numpy(np.array(v.whole))[None], torch.from_numpy(np.array(v.crops))[None])
    assert rec["score_reference"] == pytest.approx(direct.reference.item(), abs=1e-6)


def test_predict_missing_backbone_is_one_line(tmp_path, capsys):
    code = main(
        [
            "predict",
            str(FIXTURES / "img0_rgb_700x700.png"),
            "--backbone",
            str(tmp_path / "nope.pt"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope.pt: backbone file not found" in err[0]


def test_weights_import_cli(tmp_path, capsys):
    assert main(["weights", "import", str(REF_PROMPTS), "--out", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "prompt_learner_checkpoint.safetensors").is_file()
    bad = tmp_path / "bad.pth"
    torch.save({"prompt_learner": {"ctx_pos": torch.zeros(1, 1, 12, 64)}}, bad)
    assert main(["weights", "import", str(bad), "--out", str(tmp_path / "w2")]) == 2
    assert "bad.pth: missing key 'ctx_neg'" in capsys.readouterr().err


def test_a_plain_value_error_is_a_bug_not_a_user_error(tmp_path, monkeypatch):
    """Only UserError becomes a one-line message with status 2; anything else propagates with its traceback."""
    import service.predict.command as command

    def broken(args):
        raise ValueError("internal bug")

    monkeypatch.setattr(command, "run_predict", broken)
    with pytest.raises(ValueError, match="internal bug"):
        main(["predict", str(FIXTURES / "img0_rgb_700x700.png"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
        ("--batch-size", "-3", "--batch-size must be >= 1, got -3"),
        ("--threshold", "nan", "--threshold must be in [0, 1], got nan"),
        ("--threshold", "7", "--threshold must be in [0, 1], got 7.0"),
        ("--pixel-threshold", "-1", "--pixel-threshold must be in [0, 1], got -1.0"),
        ("--out", "FILE", "a_file: exists and is not a folder"),
    ],
)
def test_bad_predict_options_are_one_line_before_the_model_loads(tmp_path, capsys, option, value, message):
    """These were taken silently (batch size <= 0 ran as 1; a NaN threshold judged every image ok) or, for an
    --out that is a file, a FileExistsError traceback after the model had loaded."""
    (tmp_path / "a_file").write_text("x")
    args = ["predict", str(FIXTURES / "img0_rgb_700x700.png"), "--out", str(tmp_path / "o"), *TINY_MODEL_ARGS]
    args += [option, str(tmp_path / "a_file") if value == "FILE" else value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()
