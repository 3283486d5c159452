"""Prompt training (spec B §5): only the PromptLearner learns; the CLIP backbone is frozen.

Per batch of B images with ground-truth masks g (B, T, T) in {0, 1}::

    t      = normalize(encode_learned(clip, learner))                 # (2, D), with gradients, fp32
    M      = dhr_maps(whole, crops, t, cfg, anomaly=False)            # (B, nl, 2, T, T): 0.75 A_g + 0.25 R(crops)
    loss   = k * sum_{l < nl} [ focal(M_l, g) + dice(M_l[:, 1], g) + dice(M_l[:, 0], 1 - g) ]

with k = len(features_list) / nl: in "final" mode nl = 1 and the reference sums len(features_list) identical
terms, so k = 4 reproduces its loss values; in "per_layer" mode nl = len(features_list) and k = 1.
Adam(lr 1e-3, betas (0.5, 0.999), eps 1e-8), 15 epochs, batch 8, a seeded shuffle (one ``torch.Generator`` seeded
with ``seed`` draws one permutation per epoch), prompts initialised under ``torch.manual_seed(seed)``. A last batch
of size 1 keeps its batch dimension (the reference's ``gt.squeeze()`` bug is not copied).

Output per epoch e (1-based): ``out/epoch_{e:03d}.safetensors`` (our prompt checkpoint, training metadata in its
header) and ``out/optimizer_epoch_{e:03d}.pt`` (Adam state, read back with ``weights_only=True``; only the newest is
kept). ``resume=True`` restarts from the newest epoch checkpoint: prompts, Adam state and the shuffle generator (by
replaying the permutations of the finished epochs), so 1 + 1 epochs equal 2 epochs straight.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from service.data import Sample, load_mask
from service.model import BackboneInfo, DHRConfig, dhr_maps, load_checkpoint, save_checkpoint
from service.model.checkpoint import from_learner
from service.model.prompts import PromptLearner, encode_learned

from .features import FeatureExtractor, FeatureStore
from .losses import segmentation_loss
from .settings import TrainError, TrainSettings

EPOCH_RE = re.compile(r"epoch_(\d+)\.safetensors")


# settings that must agree for a resumed run to continue the same trajectory
RESUME_KEYS = ("batch_size", "lr", "betas", "eps", "seed", "precision", "feature_dtype", "n_images", "data")


@dataclass
class TrainResult:
    losses: list[float]  # mean batch loss of every epoch so far (resumed epochs included), 1-based epoch i at [i-1]
    checkpoints: list[Path]  # written by this call
    learner: PromptLearner
    start_epoch: int  # epochs already done before this call (0 unless resumed)
    epoch_seconds: list[float] = field(default_factory=list)  # wall time of each epoch run by this call
    prepare_seconds: float = 0.0  # feature extraction before epoch 1 (cached modes)
    extracted: int = 0  # vision-tower passes (images) done by this call


def batch_loss(maps: torch.Tensor, gt: torch.Tensor, cfg: DHRConfig) -> torch.Tensor:
    """maps (B, nl, 2, T, T), gt (B, T, T) in {0, 1} -> scalar k * sum_l segmentation_loss(maps[:, l], gt)."""
    n_layers, nl = len(cfg.features_list), maps.shape[1]
    if nl not in (1, n_layers):
        raise ValueError(f"maps carry {nl} layers; expected 1 ('final') or {n_layers} (features_list)")
    total = sum(segmentation_loss(maps[:, i], gt) for i in range(nl))
    return total * (n_layers // nl)


def train_step(
    clip,
    learner: PromptLearner,
    optimizer: torch.optim.Optimizer,
    whole: torch.Tensor,
    crops: torch.Tensor,
    gt: torch.Tensor,
    cfg: DHRConfig,
) -> float:
    """One Adam step on a batch; whole (B, nl, Ls, D), crops (B, 4, nl, Lp, D), gt (B, T, T). Returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    text = F.normalize(encode_learned(clip, learner), dim=-1)  # (2, D)
    maps = dhr_maps(whole, crops, text, cfg, anomaly=False)  # (B, nl, 2, T, T)
    loss = batch_loss(maps, gt, cfg)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def make_optimizer(learner: PromptLearner, s: TrainSettings) -> torch.optim.Adam:
    return torch.optim.Adam(learner.parameters(), lr=s.lr, betas=s.betas, eps=s.eps)


