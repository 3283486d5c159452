"""Few-shot protocol: K good train images per class as references, their normal memory for ``evaluate``.

The K images of a class are the first K of a seeded permutation of its good train samples (``numpy`` default_rng
of ``seed``), so a run is reproducible and a different ``--shot-seed`` draws other shots.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from service.data import Sample, read_image
from service.errors import UserError
from service.model import load_views, stack_views
from service.model.memory import DEFAULT_MAX_TOKENS, NormalMemory, cap_memory, memory_from_features


def pick_shots(train: Sequence[Sample], shots: int, seed: int) -> list[Sample]:
    """K good samples of one class (seeded permutation); UserError when the class has fewer than K."""
    good = [s for s in train if not s.anomaly]
    if len(good) < shots:
        name = train[0].cls_name if train else "?"
        raise UserError(f"class {name!r} has {len(good)} good train images; --shots {shots} needs {shots}")
    order = np.random.default_rng(seed).permutation(len(good))
    return [good[i] for i in order[:shots]]


@torch.inference_mode()
def shot_memory(model, samples: Sequence[Sample], max_tokens: int = DEFAULT_MAX_TOKENS) -> NormalMemory:
    """The normal memory of ``samples`` (one vision pass each, batched), on the model's device."""
    views = [load_views(read_image(s.img_path), model.cfg.preset) for s in samples]
    whole, crops = model.encode_views(*stack_views(views))
    return cap_memory(memory_from_features(whole, crops), max_tokens)


def few_shot_memories(
    model, train_by_class: dict[str, list[Sample]], classes: Sequence[str], shots: int, seed: int = 0
) -> dict[str, NormalMemory]:
    """``{cls: memory}`` of K shots for every class in ``classes`` (UserError for a class without train images)."""
    out = {}
    for cls in classes:
        if cls not in train_by_class:
            raise UserError(f"class {cls!r} has no train images for --shots {shots}")
        out[cls] = shot_memory(model, pick_shots(train_by_class[cls], shots, seed))
    return out
