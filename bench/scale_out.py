"""Throughput of the Ray Serve deployment with 1 and with 2 replicas on this machine, measured in one run.

Each configuration gets a fresh local Ray cluster (tests/ray_cluster.py) whose replicas share one database and
one artefact store, like replicas on several boxes: by default a SQLite file and a folder in a temp directory
(fine on one box), or PostgreSQL (``--database-url``) and a bucket on moto's S3 server (``--s3``). After the
replicas are ready and warmed up, ``--clients`` threads POST ``--images`` single-image /segment requests and the
wall time gives images/s. Prints one line per configuration and the ratio 2 replicas / 1 replica. On 2 shared
cores the ratio is bounded by the cores, not by the service.

    PYTHONPATH=. .venv/bin/python bench/scale_out.py [--images 80] [--clients 8] [--preset fast] [--s3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.api_fixtures import encode, synthetic_image  # noqa: E402
from tests.paths import REF_PROMPTS, ROOT, TINY_CLIP  # noqa: E402
from tests.ray_cluster import RayServe  # noqa: E402
from tests.s3_server import S3_ENV, free_port, start_moto  # noqa: E402


def wait_replicas(client: httpx.Client, want: int, timeout_s: float = 300.0) -> None:
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sorted(seen)} ready after {timeout_s:g} s")
        r = client.get("/health")
        if r.status_code == 200:
            seen.add(r.json()["replica"])
        else:
            time.sleep(0.3)


def measure(env: dict[str, str], replicas: int, images: list[bytes], clients: int, count: int) -> dict:
    """Images/s of ``replicas`` replicas for ``count`` requests (cycling over ``images``) from ``clients`` threads."""
    with RayServe(env, replicas=replicas) as ray, httpx.Client(base_url=ray.url, timeout=300) as client:
        wait_replicas(client, replicas)

        def post(i: int) -> str:
            data = images[i % len(images)]
            r = client.post("/segment", files=[("image", (f"p{i}.png", data, "image/png"))])
            r.raise_for_status()
            return r.headers["x-dhr-replica"]

        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(post, range(2 * clients)))  # warm-up: first batches, connections, caches
            t0 = time.perf_counter()
            served = list(pool.map(post, range(count)))
            seconds = time.perf_counter() - t0
        per_replica = {name: served.count(name) for name in sorted(set(served))}
        return {
            "replicas": replicas,
            "images_per_s": count / seconds,
            "seconds": seconds,
            "per_replica": list(per_replica.values()),
            "start_s": ray.start_s,
            "deploy_s": ray.deploy_s,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=80, help="timed requests per configuration (80)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads (8)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (256)")
    parser.add_argument("--preset", default="fast", help="DHR preset (fast)")
    parser.add_argument("--backbone", default=str(TINY_CLIP), help="CLIP file (the tiny test CLIP)")
    parser.add_argument("--prompts", default=str(REF_PROMPTS), help="prompt checkpoint (the test fixture)")
    parser.add_argument("--database-url", default=None, help="shared database (default: SQLite in a temp dir)")
    parser.add_argument("--s3", action="store_true", help="artefacts in a bucket on moto's server (default: folder)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dhr-scale-out-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DHR_BACKBONE": args.backbone,
        "DHR_PROMPTS": args.prompts,
        "DHR_PRESET": args.preset,
        "DHR_DEVICE": "cpu",
        "DHR_WORKERS": "1",
        "DHR_DATA_DIR": str(work / "data"),
        "DHR_DATABASE_URL": args.database_url or f"sqlite:///{work / 'inspections.db'}",
        "OMP_NUM_THREADS": "1",  # one intra-op thread per replica: replicas, not threads, use the cores
        "DHR_MAX_QUEUE_WAIT_S": "120",  # capacity is measured: the default admission bound refuses a saturating load
    }
    moto = None
    if args.s3:
        import boto3

        port = free_port()
        moto = start_moto(port)
        env.update(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", DHR_ARTEFACT_URL="s3://bench/scale-out")
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=env["AWS_ENDPOINT_URL"])
        boto3.client("s3").create_bucket(Bucket="bench")
    images = [encode(synthetic_image(seed, (args.size, args.size))) for seed in range(16)]
    storage = f"{env['DHR_DATABASE_URL'].split(':')[0]} + {'s3 (moto)' if args.s3 else 'folder'}"
    print(f"scale-out: preset {args.preset}, {args.images} images of {args.size}px, {args.clients} clients, {storage}")
    try:
        results = [measure(env, n, images, args.clients, args.images) for n in (1, 2)]
    finally:
        if moto is not None:
            moto.terminate()
        shutil.rmtree(work, ignore_errors=True)
    for r in results:
        print(
            f"  {r['replicas']} replica(s): {r['images_per_s']:.2f} images/s ({r['seconds']:.1f} s; served per replica"
            f" {r['per_replica']}; ray start {r['start_s']:.1f} s, deploy {r['deploy_s']:.1f} s)"
        )
    ratio = results[1]["images_per_s"] / results[0]["images_per_s"]
    print(f"  ratio 2/1 replicas: {ratio:.2f}x (cores: {os.cpu_count()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
