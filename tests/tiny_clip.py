"""Tiny random CLIPs built from ``tests/tiny_clip.json``: model tests that need some CLIP, not the golden one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

CONFIGS = json.loads((Path(__file__).with_name("tiny_clip.json")).read_text())


def tiny_backbone(seed: int = 0, config: str = "tiny", **vision: int) -> CLIP:
    """fp32, eval, frozen; ``config`` names an entry of the JSON, ``vision`` overrides ``vision_cfg`` entries."""
    cfg = CONFIGS[config]
    torch.manual_seed(seed)
    vision_cfg = CLIPVisionCfg(**{**cfg["vision_cfg"], **vision})
    text_cfg = CLIPTextCfg(**cfg["text_cfg"])
    model = CLIP(cfg["embed_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=cfg["quick_gelu"])
    return model.float().eval().requires_grad_(False)
