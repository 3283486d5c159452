"""Fidelity cost of the INT8 (OpenVINO + NNCF) export against torch fp32, on a labelled dataset.

Exports the model twice as INT8 (SmoothQuant on, alpha 0.95, and off: the published CLIP ViT-L int8 pitfall),
calibrated on a folder of good images, then evaluates torch fp32, OpenVINO fp32, both INT8 variants and the
SmoothQuant one with bf16 inference precision for its unquantised ops, with the evaluation runner (protocol
"service": the served map, resized to each image). Prints per variant the map deviation from torch fp32 (max and
mean |delta|, pooled over every pixel of every image) and the mean pixel / image AUROC over classes with their
change.

    PYTHONPATH=. .venv/bin/python bench/int8_fidelity.py \\
        --data ../shared/data/real_defects --calibration ../shared/data/real_defects/magnetic_tile/train/good

Defaults: the fixture's tiny random CLIP and reference prompt checkpoint, preset mvtec.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from service.data import load_dataset
from service.engine.backends import load_exported
from service.engine.export import export_model, read_export
from service.engine.quantize import export_int8, folder_samples
from service.evaluate.runner import evaluate
from service.model import load_model
from tests.paths import REF_PROMPTS, TINY_CLIP


def run_eval(model, by_class) -> tuple[dict, list[np.ndarray]]:
    maps: list[np.ndarray] = []
    body = evaluate(
        model, by_class, protocol="service", batch_size=4, progress=False, on_class=lambda c, d: maps.extend(d.maps)
    )
    return body["mean"], maps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="MVTec-style dataset root (meta.json)")
    ap.add_argument("--calibration", required=True, help="folder of good images")
    ap.add_argument("--calibration-limit", type=int, default=64)
    ap.add_argument("--backbone", default=str(TINY_CLIP))
    ap.add_argument("--prompts", default=str(REF_PROMPTS))
    ap.add_argument("--preset", default="mvtec")
    args = ap.parse_args()

    by_class = load_dataset(args.data, split="test")
    model, info = load_model(args.backbone, args.prompts, preset=args.preset, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        fp32_dir, sq_dir, nosq_dir = Path(tmp) / "fp32", Path(tmp) / "int8_sq", Path(tmp) / "int8_nosq"
        export_model(model, info, fp32_dir)
        samples = folder_samples(args.calibration, args.calibration_limit)
        source = {"kind": "folder", "folder": args.calibration}
        fp32 = read_export(fp32_dir, args.preset)
        export_int8(fp32, sq_dir, samples, source, smooth_quant=True)
        export_int8(fp32, nosq_dir, samples, source, smooth_quant=False)
        variants = {
            "torch fp32": lambda: model,
            "openvino fp32": lambda: load_exported("openvino", fp32_dir, preset=args.preset)[0],
            "openvino int8 (SmoothQuant 0.95)": lambda: load_exported("openvino", sq_dir, preset=args.preset)[0],
            "openvino int8 (no SmoothQuant)": lambda: load_exported("openvino", nosq_dir, preset=args.preset)[0],
            "openvino int8 (SQ 0.95) bf16": lambda: load_exported(
                "openvino", sq_dir, preset=args.preset, precision="bf16"
            )[0],
        }
        n = sum(len(s) for s in by_class.values())
        print(f"{n} test images, {len(by_class)} classes, preset {args.preset}, backbone {Path(args.backbone).name}")
        head = ("max|dmap|", "mean|dmap|", "pixAUROC", "d", "imgAUROC", "d", "s")
        print(f"{'variant':34s} " + " ".join(f"{h:>{w}s}" for h, w in zip(head, (10, 11, 9, 8, 9, 8, 6), strict=True)))
        base = None
        for name, make in variants.items():
            t0 = time.perf_counter()
            mean, maps = run_eval(make(), by_class)
            secs = time.perf_counter() - t0
            if base is None:
                base = (mean, maps)
            diffs = [np.abs(a - b) for a, b in zip(maps, base[1], strict=True)]
            dmax = max(float(d.max()) for d in diffs)
            dmean = float(np.concatenate([d.ravel() for d in diffs]).mean())
            pix, img = mean["pixel_auroc"], mean["reference"]["image_auroc"]
            bpix, bimg = base[0]["pixel_auroc"], base[0]["reference"]["image_auroc"]
            print(
                f"{name:34s} {dmax:10.2e} {dmean:11.2e} {pix:9.4f} {pix - bpix:+8.4f} {img:9.4f} {img - bimg:+8.4f} "
                f"{secs:6.1f}"
            )


if __name__ == "__main__":
    main()
