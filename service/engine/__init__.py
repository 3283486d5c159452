"""Inference engine: decode/preprocess, dynamic batcher, runner (device, precision, warm-up), postprocess.

The API reaches the model only through this package (``api -> engine -> model``): loading, device resolution and
the names of the model's choices are re-exported here.
"""

from service.model import (
    DHRCLIP,
    IMAGE_SCORES,
    PRECISIONS,
    PRESETS,
    ImageScore,
    ImageScores,
    ModelInfo,
    Precision,
    PresetName,
    load_model,
)
from service.model.devices import resolve_device
from service.model.weights import WeightsChoice, WeightsError, find_weights

__all__ = [
    "DHRCLIP",
    "IMAGE_SCORES",
    "PRECISIONS",
    "PRESETS",
    "ImageScore",
    "ImageScores",
    "ModelInfo",
    "Precision",
    "PresetName",
    "WeightsChoice",
    "WeightsError",
    "find_weights",
    "load_model",
    "resolve_device",
]
