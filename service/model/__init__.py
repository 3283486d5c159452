"""DHR-CLIP in plain torch + open_clip: backbone, V-V attention, prompts, tiling, scoring, checkpoints.

The choice tables of ``config`` (standard library only) are imported with the package; every other name loads its
module, and torch, on first use (``service/lazy.py``), so that argument parsers can read the tables cheaply.
"""

from service.lazy import lazy_exports

from .config import (
    IMAGE_SCORES,
    LAYER_FEATURES,
    PRECISIONS,
    PRESETS,
    DHRConfig,
    ImageScore,
    ImageScores,
    LayerFeatures,
    Precision,
    Preset,
    PresetName,
    get_preset,
)

_LAZY = {
    ".backbone": ("BackboneError", "BackboneInfo", "load_backbone", "random_backbone"),
    ".checkpoint": ("CheckpointError", "PromptCheckpoint", "import_reference", "load_checkpoint", "save_checkpoint"),
    ".dhrclip": ("DHRCLIP", "EXTRA_MAPS", "DHROutput", "dhr_maps", "dtype_of"),
    ".loader": ("ModelInfo", "build_model", "load_model", "text_features_for"),
    ".preprocess": ("Views", "load_views", "make_views", "prepare_image", "stack_views"),
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _LAZY)

__all__ = [
    "IMAGE_SCORES",
    "LAYER_FEATURES",
    "PRECISIONS",
    "PRESETS",
    "DHRConfig",
    "ImageScore",
    "ImageScores",
    "LayerFeatures",
    "Precision",
    "Preset",
    "PresetName",
    "get_preset",
    *(name for names in _LAZY.values() for name in names),
]
