"""The DHR vision tower: CLIP ViT with dual-path V-V attention in its last ``dpam - 1`` blocks.

For a replaced block l (spec B §2.4), with h = LN1(x^{l-1}) and q, k, v = split(h W_in^T + b_in):

    x^l = x^{l-1} + OutProj(softmax(q k^T / sqrt(d)) v);  x^l += MLP(LN2(x^l))     (original CLIP stream)
    y^l = y^{l-1} + OutProj(softmax(v v^T / sqrt(d)) v),   y^{first-1} = x^{first-1} (V-V stream, no LN, no MLP)

Both attentions go through one ``scaled_dot_product_attention`` call (queries [q; v], keys [k; v], values [v; v]).
Outputs: patch features ``ln_post(y^l) @ proj`` for the requested layers and the image embedding
``x^24[:, 0] @ proj`` without ``ln_post`` (reference quirk Q3). The module reads each block's own weights; no
open_clip class is patched.

Mixed precision: the matmuls (patch embedding, attention, MLP) run in the weights' dtype; the LayerNorms, the two
residual streams x and y and the output projection run in fp32. Accumulating 24 residual additions in bf16 put the
min-max eval map 1.0e-2 off the fp32 one (tiny fixture CLIP, CPU); in fp32 it is 4.2e-3 (tests/test_model.py).
At fp32 every cast is a no-op: the numbers are the reference-parity ones.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import DHRConfig


class VisionFeatures(NamedTuple):
    tokens: torch.Tensor  # (N, n_layers, L, D): ln_post(y^l) @ proj, CLS row first; n_layers = 1 in "final" mode
    cls: torch.Tensor  # (N, D): x^24[:, 0] @ proj


def interpolate_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(1 + s^2, W) positional table -> (1 + grid^2, W): bilinear, align_corners=False, CLS row kept (Part A 2)."""
    side = round((table.shape[0] - 1) ** 0.5)
    if side == grid:
        return table
    cls, pos = table[:1], table[1:]
    pos = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, W, s, s)
    pos = F.interpolate(pos.float(), size=(grid, grid), mode="bilinear", align_corners=False)
    pos = pos.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(table.dtype)
    return torch.cat([cls, pos], dim=0)


class DHRVisionTower(nn.Module):
    """Wraps an open_clip ``VisionTransformer`` (its parameters, not its forward)."""

    def __init__(self, visual: nn.Module, cfg: DHRConfig):
        super().__init__()
        self.visual = visual
        self.cfg = cfg
        self.blocks = visual.transformer.resblocks
        n = len(self.blocks)
        self.first_vv = max(0, n - (cfg.dpam - 1))  # 0-based index of the first dual-path block (5 for 24 blocks)
        bad = [layer for layer in cfg.features_list if not 1 <= layer <= n]
        if bad:
            raise ValueError(f"features_list {cfg.features_list} names layers outside 1..{n}")
        self.patch = visual.conv1.kernel_size[0]
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def _positions(self, grid: int, device, dtype) -> torch.Tensor:
        key = (grid, str(device), dtype)
        if key not in self._pos_cache:  # derived from the original table every time: stateless by construction
            self._pos_cache[key] = interpolate_positions(self.visual.positional_embedding.detach().float(), grid).to(
                device=device, dtype=dtype
            )
        return self._pos_cache[key]

    def _apply(self, fn, recurse=True):  # device/dtype moves invalidate the positional cache
        self._pos_cache = {}
        return super()._apply(fn, recurse)

    @staticmethod
    def _ln(ln: nn.LayerNorm, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """LayerNorm computed in fp32 whatever the input dtype, returned in ``dtype``."""
        return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps).to(dtype)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, s, s) normalised images -> (N, 1 + g^2, W) fp32 tokens after ln_pre (the residual stream)."""
        vis = self.visual
        x = F.conv2d(images.to(self.dtype), vis.conv1.weight, stride=self.patch)  # (N, W, g, g)
        n, w, g, _ = x.shape
        x = x.flatten(2).transpose(1, 2)  # (N, g^2, W), row-major
        cls = vis.class_embedding.to(x.dtype).expand(n, 1, w)
        x = torch.cat([cls, x], dim=1) + self._positions(g, x.device, x.dtype)
        return self._ln(vis.ln_pre, x)

    def _attention(self, blk: nn.Module, x: torch.Tensor, dual: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Standard (and V-V) attention of one block, each through out_proj with its bias."""
        attn = blk.attn
        n, length, w = x.shape
        heads = attn.num_heads
        h = self._ln(blk.ln_1, x, self.dtype)
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # (N, L, 3W) packed q|k|v
        q, k, v = qkv.view(n, length, 3, heads, w // heads).permute(2, 0, 3, 1, 4)  # each (N, H, L, d)
        if dual:
            out = F.scaled_dot_product_attention(torch.cat([q, v]), torch.cat([k, v]), torch.cat([v, v]))
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(out.shape[0], length, w)
        out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
        return (out[:n], out[n:]) if dual else (out, None)

    def forward(self, images: torch.Tensor) -> VisionFeatures:
        """(N, 3, s, s) normalised views -> VisionFeatures; s a multiple of the patch size."""
        cfg = self.cfg
        wanted = sorted(set(cfg.features_list)) if cfg.layer_features == "per_layer" else []
        x = self.embed(images)
        y = None
        taken: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks):
            dual = i >= self.first_vv
            ori, vv = self._attention(blk, x, dual)
            if dual:
                y = (x if y is None else y) + vv
            x = x + ori
            x = x + blk.mlp(self._ln(blk.ln_2, x, self.dtype))
            if (i + 1) in wanted:
                taken[i + 1] = x if y is None else y
        vis = self.visual
        proj = vis.proj.float()
        if cfg.layer_features == "per_layer":
            states = torch.stack([taken[layer] for layer in cfg.features_list], dim=1)  # (N, n_layers, L, W)
        else:
            states = (x if y is None else y).unsqueeze(1)  # (N, 1, L, W): every layer aliases y^24 (quirk Q2)
        tokens = self._ln(vis.ln_post, states) @ proj  # (N, n_layers, L, D)
        cls = x[:, 0] @ proj  # (N, D), no ln_post (quirk Q3)
        return VisionFeatures(tokens, cls)


class ViewEncoder(nn.Module):
    """The exportable vision path of DHR-CLIP: normalised whole views and crops in, their features out.

    whole (B, 3, S, S) and crops (B, 4, 3, P, P) float -> (whole_tokens (B, nl, Ls, D), whole_cls (B, D),
    crop_tokens (B, 4, nl, Lp, D), crop_cls (B, 4, D)), all float32. When S == P the 5B views go through the tower
    as one batch. Every backend (torch, an exported graph) has this signature; scoring stays in torch.
    """

    def __init__(self, tower: DHRVisionTower, one_batch: bool):
        super().__init__()
        self.tower = tower
        self.one_batch = one_batch

    def forward(self, whole: torch.Tensor, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = whole.shape[0]
        if self.one_batch:
            feats = self.tower(torch.cat([whole.unsqueeze(1), crops], 1).flatten(0, 1))
            tokens = feats.tokens.unflatten(0, (b, 5))  # (B, 5, nl, L, D)
            cls = feats.cls.unflatten(0, (b, 5))
            return tokens[:, 0], cls[:, 0], tokens[:, 1:], cls[:, 1:]
        fw, fc = self.tower(whole), self.tower(crops.flatten(0, 1))
        return fw.tokens, fw.cls, fc.tokens.unflatten(0, (b, 4)), fc.cls.unflatten(0, (b, 4))
