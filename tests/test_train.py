"""Prompt training (spec B §5) on the fixture's tiny random CLIP and a few real defect photos, on the CPU.

Most tests use a tiny preset (S = P = 112, T = 224: 8 x 8 token grids) so a training step takes a fraction of a
second; the end-to-end ``run_train`` test uses the real ``fast`` preset.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from service.data import load_dataset, load_mask
from service.model import DHRConfig, Preset, build_model, dhr_maps, load_backbone, load_checkpoint, load_views
from service.model.prompts import encode_learned
from service.train import trainer as tr
from service.train.command import add_train_arguments, run_train
from service.train.features import FeatureCacheError, FeatureExtractor, FeatureStore, cache_key, read_image
from service.train.trainer import TrainError, TrainSettings, train_prompts

ROOT = Path(__file__).resolve().parents[2] / "shared"
TINY_CLIP = ROOT / "fixtures" / "reference_parity" / "clip_tiny_openai_format.pt"
REAL = ROOT / "data" / "real_defects"
TINY = DHRConfig(preset=Preset("tiny", 112, 112, 224))


@pytest.fixture(scope="module")
def clip_info():
    return load_backbone(TINY_CLIP)


@pytest.fixture(scope="module")
def samples():
    """Two defective magnetic tiles and one defect-free one (3 images: batch 2 leaves a last batch of 1)."""
    test = load_dataset(REAL / "magnetic_tile", split="test")["magnetic_tile"]
    bad = [s for s in test if s.anomaly][:2]
    good = [s for s in test if not s.anomaly][:1]
    return bad + good


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["dhrclip"])


# ---------------------------------------------------------------- the loss, written out by hand


def _hand_segmentation_loss(p: np.ndarray, g: np.ndarray) -> float:
    """p (B, 2, H, W) probabilities, g (B, H, W) in {0, 1}; focal (gamma 2) + dice(p1, g) + dice(p0, 1 - g)."""
    eps = 1e-5
    y1 = np.clip(g, eps, 1 - eps)  # one-hot of class 1, clamped
    y0 = np.clip(1 - g, eps, 1 - eps)
    pt = y0 * p[:, 0] + y1 * p[:, 1] + eps
    focal = np.mean(-((1 - pt) ** 2) * np.log(pt))

    def dice(q, t):
        q, t = q.reshape(len(q), -1), t.reshape(len(t), -1)
        return 1 - np.mean((2 * (q * t).sum(1) + 1) / (q.sum(1) + t.sum(1) + 1))

    return float(focal + dice(p[:, 1], g) + dice(p[:, 0], 1 - g))


def test_batch_loss_matches_hand_computed_focal_plus_dice_times_layers():
    rng = np.random.default_rng(7)
    p1 = 1 / (1 + np.exp(-rng.normal(size=(2, 1, 6, 6))))  # (B, nl=1, H, W) anomalous probability
    maps = np.concatenate([1 - p1, p1], axis=1)[:, None]  # (B, 1, 2, H, W), channel 0 normal
    gt = (rng.random((2, 6, 6)) < 0.3).astype(np.float64)
    one = _hand_segmentation_loss(maps[:, 0], gt)
    got = tr.batch_loss(torch.from_numpy(maps), torch.from_numpy(gt), TINY).item()
    assert got == pytest.approx(4 * one, abs=1e-12)  # "final": 4 identical layer terms, as the reference sums
    assert 0.5 < one < 3.0  # focal ~0.1-0.3 plus two dice terms in (0, 1)

    # per_layer: four different maps, plain sum
    p4 = 1 / (1 + np.exp(-rng.normal(size=(2, 4, 6, 6))))
    maps4 = np.stack([1 - p4, p4], axis=2)  # (B, 4, 2, H, W)
    expected = sum(_hand_segmentation_loss(maps4[:, i], gt) for i in range(4))
    got4 = tr.batch_loss(torch.from_numpy(maps4), torch.from_numpy(gt), TINY.with_(layer_features="per_layer")).item()
    assert got4 == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="3 layers"):
        tr.batch_loss(torch.from_numpy(maps4[:, :3]), torch.from_numpy(gt), TINY)


# ---------------------------------------------------------------- one step on the tiny CLIP


def _features(clip, samples, cfg):
    ex = FeatureExtractor(clip.visual, cfg)
    store = FeatureStore(ex, [s.img_path for s in samples], cache="none")
    whole, crops = store.batch(list(range(len(samples))))
    t = cfg.preset.target_size
    gt = torch.from_numpy(np.stack([load_mask(s, (t, t)) for s in samples])).float()
    return whole, crops, gt


def _loss(clip, learner, whole, crops, gt, cfg) -> float:
    with torch.no_grad():
        text = F.normalize(encode_learned(clip, learner), dim=-1)
        return tr.batch_loss(dhr_maps(whole, crops, text, cfg, anomaly=False), gt, cfg).item()


def test_one_step_decreases_the_loss_and_trains_only_the_prompts(clip_info, samples):
    clip, _ = clip_info
    whole, crops, gt = _features(clip, samples, TINY)
    assert whole.shape == (3, 1, 65, 64) and crops.shape == (3, 4, 1, 65, 64) and gt.shape == (3, 224, 224)
    assert gt[:2].sum() > 0 and gt[2].sum() == 0  # two defects with masks, one good
    learner = tr.init_learner(64, TrainSettings())
    before = copy.deepcopy(learner)
    opt = tr.make_optimizer(learner, TrainSettings())
    loss0 = tr.train_step(clip, learner, opt, whole, crops, gt, TINY)
    assert loss0 == pytest.approx(_loss(clip, before, whole, crops, gt, TINY), rel=1e-6)  # returns the pre-step loss
    loss1 = _loss(clip, learner, whole, crops, gt, TINY)
    assert loss1 < loss0 - 1e-3, (loss0, loss1)
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())
    for name in ("ctx_pos", "ctx_neg", "deep"):
        step = (getattr(learner, name) - getattr(before, name)).abs()
        assert 0.5e-3 < step.max().item() <= 1.01e-3  # Adam's first step moves each entry by at most lr


def test_last_batch_of_one_keeps_its_batch_dimension(clip_info, samples):
    clip, _ = clip_info
    whole, crops, gt = _features(clip, samples[:1], TINY)
    assert gt.shape == (1, 224, 224)
    learner = tr.init_learner(64, TrainSettings())
    loss = tr.train_step(clip, learner, tr.make_optimizer(learner, TrainSettings()), whole, crops, gt, TINY)
    assert math.isfinite(loss) and loss > 0


# ---------------------------------------------------------------- cache, resume


def _train(clip, info, samples, out, **kw):
    resume = kw.pop("resume", False)
    cfg = kw.pop("cfg", TINY)
    s = TrainSettings(**{"epochs": 2, "batch_size": 2, **kw})
    return train_prompts(
        clip, samples, cfg, out, s, backbone=info, data={"root": str(REAL)}, resume=resume, progress=False
    )


@pytest.fixture(scope="module")
def mem_run(clip_info, samples, tmp_path_factory):
    """2 epochs, batch 2 (the last batch has 1 image), in-memory fp16 feature cache."""
    clip, info = clip_info
    return _train(clip, info, samples, tmp_path_factory.mktemp("mem"))


def test_cached_training_equals_uncached_training(clip_info, samples, mem_run, tmp_path):
    clip, info = clip_info
    none = _train(clip, info, samples, tmp_path / "none", cache="none")
    disk1 = _train(clip, info, samples, tmp_path / "disk1", cache="disk", cache_dir=str(tmp_path / "cache"))
    disk2 = _train(clip, info, samples, tmp_path / "disk2", cache="disk", cache_dir=str(tmp_path / "cache"))
    assert (mem_run.extracted, none.extracted, disk1.extracted, disk2.extracted) == (3, 6, 3, 0)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    ref = _checkpoint_tensors(mem_run.checkpoints[-1])
    for run in (none, disk1, disk2):
        assert run.losses == mem_run.losses  # tolerance 0: every mode rounds features to fp16 the same way
        got = _checkpoint_tensors(run.checkpoints[-1])
        assert all(torch.equal(ref[k], got[k]) for k in ("ctx_pos", "ctx_neg", "deep"))
    assert len(mem_run.losses) == 2 and mem_run.losses[1] < mem_run.losses[0]
    # fp32 storage: not identical (no fp16 rounding) but within the rounding's effect
    fp32 = _train(clip, info, samples, tmp_path / "fp32", feature_dtype="fp32", epochs=1)
    assert fp32.losses[0] != mem_run.losses[0]
    assert fp32.losses[0] == pytest.approx(mem_run.losses[0], rel=1e-4, abs=0)  # measured: 5e-6 relative


def test_disk_cache_key_and_corrupt_file(clip_info, samples, tmp_path):
    img = tmp_path / "a.jpg"
    img.write_bytes(samples[0].img_path.read_bytes())
    key = cache_key(img, TINY, "abc", "fp32", "fp16")
    assert key == cache_key(img, TINY, "abc", "fp32", "fp16") and len(key) == 64
    others = [
        cache_key(img, TINY.with_(layer_features="per_layer"), "abc", "fp32", "fp16"),
        cache_key(img, TINY, "abd", "fp32", "fp16"),
        cache_key(img, TINY, "abc", "bf16", "fp16"),
        cache_key(img, TINY, "abc", "fp32", "fp32"),
        cache_key(img, DHRConfig(preset=Preset("t2", 112, 112, 196)), "abc", "fp32", "fp16"),
    ]
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    others.append(cache_key(img, TINY, "abc", "fp32", "fp16"))
    assert len({key, *others}) == 7
    clip, info = clip_info
    store = FeatureStore(FeatureExtractor(clip.visual, TINY), [img], "disk", tmp_path / "c", "abc")
    store.prepare()
    (f,) = (tmp_path / "c").glob("*.safetensors")
    f.write_bytes(b"garbage")
    with pytest.raises(FeatureCacheError, match=str(f)):
        FeatureStore(FeatureExtractor(clip.visual, TINY), [img], "disk", tmp_path / "c", "abc").prepare()


def test_resume_after_one_epoch_equals_two_epochs_straight(clip_info, samples, mem_run, tmp_path):
    clip, info = clip_info
    straight = mem_run
    first = _train(clip, info, samples, tmp_path / "b", epochs=1)
    assert [p.name for p in first.checkpoints] == ["epoch_001.safetensors"]
    second = _train(clip, info, samples, tmp_path / "b", resume=True)
    assert second.start_epoch == 1 and [p.name for p in second.checkpoints] == ["epoch_002.safetensors"]
    a, b = _checkpoint_tensors(straight.checkpoints[-1]), _checkpoint_tensors(second.checkpoints[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)  # tolerance 0: Adam state and shuffle order restored exactly
    assert second.losses == straight.losses
    assert _meta(second.checkpoints[-1])["training"]["epoch_losses"] == straight.losses
    assert sorted(p.name for p in (tmp_path / "b").glob("optimizer_*")) == ["optimizer_epoch_002.pt"]
    assert _train(clip, info, samples, tmp_path / "b", resume=True).checkpoints == []  # already at 2 epochs
    with pytest.raises(TrainError, match="seed"):
        _train(clip, info, samples, tmp_path / "b", epochs=3, seed=5, resume=True)
    with pytest.raises(TrainError, match="already holds epoch checkpoints"):
        _train(clip, info, samples, tmp_path / "b")
    with pytest.raises(TrainError, match="no epoch_NNN"):
        _train(clip, info, samples, tmp_path / "empty", resume=True)


def test_per_layer_mode_is_used_and_recorded(clip_info, samples, tmp_path):
    clip, info = clip_info
    cfg = TINY.with_(layer_features="per_layer")
    store = FeatureStore(FeatureExtractor(clip.visual, cfg), [samples[0].img_path], cache="none")
    whole, crops = store.batch([0])
    assert whole.shape == (1, 4, 65, 64) and crops.shape == (1, 4, 4, 65, 64)
    assert not torch.equal(whole[0, 0], whole[0, 3])  # y^6 differs from y^24
    run = _train(clip, info, samples, tmp_path / "pl", cfg=cfg, epochs=1, batch_size=3)
    assert _meta(run.checkpoints[0])["layer_features"] == "per_layer"
    assert 0 < run.losses[0] < 4 * 3 and run.extracted == 3


# ---------------------------------------------------------------- the command


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_train_end_to_end_on_real_images(clip_info, tmp_path, capsys):
    out = tmp_path / "run"
    rc = run_train(
        _args(
            "--data",
            str(REAL),
            "--classes",
            "magnetic_tile,steel_sd900",
            "--limit",
            "1",
            "--backbone",
            str(TINY_CLIP),
            "--preset",
            "fast",
            "--epochs",
            "2",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            "--out",
            str(out),
        )
    )
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "epoch_001.safetensors",
        "epoch_002.safetensors",
        "optimizer_epoch_002.pt",
    ]
    meta = _meta(out / "epoch_002.safetensors")
    assert meta["preset"] == "fast" and meta["layer_features"] == "final"
    assert meta["backbone"] == {"name": TINY_CLIP.name, "sha256": clip_info[1].sha256}
    tr = meta["training"]
    assert tr["data"] == {"root": str(REAL), "split": "test", "classes": ["magnetic_tile", "steel_sd900"], "limit": 1}
    assert (tr["epochs"], tr["epoch"], tr["batch_size"], tr["lr"], tr["seed"], tr["n_images"]) == (
        2,
        2,
        2,
        1e-3,
        111,
        2,
    )
    assert tr["betas"] == [0.5, 0.999] and len(tr["epoch_losses"]) == 2
    assert all(0 < v < 4 * 3 for v in tr["epoch_losses"])  # 4 layers x (focal + 2 dice terms, each < 1)
    assert "mean loss" in capsys.readouterr().out

    ck = load_checkpoint(out)  # the folder means its newest checkpoint
    assert Path(ck.path).name == "epoch_002.safetensors" and ck.deep.shape == (8, 4, 64)
    clip, info = load_backbone(TINY_CLIP)
    model, minfo = build_model(clip, ck, preset=ck.meta["preset"], backbone_info=info)
    expected = F.normalize(encode_learned(clip, ck.learner()), dim=-1)
    assert torch.allclose(model.text_features, expected, atol=1e-6)
    views = load_views(read_image(REAL / "steel_sd900" / "test" / "inclusion" / "In_13.bmp"), model.cfg.preset)
    res = model(torch.from_numpy(np.array(views.whole))[None], torch.from_numpy(np.array(views.crops))[None])
    assert res.anomaly_map.shape == (1, 448, 448) and torch.isfinite(res.anomaly_map).all()
    assert minfo.layer_features == "final" and 0 < res.reference.item() < 1


def test_run_train_user_errors_are_one_line(tmp_path, capsys):
    from service.cli import main

    rc = main(
        ["train", "--data", str(tmp_path / "missing"), "--backbone", str(TINY_CLIP), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(tmp_path / "missing") in err and "not a directory" in err

    good = tmp_path / "ds" / "widget" / "test" / "good"
    good.mkdir(parents=True)
    src = REAL / "magnetic_tile" / "test" / "good"
    first = sorted(src.iterdir())[0]
    (good / "a.jpg").write_bytes(first.read_bytes())
    (good / "b.jpg").write_bytes(first.read_bytes()[:600])  # valid header, truncated pixel data
    argv = (
        "--data",
        str(tmp_path / "ds"),
        "--backbone",
        str(TINY_CLIP),
        "--preset",
        "fast",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path / "o2"),
    )
    rc = main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("dhrclip train: ") and str(good / "b.jpg") in err
    (good / "b.jpg").write_bytes(b"not an image at all")
    rc = main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and str(good / "b.jpg") in err and "cannot read image" in err
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--lr", "nan", "lr > 0"),
        ("--lr", "inf", "lr > 0"),
        ("--n-ctx", "0", "n_ctx >= 1"),
        ("--depth", "0", "depth >= 1"),
        ("--t-n-ctx", "13", "0 <= t_n_ctx <= n_ctx"),
        ("--out", "FILE", "a_file: exists and is not a folder"),
    ],
)
def test_bad_train_options_are_one_line_before_the_backbone_loads(tmp_path, capsys, option, value, message):
    """These were tracebacks (ValueError of the optimizer or of PromptLearner, FileExistsError) after the backbone
    had loaded; --lr inf was taken and trained to NaN."""
    from service.cli import main

    (tmp_path / "a_file").write_text("x")
    argv = ["train", "--data", str(REAL / "steel_sd900"), "--backbone", str(tmp_path / "never-read.pt")]
    argv += ["--out", str(tmp_path / "o"), "--epochs", "1", "--no-progress", "--device", "cpu"]
    argv += [option, str(tmp_path / "a_file") if value == "FILE" else value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dhrclip train: ") and message in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", [b"", b"\x00junk", None])
def test_resume_from_an_unreadable_optimizer_state_is_one_line(clip_info, samples, tmp_path, content):
    """A truncated or foreign optimizer_epoch_NNN.pt was an EOFError/UnpicklingError/KeyError traceback."""
    clip, info = clip_info
    _train(clip, info, samples, tmp_path / "r", epochs=1)
    opt = tmp_path / "r" / "optimizer_epoch_001.pt"
    if content is None:
        torch.save({"not_optimizer": 1}, opt)
    else:
        opt.write_bytes(content)
    with pytest.raises(TrainError, match=f"{opt}: unreadable optimizer state .*cannot resume"):
        _train(clip, info, samples, tmp_path / "r", resume=True)
