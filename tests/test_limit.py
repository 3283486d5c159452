"""``--limit`` keeps defective and good images in proportion, seeded; warnings for one-sided classes and empty
masks (``dhrclip data index``, ``dhrclip evaluate``)."""

from __future__ import annotations

import argparse
import shutil

import numpy as np
from PIL import Image

from service.cli import main
from service.data import balance_warning, load_dataset, stratified_indices
from service.evaluate.command import add_evaluate_arguments, run_evaluate

from .paths import REAL_DEFECTS, REF_PROMPTS, TINY_CLIP

TILE = REAL_DEFECTS / "magnetic_tile"  # meta.json: test = 15 good, then 25 defective


def test_stratified_counts_hand_checked():
    labels = [0] * 30 + [1] * 10
    picks = {n: stratified_indices(labels, n, seed=1) for n in (1, 2, 8, 40, 99)}
    assert {n: (len(p), sum(labels[i] for i in p)) for n, p in picks.items()} == {
        1: (1, 0),  # round(0.25) = 0 defective: one image cannot hold both kinds
        2: (2, 1),  # raised to one of each
        8: (8, 2),  # round(8 * 10 / 40) = 2
        40: (40, 10),
        99: (40, 10),
    }
    assert all(p == sorted(set(p)) for p in picks.values())  # index order, no repeats
    few_good = stratified_indices([1] * 5 + [0], 4, seed=0)  # round(4 * 5 / 6) = 3 defective + the one good
    assert len(few_good) == 4 and few_good[-1] == 5


def test_limit_keeps_both_kinds_when_the_index_lists_good_first():
    for limit in (2, 10, 20):
        got = load_dataset(TILE, classes=["magnetic_tile"], limit=limit, seed=3)["magnetic_tile"]
        n_bad = sum(s.anomaly for s in got)
        assert len(got) == limit and n_bad == max(1, round(limit * 25 / 40)), limit
        assert {s.specie_name for s in got if s.anomaly} <= {"blowhole", "break", "crack", "fray", "uneven"}


def test_same_seed_same_selection_other_seed_other_selection():
    def pick(seed: int) -> list:
        return [s.img_path for s in load_dataset(TILE, limit=10, seed=seed)["magnetic_tile"]]

    assert pick(7) == pick(7)
    assert pick(7) != pick(8)


def test_balance_warning_names_the_missing_kind():
    got = load_dataset(REAL_DEFECTS, classes=["bsdata", "magnetic_tile"], limit=4)
    assert balance_warning("bsdata", got["bsdata"]) == "class bsdata: 4 images, none good"
    assert balance_warning("magnetic_tile", got["magnetic_tile"]) is None


def _good_only_class(root):
    """An MVTec tree with one class "plate" whose test split holds only two good images."""
    good = root / "plate" / "test" / "good"
    good.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(good / name)
    return root


def test_evaluate_warns_in_one_line_when_a_class_has_no_defective_image(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    root = _good_only_class(tmp_path / "data")
    argv = ["--data", str(root), "--backbone", str(TINY_CLIP), "--prompts", str(REF_PROMPTS), "--preset", "fast"]
    assert run_evaluate(parser.parse_args([*argv, "--no-progress"])) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "dhrclip evaluate: warning: class plate: 2 images, none defective: "
        "pixel AUROC, AUPRO, AUPRO*, F1; image AUROC, AP, F1, OK@E undefined (shown as -)"
    ]


def test_data_index_names_defect_images_with_empty_masks(tmp_path, capsys):
    root = tmp_path / "steel"
    shutil.copytree(REAL_DEFECTS / "steel_sd900", root, ignore=shutil.ignore_patterns("meta.json"))
    masks = sorted((root / "ground_truth" / "patches").glob("*_mask.png"))[:2]
    for mask in masks:
        with Image.open(mask) as im:
            size = im.size
        Image.new("L", size, 0).save(mask)
    assert main(["data", "index", str(root)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"wrote {root / 'meta.json'}"
    names = ", ".join(m.relative_to(root).as_posix() for m in masks)
    assert err.strip().splitlines() == [f"dhrclip data index: warning: 2 defect image(s) with an empty mask: {names}"]
