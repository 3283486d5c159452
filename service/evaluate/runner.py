"""The evaluation protocol: run a DHR-CLIP model over each class's test images and score the class (spec B §6).

Two protocols decide which map is scored against which mask:

* ``"paper"`` (default, reproduces the paper's table): the model's ``eval_map`` (per-image min-max of the smoothed
  map, spec B §4.5) at ``T x T`` against the mask resized to ``T x T`` like the reference (``load_mask(s, (T, T))``:
  PIL bilinear of the 0/255 mask, ``> 0.5``). Every map of a class has one shape, so :func:`compute_metrics` runs
  on the stacked ``(N, T, T)`` arrays.
* ``"service"`` (what a user of the API gets): the service ``anomaly_map`` (``gaussian(M / n_layers)``, not
  min-max normalised, Part A item 6), clamped to [0, 1] and resized back to the image's own ``(H_i, W_i)`` by the
  engine's :func:`~service.engine.postprocess.resize_map` (OpenCV bilinear at pixel centres), against the mask
  at its original size. Images of a class may differ in size: pixels are then pooled by :func:`pooled_metrics`.

Per image three image scores are kept, one per variant of Part A item 5: ``reference``, ``map_max``, ``map_topk``.
Per class the report holds the metrics of :func:`compute_metrics` plus ``n_images`` and ``n_anomalous``; ``mean``
averages each metric over the classes where it is defined (a metric undefined in every class stays ``None``).
Maps are held in memory for one class at a time (float32: 1,000 images at T = 672 are 1.8 GB) and freed after.

The model is injectable: anything with ``cfg.preset`` (a :class:`~service.model.Preset`) and the
:class:`~service.model.DHRCLIP` call ``model(whole (B, S, S, 3) uint8, crops (B, 4, P, P, 3) uint8, extra=...)``
returning an object with the image-score variants ``reference``, ``map_max``, ``map_topk`` ``(B,)`` and
``anomaly_map`` ``(B, T, T)``, plus ``eval_map`` ``(B, T, T)`` when ``extra`` names it (paper protocol).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.data import Sample, load_mask, read_image
from service.engine.postprocess import resize_map
from service.model import IMAGE_SCORES, load_views, stack_views

from .choices import DEFAULT_ESCAPE_RATE, IMAGE_KEYS, PIXEL_KEYS, PROTOCOLS
from .metrics import (
    aupro_from_curve,
    compute_metrics,
    image_metrics,
    pixel_auroc,
    pixel_f1_max,
    pro_curve,
)


@dataclass
class ClassData:
    """What the model produced for one class, ready for the metrics.

    ``masks`` / ``maps``: bool / float32 ``(N, H, W)`` arrays when every image shares one shape, else lists of
    ``(H_i, W_i)`` arrays; ``labels`` ``(N,)`` int64; ``scores`` ``{variant: (N,) float64}``; ``seconds`` splits
    the time into ``load`` (decode, views, masks) and ``model`` (forward passes).
    """

    masks: np.ndarray | list[np.ndarray]
    maps: np.ndarray | list[np.ndarray]
    labels: np.ndarray
    scores: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)


def collect_class(
    model,
    samples: Sequence[Sample],
    protocol: str = "paper",
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "",
    memory=None,
) -> ClassData:
    """Run ``model`` over ``samples`` in batches; return maps, masks, labels and the three image scores.

    All masks are read first (a broken mask fails before any forward pass). Paper protocol: maps ``(N, T, T)``
    from ``eval_map``. Service protocol: map ``i`` is ``anomaly_map`` clamped to [0, 1] and resized to mask ``i``'s
    ``(H_i, W_i)``. ``memory``: a normal memory of the class (few-shot), passed to the model call when given.
    """
    _check_protocol(protocol)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not samples:
        raise ValueError("no samples to evaluate")
    preset = model.cfg.preset
    t_size = preset.target_size
    t0 = time.perf_counter()
    mask_list = [load_mask(s, (t_size, t_size) if protocol == "paper" else None) for s in samples]
    shapes = {m.shape for m in mask_list}
    if len(shapes) == 1:  # one (N, H, W) block: no copy at metric time
        masks: np.ndarray | list[np.ndarray] = np.stack(mask_list)
        maps: np.ndarray | list[np.ndarray] = np.empty(masks.shape, dtype=np.float32)
    else:
        masks, maps = mask_list, [np.empty(m.shape, dtype=np.float32) for m in mask_list]
    del mask_list
    scores = {v: np.empty(len(samples), dtype=np.float64) for v in IMAGE_SCORES}
    seconds = {"load": time.perf_counter() - t0, "model": 0.0}

    from tqdm import tqdm

    bar = tqdm(total=len(samples), desc=desc or "evaluate", unit="img", disable=not progress, leave=False)
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        t0 = time.perf_counter()
        views = [load_views(read_image(s.img_path), preset) for s in batch]
        whole, crops = stack_views(views)  # (B, S, S, 3), (B, 4, P, P, 3) uint8
        t1 = time.perf_counter()
        shots = {} if memory is None else {"memory": memory}
        out = model(whole, crops, extra=("eval_map",) if protocol == "paper" else (), **shots)
        t2 = time.perf_counter()
        seconds["load"] += t1 - t0
        seconds["model"] += t2 - t1
        source = out.eval_map if protocol == "paper" else out.anomaly_map
        batch_maps = source.detach().float().cpu().numpy()  # (B, T, T)
        if batch_maps.shape != (len(batch), t_size, t_size):
            raise ValueError(
                f"model returned maps of shape {batch_maps.shape}, expected ({len(batch)}, {t_size}, "
                f"{t_size}) for preset {preset.name}"
            )
        for name in IMAGE_SCORES:
            scores[name][start : start + len(batch)] = getattr(out, name).detach().float().cpu().numpy()
        for j, amap in enumerate(batch_maps):
            i = start + j
            if protocol == "paper":
                maps[i] = amap
            else:
                h, w = maps[i].shape
                maps[i] = resize_map(np.clip(amap, 0.0, 1.0), w, h)
        seconds["model"] += time.perf_counter() - t2  # map hand-over counts with the model
        bar.update(len(batch))
    bar.close()
    labels = np.array([s.anomaly for s in samples], dtype=np.int64)
    return ClassData(masks, maps, labels, scores, seconds)


def class_metrics(data: ClassData, escape_rate: float = DEFAULT_ESCAPE_RATE) -> dict:
    """Metrics of one class: :func:`compute_metrics` on stacked arrays, :func:`pooled_metrics` on lists."""
    if isinstance(data.maps, np.ndarray):
        return compute_metrics(data.masks, data.maps, data.labels, data.scores, escape_rate)
    return pooled_metrics(data.masks, data.maps, data.labels, data.scores, escape_rate)


def pooled_metrics(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    labels: np.ndarray,
    scores_by_variant: dict[str, np.ndarray],
    escape_rate: float = DEFAULT_ESCAPE_RATE,
) -> dict:
    """:func:`compute_metrics` for images of different sizes: ``masks[i]``, ``maps[i]`` of shape ``(H_i, W_i)``.

    AUROC and F1-max pool all pixels of all images (spatial layout plays no part); AUPRO uses
    :func:`~.metrics.pro_curve` on the list of images. Same keys and ``None`` rules as :func:`compute_metrics`.
    """
    if len(masks) != len(maps) or len(masks) != len(labels):
        raise ValueError(f"need one mask, map and label per image; got {len(masks)}, {len(maps)}, {len(labels)}")
    for mask, amap in zip(masks, maps, strict=True):
        if mask.ndim != 2 or mask.shape != amap.shape:
            raise ValueError(f"mask and map of one image must share one (H, W); got {mask.shape} and {amap.shape}")
    result: dict = dict.fromkeys(PIXEL_KEYS)
    flat_masks = np.concatenate([m.ravel() for m in masks]).astype(bool)[None, None]  # (1, 1, sum H_i W_i)
    if flat_masks.any() and not flat_masks.all():
        flat_maps = np.concatenate([m.ravel() for m in maps])[None, None]
        result["pixel_auroc"] = pixel_auroc(flat_masks, flat_maps)
        result["pixel_f1_max"] = pixel_f1_max(flat_masks, flat_maps)
        del flat_maps
        fpr, pro = pro_curve(masks, maps)
        for key, variant in (("pixel_aupro", "standard"), ("pixel_aupro_ref", "reference")):
            value = aupro_from_curve(fpr, pro, variant=variant)
            result[key] = None if np.isnan(value) else value
    labels = np.asarray(labels)
    for name, scores in scores_by_variant.items():
        result[name] = image_metrics(labels, scores, escape_rate)
    return result


def mean_metrics(per_class: dict[str, dict]) -> dict:
    """Mean over classes of every metric, skipping ``None``; a metric ``None`` in every class stays ``None``."""

    def mean(values: list) -> float | None:
        kept = [v for v in values if v is not None]
        return float(np.mean(kept)) if kept else None

    rows = list(per_class.values())
    out: dict = {k: mean([r.get(k) for r in rows]) for k in PIXEL_KEYS}
    variants = [k for k in (rows[0] if rows else {}) if isinstance(rows[0][k], dict)]
    for v in variants:
        out[v] = {k: mean([r[v][k] for r in rows]) for k in IMAGE_KEYS}
    return out


def evaluate(
    model,
    samples_by_class: dict[str, Sequence[Sample]],
    protocol: str = "paper",
    batch_size: int = 4,
    progress: bool = True,
    on_class: Callable[[str, ClassData], None] | None = None,
    memories: dict | None = None,
    escape_rate: float = DEFAULT_ESCAPE_RATE,
) -> dict:
    """Evaluate every class; returns the report body.

    ``on_class(cls, data)`` is called with each class's :class:`ClassData` (maps, masks, scores) before it is freed,
    e.g. to keep or save the maps. ``memories``: ``{cls: NormalMemory}`` for the few-shot protocol (K good train
    images per class as references); a class without one is scored zero-shot.

    ``{"protocol", "preset", "classes": {cls: {metrics..., "n_images", "n_anomalous"}}, "mean": {metrics...},
    "seconds", "timing": {"load", "model", "metrics"}}``; metric values in [0, 1] or ``None``. The command adds
    ``"model"`` (ModelInfo) and ``"data"`` (the dataset root).
    """
    _check_protocol(protocol)
    if not samples_by_class:
        raise ValueError("no class to evaluate")
    t_start = time.perf_counter()
    timing = {"load": 0.0, "model": 0.0, "metrics": 0.0}
    classes: dict[str, dict] = {}
    for cls, samples in samples_by_class.items():
        if not samples:
            raise ValueError(f"class {cls!r} has no test image")
        memory = None if memories is None else memories.get(cls)
        data = collect_class(model, samples, protocol, batch_size, progress, desc=cls, memory=memory)
        t0 = time.perf_counter()
        metrics = class_metrics(data, escape_rate)
        timing["metrics"] += time.perf_counter() - t0
        timing["load"] += data.seconds["load"]
        timing["model"] += data.seconds["model"]
        classes[cls] = {**metrics, "n_images": len(samples), "n_anomalous": int(data.labels.sum())}
        if on_class is not None:
            on_class(cls, data)
        del data  # one class's maps in memory at a time
    return {
        "protocol": protocol,
        "preset": model.cfg.preset.name,
        "classes": classes,
        "mean": mean_metrics(classes),
        "seconds": time.perf_counter() - t_start,
        "timing": timing,
    }


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
