"""Assemble a ready DHR-CLIP model from a backbone and prompts, and describe what was loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .backbone import BackboneInfo, load_backbone
from .checkpoint import PromptCheckpoint, load_checkpoint
from .config import DHRConfig, get_preset, resolve_precision
from .devices import resolve_device
from .dhrclip import DHRCLIP
from .prompts import encode_ensemble, encode_learned


@dataclass(frozen=True)
class ModelInfo:
    backbone: str
    backbone_sha256: str
    prompts: str  # "ensemble" or the checkpoint id
    prompts_sha256: str | None
    prompts_kind: str  # "learned" | "ensemble"
    preset: str
    precision: str
    device: str
    layer_features: str
    backend: str = "torch"  # what runs the vision path (service.engine.backends)
    quantization: str | None = None  # "int8" for a quantised export

    def to_dict(self) -> dict:
        return asdict(self)


def text_features_for(
    clip, prompts: PromptCheckpoint | str, device: str | torch.device = "cpu", class_name: str = "object"
) -> torch.Tensor:
    """(2, D) unit text features [normal, anomalous], computed once in fp32 with the text tower."""
    dev = torch.device(device)
    moved = dev.type != "cpu"
    if moved:
        clip.to(dev)
    try:
        with torch.no_grad():
            if isinstance(prompts, str):
                if prompts != "ensemble":
                    raise ValueError(f"prompts must be a checkpoint or 'ensemble', got {prompts!r}")
                raw = encode_ensemble(clip, class_name)
            else:
                prompts.check_width(clip.ln_final.weight.shape[0])
                raw = encode_learned(clip, prompts.learner().to(dev), class_name)
    finally:
        if moved:
            clip.to("cpu")
    return F.normalize(raw.float(), dim=-1).cpu()


def build_model(
    clip,
    prompts: PromptCheckpoint | str,
    *,
    preset: str = "mvtec",
    device: str = "cpu",
    precision: str = "fp32",
    backbone_info: BackboneInfo | None = None,
    **overrides,
) -> tuple[DHRCLIP, ModelInfo]:
    """A DHRCLIP on ``device`` holding ``clip.visual`` and the cached text features; the text tower stays behind.

    ``layer_features`` comes from the checkpoint's metadata (a checkpoint is served the way it was trained);
    ``precision`` "auto" is resolved for the device (:func:`~service.model.config.resolve_precision`).
    """
    learned = not isinstance(prompts, str)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    cfg = DHRConfig(preset=get_preset(preset), **overrides)
    if learned and "layer_features" not in overrides:
        cfg = cfg.with_(layer_features=prompts.layer_features)
    text = text_features_for(clip, prompts, device)
    model = DHRCLIP(clip.visual, text, cfg, precision).to(device).eval()
    info = ModelInfo(
        backbone=backbone_info.name if backbone_info else "in-memory",
        backbone_sha256=backbone_info.sha256 if backbone_info else "",
        prompts=prompts.id if learned else "ensemble",
        prompts_sha256=prompts.sha256 if learned else None,
        prompts_kind="learned" if learned else "ensemble",
        preset=preset,
        precision=precision,
        device=str(device),
        layer_features=cfg.layer_features,
    )
    return model, info


def load_model(
    backbone: str | Path,
    prompts: str | Path,
    *,
    preset: str = "mvtec",
    device: str = "auto",
    precision: str = "auto",
    allow_download: bool = False,
    **overrides,
) -> tuple[DHRCLIP, ModelInfo]:
    """From files: ``backbone`` a CLIP file or ``"openai"``; ``prompts`` a checkpoint file/dir or ``"ensemble"``."""
    device = resolve_device(device)
    ck = "ensemble" if str(prompts) == "ensemble" else load_checkpoint(prompts)
    clip, binfo = load_backbone(backbone, allow_download=allow_download)
    return build_model(clip, ck, preset=preset, device=device, precision=precision, backbone_info=binfo, **overrides)
