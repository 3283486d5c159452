"""CPU backends side by side: seconds per image and peak RSS of torch fp32, ONNX Runtime fp32, OpenVINO fp32 / bf16
and OpenVINO INT8, as ratios to torch fp32, on the full-size random ViT-L/14@336 (preset mvtec by default).

One script: it saves the random backbone once, exports it (ONNX fp32; INT8 calibrated on --calibration), then runs
each backend in a fresh worker process per round, the backends interleaved round by round (so drifting machine
load hits every backend alike). A worker loads its model through the service's loader, runs one warm-up image,
then times ``--images`` single-image model calls (``model(*stack_views([views]))``, the engine's call) and reports
its peak RSS (VmHWM: loading included). The table gives medians over rounds.

    nice -n 10 env PYTHONPATH=. .venv/bin/python bench/backends.py --rounds 2 --images 2 \\
        --calibration ../shared/data/real_defects/magnetic_tile/train/good
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# name -> (backend, precision, export subdirectory)
VARIANTS = {
    "torch fp32": ("torch", "fp32", None),
    "onnxruntime fp32": ("onnxruntime", "fp32", "fp32"),
    "openvino fp32": ("openvino", "fp32", "fp32"),
    "openvino bf16": ("openvino", "bf16", "fp32"),
    "openvino int8": ("openvino", "fp32", "int8"),
}


def peak_rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> None:
    """One backend in this process: load, warm up, time; prints one JSON line."""
    from service.engine import find_weights, load_for_backend
    from service.engine.decode import decode_image, views_for
    from service.model import stack_views

    t0 = time.perf_counter()
    choice = find_weights(args.backbone, "ensemble", Path(args.backbone).parent, "cpu")
    model, _ = load_for_backend(
        args.backend, choice, export_dir=args.export_dir, preset=args.preset, precision=args.precision
    )
    load_s = time.perf_counter() - t0
    files = sorted(Path(args.calibration).iterdir())[: args.images + 1]
    batches = [stack_views([views_for(decode_image(f.read_bytes(), f.name), model.cfg.preset)]) for f in files]
    model(*batches[0])  # warm-up
    times = []
    for batch in batches[1:]:
        t = time.perf_counter()
        model(*batch)
        times.append(time.perf_counter() - t)
    print(json.dumps({"s_per_image": statistics.median(times), "peak_rss_mib": peak_rss_mib(), "load_s": load_s}))


def prepare(args, tmp: Path) -> tuple[str, dict[str, Path]]:
    """Random ViT-L saved as a backbone file; fp32 ONNX and INT8 IR exports of it."""
    from service.engine.export import export_model
    from service.engine.quantize import export_int8
    from service.model import load_model, random_backbone

    backbone = tmp / "vit_l_14_336_random.pt"
    torch.save(random_backbone("ViT-L-14-336-quickgelu").state_dict(), backbone)
    model, info = load_model(backbone, "ensemble", preset=args.preset, device="cpu")
    dirs = {"fp32": tmp / "fp32", "int8": tmp / "int8"}
    t0 = time.perf_counter()
    export_model(model, info, dirs["fp32"])
    print(f"ONNX fp32 export: {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    export_int8(model, info, dirs["int8"], args.calibration, args.calibration_limit)
    print(f"INT8 export ({args.calibration_limit} calibration images): {time.perf_counter() - t0:.0f} s", flush=True)
    return str(backbone), dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mvtec")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--images", type=int, default=2, help="timed images per worker (after one warm-up image)")
    ap.add_argument("--calibration", required=True, help="folder of good images (calibration and timing inputs)")
    ap.add_argument("--calibration-limit", type=int, default=4)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--export-dir", help=argparse.SUPPRESS)
    ap.add_argument("--backbone", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    names = args.variants.split(",")
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        backbone, dirs = prepare(args, Path(tmp))
        for r in range(args.rounds):
            for name in names:
                backend, precision, sub = VARIANTS[name]
                cmd = [sys.executable, __file__, "--worker", "--backend", backend, "--precision", precision]
                cmd += ["--backbone", backbone, "--preset", args.preset, "--calibration", args.calibration]
                cmd += ["--images", str(args.images)] + (["--export-dir", str(dirs[sub])] if sub else [])
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                if out.returncode:
                    raise SystemExit(f"{name}: worker failed:\n{out.stderr[-3000:]}")
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
    base = statistics.median(x["s_per_image"] for x in results[names[0]])
    base_rss = statistics.median(x["peak_rss_mib"] for x in results[names[0]])
    print(f"\npreset {args.preset}, {torch.get_num_threads()} CPU threads, {args.rounds} rounds x {args.images} images")
    print(f"{'backend':18s} {'s/image':>8s} {'speed-up':>8s} {'peak RSS MiB':>12s} {'RSS ratio':>9s}")
    for name in names:
        s = statistics.median(x["s_per_image"] for x in results[name])
        rss = statistics.median(x["peak_rss_mib"] for x in results[name])
        print(f"{name:18s} {s:8.2f} {base / s:7.2f}x {rss:12.0f} {rss / base_rss:9.2f}")


if __name__ == "__main__":
    main()
