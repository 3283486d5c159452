"""Model configuration: DHR presets and the one frozen config passed whole through the model package."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Generic, Literal, NamedTuple, TypeVar

from service.errors import UserError

# Each choice of the model is named once, here; Literal types, argparse choices, OpenAPI enums and settings
# validation all derive from these tables.
LAYER_FEATURES = ("final", "per_layer")
DEFAULT_FUSION_WEIGHT = 0.5  # w of w * zero-shot + (1 - w) * few-shot (normal memory), per product
LayerFeatures = Literal[LAYER_FEATURES]
# precision name -> torch dtype name: the vision tower's matmul dtype (LayerNorms, the residual streams and the
# output projection always run in fp32, see service.model.vision)
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRECISIONS = tuple(PRECISION_DTYPES)
Precision = Literal[PRECISIONS]
# "auto" (the default of the service and the inference commands): chosen by the device type, from this table;
# any device type not listed runs fp32, so the CPU stays the reference-parity path
AUTO_PRECISION = {"cuda": "bf16"}
PRECISION_CHOICES = ("auto", *PRECISIONS)
PrecisionChoice = Literal[PRECISION_CHOICES]

T = TypeVar("T")


class ImageScores(NamedTuple, Generic[T]):
    """The image-score variants (Part A item 5); each a float, a (B,) tensor or an (N,) array.

    ``reference``: softmax of the mixed CLS similarities; ``map_max``: max of the service map; ``map_topk``: mean
    of its top ``topk_fraction`` pixels. A variant's value is ``getattr(scores, variant)``.
    """

    reference: T
    map_max: T
    map_topk: T


IMAGE_SCORES: tuple[str, ...] = ImageScores._fields
ImageScore = Literal[IMAGE_SCORES]


@dataclass(frozen=True)
class Preset:
    """Dynamic-high-resolution geometry.

    The image is squashed to ``target_size`` T x T; the whole view is that image resized to ``image_size`` S;
    four ``crop_size`` P crops are cut at offsets 0 and T - P (spec Part A item 3). Requires T/2 <= P <= T.
    """

    name: str
    image_size: int  # S
    crop_size: int  # P (not the ViT's 14-pixel patch)
    target_size: int  # T

    def __post_init__(self):
        s, p, t = self.image_size, self.crop_size, self.target_size
        if not (2 * p >= t and p <= t):
            raise ValueError(f"preset {self.name}: need T/2 <= P <= T, got P={p}, T={t}")
        if s % 14 or p % 14:
            raise ValueError(f"preset {self.name}: S={s} and P={p} must be multiples of the ViT patch size 14")

    @property
    def crop_offsets(self) -> tuple[int, int]:
        """Top/left offsets of the crops along one axis: (0, T - P)."""
        return (0, self.target_size - self.crop_size)

    @property
    def one_batch(self) -> bool:
        """Whole view and crops share a size, so all 5 views go through the tower as one batch."""
        return self.image_size == self.crop_size


PRESETS: dict[str, Preset] = {
    "mvtec": Preset("mvtec", 336, 336, 672),
    "visa": Preset("visa", 518, 518, 1024),
    "fast": Preset("fast", 336, 224, 448),
}
PresetName = Literal[tuple(PRESETS)]
# what runs the vision path: torch here, or an exported graph (service.engine.backends holds each one's needs)
BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
BackendName = Literal[BACKENDS]


def resolve_precision(precision: str, device: str) -> str:
    """A concrete precision: ``auto`` -> :data:`AUTO_PRECISION` of the device type (``cuda:1`` -> ``cuda``), else
    fp32; any other name is returned as it is."""
    if precision != "auto":
        return precision
    return AUTO_PRECISION.get(str(device).split(":")[0], "fp32")


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class DHRConfig:
    """Everything that decides the numbers, besides the weights (spec Part A items 1-7)."""

    preset: Preset = field(default_factory=lambda: PRESETS["mvtec"])
    dpam: int = 20  # the last dpam - 1 vision blocks run the V-V dual path (reference: 19 of 24)
    features_list: tuple[int, ...] = (6, 12, 18, 24)  # 1-based layers summed into the raw map
    layer_features: LayerFeatures = "final"  # "final": every layer reads y^24 (reference); "per_layer": true y^l
    alpha: float = 0.75  # weight of the whole view against the crop canvas
    temperature: float = 0.07
    sigma: float = 8.0
    topk_fraction: float = 0.01  # map_topk image score: mean of the top 1 % of the smoothed map

    def __post_init__(self):
        if self.layer_features not in LAYER_FEATURES:
            raise ValueError(f"layer_features must be one of {LAYER_FEATURES}, got {self.layer_features!r}")
        if not self.features_list:
            raise ValueError("features_list must name at least one layer")

    def with_(self, **changes) -> DHRConfig:
        return replace(self, **changes)
