"""Segmentation losses of DHR-CLIP prompt training (spec B §5.3), on 2-channel probability maps.

``probs`` is ``(B, 2, H, W)`` with channel 0 = normal and channel 1 = anomalous probability (already a softmax; no
non-linearity is applied here); ``target`` is ``(B, H, W)`` with values in {0, 1}. The batch dimension is always
kept, also for ``B = 1`` (the reference's ``gt.squeeze()`` drops it; a ``(H, W)`` target raises here).

Focal loss (gamma = 2, alpha = 1 for both classes), over the ``M = B*H*W`` pixels::

    y_c = clamp(onehot(target)_c, 1e-5, 1 - 1e-5)      pt = sum_c y_c * p_c + 1e-5
    focal = mean_pixels( -(1 - pt)^gamma * log(pt) )

Dice loss, per sample ``b`` over its pixels, smoothing 1::

    d_b = (2 * sum(p * g) + 1) / (sum(p) + sum(g) + 1)      dice = 1 - mean_b d_b

Segmentation loss: ``focal(probs, g) + dice(probs[:, 1], g) + dice(probs[:, 0], 1 - g)``.
"""

from __future__ import annotations

import torch

CLAMP = 1e-5  # one-hot clamp and pt smoothing of the focal loss
DICE_SMOOTH = 1.0


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss of probabilities ``(B, 2, H, W)`` against a {0, 1} target ``(B, H, W)``; returns a scalar."""
    _check(probs, target)
    n_classes = probs.shape[1]
    flat = probs.permute(0, 2, 3, 1).reshape(-1, n_classes)  # (B*H*W, 2)
    onehot = torch.nn.functional.one_hot(target.reshape(-1).long(), n_classes).to(flat.dtype)  # (B*H*W, 2)
    onehot = onehot.clamp(CLAMP, 1.0 - CLAMP)
    pt = (onehot * flat).sum(dim=1) + CLAMP  # (B*H*W,)
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - mean_b d_b`` for a probability map ``(B, H, W)`` and a target ``(B, H, W)``; returns a scalar."""
    if prob.dim() != 3 or prob.shape != target.shape:
        raise ValueError(
            f"dice_loss needs prob and target of the same (B, H, W) shape, got {tuple(prob.shape)} "
            f"and {tuple(target.shape)}"
        )
    p = prob.reshape(prob.shape[0], -1)  # (B, H*W)
    g = target.reshape(target.shape[0], -1).to(p.dtype)  # (B, H*W)
    dice = (2.0 * (p * g).sum(dim=1) + DICE_SMOOTH) / (p.sum(dim=1) + g.sum(dim=1) + DICE_SMOOTH)  # (B,)
    return 1.0 - dice.mean()


def segmentation_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """One layer's training loss: ``focal(probs, g) + dice(probs[:, 1], g) + dice(probs[:, 0], 1 - g)``."""
    _check(probs, target)
    g = target.to(probs.dtype)  # (B, H, W)
    return focal_loss(probs, target, gamma) + dice_loss(probs[:, 1], g) + dice_loss(probs[:, 0], 1.0 - g)


def _check(probs: torch.Tensor, target: torch.Tensor) -> None:
    """Shapes ``(B, 2, H, W)`` / ``(B, H, W)`` and target values in {0, 1}; raise a clear ValueError otherwise."""
    if probs.dim() != 4 or probs.shape[1] != 2:
        raise ValueError(f"probs must be (B, 2, H, W), got {tuple(probs.shape)}")
    expected = (probs.shape[0], *probs.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"target must be (B, H, W) = {expected}, got {tuple(target.shape)} (was the batch squeezed?)")
    if not bool(((target == 0) | (target == 1)).all()):
        raise ValueError("target must hold only 0 and 1 (binarise the mask first)")
