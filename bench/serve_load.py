"""Load test of the HTTP service over loopback: images/s and p50/p95/p99 latency per client concurrency.

Starts ``python -m service.api.server`` (uvicorn, one process) on 127.0.0.1 and a free port, with its own temporary
data directory, waits for /readyz, then for each concurrency level C runs ``--requests`` POST /segment requests
(``--images-per-request`` real JPEGs each, from the shared real_defects set) with C concurrent clients and prints
throughput, latency percentiles and the mean model batch size (from /metrics). The server is stopped with SIGTERM.

    .venv/bin/python bench/serve_load.py --preset fast --requests 48 --concurrency 1,4,8,16
    .venv/bin/python bench/serve_load.py --random-vit-l --preset mvtec --requests 8 --concurrency 1,4

``--random-vit-l`` saves a randomly initialised full-size ViT-L/14@336 (``service.model.random_backbone()``, whose
state dict uses the OpenAI key names) to a temporary ``.pt`` file and serves it with the ensemble prompts: real
compute, meaningless scores. Default backbone/prompts: the tiny CLIP and prompt checkpoint of the parity fixtures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.paths import REAL_DEFECTS, REF_PROMPTS, TINY_CLIP  # noqa: E402  (the one definition of these paths)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_random_vit_l(folder: Path) -> Path:
    """A full-size random ViT-L/14@336 as an OpenAI-format state dict (about 1.7 GB)."""
    import torch

    from service.model import random_backbone

    path = folder / "random-ViT-L-14-336.pt"
    t0 = time.perf_counter()
    torch.save(random_backbone().state_dict(), path)
    print(
        f"saved random ViT-L/14@336 to {path} ({path.stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - t0:.1f} s)"
    )
    return path


def load_images(limit: int) -> list[tuple[str, bytes]]:
    files = sorted(p for p in REAL_DEFECTS.glob("*/*/*/*.jpg") if "ground_truth" not in p.parts)
    if not files:
        raise SystemExit(f"no JPEGs under {REAL_DEFECTS}")
    return [(p.name, p.read_bytes()) for p in files[:limit]]


def start_server(args, port: int, work: Path, backbone: str, prompts: str) -> tuple[subprocess.Popen, Path]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DHR_BACKBONE": backbone,
        "DHR_PROMPTS": prompts,
        "DHR_PRESET": args.preset,
        "DHR_DEVICE": args.device,
        "DHR_PRECISION": args.precision,
        "DHR_MAX_BATCH_SIZE": str(args.max_batch_size),
        "DHR_MAX_WAIT_MS": str(args.max_wait_ms),
        "DHR_QUEUE_SIZE": str(max(64, 2 * args.max_concurrency * args.images_per_request)),
        "DHR_DATA_DIR": str(work / "data"),
        "DHR_REQUEST_TIMEOUT_S": "600",
        "DHR_MAX_QUEUE_WAIT_S": "600",  # throughput under a saturating load: the default bound would refuse it
        "DHR_MAX_UPLOAD_MB": "200",
    }
    log = work / "server.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.api.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
    )
    return proc, log


async def wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> float:
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited ({proc.returncode}); log:\n{log.read_text()[-3000:]}")
            try:
                r = await client.get("/readyz")
                if r.status_code == 200:
                    return time.perf_counter() - t0
                if r.json().get("status") == "error":
                    raise SystemExit(f"model failed to load: {r.json()['reason']}")
            except httpx.TransportError:
                pass
            if time.perf_counter() - t0 > timeout_s:
                raise SystemExit(f"not ready after {timeout_s} s; log:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.2)


async def batch_totals(client: httpx.AsyncClient) -> tuple[float, float]:
    """(dhr_batch_size_sum, dhr_batch_size_count) from /metrics."""
    text = (await client.get("/metrics")).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("dhr_batch_size_sum ", "dhr_batch_size_count ")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("dhr_batch_size_sum", 0.0), values.get("dhr_batch_size_count", 0.0)


async def run_level(
    base: str, images: list, concurrency: int, requests: int, per_request: int, max_seconds: float
) -> dict:
    """``requests`` POSTs by ``concurrency`` clients (or until ``max_seconds``); latencies in seconds."""
    latencies: list[float] = []
    errors: dict[int, int] = {}
    next_index = 0
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=900, limits=limits) as client:
        sum0, count0 = await batch_totals(client)

        async def worker() -> None:
            nonlocal next_index
            while next_index < requests and time.perf_counter() < deadline:
                i = next_index
                next_index += 1
                files = [("image", images[(i * per_request + k) % len(images)]) for k in range(per_request)]
                t0 = time.perf_counter()
                r = await client.post("/segment", files=files)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[r.status_code] = errors.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        sum1, count1 = await batch_totals(client)
    lat = np.array(latencies) * 1000.0
    pct = np.percentile(lat, [50, 95, 99]) if len(lat) else [float("nan")] * 3
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "elapsed_s": elapsed,
        "images_per_s": len(latencies) * per_request / elapsed,
        "p50": pct[0],
        "p95": pct[1],
        "p99": pct[2],
        "mean_batch": (sum1 - sum0) / (count1 - count0) if count1 > count0 else float("nan"),
    }


async def bench(args, base: str, images: list) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(base_url=base, timeout=900) as client:  # one untimed request first
        r = await client.post("/segment", files=[("image", images[0])])
        r.raise_for_status()
    for c in args.levels:
        row = await run_level(base, images, c, args.requests, args.images_per_request, args.max_seconds)
        rows.append(row)
        print(
            f"  c={c:<3d} {row['requests']:4d} req  {row['images_per_s']:7.2f} img/s  p50 {row['p50']:8.1f} ms  "
            f"p95 {row['p95']:8.1f} ms  p99 {row['p99']:8.1f} ms  mean batch {row['mean_batch']:.2f}"
            + (f"  errors {row['errors']}" if row["errors"] else ""),
            flush=True,
        )
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default=str(TINY_CLIP), help="CLIP file or openai")
    p.add_argument(
        "--prompts",
        default=None,
        help="prompt checkpoint or 'ensemble' (default: the fixture checkpoint; 'ensemble' with --random-vit-l)",
    )
    p.add_argument("--random-vit-l", action="store_true", help="serve a full-size random ViT-L/14@336")
    p.add_argument("--preset", default="fast")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop a level after this long")
    p.add_argument("--concurrency", default="1,4,8", help="comma list of client counts")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--images", type=int, default=64, help="distinct JPEGs to cycle through")
    p.add_argument("--ready-timeout-s", type=float, default=900.0)
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    args.max_concurrency = max(args.levels)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    images = load_images(args.images)
    with tempfile.TemporaryDirectory(prefix="dhr-serve-load-") as tmp:
        work = Path(tmp)
        backbone = str(save_random_vit_l(work)) if args.random_vit_l else args.backbone
        prompts = args.prompts or ("ensemble" if args.random_vit_l else str(REF_PROMPTS))
        port = free_port()
        proc, log = start_server(args, port, work, backbone, prompts)
        base = f"http://127.0.0.1:{port}"
        try:
            ready_s = asyncio.run(wait_ready(base, proc, log, args.ready_timeout_s))
            print(
                f"server ready in {ready_s:.1f} s: backbone={Path(backbone).name} prompts={Path(prompts).name} "
                f"preset={args.preset} device={args.device} precision={args.precision} "
                f"max_batch={args.max_batch_size} max_wait={args.max_wait_ms} ms, "
                f"{args.images_per_request} image(s)/request, {len(images)} JPEGs"
            )
            asyncio.run(bench(args, base, images))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
