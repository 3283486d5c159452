"""DHR-CLIP inference: views in, image scores and anomaly maps out.

Per image (spec B §11): one whole view (S) and four crops (P) through the V-V vision tower (one batch of 5B views
when S == P), token probabilities against the two text features, per-view maps upsampled to the view size, the
whole-view map upsampled again to T, crops stitched, ``M_l = alpha A_g + (1 - alpha) R(crops)``, ``M = sum_l M_l``,
then smoothed with a Gaussian of sigma and scored.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import IMAGE_SCORES, PRECISION_DTYPES, PRECISIONS, DHRConfig, ImageScores
from .memory import DEFAULT_FUSION_WEIGHT, NormalMemory, fuse
from .preprocess import normalize
from .scoring import (
    anomaly_channel,
    gaussian_blur,
    grid_maps,
    map_max,
    map_topk,
    minmax,
    reference_image_score,
    token_probs,
)
from .tiling import dhr_mix, upsample
from .vision import DHRVisionTower, ViewEncoder, VisionFeatures

EXTRA_MAPS = ("eval_map", "raw_map")  # computed only when asked for (evaluation, ``predict --save-maps``)


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of a precision name (``fp32``, ``bf16``, ``fp16``)."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return getattr(torch, PRECISION_DTYPES[precision])


class DHROutput(NamedTuple):
    """Scores and maps of a batch; an image-score variant ``v`` is ``getattr(out, v)`` (:data:`IMAGE_SCORES`)."""

    reference: torch.Tensor  # (B,) reference score (Part A item 1)
    map_max: torch.Tensor  # (B,) max of anomaly_map
    map_topk: torch.Tensor  # (B,) mean of the top 1 % of anomaly_map
    anomaly_map: torch.Tensor  # (B, T, T) service map: gaussian(M / n_layers), a probability in [0, 1]
    eval_map: torch.Tensor | None = None  # (B, T, T) paper protocol: minmax(gaussian(M)) per image; on request
    raw_map: torch.Tensor | None = None  # (B, T, T) M summed over layers, scale [0, n_layers], unsmoothed; on request

    def scores(self) -> ImageScores[torch.Tensor]:
        """The three (B,) image scores."""
        return ImageScores(*(getattr(self, v) for v in IMAGE_SCORES))


def cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` with floating parameters and buffers in ``dtype``, LayerNorms kept fp32.

    The caller's module is left as it is; only the converted tensors are allocated (no full-precision copy).
    """
    memo: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        keep = isinstance(mod, nn.LayerNorm)
        for t in [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]:
            if id(t) in memo or not t.is_floating_point():
                continue
            new = t.detach().to(torch.float32 if keep else dtype)
            memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    return copy.deepcopy(module, memo)


def view_maps(tokens: torch.Tensor, text: torch.Tensor, size: int, temperature: float, anomaly: bool) -> torch.Tensor:
    """(N, nl, L, D) tokens -> (N, nl, C, size, size) maps; C = 1 anomaly channel, or 2 probabilities."""
    n, nl, length, d = tokens.shape
    m = upsample(grid_maps(token_probs(tokens.reshape(n * nl, length, d), text, temperature)), size)
    if anomaly:
        m = anomaly_channel(m)
    return m.reshape(n, nl, m.shape[1], size, size)


def dhr_maps(
    whole_tokens: torch.Tensor, crop_tokens: torch.Tensor, text: torch.Tensor, cfg: DHRConfig, anomaly: bool = True
) -> torch.Tensor:
    """Stitched, mixed maps per layer.

    whole_tokens (B, nl, Ls, D), crop_tokens (B, 4, nl, Lp, D), text (2, D) unit rows -> (B, nl, C, T, T).
    """
    p = cfg.preset
    b, nl = whole_tokens.shape[:2]
    whole = view_maps(whole_tokens, text, p.image_size, cfg.temperature, anomaly)  # (B, nl, C, S, S)
    crops = view_maps(crop_tokens.flatten(0, 1), text, p.crop_size, cfg.temperature, anomaly)  # (4B, nl, C, P, P)
    c = whole.shape[2]
    mixed = dhr_mix(
        whole.reshape(b, nl * c, p.image_size, p.image_size),
        crops.reshape(b, 4, nl * c, p.crop_size, p.crop_size),
        p,
        cfg.alpha,
    )
    return mixed.reshape(b, nl, c, p.target_size, p.target_size)


