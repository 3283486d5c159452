"""The evaluation protocol and ``dhrclip evaluate``: a fake model with hand-checked metrics, the fixture's tiny
random CLIP on a few real defect photos (preset ``fast``: S/P/T = 336/224/448), the report and the command line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_auc_score

from service.data import DatasetError, load_dataset, load_mask
from service.errors import UserError
from service.evaluate.command import (
    add_evaluate_arguments,
    check_report,
    fmt,
    format_table,
    run_evaluate,
    write_report,
)
from service.evaluate.metrics import compute_metrics, pro_curve
from service.evaluate.runner import (
    IMAGE_KEYS,
    PIXEL_KEYS,
    ClassData,
    collect_class,
    evaluate,
    mean_metrics,
    pooled_metrics,
)
from service.model import IMAGE_SCORES, get_preset, load_model, load_views

from .paths import REAL_DEFECTS, REF_PROMPTS, TINY_CLIP, TINY_MODEL_ARGS

FAST = get_preset("fast")  # 336 / 224 / 448: the four 224 crops tile the 448 square exactly


# ------------------------------------------------------------------ a fake model that sees the image itself


class ImageAsMap:
    """A "model" whose T x T map is ``transform(squashed image)``: the four crops stitched back into the T x T
    square (exact for the fast preset), first channel / 255. All three image scores are the map's mean."""

    def __init__(self, transform):
        self.cfg = SimpleNamespace(preset=FAST)
        self.transform = transform
        self.calls = 0

    def __call__(self, whole_u8: torch.Tensor, crops_u8: torch.Tensor, extra=()):
        self.calls += 1
        p, t = FAST.crop_size, FAST.target_size
        canvas = torch.zeros(crops_u8.shape[0], t, t)
        for k, (y, x) in enumerate((y, x) for y in (0, t - p) for x in (0, t - p)):
            canvas[:, y : y + p, x : x + p] = crops_u8[:, k, :, :, 0].float() / 255.0
        amap = self.transform(canvas)  # (B, T, T)
        score = amap.flatten(1).mean(dim=1)
        return SimpleNamespace(reference=score, map_max=score, map_topk=score, anomaly_map=amap, eval_map=amap)


def _write_class(root: Path, items: list[tuple[str, str, np.ndarray]]) -> None:
    """MVTec tree of class ``toy``: (specie, stem, grey image) with the mask = pixels > 0 for defect species."""
    for specie, stem, img in items:
        folder = root / "toy" / "test" / specie
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([img] * 3, axis=-1)).save(folder / f"{stem}.png")
        if specie != "good":
            gt = root / "toy" / "ground_truth" / specie
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray(((img > 0) * 255).astype(np.uint8)).save(gt / f"{stem}_mask.png")


def _block(h: int, w: int, y0: int, y1: int, x0: int, x1: int, value: int = 255) -> np.ndarray:
    img = np.zeros((h, w), np.uint8)
    img[y0:y1, x0:x1] = value
    return img


@pytest.fixture
def toy(tmp_path):
    """Two good and two defective 448 x 448 images (squash and mask resize are identities at T = 448)."""
    half = _block(448, 448, 100, 200, 100, 200, 128)
    half[100:200, 100:150] = 255  # left half of the defect bright, right half dim
    _write_class(
        tmp_path,
        [
            ("good", "g0", np.zeros((448, 448), np.uint8)),
            ("good", "g1", np.zeros((448, 448), np.uint8)),
            ("dent", "d0", _block(448, 448, 10, 40, 300, 420, 200)),
            ("dent", "d1", half),
        ],
    )
    return load_dataset(tmp_path)


