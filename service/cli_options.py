"""Options shared by the sub-commands that load a model (``predict``, ``train``, ``evaluate``), defined once.

Choices come from the model's tables (``PRESETS``, ``PRECISIONS``); backbone and prompts default to the
``model_weights/`` folder by the rule of :mod:`service.model.weights`, the same one the service follows. Only
argparse is imported at module level: the model is imported when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from service.model.config import BACKENDS, PRECISION_CHOICES, PRECISIONS, PRESETS

DEFAULT_DEVICE = "auto"


def add_model_arguments(
    parser: argparse.ArgumentParser,
    prompts: bool = True,
    precision_help: str = "",
    backend: bool = False,
    precision_default: str = "auto",
) -> None:
    """The ``model`` option group: --backbone, --prompts (unless ``prompts=False``), --model-weights-dir, --preset,
    --device, --precision, --allow-download; with ``backend``: --backend and --export-dir (inference commands).

    ``precision_default`` "auto" (inference) offers ``auto`` as well; a concrete default (training, export) does not.
    """
    from service.model.weights import DEFAULT_WEIGHTS_DIR

    group = parser.add_argument_group("model")
    group.add_argument(
        "--backbone",
        default=None,
        help="CLIP weights: a file (OpenAI .pt, TorchScript, open_clip checkpoint) or 'openai' (cache); "
        "default: the one file in MODEL_WEIGHTS_DIR/backbone/, else 'openai'",
    )
    if prompts:
        group.add_argument(
            "--prompts",
            default=None,
            help="prompt checkpoint file or directory, or 'ensemble'; default: the newest checkpoint in "
            "MODEL_WEIGHTS_DIR/prompts/, else 'ensemble'",
        )
    group.add_argument(
        "--model-weights-dir",
        default=str(DEFAULT_WEIGHTS_DIR),
        help=f"where unset --backbone / --prompts are looked up (default {DEFAULT_WEIGHTS_DIR})",
    )
    group.add_argument("--preset", choices=tuple(PRESETS), default="mvtec", help="S/P/T geometry (default mvtec)")
    group.add_argument(
        "--device", default=DEFAULT_DEVICE, help="auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"
    )
    group.add_argument(
        "--precision",
        choices=PRECISION_CHOICES if precision_default == "auto" else PRECISIONS,
        default=precision_default,
        help=precision_help
        or "vision tower precision (default auto: bf16 on CUDA, fp32 elsewhere, the reference-parity path)",
    )
    group.add_argument("--allow-download", action="store_true", help="let open_clip download the 'openai' weights")
    if backend:
        group.add_argument(
            "--backend",
            choices=BACKENDS,
            default="torch",
            help="what runs the vision path (default torch); the others run a model written by `dhrclip export`",
        )
        group.add_argument(
            "--export-dir",
            default=None,
            help="the exported model of a non-torch backend (default: MODEL_WEIGHTS_DIR/export)",
        )


def load_model_from_args(args: argparse.Namespace):
    """``(DHRCLIP, ModelInfo)`` for the options of :func:`add_model_arguments`, weights found as the service does."""
    from service.model.weights import find_weights

    choice = find_weights(args.backbone, getattr(args, "prompts", None), args.model_weights_dir, args.device)
    backend = getattr(args, "backend", "torch")
    if backend == "torch":
        return choice.load(preset=args.preset, precision=args.precision, allow_download=args.allow_download)
    from service.engine import load_for_backend

    return load_for_backend(
        backend,
        choice,
        device=args.device,
        export_dir=args.export_dir or Path(args.model_weights_dir) / "export",
        preset=args.preset,
        precision=args.precision,
    )
