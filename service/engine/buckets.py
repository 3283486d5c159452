"""Bucketed batch sizes for a compiled vision tower: a batch of ``n`` images runs padded to ``bucket_for(n)``.

``torch.compile(dynamic=False)`` (and a CUDA graph) specialises on the batch size; padding every batch to one of a
few sizes bounds the number of compiled graphs to ``len(buckets)``, all made at warm-up::

    batch_buckets(B) = (1, 2, 4, ..., 2^k) with 2^k < B, then B          e.g. B = 12 -> (1, 2, 4, 8, 12)
    bucket_for(n)    = min(b in buckets, b >= n)

Padding rows repeat the batch's last image (``stack_views(rows=)``: real pixels, no special case in the model) and
are dropped from the features before scoring (``ModelRunner.run``), so results never see them.
"""

from __future__ import annotations

import torch

from service.model import DHRCLIP


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return (*out, max_batch)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding ``n`` images (``n`` itself beyond the largest: never truncated)."""
    return next((b for b in buckets if b >= n), n)


def compile_tower(model: DHRCLIP, mode: str, max_batch: int, backend: str = "inductor") -> None:
    """Put ``model``'s torch vision path under ``torch.compile(mode=mode, dynamic=False)`` (in place).

    Raises ValueError for a model whose vision path is an exported graph (nothing of torch to compile). The
    per-function recompile limit is raised to the number of buckets, so every bucket keeps its graph. ``backend``
    other than inductor (tests: "eager", tracing only) ignores ``mode``.
    """
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, torch.nn.Module) or not hasattr(encoder, "tower"):
        raise ValueError("DHR_COMPILE applies to the torch backend's vision tower; this model has none")
    from torch._dynamo import config as cfg

    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), len(batch_buckets(max_batch)) + 2))
    options = {"mode": mode} if backend == "inductor" else {}
    model.encoder = torch.compile(encoder, backend=backend, dynamic=False, **options)