def test_perfect_map_scores_one_and_inverted_map_zero(toy):
    perfect = evaluate(ImageAsMap(lambda c: (c > 0).float()), toy, batch_size=3, progress=False)
    row = perfect["classes"]["toy"]
    assert (row["n_images"], row["n_anomalous"]) == (4, 2)
    # a binary map puts every kept PRO point at FPR 0: the reference AUPRO (rescaled FPRs) is undefined there
    assert [row[k] for k in PIXEL_KEYS] == [1.0, 1.0, None, 1.0]
    perfect_image = {"image_auroc": 1.0, "image_ap": 1.0, "image_f1_max": 1.0, "overkill_at_escape": 0.0}
    assert all(row[v] == perfect_image for v in IMAGE_SCORES)
    inverted = evaluate(ImageAsMap(lambda c: 1.0 - (c > 0).float()), toy, batch_size=4, progress=False)
    row = inverted["classes"]["toy"]
    assert row["pixel_auroc"] == 0.0
    assert row["pixel_aupro"] == 0.0  # no threshold keeps FPR < 0.3 while covering a region
    assert row["reference"]["image_auroc"] == 0.0  # good images score 1, defective ones less
    assert row["reference"]["image_ap"] == pytest.approx((1 / 3 + 2 / 4) / 2)  # defects ranked 3rd and 4th


def test_half_found_defect_hand_checked(toy):
    """Map = 1 on the bright half (5,000 px) of d1's 100 x 100 defect, 0 elsewhere; d0's defect (30 x 120, grey
    200) is missed.

    Anomalous pixels A = 3,600 + 10,000; 5,000 score 1, the rest tie with all normal pixels at 0:
    AUROC = (5000 + 8600 / 2) / 13600; F1-max at threshold 1: 2 * 5000 / (5000 + 0 + 13600).
    """
    report = evaluate(ImageAsMap(lambda c: (c == 1.0).float()), toy, progress=False)
    row = report["classes"]["toy"]
    assert row["pixel_auroc"] == pytest.approx((5000 + 8600 / 2) / 13600, abs=1e-12)
    assert row["pixel_f1_max"] == pytest.approx(2 * 5000 / 18600, abs=1e-12)
    # PRO regions: d0's block (0 covered) and d1's block (half covered) -> PRO 0.25 at FPR 0 on every threshold.
    assert row["pixel_aupro_ref"] is None  # all kept points share FPR 0: the reference variant is undefined
    # standard: from (0, 0.25) the curve runs straight to the all-positive point (1, 1); PRO(0.3) = 0.475, and
    # the trapezoid over [0, 0.3] divided by 0.3 is (0.25 + 0.475) / 2
    assert row["pixel_aupro"] == pytest.approx((0.25 + 0.475) / 2, abs=1e-12)


def test_service_protocol_resizes_maps_to_each_image(tmp_path):
    """Images of three sizes: maps come back at each image's (H, W); a blocky defect stays perfectly ranked."""
    _write_class(
        tmp_path,
        [
            ("good", "g0", np.zeros((224, 336), np.uint8)),
            ("dent", "d0", _block(448, 448, 10, 40, 300, 420)),
            ("dent", "d1", _block(224, 224, 40, 80, 100, 140)),
        ],
    )
    samples = load_dataset(tmp_path)["toy"]
    data = collect_class(ImageAsMap(lambda c: (c > 0.5).float()), samples, "service", batch_size=2)
    assert isinstance(data.maps, list)
    assert [m.shape for m in data.maps] == [(224, 336), (448, 448), (224, 224)]
    assert [m.shape for m in data.masks] == [m.shape for m in data.maps]
    metrics = pooled_metrics(data.masks, data.maps, data.labels, data.scores)
    assert metrics["pixel_auroc"] == 1.0 and metrics["pixel_f1_max"] == 1.0
    assert metrics["reference"]["image_auroc"] == 1.0


def test_a_broken_mask_fails_before_any_forward_pass_and_a_broken_image_names_the_file(toy, tmp_path):
    samples = toy["toy"]
    bad_mask = next(s for s in samples if s.anomaly).mask_path
    bad_mask.write_bytes(b"not a png")
    model = ImageAsMap(lambda c: c)
    with pytest.raises(DatasetError, match=str(bad_mask)):
        evaluate(model, toy, progress=False)
    assert model.calls == 0
    bad_img = samples[0].img_path
    bad_img.write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=str(bad_img)):
        collect_class(model, samples[:1], "paper")
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate(model, toy, protocol="table")


# ------------------------------------------------------------------ pooling over images of different sizes


