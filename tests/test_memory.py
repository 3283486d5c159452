"""Normal memory: few-shot maps find a pasted foreign patch, fusion limits, coreset cap and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from service.engine.knowledge import MemoryCache
from service.model import build_model, load_views
from service.model import memory as mem
from service.model.dhrclip import EXTRA_MAPS
from service.model.memory import (
    NormalMemory,
    cap_memory,
    concat_memories,
    coreset_indices,
    memory_from_features,
    nearest_distance,
)

T = 448  # preset "fast": S 336, P 224, T 448; images are made T x T so map pixels are image pixels
PATCH = (300, 100, 60)  # y0, x0, side of the pasted foreign square


def _texture(seed: int) -> np.ndarray:
    """A woven-looking good part: the same stripes at a small random phase, plus sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:T, 0:T].astype(np.float64)
    dy, dx = rng.uniform(0, 6, 2)
    base = 128 + 50 * np.sin((xx + dx) / 3.0) + 40 * np.cos((yy + dy) / 4.0)
    grey = np.clip(base + rng.normal(0, 4, (T, T)), 0, 255)
    return np.stack([grey, 0.8 * grey + 20, 0.6 * grey + 40], -1).astype(np.uint8)


def _defective(seed: int) -> np.ndarray:
    img = _texture(seed).copy()
    y0, x0, s = PATCH
    rng = np.random.default_rng(1000 + seed)
    img[y0 : y0 + s, x0 : x0 + s] = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)  # foreign material
    return img


@pytest.fixture(scope="module")
def model(tiny_clip, ref_checkpoint):
    clip, _ = tiny_clip
    return build_model(clip, ref_checkpoint, preset="fast")[0]


def _features(model, images: list[np.ndarray]):
    views = [load_views(Image.fromarray(im), model.cfg.preset) for im in images]
    whole = torch.from_numpy(np.stack([np.asarray(v.whole) for v in views]))
    crops = torch.from_numpy(np.stack([np.asarray(v.crops) for v in views]))
    with torch.inference_mode():
        return model.encode_views(whole, crops)


@pytest.fixture(scope="module")
def feats(model):
    """Features of 2 references, 3 other good parts and 1 defective one, encoded once for the module."""
    return {
        "refs": _features(model, [_texture(1), _texture(2)]),
        "goods": _features(model, [_texture(s) for s in (11, 12, 13)]),
        "bad": _features(model, [_defective(11)]),
    }


def _take(f, i: int):
    return type(f[0])(*(t[i : i + 1] for t in f[0])), type(f[1])(*(t[i : i + 1] for t in f[1]))


def test_few_shot_map_finds_the_pasted_patch_and_fused_score_ranks_it_first(model, feats):
    memory = memory_from_features(*feats["refs"])
    goods, bad = feats["goods"], feats["bad"]
    with torch.inference_mode():
        few = model.score(*bad, (), memory, 0.0).anomaly_map[0]  # weight 0: the few-shot map alone
        y, x = divmod(int(torch.argmax(few)), few.shape[1])
        y0, x0, s = PATCH
        assert y0 <= y < y0 + s and x0 <= x < x0 + s, (y, x)
        fused_bad = model.score(*bad, (), memory).reference[0].item()
        fused_good = model.score(*goods, (), memory).reference
    assert fused_bad > fused_good.max().item(), (fused_bad, fused_good.tolist())


def test_weight_one_and_no_memory_are_the_zero_shot_outputs_bit_for_bit(model, feats):
    memory = memory_from_features(*_take(feats["refs"], 0))
    with torch.inference_mode():
        zero = model.score(*feats["goods"], EXTRA_MAPS)
        one = model.score(*feats["goods"], EXTRA_MAPS, memory, 1.0)
        half = model.score(*feats["goods"], EXTRA_MAPS, memory, 0.5)
    for name in ("reference", "map_max", "map_topk", "anomaly_map", "raw_map", "eval_map"):
        assert torch.equal(getattr(zero, name), getattr(one, name)), name
    assert not torch.equal(zero.anomaly_map, half.anomaly_map)


