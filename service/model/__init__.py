"""DHR-CLIP in plain torch + open_clip: backbone, V-V attention, prompts, tiling, scoring, checkpoints."""

from .backbone import BackboneError, BackboneInfo, load_backbone, random_backbone
from .checkpoint import CheckpointError, PromptCheckpoint, import_reference, load_checkpoint, save_checkpoint
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
from .dhrclip import DHRCLIP, EXTRA_MAPS, DHROutput, dhr_maps, dtype_of
from .loader import ModelInfo, build_model, load_model, text_features_for
from .preprocess import Views, load_views, make_views, prepare_image, stack_views

__all__ = [
    "DHRCLIP",
    "EXTRA_MAPS",
    "IMAGE_SCORES",
    "LAYER_FEATURES",
    "PRECISIONS",
    "PRESETS",
    "BackboneError",
    "BackboneInfo",
    "CheckpointError",
    "DHRConfig",
    "DHROutput",
    "ImageScore",
    "ImageScores",
    "LayerFeatures",
    "ModelInfo",
    "Precision",
    "Preset",
    "PresetName",
    "PromptCheckpoint",
    "Views",
    "build_model",
    "dhr_maps",
    "dtype_of",
    "get_preset",
    "import_reference",
    "load_backbone",
    "load_checkpoint",
    "load_model",
    "load_views",
    "make_views",
    "prepare_image",
    "random_backbone",
    "save_checkpoint",
    "stack_views",
    "text_features_for",
]
