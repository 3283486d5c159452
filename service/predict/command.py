"""``dhrclip predict``: image files in; per image a JSON record, heatmap/mask/overlay PNGs and optionally raw maps.

Example::

    dhrclip predict photos/*.jpg --out results/ --preset fast --threshold 0.6

Each image goes the service's way: ``decode_image`` -> DHR views -> :class:`~service.engine.runner.ModelRunner`
(batches of ``--batch-size``) -> ``postprocess`` -> ``verdict(score, thresholds)``. Per image ``<stem>.json``
holds the scores of every variant, the verdict, the regions, the model identity and timings; ``--save-maps`` adds
``<stem>.maps.npz`` with the ``(T, T)`` float32 ``anomaly_map``, ``eval_map`` and ``raw_map``. An unreadable file
gets one line on stderr and is skipped (exit status 1); a bad option or missing weights end the command (status 2).

``--references DIR``: every image file in DIR (sorted by name) is a good reference of the product; their normal
memory is built once (``service.engine.knowledge``) and every image is judged with the few-shot map fused in
(``--fusion-weight`` w, default 0.5). An unreadable reference ends the command (status 2, naming the file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from service.cli_options import add_model_arguments, load_model_from_args
from service.errors import UserError, check_out_folder
from service.inspection import ARTEFACT_KINDS, Thresholds, verdict
from service.model.config import DEFAULT_FUSION_WEIGHT, IMAGE_SCORES

if TYPE_CHECKING:  # the handler imports them (numpy, OpenCV, torch): `dhrclip --help` stays fast
    from service.engine import ModelInfo
    from service.engine.decode import DecodedImage
    from service.engine.knowledge import NormalMemory
    from service.engine.runner import ImageResult, ModelRunner
    from service.model import Views


@dataclass(frozen=True)
class PredictOptions:
    out_dir: Path
    save_maps: bool = False
    batch_size: int = 1
    thresholds: Thresholds = field(default_factory=Thresholds)
    image_score: str = "reference"
    max_pixels: int = 200_000_000
    memory: NormalMemory | None = None  # on the model's device
    fusion_weight: float = DEFAULT_FUSION_WEIGHT
    n_references: int = 0


@dataclass
class _Pending:
    stem: str
    decoded: DecodedImage
    views: Views
    decode_ms: float


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dhrclip predict``."""
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--save-maps", action="store_true", help="also write <stem>.maps.npz (T x T float32 maps)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per model call")
    d = Thresholds()
    parser.add_argument("--threshold", type=float, default=d.image, help="image threshold of the verdict")
    parser.add_argument("--pixel-threshold", type=float, default=d.pixel, help="mask threshold on the anomaly map")
    parser.add_argument("--image-score", default="reference", choices=IMAGE_SCORES, help="score variant judged")
    parser.add_argument("--references", default=None, help="folder of good reference images (few-shot memory)")
    parser.add_argument(
        "--fusion-weight", type=float, default=DEFAULT_FUSION_WEIGHT, help="w of w * zero-shot + (1 - w) * few-shot"
    )
    add_model_arguments(parser, backend=True)


def _check_options(args: argparse.Namespace) -> None:
    """Refuse out-of-range options before the model loads (NaN fails every range check)."""
    for option, value in (
        ("--threshold", args.threshold),
        ("--pixel-threshold", args.pixel_threshold),
        ("--fusion-weight", args.fusion_weight),
    ):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{option} must be in [0, 1], got {value}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_out_folder("--out", args.out)


def run_predict(args: argparse.Namespace) -> int:
    """Run ``dhrclip predict``: 0 when every image was written, 1 when some could not be read."""
    from service.engine.runner import ModelRunner

    _check_options(args)
    model, info = load_model_from_args(args)
    runner = ModelRunner(model)
    memory, n_refs = None, 0
    if args.references:
        memory, n_refs = reference_memory(Path(args.references), runner, args.batch_size)
    opts = PredictOptions(
        Path(args.out),
        save_maps=args.save_maps,
        batch_size=args.batch_size,
        thresholds=Thresholds(image=args.threshold, pixel=args.pixel_threshold),
        image_score=args.image_score,
        memory=memory,
        fusion_weight=args.fusion_weight,
        n_references=n_refs,
    )
    failures = predict_files([Path(p) for p in args.images], runner, info, opts)
    return 1 if failures else 0


