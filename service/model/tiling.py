"""Where the four crops sit on the T x T canvas, and stitching their maps back (spec B §4.3, Part A item 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Preset


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, g, g) -> (N, C, size, size): bilinear, align_corners=False, no antialias."""
    if maps.shape[-1] == size and maps.shape[-2] == size:
        return maps
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


def stitch(crops: torch.Tensor, preset: Preset) -> torch.Tensor:
    """(B, 4, C, P, P) crop maps -> (B, C, T, T) canvas R(.).

    Crops are added at offsets (0, T - P) in row-major order. Where they overlap (2P > T), the band of rows
    [P - o, P) is halved, then the band of columns: o = 2P - T, the central o x o square ends up divided by 4.
    """
    b, n, c, side, _ = crops.shape
    t, p = preset.target_size, preset.crop_size
    if n != 4 or side != p:
        raise ValueError(f"expected (B, 4, C, {p}, {p}) crops for preset {preset.name}, got {tuple(crops.shape)}")
    canvas = crops.new_zeros(b, c, t, t)
    offs = preset.crop_offsets
    k = 0
    for y0 in offs:
        for x0 in offs:
            canvas[:, :, y0 : y0 + p, x0 : x0 + p] += crops[:, k]
            k += 1
    o = 2 * p - t
    if o > 0:
        canvas[:, :, p - o : p, :] /= 2
        canvas[:, :, :, p - o : p] /= 2
    return canvas


def dhr_mix(whole: torch.Tensor, crops: torch.Tensor, preset: Preset, alpha: float) -> torch.Tensor:
    """M = alpha * A_g + (1 - alpha) * R(crops).

    whole: (B, C, S, S) view-resolution map, upsampled S -> T here (the reference's second interpolation);
    crops: (B, 4, C, P, P). Returns (B, C, T, T).
    """
    return alpha * upsample(whole, preset.target_size) + (1 - alpha) * stitch(crops, preset)
