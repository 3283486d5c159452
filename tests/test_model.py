"""Model behaviour beyond the golden fixtures: layer modes, statelessness, precision, backbones, ensemble prompts.

Self-contained: the CLIPs come from ``tests/tiny_clip.json`` (random weights), the prompts from a seeded
``PromptLearner``, the images are synthetic; nothing is read from ``../shared``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from service.model import EXTRA_MAPS, BackboneError, build_model, get_preset, load_backbone, load_views
from service.model.backbone import read_state_dict, resolve_openai
from service.model.checkpoint import from_learner
from service.model.prompts import PromptLearner

from .tiny_clip import tiny_backbone


def _views(img, preset):
    v = load_views(img, preset)
    return torch.from_numpy(np.array(v.whole))[None], torch.from_numpy(np.array(v.crops))[None]


def _image(seed: int, width: int, height: int) -> Image.Image:
    """Smooth colour gradients with a dark blob: structured enough that views and layers differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    cx, cy = rng.uniform(0.2, 0.8, 2)
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.005)
    rgb = np.stack([128 + 100 * np.sin(6 * xx + k) * np.cos(5 * yy - k) - 90 * blob for k in range(3)], axis=-1)
    return Image.fromarray(np.clip(rgb + rng.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def img0():
    return _image(0, 700, 700)


@pytest.fixture(scope="module")
def img1():
    return _image(1, 640, 480)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """The 'vit24' tiny CLIP saved as an OpenAI-format state dict (the golden fixture's format and shapes)."""
    path = tmp_path_factory.mktemp("clip") / "clip_vit24.pt"
    torch.save(tiny_backbone(config="vit24").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(clip_file):
    return load_backbone(clip_file)


@pytest.fixture(scope="module")
def ref_checkpoint():
    """Learned-format prompts for the 'vit24' text width (64): a seeded, untrained PromptLearner."""
    torch.manual_seed(0)
    return from_learner(PromptLearner(64))


def test_backbone_parameters_bit_equal_to_file(tiny_clip, clip_file):
    clip, info = tiny_clip
    sd = read_state_dict(clip_file)
    mine = clip.state_dict()
    for k, v in sd.items():
        assert torch.equal(mine[k], v.float()), k
    assert (info.vision_width, info.vision_layers, info.embed_dim) == (128, 24, 64)
    assert type(clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert len(info.sha256) == 64


def test_per_layer_maps_differ_and_reduce_to_final(tiny_clip, ref_checkpoint, img0):
    clip, _ = tiny_clip
    whole, crops = _views(img0, get_preset("mvtec"))
    per_layer, _ = build_model(clip, ref_checkpoint, layer_features="per_layer")
    fw, fc = per_layer.encode_views(whole, crops)
    assert fw.tokens.shape[1] == 4
    from service.model import dhr_maps

    maps = dhr_maps(fw.tokens, fc.tokens, per_layer.text_features, per_layer.cfg)[0, :, 0]  # (4, T, T)
    for a in range(4):
        for b in range(a + 1, 4):
            assert (maps[a] - maps[b]).abs().max() > 1e-3, f"layers {a} and {b} gave the same map"
    final, _ = build_model(clip, ref_checkpoint, layer_features="final")
    all24, _ = build_model(clip, ref_checkpoint, layer_features="per_layer", features_list=(24, 24, 24, 24))
    out_f, out_24 = final(whole, crops, EXTRA_MAPS), all24(whole, crops, EXTRA_MAPS)
    for name in ("reference", "raw_map", "anomaly_map", "eval_map"):
        diff = (getattr(out_f, name) - getattr(out_24, name)).abs().max().item()
        assert diff <= 2e-6, (name, diff)


def test_fast_preset_is_stateless(tiny_clip, ref_checkpoint, img0, img1):
    """S != P: the reference drifts its positional table; ours gives the same answer whatever came before."""
    clip, _ = tiny_clip
    model, _ = build_model(clip, ref_checkpoint, preset="fast")
    alone = model(*_views(img1, model.cfg.preset))
    model(*_views(img0, model.cfg.preset))
    after = model(*_views(img1, model.cfg.preset))
    assert torch.equal(alone.anomaly_map, after.anomaly_map)
    assert torch.equal(alone.reference, after.reference)
    assert torch.equal(model.tower.visual.positional_embedding, clip.visual.positional_embedding)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_close_to_fp32(tiny_clip, ref_checkpoint, img0, precision):
    clip, info = tiny_clip
    ref, _ = build_model(clip, ref_checkpoint)
    out32 = ref(*_views(img0, ref.cfg.preset))
    fast, minfo = build_model(clip, ref_checkpoint, precision=precision)
    assert clip.visual.conv1.weight.dtype == torch.float32, "the caller's module must not be cast"
    assert minfo.precision == precision
    assert fast.tower.visual.conv1.weight.dtype != torch.float32
    assert fast.tower.visual.ln_pre.weight.dtype == torch.float32
    out = fast(*_views(img0, fast.cfg.preset))
    dev = (out.anomaly_map - out32.anomaly_map).abs().max().item()
    assert 0 < dev < 0.1, dev
    assert abs(out.reference.item() - out32.reference.item()) < 0.05


def test_ensemble_prompts_need_only_a_backbone():
    clip = tiny_backbone()
    model, info = build_model(clip, "ensemble", dpam=4, features_list=(3, 6))
    assert info.prompts_kind == "ensemble" and info.prompts == "ensemble"
    t = model.text_features
    assert t.shape == (2, 32)
    assert torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert (t[0] - t[1]).abs().max() > 1e-3
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    out = model(*_views(img, model.cfg.preset))
    assert out.anomaly_map.shape == (1, 672, 672)
    assert 0 <= out.anomaly_map.min() <= out.anomaly_map.max() <= 1
    assert 0 <= out.reference.item() <= 1


def test_tiny_open_clip_config_runs_same_path_with_different_depth():
    clip = tiny_backbone(layers=6)
    model, _ = build_model(clip, "ensemble", preset="fast", dpam=4, features_list=(2, 4, 6), layer_features="per_layer")
    assert model.tower.first_vv == 3  # last dpam - 1 = 3 blocks of 6 run the dual path
    img = Image.fromarray(np.full((100, 80), 128, dtype=np.uint8), mode="L")
    out = model(*_views(img, model.cfg.preset), ("raw_map",))
    assert out.raw_map.shape == (1, 448, 448)
    assert float(out.raw_map.max()) <= 3.0 + 1e-5  # three layers, each in [0, 1]


def test_backbone_errors_are_one_line(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello")
    with pytest.raises(BackboneError, match="notes.pt: not a readable CLIP checkpoint"):
        load_backbone(bad)
    with pytest.raises(BackboneError, match="missing.pt: backbone file not found"):
        load_backbone(tmp_path / "missing.pt")
    partial = tmp_path / "partial.pt"
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 14, 14)}, partial)
    with pytest.raises(BackboneError, match="missing visual.positional_embedding"):
        load_backbone(partial)
    with pytest.raises(BackboneError) as e:
        resolve_openai(cache_dir=str(tmp_path), allow_download=False)
    msg = str(e.value)
    assert "\n" not in msg and "ViT-L-14-336px.pt" in msg and "model_weights/backbone" in msg


def test_backbone_formats_open_clip_checkpoint_and_torchscript(tmp_path, tiny_clip):
    clip, _ = tiny_clip
    sd = clip.state_dict()
    wrapped = tmp_path / "open_clip_epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    loaded, info = load_backbone(wrapped)
    assert torch.equal(loaded.visual.proj, clip.visual.proj) and info.name == "open_clip_epoch_1.pt"
    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items() if k != "attn_mask"}, str(st))
    assert torch.equal(load_backbone(st)[0].text_projection, clip.text_projection)

    root = torch.nn.Module()  # a TorchScript archive with OpenAI's key names, like ViT-L-14-336px.pt
    for key, value in sd.items():
        *path, leaf = key.split(".")
        mod = root
        for name in path:
            if not hasattr(mod, name):
                mod.add_module(name, torch.nn.Module())
            mod = getattr(mod, name)
        mod.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    ts = tmp_path / "ViT-tiny-openai.pt"
    torch.jit.save(torch.jit.script(root), str(ts))
    from service.model.backbone import _is_torchscript

    assert _is_torchscript(ts) and not _is_torchscript(wrapped)
    from_ts, _ = load_backbone(ts)
    for k, v in clip.state_dict().items():
        assert torch.equal(from_ts.state_dict()[k], v), k
