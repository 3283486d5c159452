"""Training settings and the names of their choices: standard library only, so that ``dhrclip train`` defines its
options (and their defaults) without loading torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.errors import UserError
from service.model.config import PRECISIONS

CACHE_MODES = ("memory", "disk", "none")
# storage dtype of the cached view features: name -> torch dtype name
FEATURE_DTYPE_NAMES = {"fp16": "float16", "fp32": "float32"}


class TrainError(UserError):
    """A training run that cannot start or resume; one line saying why."""


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 15
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    eps: float = 1e-8
    seed: int = 111
    n_ctx: int = 12
    depth: int = 9
    t_n_ctx: int = 4
    device: str = "cpu"
    precision: str = "fp32"  # frozen vision tower only; the text side is always fp32
    feature_dtype: str = "fp16"  # storage of the view features (all cache modes round to it)
    cache: str = "memory"  # "memory" | "disk" | "none"
    cache_dir: str | None = None

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.lr < math.inf:  # NaN fails the comparison too
            raise TrainError(
                f"need epochs >= 1, batch_size >= 1 and lr > 0 (finite), got {self.epochs}, {self.batch_size}, "
                f"{self.lr}"
            )
        if self.n_ctx < 1 or self.depth < 1 or not 0 <= self.t_n_ctx <= self.n_ctx:
            raise TrainError(
                f"need n_ctx >= 1, depth >= 1 and 0 <= t_n_ctx <= n_ctx, got {self.n_ctx}, {self.depth}, {self.t_n_ctx}"
            )
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.feature_dtype not in FEATURE_DTYPE_NAMES:
            names = ", ".join(FEATURE_DTYPE_NAMES)
            raise TrainError(f"feature dtype must be one of {names}, got {self.feature_dtype!r}")
        if self.cache not in CACHE_MODES or (self.cache == "disk") != (self.cache_dir is not None):
            raise TrainError(
                f"cache must be one of {CACHE_MODES}, with cache_dir exactly when 'disk' "
                f"(got {self.cache!r}, cache_dir={self.cache_dir!r})"
            )