def test_pro_curve_on_a_list_equals_pro_curve_on_min_padded_stack():
    """Padding every image to one shape with the global minimum and no defect adds normal pixels that are never
    positive (prediction is map > t, t_0 = min): PRO is unchanged and FP counts are unchanged."""
    rng = np.random.default_rng(0)
    shapes = [(30, 50), (64, 20), (41, 41)]
    masks = [rng.random(s) < 0.15 for s in shapes]
    maps = [(rng.random(s) + 0.5 * m).astype(np.float32) for s, m in zip(shapes, masks, strict=True)]
    fpr, pro = pro_curve(masks, maps)
    lo = min(m.min() for m in maps)
    h, w = max(s[0] for s in shapes), max(s[1] for s in shapes)
    pad_masks = np.zeros((3, h, w), bool)
    pad_maps = np.full((3, h, w), lo, np.float32)
    for i, (m, a) in enumerate(zip(masks, maps, strict=True)):
        pad_masks[i, : m.shape[0], : m.shape[1]] = m
        pad_maps[i, : a.shape[0], : a.shape[1]] = a
    fpr_pad, pro_pad = pro_curve(pad_masks, pad_maps)
    n_normal = sum(int((~m).sum()) for m in masks)
    assert fpr.size == fpr_pad.size >= 200
    np.testing.assert_array_equal(pro, pro_pad)
    np.testing.assert_array_equal(np.rint(fpr * n_normal), np.rint(fpr_pad * (~pad_masks).sum()))
    # AUROC / F1 of the pooled path against scikit-learn on the concatenated pixels
    labels = np.array([1, 1, 1])
    metrics = pooled_metrics(masks, maps, labels, {"reference": np.array([0.1, 0.2, 0.3])})
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    assert metrics["pixel_f1_max"] == pytest.approx(np.nanmax(f1), abs=1e-12)
    assert metrics["reference"] == dict.fromkeys(IMAGE_KEYS)  # only anomalous images: undefined


def test_pooled_metrics_equal_compute_metrics_on_equal_sizes():
    rng = np.random.default_rng(1)
    masks = rng.random((4, 32, 24)) < 0.1
    maps = (rng.random((4, 32, 24)) + masks).astype(np.float32)
    labels = np.array([0, 1, 1, 0])
    scores = {"reference": rng.random(4), "map_max": rng.random(4)}
    expected = compute_metrics(masks, maps, labels, scores)
    got = pooled_metrics(list(masks), list(maps), labels, scores)
    assert got.keys() == expected.keys()
    for k in PIXEL_KEYS:
        assert got[k] == pytest.approx(expected[k], abs=1e-12)
    assert got["reference"] == expected["reference"] and got["map_max"] == expected["map_max"]


def test_mean_skips_undefined_values_and_keeps_all_undefined_as_none():
    a = {
        "pixel_auroc": 0.5,
        "pixel_aupro": 0.2,
        "pixel_aupro_ref": None,
        "pixel_f1_max": 0.1,
        "reference": {"image_auroc": None, "image_ap": None, "image_f1_max": None, "overkill_at_escape": None},
        "n_images": 3,
    }
    b = {
        "pixel_auroc": 1.0,
        "pixel_aupro": 0.4,
        "pixel_aupro_ref": None,
        "pixel_f1_max": None,
        "reference": {"image_auroc": 0.8, "image_ap": 0.6, "image_f1_max": None, "overkill_at_escape": 0.25},
        "n_images": 5,
    }
    mean = mean_metrics({"a": a, "b": b})
    assert mean == {
        "pixel_auroc": 0.75,
        "pixel_aupro": pytest.approx(0.3),
        "pixel_aupro_ref": None,
        "pixel_f1_max": 0.1,
        "reference": {"image_auroc": 0.8, "image_ap": 0.6, "image_f1_max": None, "overkill_at_escape": 0.25},
    }


# ------------------------------------------------------------------ the tiny random CLIP on real defect photos


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY_CLIP, REF_PROMPTS, preset="fast")


@pytest.fixture(scope="module")
def real():
    """magnetic_tile: 1 good + 2 defective images of different sizes; steel_sd900: 2 defective 200 x 200."""
    tiles = load_dataset(REAL_DEFECTS, classes=["magnetic_tile"])["magnetic_tile"]
    steel = load_dataset(REAL_DEFECTS, classes=["steel_sd900"], limit=2)["steel_sd900"]
    return {
        "magnetic_tile": [s for s in tiles if not s.anomaly][:1] + [s for s in tiles if s.anomaly][:2],
        "steel_sd900": steel,
    }


