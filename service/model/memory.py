"""Normal memory: what good parts of a product look like, as unit patch tokens of its reference images.

The tokens are exactly those the zero-shot path compares with the text features (``VisionFeatures.tokens``
without the CLS row, L2-normalised), kept per view kind (whole view, crops) and per feature layer:

    bank[kind]  (nl, K, D)   K tokens per layer (all layers the same K), unit rows

Few-shot map of a query view, per layer l and patch i (spec of issue #10)::

    d_i = 1 - max_j cos(token_i, bank[kind][l, j])          in [0, 2]

then the DHR path of the zero-shot map: grid -> upsample to the view size -> crops stitched -> whole view
upsampled to T -> ``alpha * whole + (1 - alpha) * R(crops)`` -> layer sum ``F``. With ``M`` the zero-shot layer sum
and ``w`` the product's fusion weight, the outputs are those of ``w * M + (1 - w) * F`` (service map
``gaussian(.) / n_layers``, ``map_max`` and ``map_topk`` of it), and the reference image score becomes
``w * s_zero_shot + (1 - w) * max(gaussian(F) / n_layers)``.

The nearest-neighbour search is a chunked matmul on the device of the query tokens. A bank larger than
``max_tokens`` per layer is reduced by a deterministic greedy k-center coreset (as PatchCore) on a fixed random
projection of the tokens.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import DEFAULT_FUSION_WEIGHT, DHRConfig
from .scoring import gaussian_blur, map_max, map_topk, minmax
from .tiling import dhr_mix, upsample
from .vision import VisionFeatures

VIEW_KINDS = ("whole", "crops")
DEFAULT_MAX_TOKENS = 40_000  # per layer and view kind; 17 references of preset mvtec fit uncapped
CORESET_DIM = 128  # random projection used only to choose the coreset
CORESET_SEED = 0
_CHUNK_ELEMENTS = 1 << 24  # similarity block of at most 16 M floats (64 MiB) per matmul


class NormalMemory(NamedTuple):
    """Unit patch tokens of good images: ``whole`` (nl, Kw, D), ``crops`` (nl, Kc, D), float32."""

    whole: torch.Tensor
    crops: torch.Tensor

    @property
    def size(self) -> int:
        """Tokens per layer over both view kinds."""
        return int(self.whole.shape[1] + self.crops.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.whole.numel() * self.whole.element_size() + self.crops.numel() * self.crops.element_size())

    def to(self, device) -> NormalMemory:
        return NormalMemory(self.whole.to(device), self.crops.to(device))

    def digest(self) -> str:
        """sha256 (hex, 16 digits) of shapes and values: equal digests mean equal memories."""
        h = hashlib.sha256()
        for t in self:
            c = t.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(c.shape)).encode())
            h.update(c.numpy().tobytes())
        return h.hexdigest()[:16]


def unit_patches(tokens: torch.Tensor) -> torch.Tensor:
    """(..., nl, L, D) tokens with the CLS row first -> (..., nl, L - 1, D) unit patch tokens, float32."""
    return F.normalize(tokens[..., 1:, :].float(), dim=-1)


def memory_from_features(whole: VisionFeatures, crops: VisionFeatures) -> NormalMemory:
    """Features of B good images (tokens (B, nl, L, D) and (B, 4, nl, L, D)) -> their uncapped memory."""
    w = unit_patches(whole.tokens)  # (B, nl, Lw, D)
    c = unit_patches(crops.tokens).transpose(1, 2)  # (B, nl, 4, Lc, D)
    nl, d = w.shape[1], w.shape[-1]
    return NormalMemory(
        w.transpose(0, 1).reshape(nl, -1, d).contiguous(), c.transpose(0, 1).reshape(nl, -1, d).contiguous()
    )


def concat_memories(memories: list[NormalMemory]) -> NormalMemory:
    """Join memories in order (e.g. one per reference image); an empty list is an error."""
    if not memories:
        raise ValueError("no memories to join")
    return NormalMemory(*(torch.cat([m[k] for m in memories], dim=1) for k in range(len(VIEW_KINDS))))


def coreset_indices(x: torch.Tensor, k: int, dim: int = CORESET_DIM, seed: int = CORESET_SEED) -> torch.Tensor:
    """Greedy k-center: (n, D) points -> (min(k, n),) indices, the first point first.

    Each step takes the point farthest (squared L2 in a fixed Gaussian projection to ``dim`` dimensions) from
    those chosen; ties go to the lowest index. Deterministic for given points, ``dim`` and ``seed``.
    """
    n, d = x.shape
    if k >= n:
        return torch.arange(n, device=x.device)
    if k < 1:
        raise ValueError(f"coreset size must be >= 1, got {k}")
    gen = torch.Generator().manual_seed(seed)
    proj = (torch.randn(d, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)).to(x.device, torch.float32)
    z = x.float() @ proj  # (n, dim)
    sq = (z * z).sum(dim=1)
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    chosen[0] = 0
    nearest = (sq - 2 * (z @ z[0]) + sq[0]).clamp_min(0)
    for i in range(1, k):
        c = torch.argmax(nearest)
        chosen[i] = c
        nearest = torch.minimum(nearest, (sq - 2 * (z @ z[c]) + sq[c]).clamp_min(0))
    return chosen


def cap_memory(memory: NormalMemory, max_tokens: int) -> NormalMemory:
    """Each layer of each view kind reduced to at most ``max_tokens`` tokens by :func:`coreset_indices`."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    banks = []
    for bank in memory:
        if bank.shape[1] <= max_tokens:
            banks.append(bank)
            continue
        banks.append(torch.stack([layer[coreset_indices(layer, max_tokens)] for layer in bank]))
    return NormalMemory(*banks)