def init_learner(width: int, s: TrainSettings) -> PromptLearner:
    """Prompts drawn under ``torch.manual_seed(seed)`` without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        return PromptLearner(width, n_ctx=s.n_ctx, depth=s.depth, t_n_ctx=s.t_n_ctx)


def epoch_checkpoints(out_dir: Path) -> dict[int, Path]:
    """{epoch: path} of the ``epoch_NNN.safetensors`` files in ``out_dir``."""
    if not out_dir.is_dir():
        return {}
    return {int(m.group(1)): p for p in out_dir.iterdir() if (m := EPOCH_RE.fullmatch(p.name))}


def _optimizer_path(out_dir: Path, epoch: int) -> Path:
    return out_dir / f"optimizer_epoch_{epoch:03d}.pt"


def _packed_masks(samples: list[Sample], t: int) -> list[np.ndarray]:
    """Every GT mask at T x T, bit-packed (validates every image header and mask file before training)."""
    return [np.packbits(load_mask(s, (t, t))) for s in samples]


def _gt(packed: list[np.ndarray], indices: list[int], t: int, device) -> torch.Tensor:
    rows = [np.unpackbits(packed[i], count=t * t).reshape(t, t) for i in indices]
    return torch.from_numpy(np.stack(rows)).to(device, torch.float32)  # (B, T, T)


def _meta(cfg: DHRConfig, s: TrainSettings, backbone: dict, data: dict, n_images: int, losses: list[float]) -> dict:
    p = cfg.preset
    training = {k: v for k, v in asdict(s).items() if k not in ("cache", "cache_dir")}
    training.update(
        betas=list(s.betas),
        epoch=len(losses),
        epoch_losses=list(losses),
        n_images=n_images,
        data=data,
        feature_cache=s.cache,
        features_list=list(cfg.features_list),
        optimizer="adam",
    )
    return {
        "preset": p.name,
        # "patch_size": the on-disk key of checkpoints written before Preset.patch_size became crop_size
        "preset_sizes": {"image_size": p.image_size, "patch_size": p.crop_size, "target_size": p.target_size},
        "layer_features": cfg.layer_features,
        "backbone": backbone,
        "training": training,
    }


def _resume(out_dir: Path, learner: PromptLearner, optimizer, expected: dict) -> tuple[int, list[float]]:
    """Load the newest epoch checkpoint and its Adam state; returns (epochs done, their losses)."""
    found = epoch_checkpoints(out_dir)
    if not found:
        raise TrainError(f"{out_dir}: --resume given but no epoch_NNN.safetensors checkpoint is there")
    epoch = max(found)
    ck = load_checkpoint(found[epoch])
    for key in ("preset", "preset_sizes", "layer_features"):
        if ck.meta.get(key) != expected[key]:
            raise TrainError(
                f"{found[epoch]}: cannot resume, {key} is {ck.meta.get(key)!r}, this run has {expected[key]!r}"
            )
    if ck.meta.get("backbone", {}).get("sha256") != expected["backbone"]["sha256"]:
        raise TrainError(
            f"{found[epoch]}: cannot resume, it was trained on another backbone ({ck.meta.get('backbone')})"
        )
    old, new = ck.meta.get("training", {}), expected["training"]
    for key in RESUME_KEYS:
        if old.get(key) != new[key]:
            raise TrainError(f"{found[epoch]}: cannot resume, training {key} was {old.get(key)!r}, now {new[key]!r}")
    shapes = (tuple(ck.ctx_pos.shape), tuple(ck.deep.shape))
    if shapes != (tuple(learner.ctx_pos.shape), tuple(learner.deep.shape)):
        raise TrainError(f"{found[epoch]}: prompt shapes {shapes} differ from this run's n_ctx/depth/t_n_ctx")
    opt_path = _optimizer_path(out_dir, epoch)
    if not opt_path.is_file():
        raise TrainError(f"{opt_path}: optimizer state of epoch {epoch} missing; cannot resume exactly")
    with torch.no_grad():
        learner.ctx_pos.copy_(ck.ctx_pos)
        learner.ctx_neg.copy_(ck.ctx_neg)
        learner.deep.copy_(ck.deep)
    try:
        state = torch.load(opt_path, map_location=learner.ctx_pos.device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
    except Exception as e:  # noqa: BLE001 - any reader or shape failure is one line naming the file
        cause = (str(e).splitlines() or [""])[0]  # torch's weights-only refusal runs to many lines
        raise TrainError(f"{opt_path}: unreadable optimizer state ({type(e).__name__}: {cause}); cannot resume") from e
    return epoch, list(old.get("epoch_losses", []))[:epoch]


def train_prompts(
    clip,
    samples: list[Sample],
    cfg: DHRConfig,
    out_dir: str | Path,
    settings: TrainSettings | None = None,
    *,
    backbone: BackboneInfo | dict | None = None,
    data: dict | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train prompts on ``samples`` (each with a mask or defect-free) and write a checkpoint per epoch.

    ``clip`` is an open_clip CLIP (fp32); it is frozen and moved to ``settings.device``. ``backbone`` names it in the
    checkpoints ({"name", "sha256"}); ``data`` (e.g. root, split, classes, limit) is recorded as given.
    """
    from tqdm import tqdm

    s = settings or TrainSettings()
    out_dir = Path(out_dir)
    if not samples:
        raise TrainError("no training images (check --data, --split, --classes and --limit)")
    if not resume and epoch_checkpoints(out_dir):
        raise TrainError(f"{out_dir}: already holds epoch checkpoints; pass --resume or choose another --out")
    if isinstance(backbone, BackboneInfo):
        backbone = {"name": backbone.name, "sha256": backbone.sha256}
    backbone = dict(backbone or {"name": "in-memory", "sha256": ""})
    data = dict(data or {})
    device = torch.device(s.device)
    t = cfg.preset.target_size
    masks = _packed_masks(samples, t)
    clip.requires_grad_(False).to(device)
    learner = init_learner(clip.ln_final.weight.shape[0], s).to(device)
    optimizer = make_optimizer(learner, s)
    losses: list[float] = []
    start = 0
    if resume:
        start, losses = _resume(out_dir, learner, optimizer, _meta(cfg, s, backbone, data, len(samples), losses))
    result = TrainResult(losses, [], learner, start)
    if start >= s.epochs:
        return result
    store = FeatureStore(
        FeatureExtractor(clip.visual, cfg, device, s.precision, s.feature_dtype),
        [x.img_path for x in samples],
        s.cache,
        s.cache_dir,
        backbone["sha256"],
    )
    t0 = time.perf_counter()
    store.prepare(progress)
    result.prepare_seconds = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(s.seed)
    n = len(samples)
    for epoch in range(s.epochs):
        perm = torch.randperm(n, generator=gen).tolist()  # drawn for finished epochs too: resume replays them
        if epoch < start:
            continue
        t0 = time.perf_counter()
        batch_losses: list[float] = []
        bar = tqdm(range(0, n, s.batch_size), desc=f"epoch {epoch + 1}/{s.epochs}", unit="batch", disable=not progress)
        for b0 in bar:
            idx = perm[b0 : b0 + s.batch_size]
            whole, crops = store.batch(idx, device)  # (B, nl, Ls, D), (B, 4, nl, Lp, D)
            batch_losses.append(train_step(clip, learner, optimizer, whole, crops, _gt(masks, idx, t, device), cfg))
            bar.set_postfix(loss=f"{np.mean(batch_losses):.4f}")
        losses.append(float(np.mean(batch_losses)))
        result.epoch_seconds.append(time.perf_counter() - t0)
        meta = _meta(cfg, s, backbone, data, n, losses)
        e = epoch + 1
        opt_path = _optimizer_path(out_dir, e)
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": e, "optimizer": optimizer.state_dict()}, opt_path.with_name(opt_path.name + ".tmp"))
        opt_path.with_name(opt_path.name + ".tmp").replace(opt_path)
        result.checkpoints.append(save_checkpoint(from_learner(learner, meta), out_dir / f"epoch_{e:03d}.safetensors"))
        for old in out_dir.glob("optimizer_epoch_*.pt"):
            if old != opt_path:
                old.unlink()
    result.extracted = store.extracted
    return result