def _run(model, samples, protocol):
    kept: dict[str, ClassData] = {}
    report = evaluate(
        model,
        samples,
        protocol=protocol,
        batch_size=3,
        progress=False,
        on_class=lambda cls, data: kept.__setitem__(cls, data),
    )
    return report, kept


@pytest.fixture(scope="module")
def paper(tiny, real):
    return _run(tiny[0], real, "paper")


@pytest.fixture(scope="module")
def service(tiny, real):
    return _run(tiny[0], real, "service")


def test_paper_report_has_every_key_and_valid_values(paper):
    report, _ = paper
    assert (report["protocol"], report["preset"]) == ("paper", "fast")
    assert list(report["classes"]) == ["magnetic_tile", "steel_sd900"]
    tiles, steel = report["classes"]["magnetic_tile"], report["classes"]["steel_sd900"]
    assert (tiles["n_images"], tiles["n_anomalous"], steel["n_images"], steel["n_anomalous"]) == (3, 2, 2, 2)
    for row in (tiles, steel, report["mean"]):
        assert set(PIXEL_KEYS) <= row.keys() and set(IMAGE_SCORES) <= row.keys()
        assert all(row[k] is not None and 0.0 <= row[k] <= 1.0 for k in PIXEL_KEYS)
        assert all(set(row[v]) == set(IMAGE_KEYS) for v in IMAGE_SCORES)
    assert all(tiles[v][k] is not None and 0 <= tiles[v][k] <= 1 for v in IMAGE_SCORES for k in IMAGE_KEYS)
    assert all(steel[v] == dict.fromkeys(IMAGE_KEYS) for v in IMAGE_SCORES)  # no good image: undefined
    assert report["mean"]["pixel_auroc"] == pytest.approx((tiles["pixel_auroc"] + steel["pixel_auroc"]) / 2)
    assert report["mean"]["map_max"] == tiles["map_max"]  # the only class where image metrics exist
    check_report(report)
    assert report["seconds"] >= report["timing"]["model"] > 0


def test_paper_metrics_equal_compute_metrics_on_the_same_maps(paper, real):
    report, kept = paper
    for cls, data in kept.items():
        assert data.maps.shape == data.masks.shape == (len(real[cls]), 448, 448)
        assert data.maps.dtype == np.float32
        np.testing.assert_allclose(data.maps.reshape(len(data.maps), -1).max(axis=1), 1.0)  # per-image min-max
        np.testing.assert_allclose(data.maps.reshape(len(data.maps), -1).min(axis=1), 0.0)
        for i, s in enumerate(real[cls]):
            np.testing.assert_array_equal(data.masks[i], load_mask(s, (448, 448)))
        expected = compute_metrics(data.masks, data.maps, data.labels, data.scores)
        assert {k: report["classes"][cls][k] for k in expected} == expected
        assert report["classes"][cls]["pixel_auroc"] == pytest.approx(
            roc_auc_score(data.masks.ravel(), data.maps.ravel()), abs=1e-12
        )


