"""Offline prediction for ``dhrclip predict``: files in, per-image JSON, PNGs and (optionally) raw maps out."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.inspection import Thresholds, verdict
from service.model import DHRCLIP, EXTRA_MAPS, IMAGE_SCORES, ModelInfo, stack_views

from .decode import DecodedImage, ImageError, decode_image, views_for
from .postprocess import postprocess


@dataclass(frozen=True)
class PredictOptions:
    out_dir: Path
    save_maps: bool = False
    batch_size: int = 1
    image_threshold: float = 0.5
    pixel_threshold: float = 0.5
    image_score: str = "reference"
    max_pixels: int = 200_000_000


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, k = path.stem, 1
    while stem in used:
        stem, k = f"{path.stem}_{k}", k + 1
    used.add(stem)
    return stem


def _write_outputs(
    stem: str, dec: DecodedImage, out, i: int, info: ModelInfo, opts: PredictOptions, timings: dict
) -> dict:
    t0 = time.perf_counter()
    scores = {v: float(getattr(out, v)[i]) for v in IMAGE_SCORES}
    amap = out.anomaly_map[i].clamp(0, 1).numpy()
    post = postprocess(amap, dec.rgb(), opts.pixel_threshold)
    d = opts.out_dir
    (d / f"{stem}.heatmap.png").write_bytes(post.heatmap_png)
    (d / f"{stem}.mask.png").write_bytes(post.mask_png)
    (d / f"{stem}.overlay.png").write_bytes(post.overlay_png)
    if opts.save_maps:
        np.savez_compressed(
            d / f"{stem}.maps.npz",
            raw_map=out.raw_map[i].numpy().astype(np.float32),
            anomaly_map=out.anomaly_map[i].numpy().astype(np.float32),
            eval_map=out.eval_map[i].numpy().astype(np.float32),
        )
    score = scores[opts.image_score]
    record = {
        "file": dec.name,
        "width": dec.width,
        "height": dec.height,
        "format": dec.format,
        "mode": dec.mode,
        "preset": info.preset,
        "image_score": opts.image_score,
        "score": score,
        **{f"score_{v}": s for v, s in scores.items()},
        "threshold": opts.image_threshold,
        "verdict": verdict(score, Thresholds(opts.image_threshold, opts.pixel_threshold)),
        "pixel_threshold": opts.pixel_threshold,
        "defect_area_ratio": post.defect_area_ratio,
        "regions": [r.to_dict() for r in post.regions],
        "model": info.to_dict(),
        "timing_ms": {**timings, "postprocess": 1000 * (time.perf_counter() - t0)},
    }
    (d / f"{stem}.json").write_text(json.dumps(record, indent=2))
    return record


def predict_files(paths: list[Path], model: DHRCLIP, info: ModelInfo, opts: PredictOptions) -> int:
    """Run every image; unreadable files get one line on stderr and are skipped. Returns the failure count."""
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    preset = model.cfg.preset
    used: set[str] = set()
    failures = 0
    pending: list[tuple[str, DecodedImage, object, float]] = []

    def flush():
        if not pending:
            return
        t0 = time.perf_counter()
        out = model(*stack_views([p[2] for p in pending]), EXTRA_MAPS if opts.save_maps else ())
        out = type(out)(*(None if t is None else t.float().cpu() for t in out))
        infer_ms = 1000 * (time.perf_counter() - t0) / len(pending)
        for i, (stem, dec, _, decode_ms) in enumerate(pending):
            rec = _write_outputs(stem, dec, out, i, info, opts, {"decode": decode_ms, "inference": infer_ms})
            print(
                f"{dec.name}: score {rec['score']:.4f} ({rec['verdict']}), {len(rec['regions'])} region(s), "
                f"{infer_ms:.0f} ms"
            )
        pending.clear()

    for path in paths:
        t0 = time.perf_counter()
        try:
            dec = decode_image(Path(path).read_bytes(), str(path), opts.max_pixels)
        except (ImageError, OSError) as e:
            print(
                f"dhrclip predict: {e if isinstance(e, ImageError) else f'{path}: {e.strerror or e}'}", file=sys.stderr
            )
            failures += 1
            continue
        views = views_for(dec, preset)
        pending.append((_unique_stem(Path(path), used), dec, views, 1000 * (time.perf_counter() - t0)))
        if len(pending) >= opts.batch_size:
            flush()
    flush()
    return failures
