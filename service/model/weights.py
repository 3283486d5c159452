"""Which weights to load when none are named: the ``model_weights/`` folder, else the built-in defaults.

One rule for every entry point (``dhrclip serve`` reads the names from ``DHR_*`` settings, ``dhrclip predict`` /
``evaluate`` from ``--backbone`` / ``--prompts`` / ``--model-weights-dir``); each failure is one line saying what is
missing and how to provide it:

- backbone: the given name if any (a file, or ``"openai"`` for the open_clip cache); otherwise the single file in
  ``<weights_dir>/backbone/`` (dot-files such as ``.gitkeep`` ignored); with no file there, ``"openai"``; with
  several files there, an error naming them (never a guess between two backbones).
- prompts: the given name if any (a checkpoint file, a directory, or ``"ensemble"``); otherwise
  ``<weights_dir>/prompts/`` when it holds a ``*.safetensors`` or ``*.pth`` checkpoint (the newest one is loaded,
  by :func:`~service.model.load_checkpoint`'s directory rule); otherwise the hand-written prompt ensemble, which the
  service reports as ``prompts_kind: "ensemble"``.
- device: ``auto`` means ``cuda`` when torch sees a CUDA device, else ``cpu``; an explicit ``cuda`` without one is
  an error, never a silent switch to the CPU (:func:`~service.model.devices.resolve_device`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.errors import UserError

DEFAULT_WEIGHTS_DIR = Path("model_weights")
PROMPT_SUFFIXES = (".safetensors", ".pth")


class WeightsError(UserError, RuntimeError):
    """The names and ``model_weights/`` do not name one usable set of weights; one line with the fix."""


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

    def load(self, *, preset: str = "mvtec", precision: str = "auto", allow_download: bool = False):
        """Blocking: ``(DHRCLIP, ModelInfo)`` of these weights on this device (:func:`~service.model.load_model`)."""
        from .loader import load_model

        return load_model(
            self.backbone,
            self.prompts,
            preset=preset,
            device=self.device,
            precision=precision,
            allow_download=allow_download,
        )


def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def find_backbone(backbone: str | None, weights_dir: Path) -> tuple[str, str]:
    """(backbone, source) following the module rules."""
    if backbone:
        return backbone, "setting"
    folder = Path(weights_dir) / "backbone"
    files = _visible_files(folder)
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise WeightsError(
            f"{folder} holds {len(files)} files ({names}); keep one backbone there or set "
            "DHR_BACKBONE / --backbone to the file to use"
        )
    return (str(files[0]), "model_weights") if files else ("openai", "default")


def find_prompts(prompts: str | None, weights_dir: Path) -> tuple[str, str]:
    """(prompts, source) following the module rules."""
    if prompts:
        return prompts, "setting"
    folder = Path(weights_dir) / "prompts"
    if any(p.suffix in PROMPT_SUFFIXES for p in _visible_files(folder)):
        return str(folder), "model_weights"
    return "ensemble", "default"


def find_weights(
    backbone: str | None,
    prompts: str | None,
    weights_dir: str | Path = DEFAULT_WEIGHTS_DIR,
    device: str | None = "auto",
    device_label: str = "--device",
) -> WeightsChoice:
    """Resolve backbone, prompts and device (raises WeightsError, or a UserError for a device that is absent)."""
    b, b_src = find_backbone(backbone, Path(weights_dir))
    p, p_src = find_prompts(prompts, Path(weights_dir))
    from .devices import resolve_device  # torch: imported when weights are chosen, not by option parsers

    return WeightsChoice(b, b_src, p, p_src, resolve_device(device, device_label))
