"""View features of the frozen vision tower for prompt training, computed once and cached.

Prompt training (spec B §5.2) only back-propagates into the text side: the vision tower is frozen, so the patch
tokens of every training image are the same in every epoch. They are extracted once per image and kept

- in memory (``cache="memory"``, the default), or
- on disk (``cache="disk"``): one ``<key>.safetensors`` per image under ``cache_dir``, where ``key`` is the sha256
  of the image's resolved path, mtime and size, the preset sizes, the backbone sha256, ``layer_features``,
  ``features_list``, ``dpam``, the tower precision and the storage dtype; or
- not at all (``cache="none"``): recomputed at every batch, the reference's behaviour (for comparison and benchmarks).

Storage rounding. Features are stored as ``feature_dtype`` (``fp16`` default, ``fp32`` optional) and every path,
the uncached one included, rounds them to that dtype before use: cached and uncached training see bit-identical
inputs, and the only deviation from the reference's fp32 features is this one rounding (relative 2^-11 ~ 4.9e-4 of
each token component for fp16; none for ``fp32``). Images are always encoded one at a time (5 views, one batch when
S == P), so a feature never depends on which images share its batch.

Per image (D = embed dim, nl = 1 in "final" mode, len(features_list) in "per_layer" mode)::

    whole (nl, 1 + (S/14)^2, D)     crops (4, nl, 1 + (P/14)^2, D)

With ViT-L/14 (D = 768) in fp16 that is 4.4 MB per image for ``mvtec`` (5 x 577 tokens) and 10.5 MB for ``visa``
(5 x 1370), times 4 in "per_layer" mode: the MVTec test set (1725 images) needs ~7.6 GB in memory; use the disk
cache for larger sets.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from service.data import read_image
from service.errors import UserError
from service.model import DHRCLIP, DHRConfig, load_views, stack_views

from .settings import CACHE_MODES, FEATURE_DTYPE_NAMES

FEATURE_DTYPES = {name: getattr(torch, dtype) for name, dtype in FEATURE_DTYPE_NAMES.items()}


class FeatureCacheError(UserError):
    """An on-disk feature file that cannot be used; the message names the file."""


class ViewFeatures(NamedTuple):
    whole: torch.Tensor  # (nl, Ls, D), storage dtype, CPU
    crops: torch.Tensor  # (4, nl, Lp, D), storage dtype, CPU


class FeatureExtractor:
    """Frozen DHR vision tower on ``device`` at ``precision``: image file -> :class:`ViewFeatures`.

    The caller's ``visual`` is used as is in fp32 (moved to ``device``); for bf16/fp16 :class:`DHRCLIP` holds a
    converted copy, so the caller's model is never cast.
    """

    def __init__(
        self,
        visual: torch.nn.Module,
        cfg: DHRConfig,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        feature_dtype: str = "fp16",
    ):
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {', '.join(FEATURE_DTYPES)}, got {feature_dtype!r}")
        width = visual.proj.shape[1]
        self.cfg, self.precision, self.feature_dtype = cfg, precision, feature_dtype
        self.model = DHRCLIP(visual, torch.zeros(2, width), cfg, precision).to(device).eval()  # text unused here

    @torch.no_grad()
    def __call__(self, img_path: str | Path) -> ViewFeatures:
        views = load_views(read_image(img_path), self.cfg.preset)
        fw, fc = self.model.encode_views(*stack_views([views]))  # a batch of one: (1, S, S, 3), (1, 4, P, P, 3)
        dtype = FEATURE_DTYPES[self.feature_dtype]
        return ViewFeatures(fw.tokens[0].to("cpu", dtype), fc.tokens[0].to("cpu", dtype))


def cache_key(img_path: str | Path, cfg: DHRConfig, backbone_sha256: str, precision: str, feature_dtype: str) -> str:
    """sha256 hex of everything that decides an image's cached features."""
    path = Path(img_path).resolve()
    st = path.stat()
    p = cfg.preset
    fields = {
        "img": str(path),
        "mtime_ns": st.st_mtime_ns,
        "size": st.st_size,
        "preset": [p.image_size, p.crop_size, p.target_size],
        "backbone_sha256": backbone_sha256,
        "layer_features": cfg.layer_features,
        "features_list": list(cfg.features_list),
        "dpam": cfg.dpam,
        "precision": precision,
        "feature_dtype": feature_dtype,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class FeatureStore:
    """Per-image view features for a fixed list of images, by index; see the module docstring for the modes.

    ``batch(indices, device)`` -> whole (B, nl, Ls, D) and crops (B, 4, nl, Lp, D), float32 on ``device``.
    Counters: ``extracted`` (tower forward passes), ``disk_hits`` (features read from an existing cache file).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        img_paths: list[Path],
        cache: str = "memory",
        cache_dir: str | Path | None = None,
        backbone_sha256: str = "",
    ):
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
        if cache == "disk" and (cache_dir is None or not backbone_sha256):
            raise ValueError("a disk feature cache needs cache_dir and the backbone's sha256 (to key the files)")
        self.extractor, self.paths, self.cache = extractor, [Path(p) for p in img_paths], cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.backbone_sha256 = backbone_sha256
        self._memory: dict[int, ViewFeatures] = {}
        self._files: dict[int, Path] = {}
        self.extracted = 0
        self.disk_hits = 0

    def __len__(self) -> int:
        return len(self.paths)

    def _extract(self, i: int) -> ViewFeatures:
        self.extracted += 1
        return self.extractor(self.paths[i])

    def prepare(self, progress: bool = False) -> None:
        """Fill the cache (no-op for ``cache="none"``): extract every image not cached yet."""
        if self.cache == "none":
            return
        from tqdm import tqdm

        if self.cache == "disk":
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(len(self.paths)), desc="view features", unit="img", disable=not progress, leave=False):
            if self.cache == "memory":
                if i not in self._memory:
                    self._memory[i] = self._extract(i)
                continue
            ex = self.extractor
            key = cache_key(self.paths[i], ex.cfg, self.backbone_sha256, ex.precision, ex.feature_dtype)
            f = self.cache_dir / f"{key}.safetensors"
            if f.is_file():
                self._read(f)  # validate once, up front
                self.disk_hits += 1
            else:
                feats = self._extract(i)
                tmp = f.with_name(f.name + ".tmp")
                save_file(
                    {"whole": feats.whole.contiguous(), "crops": feats.crops.contiguous()},
                    str(tmp),
                    metadata={"img_path": str(self.paths[i].resolve())},
                )
                tmp.replace(f)
            self._files[i] = f

    def _read(self, f: Path) -> ViewFeatures:
        dtype = FEATURE_DTYPES[self.extractor.feature_dtype]
        try:
            with safe_open(str(f), framework="pt") as h:
                whole, crops = h.get_tensor("whole"), h.get_tensor("crops")
        except Exception as e:  # noqa: BLE001 - any reader failure is one line naming the file
            raise FeatureCacheError(
                f"{f}: unreadable feature cache file ({type(e).__name__}: {e}); delete it to recompute"
            ) from e
        if whole.dtype != dtype or crops.dtype != dtype or whole.ndim != 3 or crops.ndim != 4 or crops.shape[0] != 4:
            raise FeatureCacheError(
                f"{f}: feature cache file holds whole {tuple(whole.shape)} {whole.dtype}, crops "
                f"{tuple(crops.shape)} {crops.dtype}; expected {dtype}; delete it to recompute"
            )
        return ViewFeatures(whole, crops)

    def get(self, i: int) -> ViewFeatures:
        if self.cache == "memory" and i in self._memory:
            return self._memory[i]
        if self.cache == "disk" and i in self._files:
            return self._read(self._files[i])
        if self.cache != "none":
            raise RuntimeError(f"feature store not prepared for image {self.paths[i]} (call prepare() first)")
        return self._extract(i)

    def batch(self, indices: list[int], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked float32 features: whole (B, nl, Ls, D), crops (B, 4, nl, Lp, D)."""
        feats = [self.get(i) for i in indices]
        whole = torch.stack([f.whole for f in feats]).to(device, torch.float32)  # (B, nl, Ls, D)
        crops = torch.stack([f.crops for f in feats]).to(device, torch.float32)  # (B, 4, nl, Lp, D)
        return whole, crops
