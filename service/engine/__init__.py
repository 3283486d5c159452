"""Inference engine: decode/preprocess, dynamic batcher, runner (device, precision, warm-up), postprocess.

The API reaches the model only through this package (``api -> engine -> model``): loading, device resolution and
the names of the model's choices are re-exported here. The choice tables come with the package; the rest loads
torch on first use (``service/lazy.py``).
"""

from service.lazy import lazy_exports
from service.model import IMAGE_SCORES, PRECISIONS, PRESETS, ImageScore, ImageScores, Precision, PresetName
from service.model.config import BACKENDS, PRECISION_CHOICES, BackendName, PrecisionChoice

__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "service.model": ("DHRCLIP", "ModelInfo", "load_model"),
        "service.model.devices": ("resolve_device",),
        "service.model.weights": ("WeightsChoice", "WeightsError", "find_weights"),
        "service.engine.backends": ("load_for_backend",),
    },
)

__all__ = [
    "BACKENDS",
    "DHRCLIP",
    "IMAGE_SCORES",
    "PRECISIONS",
    "PRECISION_CHOICES",
    "PRESETS",
    "BackendName",
    "ImageScore",
    "ImageScores",
    "ModelInfo",
    "Precision",
    "PrecisionChoice",
    "PresetName",
    "WeightsChoice",
    "WeightsError",
    "find_weights",
    "load_for_backend",
    "load_model",
    "resolve_device",
]
