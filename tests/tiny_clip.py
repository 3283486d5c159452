"""A tiny random CLIP built from ``tests/tiny_clip.json``: model tests that need some CLIP, not the golden one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

CONFIG = json.loads((Path(__file__).with_name("tiny_clip.json")).read_text())


def tiny_backbone(seed: int = 0, **vision: int) -> CLIP:
    """fp32, eval, frozen; ``vision`` overrides entries of ``vision_cfg`` (e.g. ``layers=6``)."""
    torch.manual_seed(seed)
    vision_cfg = CLIPVisionCfg(**{**CONFIG["vision_cfg"], **vision})
    text_cfg = CLIPTextCfg(**CONFIG["text_cfg"])
    model = CLIP(CONFIG["embed_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=CONFIG["quick_gelu"])
    return model.float().eval().requires_grad_(False)