def test_service_maps_are_at_original_sizes_and_resized_from_the_service_map(service, real, tiny):
    report, kept = service
    tiles, steel = kept["magnetic_tile"], kept["steel_sd900"]
    sizes = [Image.open(s.img_path).size for s in real["magnetic_tile"]]  # (W, H), all different
    assert len(set(sizes)) == 3 and isinstance(tiles.maps, list)
    assert [m.shape for m in tiles.maps] == [(h, w) for w, h in sizes] == [m.shape for m in tiles.masks]
    assert isinstance(steel.maps, np.ndarray) and steel.maps.shape == (2, 200, 200)
    assert all(0.0 <= m.min() and m.max() <= 1.0 for m in [*tiles.maps, *steel.maps])
    y = np.concatenate([m.ravel() for m in tiles.masks])
    s = np.concatenate([m.ravel() for m in tiles.maps])
    assert report["classes"]["magnetic_tile"]["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    expected = compute_metrics(steel.masks, steel.maps, steel.labels, steel.scores)
    assert {k: report["classes"]["steel_sd900"][k] for k in expected} == expected
    model = tiny[0]  # the map of one image, recomputed: service map clamped and resized to 200 x 200
    views = load_views(Image.open(real["steel_sd900"][1].img_path), model.cfg.preset)
    out = model(torch.tensor(views.whole[None]), torch.tensor(views.crops[None]))
    expected_map = cv2.resize(out.anomaly_map[0].clamp(0, 1).numpy(), (200, 200), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(steel.maps[1], expected_map, atol=1e-6)
    assert steel.scores["map_max"][1] == pytest.approx(float(out.map_max[0]), abs=1e-6)
    check_report(report)


# ------------------------------------------------------------------ report and command line


def test_table_prints_percentages_and_dashes(paper):
    report, _ = paper
    table = format_table(report)
    lines = table.splitlines()
    assert lines[1].split()[:3] == ["class", "n", "anom"]
    steel_line = next(line for line in lines if line.startswith("steel_sd900"))
    assert fmt(report["classes"]["steel_sd900"]["pixel_auroc"]) in steel_line and " - " in steel_line
    assert lines[-1].startswith("mean") and fmt(report["mean"]["pixel_aupro"]) in lines[-1]
    assert len({len(line) for line in lines[1:3]}) == 1  # header and rule line up
    assert fmt(0.8766) == "87.7" and fmt(None) == "-" and fmt(1.0) == "100.0"


def test_write_report_refuses_out_of_range_values(tmp_path, paper):
    report, _ = paper
    bad = json.loads(json.dumps(report))
    bad["classes"]["steel_sd900"]["pixel_auroc"] = 1.5
    with pytest.raises(ValueError, match="steel_sd900.*pixel_auroc"):
        write_report(bad, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def _args(**over) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_evaluate_arguments(parser)
    argv = [
        "--data",
        str(REAL_DEFECTS),
        *TINY_MODEL_ARGS,
        "--classes",
        "steel_sd900",
        "--limit",
        "1",
        "--no-progress",
    ]
    args = parser.parse_args(argv)
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_run_evaluate_writes_the_report(tmp_path, capsys):
    out = tmp_path / "sub" / "report.json"
    assert run_evaluate(_args(report=str(out))) == 0
    report = json.loads(out.read_text())
    assert set(report) >= {"protocol", "preset", "model", "data", "classes", "mean", "seconds"}
    assert (report["protocol"], report["preset"], report["data"]) == ("paper", "fast", str(REAL_DEFECTS))
    assert report["model"]["backbone"] == TINY_CLIP.name and report["model"]["prompts_kind"] == "learned"
    assert list(report["classes"]) == ["steel_sd900"] and report["classes"]["steel_sd900"]["n_images"] == 1
    check_report(report)
    table = capsys.readouterr().out
    assert "steel_sd900" in table and table.splitlines()[-1].startswith("mean")


def test_user_errors_are_clear(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=f"{missing}: dataset root is not a directory"):
        run_evaluate(_args(data=str(missing)))
    with pytest.raises(DatasetError, match="class.*gear.*not in split"):
        run_evaluate(_args(classes="gear"))
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        run_evaluate(_args(limit=0))
    with pytest.raises(ValueError, match="is a directory"):
        run_evaluate(_args(report=str(tmp_path)))
    (tmp_path / "a_file").write_text("x")  # under a file: was a NotADirectoryError traceback after the whole run
    for report in (tmp_path / "a_file" / "r.json", tmp_path / "a_file" / "sub" / "r.json"):
        with pytest.raises(UserError, match=f"--report {report}: {tmp_path / 'a_file'} is not a folder"):
            run_evaluate(_args(report=str(report)))


def test_cli_main_end_to_end(tmp_path, capsys):
    from service.cli import main

    out = tmp_path / "r.json"
    argv = [
        "evaluate",
        "--data",
        str(REAL_DEFECTS / "steel_sd900"),
        *TINY_MODEL_ARGS,
        "--limit",
        "1",
        "--protocol",
        "service",
        "--report",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["protocol"] == "service" and report["classes"]["steel_sd900"]["n_images"] == 1
    assert main(["evaluate", "--data", str(tmp_path / "nowhere"), "--backbone", str(TINY_CLIP)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"dhrclip evaluate: {tmp_path / 'nowhere'}: dataset root is not a directory"
