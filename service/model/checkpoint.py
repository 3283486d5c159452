"""Prompt checkpoints: our format (safetensors + JSON metadata, Part A item 8) and the reference format.

Our file ``*.safetensors`` holds ``ctx_pos`` (n_ctx, W), ``ctx_neg`` (n_ctx, W) and ``deep`` (depth-1, t_n_ctx, W);
its safetensors header metadata holds ``{"dhrclip": <json>}`` with ``format``, ``preset``, ``layer_features``,
``n_ctx``, ``depth``, ``t_n_ctx``, ``width``, ``backbone`` (name, sha256), ``training`` and ``metrics``.
A checkpoint *directory* means its newest ``*.safetensors``. The reference's ``{"prompt_learner": state_dict}``
``.pth`` loads directly (only ``ctx_pos``, ``ctx_neg`` and ``compound_prompts_text.*`` are read).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from service.errors import UserError

from .backbone import sha256_file
from .config import LAYER_FEATURES
from .prompts import PromptLearner

FORMAT = "dhrclip-prompts/1"


class CheckpointError(UserError):
    """A prompt checkpoint that cannot be used; one line naming the file, the key and the shapes."""


@dataclass
class PromptCheckpoint:
    ctx_pos: torch.Tensor  # (n_ctx, W)
    ctx_neg: torch.Tensor  # (n_ctx, W)
    deep: torch.Tensor  # (depth - 1, t_n_ctx, W)
    meta: dict = field(default_factory=dict)
    path: str = ""
    sha256: str = ""

    @property
    def width(self) -> int:
        return self.ctx_pos.shape[1]

    @property
    def layer_features(self) -> str:
        return self.meta.get("layer_features", "final")

    @property
    def id(self) -> str:
        return Path(self.path).stem if self.path else "unsaved"

    def learner(self) -> PromptLearner:
        pl = PromptLearner(
            self.width, n_ctx=self.ctx_pos.shape[0], depth=self.deep.shape[0] + 1, t_n_ctx=self.deep.shape[1]
        )
        with torch.no_grad():
            pl.ctx_pos.copy_(self.ctx_pos)
            pl.ctx_neg.copy_(self.ctx_neg)
            pl.deep.copy_(self.deep)
        return pl

    def check_width(self, width: int) -> None:
        if self.width != width:
            raise CheckpointError(
                f"{self.path or 'checkpoint'}: ctx_pos has shape {tuple(self.ctx_pos.shape)} "
                f"(width {self.width}) but the backbone's text width is {width}"
            )


def from_learner(learner: PromptLearner, meta: dict | None = None) -> PromptCheckpoint:
    return PromptCheckpoint(
        learner.ctx_pos.detach().cpu().float().clone(),
        learner.ctx_neg.detach().cpu().float().clone(),
        learner.deep.detach().cpu().float().clone(),
        dict(meta or {}),
    )


def _validate(ck: PromptCheckpoint, src: str) -> PromptCheckpoint:
    if ck.ctx_pos.ndim != 2 or ck.ctx_pos.shape != ck.ctx_neg.shape:
        raise CheckpointError(
            f"{src}: ctx_pos {tuple(ck.ctx_pos.shape)} and ctx_neg {tuple(ck.ctx_neg.shape)} "
            "must both be (n_ctx, width)"
        )
    if ck.deep.ndim != 3 or ck.deep.shape[2] != ck.width:
        raise CheckpointError(f"{src}: deep prompts {tuple(ck.deep.shape)} must be (depth-1, t_n_ctx, {ck.width})")
    if ck.deep.shape[1] > ck.ctx_pos.shape[0]:
        raise CheckpointError(f"{src}: t_n_ctx {ck.deep.shape[1]} exceeds n_ctx {ck.ctx_pos.shape[0]}")
    depth = ck.meta.get("depth")
    if depth is not None and depth != ck.deep.shape[0] + 1:
        raise CheckpointError(
            f"{src}: metadata says depth {depth!r} but 'deep' has shape {tuple(ck.deep.shape)} "
            f"(depth {ck.deep.shape[0] + 1})"
        )
    lf = ck.meta.get("layer_features", "final")
    if lf not in LAYER_FEATURES:
        raise CheckpointError(f"{src}: layer_features {lf!r} is not one of {LAYER_FEATURES}")
    return ck


def save_checkpoint(ck: PromptCheckpoint, path: str | Path) -> Path:
    """Write ``path`` (a ``.safetensors`` file) atomically; returns it. ``ck.meta`` is completed with the sizes."""
    path = Path(path)
    meta = dict(ck.meta)
    meta.update(
        format=FORMAT, n_ctx=ck.ctx_pos.shape[0], depth=ck.deep.shape[0] + 1, t_n_ctx=ck.deep.shape[1], width=ck.width
    )
    meta.setdefault("layer_features", "final")
    _validate(PromptCheckpoint(ck.ctx_pos, ck.ctx_neg, ck.deep, meta), str(path))
    tensors = {"ctx_pos": ck.ctx_pos.contiguous(), "ctx_neg": ck.ctx_neg.contiguous(), "deep": ck.deep.contiguous()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"dhrclip": json.dumps(meta, sort_keys=True)})
        tmp.replace(path)
    except BaseException as e:  # a failed write leaves no temporary file behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"{path}: cannot write it ({e.strerror or e})") from None
        raise
    ck.meta, ck.path, ck.sha256 = meta, str(path), sha256_file(path)
    return path


def _epoch_key(p: Path) -> tuple:
    nums = re.findall(r"\d+", p.stem)
    return (p.stat().st_mtime, int(nums[-1]) if nums else -1, p.name)


def resolve_checkpoint_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"), key=_epoch_key) or sorted(path.glob("*.pth"), key=_epoch_key)
        if not files:
            raise CheckpointError(f"{path}: directory holds no *.safetensors or *.pth prompt checkpoint")
        return files[-1]
    if not path.is_file():
        raise CheckpointError(f"{path}: prompt checkpoint not found")
    return path


def _load_ours(path: Path) -> PromptCheckpoint:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for k in ("ctx_pos", "ctx_neg", "deep"):
                if k not in keys:
                    raise CheckpointError(f"{path}: missing tensor {k!r} (has {', '.join(sorted(keys)) or 'none'})")
            tensors = {k: f.get_tensor(k).float() for k in ("ctx_pos", "ctx_neg", "deep")}
            raw = (f.metadata() or {}).get("dhrclip", "{}")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata 'dhrclip' is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata 'dhrclip' must be a JSON object, got {type(meta).__name__}")
    return PromptCheckpoint(tensors["ctx_pos"], tensors["ctx_neg"], tensors["deep"], meta)


def _load_reference(path: Path) -> PromptCheckpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    sd = obj.get("prompt_learner", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected {{'prompt_learner': state_dict}}")
    for k in ("ctx_pos", "ctx_neg"):
        if k not in sd:
            raise CheckpointError(f"{path}: missing key {k!r} in the prompt_learner state dict")
        _tensor(sd, k, path, min_ndim=1)
    ctx_pos, ctx_neg = (sd[k].float().reshape(-1, sd[k].shape[-1]) for k in ("ctx_pos", "ctx_neg"))
    idx = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"compound_prompts_text\.(\d+)", k)))
    if idx != list(range(len(idx))):
        missing = sorted(set(range(max(idx, default=-1) + 1)) - set(idx))
        raise CheckpointError(f"{path}: missing key 'compound_prompts_text.{missing[0]}'")
    if not idx:
        deep = ctx_pos.new_zeros(0, 1, ctx_pos.shape[1])
    else:
        shapes = {tuple(_tensor(sd, f"compound_prompts_text.{i}", path).shape) for i in idx}
        if len(shapes) != 1:
            raise CheckpointError(f"{path}: compound_prompts_text.* have different shapes {sorted(shapes)}")
        deep = torch.stack([sd[f"compound_prompts_text.{i}"].float() for i in idx])
    meta = {"layer_features": "final", "source": {"format": "reference", "file": path.name}}
    return PromptCheckpoint(ctx_pos, ctx_neg, deep, meta)


def _tensor(sd: dict, key: str, path: Path, min_ndim: int = 0) -> torch.Tensor:
    """``sd[key]`` when it is a tensor of at least ``min_ndim`` dimensions, else one line naming file and key."""
    value = sd[key]
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{path}: {key!r} is {type(value).__name__}, not a tensor")
    if value.ndim < min_ndim:
        raise CheckpointError(f"{path}: {key!r} has shape {tuple(value.shape)}; expected (n_ctx, width)")
    return value


def load_checkpoint(path: str | Path) -> PromptCheckpoint:
    """Our ``.safetensors`` file, a directory of them (newest), or a reference ``.pth``."""
    path = resolve_checkpoint_path(path)
    ck = _load_ours(path) if path.suffix == ".safetensors" else _load_reference(path)
    ck.path, ck.sha256 = str(path), sha256_file(path)
    return _validate(ck, str(path))


def import_reference(src: str | Path, out_dir: str | Path) -> Path:
    """Convert a reference ``{"prompt_learner": ...}`` file into ``out_dir/<stem>.safetensors``."""
    ck = load_checkpoint(src)
    return save_checkpoint(ck, Path(out_dir) / f"{Path(src).stem}.safetensors")
