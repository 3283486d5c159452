"""CPU backends side by side: seconds per image and peak RSS of torch fp32, ONNX Runtime fp32, OpenVINO fp32 / bf16
and OpenVINO INT8, as ratios to torch fp32, on the full-size random ViT-L/14@336 (preset mvtec by default).

One script. It saves the random backbone and exports it once into ``--work`` (ONNX fp32; INT8 quantised from that
graph, calibrated on ``--calibration``); a later run with the same ``--work`` reuses them (the ViT-L export takes
20-30 min on 2 busy cores). Then ``--rounds`` rounds: in each round every backend runs in a fresh worker process,
the backends interleaved round by round so that drifting machine load hits each alike. A worker loads its model
through the service's loader, runs one warm-up image, then times ``--images`` single-image model calls
(``model(*stack_views([views]))``, the engine's call) and reports its peak RSS (``ru_maxrss``: imports and loading
included) and its RSS after loading. Per backend the table gives the median over rounds of the per-image time and
of the peak RSS; ratios are to torch fp32 of the same run.

    nice -n 10 env PYTHONPATH=. .venv/bin/python bench/backends.py --rounds 2 --images 1 --work /tmp/bench-backends \\
        --calibration ../shared/data/real_defects/magnetic_tile/train/good
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    "openvino int8 bf16": ("openvino", "bf16", "int8"),  # INT8 weights, bf16 for what is not quantised
}
BACKBONE = "vit_l_14_336_random.pt"
TARGETS = "a CPU backend >= 1.5x torch fp32 without INT8; INT8 >= 2.5x; best backend peak RSS <= 1.5 GiB"


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB; the peak is ``ru_maxrss`` (KiB on Linux)."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    """One backend in this process: load, warm up, time; prints one JSON line."""
    from service.engine import find_weights, load_for_backend
    from service.engine.decode import decode_image, views_for
    from service.model import stack_views

    import_rss = rss_mib()[1]
    t0 = time.perf_counter()
    choice = find_weights(args.backbone, "ensemble", Path(args.backbone).parent, "cpu")
    model, _ = load_for_backend(
        args.backend, choice, export_dir=args.export_dir, preset=args.preset, precision=args.precision
    )
    load_s = time.perf_counter() - t0
    loaded_rss, load_peak = rss_mib()
    files = sorted(Path(args.calibration).iterdir())[: args.images + 1]
    batches = [stack_views([views_for(decode_image(f.read_bytes(), f.name), model.cfg.preset)]) for f in files]
    with torch.inference_mode():
        model(*batches[0])  # warm-up
        times = []
        for batch in batches[1:]:
            t = time.perf_counter()
            model(*batch)
            times.append(time.perf_counter() - t)
    row = {"s_per_image": statistics.median(times), "peak_rss_mib": rss_mib()[1], "load_s": load_s}
    row.update(import_rss_mib=import_rss, loaded_rss_mib=loaded_rss, load_peak_rss_mib=load_peak)
    print(json.dumps({k: round(v, 3) for k, v in row.items()}))


def prepare(args, work: Path) -> tuple[str, dict[str, Path]]:
    """Random ViT-L saved as a backbone file; fp32 ONNX and INT8 IR exports of it (each kept when present)."""
    from service.engine.export import SIDECAR, export_model, read_export
    from service.engine.quantize import export_int8, folder_samples
    from service.model import load_model, random_backbone

    work.mkdir(parents=True, exist_ok=True)
    backbone = work / BACKBONE
    dirs = {"fp32": work / "fp32", "int8": work / "int8"}
    if not backbone.is_file():
        torch.save(random_backbone("ViT-L-14-336-quickgelu").state_dict(), backbone)
    if not (dirs["fp32"] / SIDECAR).is_file():
        t0 = time.perf_counter()
        export_model(*load_model(backbone, "ensemble", preset=args.preset, device="cpu"), dirs["fp32"])
        print(f"ONNX fp32 export: {time.perf_counter() - t0:.0f} s", flush=True)
    if not (dirs["int8"] / SIDECAR).is_file():
        t0 = time.perf_counter()
        samples = folder_samples(args.calibration, args.calibration_limit)
        source = {"kind": "folder", "folder": args.calibration}
        export_int8(read_export(dirs["fp32"], args.preset), dirs["int8"], samples, source)
        print(f"INT8 from the fp32 graph ({len(samples)} calibration images): {time.perf_counter() - t0:.0f} s")
    return str(backbone), dirs


def run_worker(args, name: str, backbone: str, dirs: dict[str, Path]) -> dict:
    backend, precision, sub = VARIANTS[name]
    cmd = [sys.executable, __file__, "--worker", "--backend", backend, "--precision", precision]
    cmd += ["--backbone", backbone, "--preset", args.preset, "--calibration", args.calibration]
    cmd += ["--images", str(args.images)] + (["--export-dir", str(dirs[sub])] if sub else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if out.returncode:
        raise SystemExit(f"{name}: worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(args, names: list[str], results: dict[str, list[dict]]) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    base, base_rss = med(names[0], "s_per_image"), med(names[0], "peak_rss_mib")
    print(f"\npreset {args.preset}, {torch.get_num_threads()} CPU threads, {args.rounds} rounds x {args.images} images")
    print("per image: median over rounds; peak RSS: ru_maxrss of the backend's own worker (imports + load + run)")
    head = ("backend", "s/image", "speed-up", "peak RSS MiB", "RSS ratio", "after load", "imports")
    print(f"{head[0]:18s} " + " ".join(f"{h:>12s}" for h in head[1:]))
    for name in names:
        s, rss = med(name, "s_per_image"), med(name, "peak_rss_mib")
        cells = (f"{s:.2f}", f"{base / s:.2f}x", f"{rss:.0f}", f"{rss / base_rss:.2f}")
        cells += (f"{med(name, 'loaded_rss_mib'):.0f}", f"{med(name, 'import_rss_mib'):.0f}")
        print(f"{name:18s} " + " ".join(f"{c:>12s}" for c in cells))
    print(f"targets: {TARGETS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mvtec")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--images", type=int, default=1, help="timed images per worker (after one warm-up image)")
    ap.add_argument("--calibration", required=True, help="folder of good images (calibration and timing inputs)")
    ap.add_argument("--calibration-limit", type=int, default=4)
    ap.add_argument("--work", default=None, help="keep the backbone and exports here and reuse them (default: temp)")
    ap.add_argument("--prepare-only", action="store_true", help="write the exports into --work, time nothing")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list; the first is the ratios' base")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--export-dir", help=argparse.SUPPRESS)
    ap.add_argument("--backbone", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or args.rounds < 1:
        raise SystemExit(f"unknown variants {unknown} (choose from {', '.join(VARIANTS)}); --rounds >= 1")
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        backbone, dirs = prepare(args, Path(args.work or tmp))
        if args.prepare_only:
            return print(f"exports ready in {args.work}")
        for r in range(args.rounds):
            for name in names:
                results[name].append(run_worker(args, name, backbone, dirs))
                print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
    report(args, names, results)


if __name__ == "__main__":
    main()
