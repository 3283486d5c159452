"""DHR-CLIP in plain torch + open_clip: backbone, V-V attention, prompts, tiling, scoring, checkpoints."""

from .backbone import BackboneError, BackboneInfo, load_backbone, random_backbone, tiny_backbone
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
    "BackboneError",
    "BackboneInfo",
    "load_backbone",
    "random_backbone",
    "tiny_backbone",
    "CheckpointError",
    "PromptCheckpoint",
    "import_reference",
    "load_checkpoint",
    "save_checkpoint",
    "IMAGE_SCORES",
    "LAYER_FEATURES",
    "PRECISIONS",
    "PRESETS",
    "ImageScore",
    "ImageScores",
    "LayerFeatures",
    "Precision",
    "PresetName",
    "DHRConfig",
    "Preset",
    "get_preset",
    "DHRCLIP",
    "EXTRA_MAPS",
    "DHROutput",
    "dhr_maps",
    "dtype_of",
    "ModelInfo",
    "build_model",
    "load_model",
    "text_features_for",
    "Views",
    "load_views",
    "make_views",
    "prepare_image",
    "stack_views",
]
