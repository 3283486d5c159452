"""Product knowledge on the engine side: reference features and memories as bytes, versions, the device cache.

Bytes (safetensors, float32) are what the store keeps:

    reference features: whole_tokens (1, nl, Ls, D), whole_cls (1, D), crop_tokens (1, 4, nl, Lp, D), crop_cls (1, 4, D)
    memory:             whole (nl, Kw, D), crops (nl, Kc, D)  (unit rows, see ``service.model.memory``)

``model_key`` names what the features depend on (backbone weights, preset, layer mode, precision; not the prompts):
stored features of another model are not mixed into a memory. ``memory_version`` is a hash of the model key, the
reference ids in order and the token cap, so every replica derives the same version for the same references.

The cache keeps the memories of the most recently used products on the model's device (``capacity`` products,
least recently used evicted); a memory is loaded from the store on first use.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
from safetensors.torch import load, save

from service.model import ModelInfo
from service.model.memory import (
    DEFAULT_FUSION_WEIGHT,
    DEFAULT_MAX_TOKENS,
    NormalMemory,
    cap_memory,
    concat_memories,
    memory_from_features,
)
from service.model.vision import VisionFeatures

__all__ = [
    "DEFAULT_FUSION_WEIGHT",
    "DEFAULT_MAX_TOKENS",
    "MemoryCache",
    "NormalMemory",
    "build_memory",
    "features_from_bytes",
    "features_to_bytes",
    "memory_from_bytes",
    "memory_to_bytes",
    "memory_version",
    "model_key",
]

_FEATURE_KEYS = ("whole_tokens", "whole_cls", "crop_tokens", "crop_cls")


def model_key(info: ModelInfo) -> str:
    """sha256 (16 hex) of what patch features depend on: backbone hash, preset, layer mode, precision."""
    parts = (info.backbone, info.backbone_sha256, info.preset, info.layer_features, info.precision)
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def memory_version(key: str, reference_ids: list[str], max_tokens: int) -> str:
    """sha256 (16 hex) of the model key, the reference ids in order and the token cap."""
    return hashlib.sha256(f"{key}|{max_tokens}|{','.join(reference_ids)}".encode()).hexdigest()[:16]


def features_to_bytes(whole: VisionFeatures, crops: VisionFeatures) -> bytes:
    """Features of one image (batch of 1) -> safetensors bytes."""
    tensors = (whole.tokens, whole.cls, crops.tokens, crops.cls)
    return save({k: t.detach().float().cpu().contiguous() for k, t in zip(_FEATURE_KEYS, tensors, strict=True)})


def features_from_bytes(data: bytes) -> tuple[VisionFeatures, VisionFeatures]:
    t = load(data)
    return VisionFeatures(t["whole_tokens"], t["whole_cls"]), VisionFeatures(t["crop_tokens"], t["crop_cls"])


def memory_to_bytes(memory: NormalMemory) -> bytes:
    return save({"whole": memory.whole.float().cpu().contiguous(), "crops": memory.crops.float().cpu().contiguous()})


def memory_from_bytes(data: bytes) -> NormalMemory:
    t = load(data)
    return NormalMemory(t["whole"], t["crops"])


def build_memory(features: list[tuple[VisionFeatures, VisionFeatures]], max_tokens: int) -> NormalMemory:
    """Memory of the given reference features (in order), capped at ``max_tokens`` per layer and view kind."""
    return cap_memory(concat_memories([memory_from_features(w, c) for w, c in features]), max_tokens)


class MemoryCache:
    """Memories on the model's device by version, at most ``capacity`` of them (least recently used evicted)."""

    def __init__(self, device: torch.device | str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"memory cache capacity must be >= 1, got {capacity}")
        self.device, self.capacity = torch.device(device), capacity
        self._items: OrderedDict[str, NormalMemory] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, version: str, load_cpu: Callable[[], NormalMemory]) -> NormalMemory:
        """The memory of ``version`` on the device, loaded with ``load_cpu()`` when not cached (blocking)."""
        with self._lock:
            if version in self._items:
                self._items.move_to_end(version)
                return self._items[version]
        memory = load_cpu().to(self.device)
        with self._lock:
            self._items[version] = memory
            self._items.move_to_end(version)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return memory

    def versions(self) -> list[str]:
        """Cached versions, least recently used first."""
        with self._lock:
            return list(self._items)
