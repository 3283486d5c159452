"""Blocking helpers of the product-knowledge routes: memories from the store to the device, rebuilds, leave-one-out.

Every function here runs in a worker thread (``asyncio.to_thread``); none of them knows the request.
"""

from __future__ import annotations

import torch

from service.engine.knowledge import (
    NormalMemory,
    build_memory,
    features_from_bytes,
    memory_from_bytes,
    memory_to_bytes,
    memory_version,
    model_key,
)
from service.engine.runner import Engine
from service.inspection import Thresholds
from service.storage import InspectionStore, ProductProfile
from service.storage.models import MemoryInfo

from .problems import Problem


def profile_thresholds(profile: ProductProfile) -> Thresholds:
    return Thresholds(image=profile.image_threshold, pixel=profile.pixel_threshold, review=profile.review_threshold)


def product_memory(engine: Engine, store: InspectionStore, profile: ProductProfile) -> NormalMemory | None:
    """The product's memory on the model's device (loaded from the store on first use), None without one."""
    version = profile.memory_version
    if version is None:
        return None
    return engine.memories.get(version, lambda: memory_from_bytes(store.read_memory(version)))


def reference_features(
    engine: Engine, store: InspectionStore, product: str, without: str | None = None
) -> tuple[list[str], list]:
    """Ids and stored features of a product's references (but ``without``); 409 when some were analysed by another
    model."""
    key = model_key(engine.info)
    refs = [r for r in store.list_references(product) if r.id != without]
    foreign = [r.id for r in refs if r.model_key != key]
    if foreign:
        raise Problem(
            409,
            "References of another model",
            f"{len(foreign)} reference(s) of {product!r} (first {foreign[0]}) were analysed by another model; "
            "delete and upload them again",
            "references-of-another-model",
        )
    return [r.id for r in refs], [features_from_bytes(store.read_reference_features(r.id)) for r in refs]


def rebuild_memory(engine: Engine, store: InspectionStore, product: str, without: str | None = None) -> ProductProfile:
    """Make the product's memory match its references (but ``without``, about to be removed; none: no memory);
    returns the updated profile."""
    ids, features = reference_features(engine, store, product, without)
    if not ids:
        return store.set_memory(product, None)
    cap = engine.cfg.memory_max_tokens
    version = memory_version(model_key(engine.info), ids, cap)
    profile = store.get_product(product)
    if profile is not None and profile.memory_version == version:
        return profile
    memory = build_memory(features, cap)
    info = MemoryInfo(
        version=version,
        product=product,
        model_key=model_key(engine.info),
        n_references=len(ids),
        tokens=memory.size,
        nbytes=memory.nbytes,
    )
    return store.set_memory(product, info, memory_to_bytes(memory))


@torch.inference_mode()
def leave_one_out(engine: Engine, store: InspectionStore, profile: ProductProfile) -> list[tuple]:
    """Each reference scored against a memory of the others: ``[(ImageScores, (T, T) map)]`` in reference order.

    Needs at least 2 references (422 otherwise). Runs ``model.score`` on the stored features, no vision pass.
    """
    ids, features = reference_features(engine, store, profile.name)
    if len(ids) < 2:
        raise Problem(
            422,
            "Too few references",
            f"leave-one-out calibration needs at least 2 references of {profile.name!r}, found {len(ids)}",
            "too-few-references",
        )
    model, dev, cap = engine.model, engine.model.device, engine.cfg.memory_max_tokens
    out = []
    for i, (whole, crops) in enumerate(features):
        memory = build_memory(features[:i] + features[i + 1 :], cap).to(dev)
        w, c = (type(f)(f.tokens.to(dev), f.cls.to(dev)) for f in (whole, crops))
        result = model.score(w, c, (), memory, profile.fusion_weight)
        scores = type(result.scores())(*(float(v[0]) for v in result.scores()))
        out.append((scores, result.anomaly_map[0].clamp(0, 1).float().cpu().numpy()))
    return out
