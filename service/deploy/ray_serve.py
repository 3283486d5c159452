"""The service as a Ray Serve application: the same FastAPI app in every replica, replicas added by queue load.

Each replica builds the app of :func:`service.api.app.create_app` from its own ``DHR_*`` environment (the builder
runs inside the replica, so nothing is pickled from the driver), runs its lifespan (store opened, model loaded and
warmed up) and keeps its own dynamic batcher. Replicas share nothing in memory: records and product profiles live
in the database (``DHR_DATABASE_URL``, PostgreSQL for more than one box), artefacts in the artefact store
(``DHR_ARTEFACT_URL``, S3 for more than one box), and profiles are re-read within ``DHR_STATE_REFRESH_S``.

Resources: one GPU per replica when the cluster has GPUs (``ray_actor_options={"num_gpus": 1}``), else CPU
replicas; ``DHR_RAY_GPUS_PER_REPLICA`` / ``DHR_RAY_CPUS_PER_REPLICA`` override. Autoscaling follows Ray's
ongoing-request count: between ``DHR_RAY_MIN_REPLICAS`` and ``DHR_RAY_MAX_REPLICAS`` replicas, aiming at
``DHR_RAY_TARGET_ONGOING`` requests in flight per replica.

Entry points:

- ``serve run deploy/ray/serve_config.yaml`` (``make serve-ray``) or a KubeRay ``RayService``
  (``deploy/ray/rayservice.yaml``): both import :func:`app`.
- ``python -m service.deploy.ray_serve --address ADDR --port P``: deploy onto a running cluster, wait until every
  replica is up, print one JSON line and exit (the application keeps running in the cluster).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from ray import serve
from ray.serve import Application

from service.api.app import create_app
from service.api.settings import Settings

logger = logging.getLogger("dhrclip.deploy")

DEPLOYMENT = "dhrclip"
APP_NAME = "dhrclip"


def replica_asgi_app():
    """Runs inside each replica: the service app with this replica's settings, labelled with its Ray replica id."""
    settings = Settings()
    if settings.replica_name is None:
        replica = serve.get_replica_context().replica_id.unique_id
        settings = settings.model_copy(update={"replica_name": replica})
    return create_app(settings)


@serve.ingress(replica_asgi_app)
class Inspector:
    """One replica of the inspection service (routes, engine, batcher and store clients of its own)."""


def deployment_options(settings: Settings, cluster_gpus: float) -> dict:
    """``serve.deployment`` options from the settings; ``cluster_gpus``: GPUs the Ray cluster has (0: CPU only)."""
    gpus = settings.ray_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if cluster_gpus > 0 else 0.0
    actor: dict = {"num_cpus": settings.ray_cpus_per_replica}
    if gpus > 0:
        actor["num_gpus"] = gpus
    lowest = min(settings.ray_min_replicas, settings.ray_max_replicas)
    return {
        "name": DEPLOYMENT,
        "ray_actor_options": actor,
        "autoscaling_config": {
            "min_replicas": lowest,
            "initial_replicas": max(lowest, 1),
            "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": settings.ray_target_ongoing,
        },
        # a replica accepts up to twice the target before Ray queues at the proxy; its own batcher does the rest
        "max_ongoing_requests": max(int(2 * settings.ray_target_ongoing), settings.max_batch_size),
        "graceful_shutdown_timeout_s": settings.request_timeout_s + 5,
        "health_check_period_s": 10,
    }


def app(args: dict | None = None) -> Application:
    """The Serve application (the ``import_path`` of the serve config). ``args`` are not used: settings come from
    ``DHR_*`` variables (``runtime_env.env_vars`` in the config), the same in the builder and in every replica."""
    import ray

    settings = Settings()
    gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    return serve.deployment(Inspector, **deployment_options(settings, gpus)).bind()


def deploy(address: str, host: str, port: int, timeout_s: float) -> dict:
    """Start Serve's HTTP proxy on ``host:port`` in the cluster at ``address``, deploy :func:`app`, wait until the
    deployment is healthy; returns ``{"url", "replicas", "seconds"}``."""
    import ray

    t0 = time.monotonic()
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app(), name=APP_NAME, route_prefix="/", blocking=False)
    deadline = t0 + timeout_s
    while True:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            break
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deployment failed: {status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"deployment not running after {timeout_s:g} s: {status}")
        time.sleep(0.5)
    replicas = sum(status.deployments[DEPLOYMENT].replica_states.values())
    return {"url": f"http://{host}:{port}", "replicas": replicas, "seconds": round(time.monotonic() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.deploy.ray_serve", description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP proxy interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP proxy port (default 8000)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the replicas (600)")
    args = parser.parse_args(argv)
    try:
        out = deploy(args.address, args.host, args.port, args.timeout)
    except (RuntimeError, TimeoutError, ConnectionError) as exc:
        print(f"ray_serve: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
