"""Model configuration: DHR presets and the one frozen config passed whole through the model package."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

LAYER_FEATURES = ("final", "per_layer")
IMAGE_SCORES = ("reference", "map_max", "map_topk")


@dataclass(frozen=True)
class Preset:
    """Dynamic-high-resolution geometry.

    The image is squashed to ``target_size`` T x T; the whole view is that image resized to ``image_size`` S;
    four ``patch_size`` P crops are cut at offsets 0 and T - P (spec Part A item 3). Requires T/2 <= P <= T.
    """

    name: str
    image_size: int  # S
    patch_size: int  # P
    target_size: int  # T

    def __post_init__(self):
        s, p, t = self.image_size, self.patch_size, self.target_size
        if not (2 * p >= t and p <= t):
            raise ValueError(f"preset {self.name}: need T/2 <= P <= T, got P={p}, T={t}")
        if s % 14 or p % 14:
            raise ValueError(f"preset {self.name}: S={s} and P={p} must be multiples of the ViT patch size 14")

    @property
    def crop_offsets(self) -> tuple[int, int]:
        """Top/left offsets of the crops along one axis: (0, T - P)."""
        return (0, self.target_size - self.patch_size)

    @property
    def one_batch(self) -> bool:
        """Whole view and crops share a size, so all 5 views go through the tower as one batch."""
        return self.image_size == self.patch_size


PRESETS: dict[str, Preset] = {
    "mvtec": Preset("mvtec", 336, 336, 672),
    "visa": Preset("visa", 518, 518, 1024),
    "fast": Preset("fast", 336, 224, 448),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class DHRConfig:
    """Everything that decides the numbers, besides the weights (spec Part A items 1-7)."""

    preset: Preset = field(default_factory=lambda: PRESETS["mvtec"])
    dpam: int = 20  # the last dpam - 1 vision blocks run the V-V dual path (reference: 19 of 24)
    features_list: tuple[int, ...] = (6, 12, 18, 24)  # 1-based layers summed into the raw map
    layer_features: str = "final"  # "final": every layer reads y^24 (reference); "per_layer": true y^l
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