class DHRCLIP(nn.Module):
    """Vision tower + two cached unit text vectors; nothing of the text tower stays here.

    At fp32 the caller's ``visual`` is used as is; at bf16/fp16 the tower holds a converted copy
    (:func:`cast_copy`), so the caller's module is never cast.
    """

    def __init__(
        self,
        visual: nn.Module | None,
        text_features: torch.Tensor,
        cfg: DHRConfig,
        precision: str = "fp32",
        encoder: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]] | None = None,
    ):
        """``visual`` an open_clip vision tower run in torch, or None with ``encoder``: a backend with the
        :class:`~service.model.vision.ViewEncoder` signature (an exported graph) fed float32 views."""
        super().__init__()
        dtype = dtype_of(precision)
        if (visual is None) == (encoder is None):
            raise ValueError("give either a vision tower (visual) or a backend encoder, not both")
        self.cfg = cfg
        self.precision = precision
        if encoder is None:
            tower = DHRVisionTower(visual if precision == "fp32" else cast_copy(visual, dtype), cfg)
            self.encoder = ViewEncoder(tower, cfg.preset.one_batch)
            self.view_dtype = dtype
        else:
            self.encoder = encoder
            self.view_dtype = torch.float32  # an exported graph casts to its own precision inside
        self.register_buffer("text_features", F.normalize(text_features.detach().float(), dim=-1))  # (2, D)

    @property
    def tower(self) -> DHRVisionTower:
        """The torch vision tower (absent when an exported graph runs the vision path)."""
        return self.encoder.tower

    @property
    def device(self) -> torch.device:
        return self.text_features.device

    def encode_views(self, whole_u8: torch.Tensor, crops_u8: torch.Tensor) -> tuple[VisionFeatures, VisionFeatures]:
        """whole (B, S, S, 3) and crops (B, 4, P, P, 3) uint8 -> features of (B,) whole views and (B, 4) crops.

        Tokens: (B, nl, L, D) and (B, 4, nl, L, D); cls: (B, D) and (B, 4, D).
        """
        dtype, dev = self.view_dtype, self.device
        whole = normalize(whole_u8.to(dev, non_blocking=True), dtype)  # (B, 3, S, S)
        crops = normalize(crops_u8.to(dev, non_blocking=True), dtype)  # (B, 4, 3, P, P)
        wt, wc, ct, cc = self.encoder(whole, crops)
        return VisionFeatures(wt, wc), VisionFeatures(ct, cc)

    def score(
        self,
        whole: VisionFeatures,
        crops: VisionFeatures,
        extra: Collection[str] = (),
        memory: NormalMemory | None = None,
        fusion_weight: float = DEFAULT_FUSION_WEIGHT,
    ) -> DHROutput:
        """Scores and the service map; ``extra`` names the maps of :data:`EXTRA_MAPS` to add (else None).

        With a normal ``memory`` the outputs are fused with its few-shot maps (``service.model.memory``).
        """
        unknown = set(extra) - set(EXTRA_MAPS)
        if unknown:
            raise ValueError(f"unknown extra maps {sorted(unknown)}; choose from {', '.join(EXTRA_MAPS)}")
        cfg = self.cfg
        m = dhr_maps(whole.tokens, crops.tokens, self.text_features, cfg)[:, :, 0]  # (B, nl, T, T)
        n_layers = len(cfg.features_list)
        raw = m.sum(dim=1) if m.shape[1] == n_layers else m[:, 0] * n_layers  # "final": n identical layers
        reference = reference_image_score(whole.cls, crops.cls, self.text_features, cfg.alpha, cfg.temperature)
        if memory is not None:
            return DHROutput(*fuse(reference, raw, whole.tokens, crops.tokens, memory, cfg, fusion_weight, extra))
        smooth = gaussian_blur(raw, cfg.sigma)
        service = smooth / n_layers
        return DHROutput(
            reference=reference,
            map_max=map_max(service),
            map_topk=map_topk(service, cfg.topk_fraction),
            anomaly_map=service,
            eval_map=minmax(smooth) if "eval_map" in extra else None,
            raw_map=raw if "raw_map" in extra else None,
        )

    @torch.inference_mode()
    def forward(
        self,
        whole_u8: torch.Tensor,
        crops_u8: torch.Tensor,
        extra: Collection[str] = (),
        memory: NormalMemory | None = None,
        fusion_weight: float = DEFAULT_FUSION_WEIGHT,
    ) -> DHROutput:
        """whole (B, S, S, 3) uint8, crops (B, 4, P, P, 3) uint8 -> DHROutput on the model's device.

        ``extra``: which of ``eval_map`` / ``raw_map`` to compute as well (the service needs neither);
        ``memory`` / ``fusion_weight``: few-shot fusion (none: the zero-shot outputs, unchanged).
        """
        return self.score(*self.encode_views(whole_u8, crops_u8), extra, memory, fusion_weight)
