"""Few-shot evaluation: seeded shot draws, ``--shots`` side by side with zero-shot, clear user errors."""

from __future__ import annotations

import argparse
import json

import pytest

from service.data import load_dataset
from service.errors import UserError
from service.evaluate.command import add_evaluate_arguments, check_report, run_evaluate
from service.evaluate.shots import pick_shots

from .paths import REAL_DEFECTS, REF_PROMPTS, TINY_CLIP


def test_pick_shots_is_seeded_good_only_and_refuses_too_many():
    train = load_dataset(REAL_DEFECTS, split="train", classes=["magnetic_tile"])["magnetic_tile"]
    a, b, c = pick_shots(train, 4, 0), pick_shots(train, 4, 0), pick_shots(train, 4, 1)
    assert a == b and a != c and len(a) == 4 and len({s.img_path for s in a}) == 4
    assert all(not s.anomaly for s in a)
    with pytest.raises(UserError, match="class 'magnetic_tile' has 15 good train images; --shots 16 needs 16"):
        pick_shots(train, 16, 0)


def test_evaluate_with_shots_reports_zero_and_few_shot_side_by_side(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(
        ["--data", str(REAL_DEFECTS), "--backbone", str(TINY_CLIP), "--prompts", str(REF_PROMPTS), "--preset", "fast"]
        + ["--classes", "magnetic_tile", "--limit", "3", "--shots", "2", "--no-progress", "--report", str(out)]
    )
    assert run_evaluate(args) == 0
    report = json.loads(out.read_text())
    few = report["few_shot"]
    assert (few["shots"], few["shot_seed"]) == (2, 0)
    zero_row, few_row = report["classes"]["magnetic_tile"], few["classes"]["magnetic_tile"]
    assert zero_row["n_images"] == few_row["n_images"] == 3
    assert zero_row["pixel_auroc"] != few_row["pixel_auroc"]  # the references changed the maps
    check_report(report)
    table = capsys.readouterr().out
    assert "2-shot (seed 0):" in table and table.count("magnetic_tile") == 2
    with pytest.raises(UserError, match="--shots must be >= 0"):
        run_evaluate(parser.parse_args(["--data", str(REAL_DEFECTS), "--shots", "-1"]))
