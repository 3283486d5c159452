"""Which weights the service loads, decided once at start-up from the settings and ``model_weights/``.

The rule is the model package's (:mod:`service.model.weights`, shared with ``dhrclip predict`` / ``evaluate``):
``DHR_BACKBONE`` / ``DHR_PROMPTS`` when set, else what ``DHR_MODEL_WEIGHTS_DIR`` holds, else ``"openai"`` and the
prompt ensemble; ``DHR_DEVICE=auto`` means ``cuda`` when torch sees a CUDA device, else ``cpu``.
"""

from __future__ import annotations

import logging

from service.engine import DHRCLIP, ModelInfo, WeightsChoice, WeightsError, find_weights, load_for_backend

from .settings import Settings

logger = logging.getLogger("dhrclip.api")

__all__ = ["WeightsChoice", "WeightsError", "choose_weights", "load_weights"]


def choose_weights(settings: Settings) -> WeightsChoice:
    """Resolve backbone, prompts and device (raises WeightsError, or a UserError for a device that is absent)."""
    first = settings.devices[0]  # replicas on the other devices are the engine's (EngineConfig.devices)
    return find_weights(settings.backbone, settings.prompts, settings.model_weights_dir, first, "DHR_DEVICE")


def load_weights(settings: Settings) -> tuple[DHRCLIP, ModelInfo, WeightsChoice]:
    """Blocking: choose and load the model (seconds to a minute; call it in a thread).

    Raises WeightsError, ``BackboneError`` (missing/unreadable backbone, one line with the fix) or
    ``CheckpointError`` (unusable prompt checkpoint), all :class:`~service.errors.UserError`.
    """
    choice = choose_weights(settings)
    logger.info("loading model: %s, backend %s", choice.describe(), settings.backend)
    model, info = load_for_backend(
        settings.backend,
        choice,
        device=settings.devices[0],
        export_dir=settings.export_dir or settings.model_weights_dir / "export",
        preset=settings.preset,
        precision=settings.precision,
        allow_download=settings.allow_download,
        label="DHR_BACKEND",
    )
    if choice.prompts_source == "default" and settings.backend == "torch":
        logger.warning(
            "no prompt checkpoint in %s: serving the zero-shot prompt ensemble (prompts_kind=ensemble)",
            settings.model_weights_dir / "prompts",
        )
    return model, info, choice