def reference_memory(folder: Path, runner: ModelRunner, batch_size: int) -> tuple[NormalMemory, int]:
    """The normal memory of the image files in ``folder`` (sorted), on the model's device, and their count."""
    from service.engine.decode import DecodeLimits, ImageError, decode_image, views_for
    from service.engine.knowledge import DEFAULT_MAX_TOKENS, build_memory
    from service.engine.runner import InferItem

    if not folder.is_dir():
        raise UserError(f"--references {folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"--references {folder}: no image files")
    features = []
    for start in range(0, len(files), max(1, batch_size)):
        jobs = []
        for path in files[start : start + max(1, batch_size)]:
            try:
                decoded = decode_image(path.read_bytes(), str(path), DecodeLimits(max_pixels=PredictOptions.max_pixels))
            except (ImageError, OSError) as e:
                raise UserError(f"reference {e if isinstance(e, ImageError) else f'{path}: {e}'}") from None
            jobs.append(InferItem(views_for(decoded, runner.preset), keep_features=True))
        features += [r.features for r in runner.run(jobs)]
    memory = build_memory(features, DEFAULT_MAX_TOKENS).to(runner.model.device)
    print(f"{len(files)} reference image(s): memory of {memory.size} tokens per layer", file=sys.stderr)
    return memory, len(files)


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, k = path.stem, 1
    while stem in used:
        stem, k = f"{path.stem}_{k}", k + 1
    used.add(stem)
    return stem


def _write_outputs(item: _Pending, result: ImageResult, info: ModelInfo, opts: PredictOptions, infer_ms: float):
    import numpy as np

    from service.engine.postprocess import postprocess

    t0 = time.perf_counter()
    dec, th = item.decoded, opts.thresholds
    post = postprocess(result.anomaly_map, dec.rgb(), th.pixel)
    for kind in ARTEFACT_KINDS:
        (opts.out_dir / f"{item.stem}.{kind}.png").write_bytes(post.png(kind))
    if opts.save_maps:
        np.savez_compressed(opts.out_dir / f"{item.stem}.maps.npz", anomaly_map=result.anomaly_map, **result.maps)
    score = getattr(result.scores, opts.image_score)
    record = {
        "file": dec.name,
        "width": dec.width,
        "height": dec.height,
        "format": dec.format,
        "mode": dec.mode,
        "preset": info.preset,
        "references": opts.n_references,
        "image_score": opts.image_score,
        "score": score,
        **{f"score_{v}": getattr(result.scores, v) for v in IMAGE_SCORES},
        "threshold": th.image,
        "verdict": verdict(score, th),
        "pixel_threshold": th.pixel,
        "defect_area_ratio": post.defect_area_ratio,
        "regions": [r.to_dict() for r in post.regions],
        "model": info.to_dict(),
        "timing_ms": {
            "decode": item.decode_ms,
            "inference": infer_ms,
            "postprocess": 1000 * (time.perf_counter() - t0),
        },
    }
    (opts.out_dir / f"{item.stem}.json").write_text(json.dumps(record, indent=2))
    print(f"{dec.name}: score {score:.4f} ({record['verdict']}), {len(post.regions)} region(s), {infer_ms:.0f} ms")


def predict_files(paths: list[Path], runner: ModelRunner, info: ModelInfo, opts: PredictOptions) -> int:
    """Run every image; unreadable files get one line on stderr and are skipped. Returns the failure count."""
    from service.engine.decode import DecodeLimits, ImageError, decode_image, views_for
    from service.engine.runner import InferItem
    from service.model import EXTRA_MAPS

    try:
        opts.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {opts.out_dir}: cannot create the folder ({e.strerror or e})") from None
    extra = EXTRA_MAPS if opts.save_maps else ()
    used: set[str] = set()
    failures = 0
    pending: list[_Pending] = []

    def flush():
        if not pending:
            return
        t0 = time.perf_counter()
        results = runner.run([InferItem(p.views, opts.memory, opts.fusion_weight) for p in pending], extra)
        infer_ms = 1000 * (time.perf_counter() - t0) / len(pending)
        for item, result in zip(pending, results, strict=True):
            _write_outputs(item, result, info, opts, infer_ms)
        pending.clear()

    for path in paths:
        t0 = time.perf_counter()
        try:
            dec = decode_image(Path(path).read_bytes(), str(path), DecodeLimits(max_pixels=opts.max_pixels))
        except (ImageError, OSError) as e:
            print(
                f"dhrclip predict: {e if isinstance(e, ImageError) else f'{path}: {e.strerror or e}'}", file=sys.stderr
            )
            failures += 1
            continue
        views = views_for(dec, runner.preset)
        pending.append(_Pending(_unique_stem(Path(path), used), dec, views, 1000 * (time.perf_counter() - t0)))
        if len(pending) >= opts.batch_size:
            flush()
    flush()
    return failures
