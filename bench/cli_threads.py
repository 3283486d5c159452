"""Benchmark (not a test): CPU seconds per image of ``dhrclip predict``, alone and beside a busy competitor, with
the thread policy off (``DHR_THREAD_POLICY=default``: OpenMP as shipped, idle threads spin) and on (``passive``,
the default; ``service/runtime.py``), all measured in one run.

Each case runs ``python -m service.cli predict`` twice, on 1 image and on ``1 + N`` images (real defect photos);
the difference of the child's CPU time (user + system, from ``wait4``) divided by ``N`` is the CPU per image
without start-up and model loading. The wall time per image is the mean of the model step's own timing that
``predict`` prints per image (``..., 812 ms``) in the ``1 + N`` run. "busy" starts ``--busy`` pure-Python busy loops
(default: one per CPU) for the length of the two runs. Default model: the tiny random CLIP of the parity fixtures
(the spinning does not depend on the weights; ``--backbone`` takes a full-size file)::

    nice -n 10 .venv/bin/python bench/cli_threads.py                 # 4 images, preset mvtec, 1 busy loop per CPU
    nice -n 10 .venv/bin/python bench/cli_threads.py --images 8 --busy 4
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "reference_parity"
PHOTOS = ROOT.parent / "shared" / "data" / "real_defects" / "magnetic_tile" / "test"
BUSY_LOOP = "while True:\n    pass"
STEP_MS = re.compile(r", (\d+) ms$", re.MULTILINE)  # predict's line per image ends with the model step's time


def run_predict(images: list[Path], args: argparse.Namespace, policy: str) -> tuple[float, float]:
    """(CPU seconds of the child process, mean model-step wall seconds per image) of one ``predict`` run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DHR_THREAD_POLICY": policy}
    env.pop("OMP_WAIT_POLICY", None)  # the policy under test decides it
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "service.cli", "predict", *map(str, images), "--out", out]
        cmd += ["--backbone", args.backbone, "--prompts", args.prompts, "--preset", args.preset]
        with tempfile.TemporaryFile() as out_log, tempfile.TemporaryFile() as err_log:
            child = subprocess.Popen(cmd, env=env, stdout=out_log, stderr=err_log)
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)
            out_log.seek(0)
            err_log.seek(0)
            out, err = out_log.read().decode(errors="replace"), err_log.read().decode(errors="replace")
    if child.returncode != 0:
        raise SystemExit(f"predict failed ({child.returncode}): {err.strip()}")
    step_ms = [float(m) for m in STEP_MS.findall(out)]
    if len(step_ms) != len(images):
        raise SystemExit(f"expected {len(images)} per-image lines from predict, got:\n{out}")
    return usage.ru_utime + usage.ru_stime, sum(step_ms) / len(step_ms) / 1000


def per_image(images: list[Path], args: argparse.Namespace, policy: str) -> tuple[float, float]:
    """(CPU, model-step wall) seconds per image: CPU (run on all images - run on the first) / (len(images) - 1)."""
    cpu_1, _ = run_predict(images[:1], args, policy)
    cpu_n, wall = run_predict(images, args, policy)
    return (cpu_n - cpu_1) / (len(images) - 1), wall


def with_busy(count: int, fn):
    """Call ``fn()`` while ``count`` busy-loop processes compete for the CPU."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        return fn()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4, help="images per measured run (besides the first)")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="competing busy-loop processes")
    parser.add_argument("--backbone", default=str(FIXTURES / "clip_tiny_openai_format.pt"))
    parser.add_argument("--prompts", default=str(FIXTURES / "prompt_learner_checkpoint.pth"))
    parser.add_argument("--preset", default="mvtec")
    args = parser.parse_args()
    photos = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in {".jpg", ".bmp", ".png"})
    images = photos[: args.images + 1]
    if len(images) < 2:
        raise SystemExit(f"{PHOTOS}: need at least 2 images")
    print(
        f"dhrclip predict, preset {args.preset}, backbone {Path(args.backbone).name}, {len(images) - 1} images per "
        f"measurement, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; busy = {args.busy} busy loops"
    )
    print(f"{'policy':<10}{'competitor':<12}{'CPU s/image':>12}{'model wall s/image':>20}")
    results = {}
    for busy in (False, True):
        for policy in ("default", "passive"):
            run = lambda policy=policy: per_image(images, args, policy)  # noqa: E731
            cpu, wall = with_busy(args.busy, run) if busy else run()
            results[policy, busy] = cpu
            print(f"{policy:<10}{'busy' if busy else 'none':<12}{cpu:>12.3f}{wall:>20.3f}", flush=True)
    for busy in (False, True):
        ratio = results["default", busy] / max(results["passive", busy], 1e-9)
        print(f"CPU per image, default / passive, {'beside busy loops' if busy else 'alone'}: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
