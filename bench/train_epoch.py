"""Benchmark (not a test): seconds per prompt-training epoch with and without the view-feature cache.

Full-size ViT-L/14@336 (QuickGELU) with random weights (``random_backbone()``; timings do not depend on the
weights) trains prompts on a few images of the real-defect set, once with the in-memory feature cache and once
recomputing the frozen tower's features every epoch (the reference's behaviour). Prints, per mode, the one-off
feature extraction, each epoch's wall time and the final prompts' max difference between the modes (expected 0:
both round the features to the same storage dtype).

    .venv/bin/python bench/train_epoch.py --limit 2 --epochs 2            # CPU, about 3 minutes on 2 cores
    .venv/bin/python bench/train_epoch.py --device cuda --limit 16 --epochs 3

Expect on CPU (fp32): a cached epoch costs the text tower forward/backward plus the maps and loss at T x T; an
uncached epoch adds 5 ViT-L views per image (~3 s per 336 view on 2 cores).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's service/ and tests/

import service  # noqa: E402, F401 - applies the thread policy before torch loads OpenMP (service/runtime.py)

# isort: split
import torch  # noqa: E402

from service.data import load_dataset  # noqa: E402
from service.model import DHRConfig, get_preset, random_backbone  # noqa: E402
from service.train.trainer import TrainSettings, train_prompts  # noqa: E402
from tests.paths import REAL_DEFECTS as DEFAULT_DATA  # noqa: E402  (the one definition of the shared-data paths)

MODEL = "ViT-L-14-336-quickgelu"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--classes", default="magnetic_tile", help="comma-separated classes")
    ap.add_argument("--limit", type=int, default=2, help="images per class")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--preset", default="mvtec")
    ap.add_argument("--layer-features", choices=("final", "per_layer"), default="final")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--modes", default="memory,none", help="cache modes to time, in order")
    return ap.parse_args()


def main() -> int:
    args = parse()
    by_class = load_dataset(args.data, split="test", classes=args.classes.split(","), limit=args.limit)
    samples = [s for items in by_class.values() for s in items]
    cfg = DHRConfig(preset=get_preset(args.preset), layer_features=args.layer_features)
    t0 = time.perf_counter()
    clip = random_backbone(MODEL)
    build_s = time.perf_counter() - t0
    backbone = {"name": f"random:{MODEL}:seed0", "sha256": "random-seed0"}
    p = cfg.preset
    print(
        f"# {MODEL} random weights (built in {build_s:.1f} s), preset {p.name} S/P/T {p.image_size}/"
        f"{p.crop_size}/{p.target_size}, layer_features {cfg.layer_features}, {len(samples)} images, batch "
        f"{args.batch_size}, {args.epochs} epochs, device {args.device}, precision {args.precision}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    finals = {}
    rows = []
    for mode in args.modes.split(","):
        settings = TrainSettings(
            epochs=args.epochs, batch_size=args.batch_size, device=args.device, precision=args.precision, cache=mode
        )
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            r = train_prompts(clip, samples, cfg, out, settings, backbone=backbone, progress=False)
            total = time.perf_counter() - t0
        finals[mode] = r.learner
        per_epoch = r.epoch_seconds
        rows.append((mode, r.prepare_seconds, per_epoch, total, r.losses))
        steady = sum(per_epoch[1:]) / max(1, len(per_epoch) - 1) if len(per_epoch) > 1 else per_epoch[0]
        print(
            f"cache={mode:6s}  extraction {r.prepare_seconds:7.2f} s  epochs "
            f"[{', '.join(f'{s:.2f}' for s in per_epoch)}] s  steady {steady:7.2f} s/epoch  "
            f"({steady / len(samples):.3f} s/image)  total {total:7.2f} s  losses "
            f"[{', '.join(f'{v:.5f}' for v in r.losses)}]",
            flush=True,
        )
    if len(finals) > 1:
        ref = next(iter(finals.values()))
        for mode, learner in list(finals.items())[1:]:
            diff = max(
                (getattr(learner, k) - getattr(ref, k)).abs().max().item() for k in ("ctx_pos", "ctx_neg", "deep")
            )
            print(f"max |prompt({mode}) - prompt({rows[0][0]})| = {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
