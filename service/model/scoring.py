"""Scores: token probabilities, per-view maps, Gaussian smoothing, normalisation and image-level scores.

Pure functions on tensors; every one works on whatever device its inputs live on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_probs(tokens: torch.Tensor, text: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """p = softmax(cos(f, t_j) / tau) over j in {normal, anomalous}.

    tokens (..., L, D) patch features (any scale), text (2, D) unit rows -> (..., L, 2).
    """
    f = F.normalize(tokens.float(), dim=-1)
    return torch.softmax(f @ text.float().t() / temperature, dim=-1)


def grid_maps(probs: torch.Tensor) -> torch.Tensor:
    """(N, 1 + g^2, 2) -> (N, 2, g, g): drop the CLS row, reshape row-major."""
    n, length, c = probs.shape
    g = math.isqrt(length - 1)
    return probs[:, 1:].transpose(1, 2).reshape(n, c, g, g)


def anomaly_channel(probs: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W) -> (N, 1, H, W): a = (p_anomalous + 1 - p_normal) / 2 (reference form, equals p_anomalous)."""
    return ((probs[:, 1] + 1 - probs[:, 0]) / 2).unsqueeze(1)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype=torch.float64, device=None) -> torch.Tensor:
    """scipy.ndimage's kernel: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _symmetric_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of a length-n axis padded half-sample symmetrically (scipy 'reflect': dcba|abcd|dcba)."""
    idx = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


_OPERATORS: dict[tuple, torch.Tensor] = {}


def blur_operator(n: int, sigma: float, truncate: float = 4.0, device=None) -> torch.Tensor:
    """(n, n) float64 matrix G with (G x)_i = sum_k w_k x[reflect(i + k - r)]: the 1-D filter as one matmul."""
    key = (n, float(sigma), float(truncate), str(device))
    if key not in _OPERATORS:
        k = gaussian_kernel1d(sigma, truncate)
        r = (k.numel() - 1) // 2
        cols = _symmetric_index(n, r, None).unfold(0, 2 * r + 1, 1)  # (n, 2r+1): source index of each tap
        op = torch.zeros(n, n, dtype=torch.float64)
        op.scatter_add_(1, cols, k.expand(n, -1).contiguous())
        _OPERATORS[key] = op.to(device)
    return _OPERATORS[key]


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """(B, H, W) float32 -> (B, H, W) float32 = scipy.ndimage.gaussian_filter(m, sigma) per image.

    Separable, axis 0 then axis 1, float64 accumulation rounded to float32 after each axis (as scipy does for
    float32 input), half-sample symmetric padding ('reflect'), radius int(truncate * sigma + 0.5). Each axis is one
    float64 matmul with a banded operator (:func:`blur_operator`). sigma <= 0 returns the input.
    """
    if sigma <= 0:
        return maps
    _, h, w = maps.shape
    gh = blur_operator(h, sigma, truncate, maps.device)
    gw = blur_operator(w, sigma, truncate, maps.device)
    x = (gh @ maps.to(torch.float64)).to(torch.float32)  # axis 0
    return (x.to(torch.float64) @ gw.t()).to(torch.float32)  # axis 1


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-image (m - min) / (max - min) of (B, H, W); a constant map becomes all zeros (no NaN)."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    rng = hi - lo
    return torch.where(rng > 0, (maps - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(maps))


def reference_image_score(
    whole_cls: torch.Tensor, crop_cls: torch.Tensor, text: torch.Tensor, alpha: float = 0.75, temperature: float = 0.07
) -> torch.Tensor:
    """softmax((alpha z_g + (1 - alpha) z_l) / tau)[anomalous] (spec B §4.6).

    whole_cls (B, D) is L2-normalised here; crop_cls (B, 4, D) enters unnormalised (quirk Q4); text (2, D).
    """
    t = text.float()
    z_g = F.normalize(whole_cls.float(), dim=-1) @ t.t()  # (B, 2)
    z_l = (crop_cls.float() @ t.t()).mean(dim=1)  # (B, 2)
    return torch.softmax((alpha * z_g + (1 - alpha) * z_l) / temperature, dim=-1)[:, 1]


def map_max(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B,) maximum of each map."""
    return maps.flatten(1).max(dim=1).values


def map_topk(maps: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """(B, H, W) -> (B,) mean of the top ``fraction`` of each map's pixels (at least one pixel)."""
    flat = maps.flatten(1)
    k = max(1, round(flat.shape[1] * fraction))
    return flat.topk(k, dim=1).values.mean(dim=1)
