"""Benchmark (not a test): how long ``dhrclip evaluate`` takes, split into image loading, model and metric time.

Part 1 runs the evaluation protocol on the real-defect development set with a full-size ViT-L/14@336 of random
weights (``random_backbone``; timing does not depend on the weights) and the training-free prompt ensemble.
Part 2 times the metrics alone on synthetic classes: ``compute_metrics`` on ``N x H x W`` float32 maps (default
1,000 x 224 x 224, a large MVTec/VisA class at a reduced size) and the pooled path used by the service protocol for
images of different sizes.

    .venv/bin/python bench/evaluate_time.py --limit 1                 # 1 image per class, preset mvtec
    .venv/bin/python bench/evaluate_time.py --skip-model --metric-images 1000 --metric-size 224
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.data import load_dataset  # noqa: E402
from service.evaluate.metrics import compute_metrics  # noqa: E402
from service.evaluate.runner import evaluate, pooled_metrics  # noqa: E402
from service.model import build_model, random_backbone  # noqa: E402
from tests.paths import REAL_DEFECTS as DATA  # noqa: E402  (the one definition of the shared-data paths)

# isort: split
import torch  # noqa: E402 - after `service`, which applies the thread policy before torch loads OpenMP


def bench_model(args: argparse.Namespace) -> None:
    classes = args.classes.split(",") if args.classes else None
    by_class = load_dataset(args.data, classes=classes, limit=args.limit)
    n = sum(len(v) for v in by_class.values())
    t0 = time.perf_counter()
    clip = random_backbone()
    model, _ = build_model(clip, "ensemble", preset=args.preset, device=args.device, precision=args.precision)
    build_s = time.perf_counter() - t0
    print(
        f"model: ViT-L-14-336 random weights, ensemble prompts, preset {args.preset}, {args.device} "
        f"{args.precision}, {torch.get_num_threads()} threads; built in {build_s:.1f} s"
    )
    report = evaluate(model, by_class, protocol=args.protocol, batch_size=args.batch_size, progress=False)
    t = report["timing"]
    total = report["seconds"]
    print(
        f"evaluate ({args.protocol}): {n} images of {len(by_class)} classes in {total:.1f} s = {total / n:.2f} s "
        f"per image; model {t['model']:.1f} s ({t['model'] / n:.2f} s/img), loading {t['load']:.2f} s, "
        f"metrics {t['metrics']:.2f} s"
    )
    for cls, row in report["classes"].items():
        auroc = "-" if row["pixel_auroc"] is None else f"{100 * row['pixel_auroc']:.1f}"
        print(f"  {cls}: {row['n_images']} images, pixel AUROC {auroc}")


def synthetic_class(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, size, size) bool masks (half the images get 1-3 rectangular defects), float32 maps, (N,) labels."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    labels = np.zeros(n, dtype=np.int64)
    for i in range(n // 2, n):
        labels[i] = 1
        for _ in range(rng.integers(1, 4)):
            h, w = rng.integers(size // 32, size // 4, size=2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            masks[i, y : y + h, x : x + w] = True
    maps = rng.random((n, size, size), dtype=np.float32)
    maps += 0.6 * masks
    return masks, maps, labels


def bench_metrics(args: argparse.Namespace) -> None:
    n, size = args.metric_images, args.metric_size
    masks, maps, labels = synthetic_class(n, size)
    scores = {v: maps.reshape(n, -1).max(axis=1).astype(np.float64) for v in ("reference", "map_max", "map_topk")}
    print(f"metrics on a synthetic class of {n} x {size} x {size} ({maps.nbytes / 2**20:.0f} MiB of float32 maps):")
    t0 = time.perf_counter()
    m = compute_metrics(masks, maps, labels, scores)
    t1 = time.perf_counter()
    print(
        f"  compute_metrics (stacked, paper protocol): {t1 - t0:.1f} s   (pixel AUROC {m['pixel_auroc']:.4f}, "
        f"AUPRO {m['pixel_aupro']:.4f})"
    )
    p = pooled_metrics(list(masks), list(maps), labels, scores)
    t2 = time.perf_counter()
    print(
        f"  pooled_metrics (list, service protocol with mixed sizes): {t2 - t1:.1f} s   (pixel AUROC "
        f"{p['pixel_auroc']:.4f}, AUPRO {p['pixel_aupro']:.4f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--classes", default=None, help="comma-separated (default: all)")
    parser.add_argument("--limit", type=int, default=1, help="images per class")
    parser.add_argument("--preset", default="mvtec", choices=["mvtec", "visa", "fast"])
    parser.add_argument("--protocol", default="paper", choices=["paper", "service"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--metric-images", type=int, default=1000)
    parser.add_argument("--metric-size", type=int, default=224)
    parser.add_argument("--skip-model", action="store_true", help="only the synthetic metric timing")
    parser.add_argument("--skip-metrics", action="store_true", help="only the model run")
    args = parser.parse_args()
    if not args.skip_model:
        bench_model(args)
    if not args.skip_metrics:
        bench_metrics(args)


if __name__ == "__main__":
    main()