def nearest_distance(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """``1 - max_j cos``: query (N, nl, Lq, D) unit, bank (nl, K, D) unit -> (N, nl, Lq) float32.

    Chunked over queries and bank rows so one similarity block holds at most 16 M floats.
    """
    n, nl, lq, d = query.shape
    bank = bank.to(query.device, torch.float32)
    k = bank.shape[1]
    out = torch.empty(n, nl, lq, device=query.device)
    q_rows = max(1, min(n * lq, _CHUNK_ELEMENTS // max(1, min(k, _CHUNK_ELEMENTS))))
    k_rows = max(1, _CHUNK_ELEMENTS // q_rows)
    for layer in range(nl):
        q = query[:, layer].reshape(n * lq, d).float()
        best = torch.full((n * lq,), -2.0, device=query.device)
        for i in range(0, n * lq, q_rows):
            qi = q[i : i + q_rows]
            for j in range(0, k, k_rows):
                sims = qi @ bank[layer, j : j + k_rows].t()
                best[i : i + q_rows] = torch.maximum(best[i : i + q_rows], sims.max(dim=1).values)
        out[:, layer] = (1 - best).view(n, lq)
    return out


def _grid(dist: torch.Tensor) -> torch.Tensor:
    """(N, nl, g^2) -> (N, nl, g, g), row-major as ``grid_maps``."""
    n, nl, length = dist.shape
    g = math.isqrt(length)
    return dist.view(n, nl, g, g)


def few_shot_layer_maps(
    whole_tokens: torch.Tensor, crop_tokens: torch.Tensor, memory: NormalMemory, cfg: DHRConfig
) -> torch.Tensor:
    """whole (B, nl, Ls, D), crops (B, 4, nl, Lp, D) -> (B, nl, T, T) mixed few-shot maps per layer."""
    p = cfg.preset
    b, nl = whole_tokens.shape[:2]
    whole = _grid(nearest_distance(unit_patches(whole_tokens), memory.whole))  # (B, nl, gs, gs)
    crops = _grid(nearest_distance(unit_patches(crop_tokens.flatten(0, 1)), memory.crops))  # (4B, nl, gp, gp)
    whole = upsample(whole, p.image_size)
    crops = upsample(crops, p.crop_size).view(b, 4, nl, p.crop_size, p.crop_size)
    return dhr_mix(whole, crops, p, cfg.alpha)


def layer_sum(maps: torch.Tensor, n_layers: int) -> torch.Tensor:
    """(B, nl, T, T) -> (B, T, T) sum over the configured layers ("final" mode: one layer counted n times)."""
    return maps.sum(dim=1) if maps.shape[1] == n_layers else maps[:, 0] * n_layers


class FusedOutput(NamedTuple):
    """The fields of ``DHROutput`` after fusion with the few-shot map (same names, order and shapes)."""

    reference: torch.Tensor
    map_max: torch.Tensor
    map_topk: torch.Tensor
    anomaly_map: torch.Tensor
    eval_map: torch.Tensor | None
    raw_map: torch.Tensor | None


def fuse(
    zero_shot_reference: torch.Tensor,
    zero_shot_raw: torch.Tensor,
    whole_tokens: torch.Tensor,
    crop_tokens: torch.Tensor,
    memory: NormalMemory,
    cfg: DHRConfig,
    weight: float = DEFAULT_FUSION_WEIGHT,
    extra: Collection[str] = (),
) -> FusedOutput:
    """Zero-shot reference score (B,) and layer sum (B, T, T) fused with the few-shot maps of ``memory``.

    ``extra`` as in ``DHRCLIP.score``: ``eval_map`` / ``raw_map`` of the fused layer sum, else None.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    n_layers = len(cfg.features_list)
    few_raw = layer_sum(few_shot_layer_maps(whole_tokens, crop_tokens, memory, cfg), n_layers)
    raw = weight * zero_shot_raw + (1 - weight) * few_raw
    smooth = gaussian_blur(raw, cfg.sigma)
    service = smooth / n_layers
    few_max = map_max(gaussian_blur(few_raw, cfg.sigma) / n_layers)
    return FusedOutput(
        reference=weight * zero_shot_reference + (1 - weight) * few_max,
        map_max=map_max(service),
        map_topk=map_topk(service, cfg.topk_fraction),
        anomaly_map=service,
        eval_map=minmax(smooth) if "eval_map" in extra else None,
        raw_map=raw if "raw_map" in extra else None,
    )
