"""Which weights the service loads, decided once at start-up from the settings and ``model_weights/``.

Rules (each failure is one line saying what is missing and how to provide it):

- backbone: ``DHR_BACKBONE`` if set (a file, or ``"openai"`` for the open_clip cache); otherwise the single file in
  ``<DHR_MODEL_WEIGHTS_DIR>/backbone/`` (dot-files such as ``.gitkeep`` ignored); with no file there, ``"openai"``;
  with several files there, an error naming them (the service never guesses between two backbones).
- prompts: ``DHR_PROMPTS`` if set (a checkpoint file, a directory, or ``"ensemble"``); otherwise
  ``<DHR_MODEL_WEIGHTS_DIR>/prompts/`` when it holds a ``*.safetensors`` or ``*.pth`` checkpoint (the newest one is
  loaded, by the model package's directory rule); otherwise the hand-written prompt ensemble, which ``/health``
  reports as ``prompts_kind: "ensemble"``.
- device: ``auto`` means ``cuda`` when torch sees a CUDA device, else ``cpu``; an explicit ``cuda`` without a
  CUDA device is an error, never a silent switch to the CPU (``service.engine.resolve_device``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from service.engine import DHRCLIP, ModelInfo, load_model, resolve_device

from .settings import Settings

logger = logging.getLogger("dhrclip.api")

PROMPT_SUFFIXES = (".safetensors", ".pth")


class WeightsError(RuntimeError):
    """The settings and ``model_weights/`` do not name one usable set of weights; one line with the fix."""


@dataclass(frozen=True)
class WeightsChoice:
    """What will be loaded and why (``*_source`` is "setting", "model_weights" or "default")."""

    backbone: str  # a file path or "openai"
    backbone_source: str
    prompts: str  # a file/dir path or "ensemble"
    prompts_source: str
    device: str  # resolved: "cpu", "cuda", "cuda:1", "mps"

    def describe(self) -> str:
        return (
            f"backbone={self.backbone} ({self.backbone_source}), prompts={self.prompts} "
            f"({self.prompts_source}), device={self.device}"
        )


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def resolve_backbone(settings: Settings) -> tuple[str, str]:
    """(backbone, source) following the module rules."""
    if settings.backbone:
        return settings.backbone, "setting"
    folder = settings.model_weights_dir / "backbone"
    files = _visible_files(folder)
    if len(files) == 1:
        return str(files[0]), "model_weights"
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise WeightsError(
            f"{folder} holds {len(files)} files ({names}); keep one backbone there or set "
            "DHR_BACKBONE to the file to use"
        )
    return "openai", "default"


def resolve_prompts(settings: Settings) -> tuple[str, str]:
    """(prompts, source) following the module rules."""
    if settings.prompts:
        return settings.prompts, "setting"
    folder = settings.model_weights_dir / "prompts"
    if any(p.suffix in PROMPT_SUFFIXES for p in _visible_files(folder)):
        return str(folder), "model_weights"
    return "ensemble", "default"


def choose_weights(settings: Settings) -> WeightsChoice:
    """Resolve backbone, prompts and device (raises WeightsError, or ValueError for a device that is absent)."""
    backbone, b_src = resolve_backbone(settings)
    prompts, p_src = resolve_prompts(settings)
    return WeightsChoice(backbone, b_src, prompts, p_src, resolve_device(settings.device, "DHR_DEVICE"))


def load_weights(settings: Settings) -> tuple[DHRCLIP, ModelInfo, WeightsChoice]:
    """Blocking: choose and load the model (seconds to a minute; call it in a thread).

    Raises WeightsError, ``service.model.BackboneError`` (missing/unreadable backbone, one line with the fix) or
    ``service.model.CheckpointError`` (unusable prompt checkpoint).
    """
    choice = choose_weights(settings)
    logger.info("loading model: %s", choice.describe())
    model, info = load_model(
        choice.backbone,
        choice.prompts,
        preset=settings.preset,
        device=choice.device,
        precision=settings.precision,
        allow_download=settings.allow_download,
    )
    if choice.prompts_source == "default":
        logger.warning(
            "no prompt checkpoint in %s: serving the zero-shot prompt ensemble (prompts_kind=ensemble)",
            settings.model_weights_dir / "prompts",
        )
    return model, info, choice