def test_memory_holds_unit_patch_tokens_per_layer_and_view_kind(feats):
    w, c = feats["refs"]
    m = memory_from_features(w, c)
    nl, lw, d = w.tokens.shape[1], w.tokens.shape[2] - 1, w.tokens.shape[-1]
    lc = c.tokens.shape[3] - 1
    assert m.whole.shape == (nl, 2 * lw, d) and m.crops.shape == (nl, 2 * 4 * lc, d)
    assert torch.allclose(m.whole.norm(dim=-1), torch.ones(nl, 2 * lw), atol=1e-5)
    assert torch.equal(m.whole[0, :lw], torch.nn.functional.normalize(w.tokens[0, 0, 1:], dim=-1))
    both = concat_memories([memory_from_features(*_take(feats["refs"], i)) for i in (0, 1)])
    assert torch.equal(both.whole, m.whole) and torch.equal(both.crops, m.crops)
    assert m.nbytes == 4 * d * nl * (2 * lw + 8 * lc)


def test_nearest_distance_chunks_equal_one_matmul(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 2, 17, 8, generator=g), dim=-1)
    bank = torch.nn.functional.normalize(torch.randn(2, 29, 8, generator=g), dim=-1)
    expected = 1 - torch.einsum("nlqd,lkd->nlqk", q, bank).max(dim=-1).values
    monkeypatch.setattr(mem, "_CHUNK_ELEMENTS", 40)  # forces 2-row query chunks and 20-row bank chunks
    got = nearest_distance(q, bank)
    assert torch.allclose(got, expected, atol=1e-6)
    assert nearest_distance(bank[:, :4].unsqueeze(0), bank).abs().max() < 1e-6  # a bank token is its own neighbour


def test_coreset_greedy_order_on_collinear_points():
    # distances along a line scale alike under any projection: 0 first, then 11 (far end), 5, then 2
    t = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 5.0])
    points = t[:, None] * torch.tensor([[0.3, -1.2, 0.7, 2.0]])
    assert coreset_indices(points, 4).tolist() == [0, 4, 5, 2]
    assert coreset_indices(points, 10).tolist() == [0, 1, 2, 3, 4, 5]


def test_cap_memory_keeps_the_cap_and_is_deterministic():
    g = torch.Generator().manual_seed(3)
    bank = torch.nn.functional.normalize(torch.randn(2, 500, 16, generator=g), dim=-1)
    m = NormalMemory(bank, bank[:, :100].clone())
    a, b = cap_memory(m, 64), cap_memory(m, 64)
    assert a.whole.shape == (2, 64, 16) and a.crops.shape == (2, 64, 16)
    assert torch.equal(a.whole, b.whole) and torch.equal(a.crops, b.crops) and a.digest() == b.digest()
    rows = {tuple(r.tolist()) for r in bank[1]}
    assert all(tuple(r.tolist()) in rows for r in a.whole[1])  # a subset of the original tokens
    assert cap_memory(m, 1000).whole is m.whole  # under the cap: unchanged
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        cap_memory(m, 0)


def test_memory_cache_evicts_the_least_recently_used_and_loads_each_version_once():
    loads: list[str] = []

    def loader(version: str):
        def load() -> NormalMemory:
            loads.append(version)
            return NormalMemory(torch.full((1, 1, 2), float(len(loads))), torch.zeros(1, 1, 2))

        return load

    cache = MemoryCache("cpu", capacity=2)
    a = cache.get("a", loader("a"))
    cache.get("b", loader("b"))
    assert cache.get("a", loader("a")) is a and loads == ["a", "b"]  # a hit: not loaded again, now most recent
    cache.get("c", loader("c"))  # evicts b, the least recently used
    assert cache.versions() == ["a", "c"]
    cache.get("b", loader("b"))
    assert loads == ["a", "b", "c", "b"] and cache.versions() == ["c", "b"]
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        MemoryCache("cpu", capacity=0)
