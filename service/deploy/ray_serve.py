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

A new replica takes requests once its model is loaded (its health check waits for ``/readyz``), not as soon as its
constructor returns. Requests reach the replicas through a thin :class:`Gateway` deployment (the application's HTTP
ingress, no CPU reserved): it hands each request to a replica through a deployment handle, so Ray still routes by
queue length and autoscales on the replicas' ongoing requests. What it adds is the answer when a replica dies while
it holds a request (``RayActorError``): Ray's own proxy would answer 500; the gateway retries a GET/HEAD once on
another replica and answers anything else 503 with ``Retry-After`` (the inspection may or may not have been stored:
the client retries with its ``Idempotency-Key``). Each response is buffered whole in the gateway (inspection
answers, PNGs and CSV exports are small).

Entry points:

- ``serve run`` / ``serve deploy deploy/ray/serve_config.yaml`` or a KubeRay ``RayService``
  (``deploy/ray/rayservice.yaml``): both import :func:`app`.
- ``python -m service.deploy.ray_serve --address ADDR --port P``: deploy onto a running cluster, wait until every
  replica is up, print one JSON line and exit (the application keeps running in the cluster).
- ``make serve-ray``: the same with ``--address local --block``: a Ray cluster on this machine for as long as the
  command runs, the proxy on ``HOST:PORT``, settings from the ``DHR_*`` environment as for ``make serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
import time
import uuid

from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from service.api.access_log import REQUEST_ID_HEADER, too_large
from service.api.app import create_app
from service.api.problems import service_unavailable
from service.api.settings import Settings, settings_error_line

logger = logging.getLogger("dhrclip.deploy")

DEPLOYMENT = "dhrclip"
GATEWAY = "gateway"
APP_NAME = "dhrclip"
RETRIED_METHODS = ("GET", "HEAD")  # safe to run twice: retried once on another replica when one dies
RETRY_AFTER_S = 1  # another replica is usually up; Ray replaces the lost one meanwhile
READY_POLL_S = 1.0  # /readyz polls of a starting replica (each is one access-log line)

# one forwarded request: method, path, query string, headers, body, client (host, port) or None
Forwarded = tuple[str, str, bytes, list[tuple[bytes, bytes]], bytes, tuple[str, int] | None]


def replica_asgi_app():
    """Runs inside each replica: the service app with this replica's settings, labelled with its Ray replica id."""
    settings = Settings()
    if settings.replica_name is None:
        replica = serve.get_replica_context().replica_id.unique_id
        settings = settings.model_copy(update={"replica_name": replica})
    return create_app(settings)


async def call_asgi(app, request: Forwarded) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Run one HTTP request through an ASGI ``app`` in this process; returns ``(status, raw headers, body)``.

    The body is received at once; later ``receive`` calls wait (the client is the gateway, it does not leave
    before the answer), so streaming responses that listen for a disconnect run to their end.
    """
    method, path, query, headers, body, client = request
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": client,
        "server": None,
    }
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    status, out_headers, chunks = 500, [], []

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # never set: cancelled with the request
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        nonlocal status, out_headers
        if message["type"] == "http.response.start":
            status, out_headers = message["status"], list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, out_headers, b"".join(chunks)


@serve.ingress(replica_asgi_app)
class Inspector:
    """One replica of the inspection service (routes, engine, batcher and store clients of its own)."""

    async def forward(self, request: Forwarded) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """One request from the :class:`Gateway`, run through this replica's app."""
        return await call_asgi(self.app, request)

    async def check_health(self) -> None:
        """Ray's health check, which also runs once before a new replica gets any request: it waits while the
        model loads (``/readyz`` says ``loading``), so that requests only go to replicas that can serve them. A
        replica whose start failed stays up and answers 503 with the reason, like the plain service."""
        while True:
            status, _, body = await call_asgi(self.app, ("GET", "/readyz", b"", [], b"", None))
            if status == 200 or json.loads(body).get("status") != "loading":
                return
            await asyncio.sleep(READY_POLL_S)


class Gateway:
    """The HTTP ingress: each request to a replica through ``inspector``; a replica lost mid-request is a retry
    (GET/HEAD) or a 503 with ``Retry-After``, never Ray's 500."""

    def __init__(self, inspector: DeploymentHandle, max_body_bytes: int) -> None:
        self.inspector, self.max_body_bytes = inspector, int(max_body_bytes)

    async def __call__(self, request: Request) -> Response:
        request_id_key = REQUEST_ID_HEADER.lower().encode()
        headers = [(k, v) for k, v in request.scope["headers"] if k.lower() != request_id_key]
        # Ray's proxy gives every request an id (or keeps the client's) and sets it on the answer; the replica logs
        # and answers with the same one
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        headers.append((request_id_key, request_id.encode("latin-1")))
        client = tuple(request.client) if request.client else None
        body = bytearray()
        async for chunk in request.stream():  # the replica's upload limit, before a byte is held here
            body += chunk
            if len(body) > self.max_body_bytes:
                return too_large(self.max_body_bytes, "the request body").response(request.url.path, request_id)
        forwarded = (request.method, request.url.path, request.scope["query_string"], headers, bytes(body))
        attempts = 2 if request.method in RETRIED_METHODS else 1
        for attempt in range(1, attempts + 1):
            try:
                status, raw_headers, body = await self.inspector.forward.remote((*forwarded, client))
            except RayActorError as exc:
                logger.warning("replica lost with request %s (attempt %d/%d): %s", request_id, attempt, attempts, exc)
                continue
            response = Response(body, status_code=status)
            response.raw_headers = [(k, v) for k, v in raw_headers if k != request_id_key]  # Ray's proxy adds it
            return response
        problem = service_unavailable(
            "the replica handling this request stopped before answering; retry (a POST /segment may have been"
            " stored: send the same Idempotency-Key)",
            RETRY_AFTER_S,
            slug="replica-lost",
            title="Replica lost",
        )
        return problem.response(request.url.path, request_id)


def replica_capacity(settings: Settings) -> int:
    """Requests a replica holds at once: twice the autoscaling target, at least one full batch; more wait in the
    gateway's queue (its own batcher does the rest)."""
    return max(int(2 * settings.ray_target_ongoing), settings.max_batch_size)


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
        "max_ongoing_requests": replica_capacity(settings),
        "graceful_shutdown_timeout_s": settings.request_timeout_s + 5,
        "health_check_period_s": 10,
    }


def gateway_options(settings: Settings) -> dict:
    """``serve.deployment`` options of the :class:`Gateway`: no CPU reserved (it only awaits the replicas), as many
    gateways as replicas at most, each holding the requests of every replica's queue."""
    per_replica = replica_capacity(settings)
    return {
        "name": GATEWAY,
        "ray_actor_options": {"num_cpus": 0},
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": 4 * per_replica,
        },
        "max_ongoing_requests": 8 * per_replica,
    }


def app(args: dict | None = None) -> Application:
    """The Serve application (the ``import_path`` of the serve config). ``args`` are not used: settings come from
    ``DHR_*`` variables (``runtime_env.env_vars`` in the config), the same in the builder and in every replica."""
    import ray

    settings = Settings()
    gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    inspector = serve.deployment(Inspector, **deployment_options(settings, gpus)).bind()
    return serve.deployment(Gateway, **gateway_options(settings)).bind(inspector, settings.max_upload_bytes)


def deploy(address: str, host: str, port: int, timeout_s: float, logs: bool = False) -> dict:
    """Start Serve's HTTP proxy on ``host:port`` in the cluster at ``address`` (``local``: a new one-machine cluster
    of this process), deploy :func:`app`, wait until the deployment is healthy; returns ``{"url", "replicas",
    "seconds"}``. ``logs``: stream the replicas' logs to this process's stderr."""
    import ray

    t0 = time.monotonic()
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=logs)
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
    parser.add_argument(
        "--address", default="auto", help="Ray cluster address; 'local' starts a cluster on this machine (auto)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP proxy interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP proxy port (default 8000)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the replicas (600)")
    parser.add_argument(
        "--block", action="store_true", help="stay in the foreground until Ctrl-C or SIGTERM, then shut Serve down"
    )
    args = parser.parse_args(argv)
    try:
        Settings()  # checked before a cluster starts: the builder and every replica read the same variables
    except ValidationError as exc:
        print(f"ray_serve: {settings_error_line(exc)}", file=sys.stderr)
        return 2
    try:
        out = deploy(args.address, args.host, args.port, args.timeout, logs=args.block)
    except (RuntimeError, TimeoutError, ConnectionError) as exc:
        print(f"ray_serve: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out), flush=True)
    if args.block:
        serve_until_stopped()
    return 0


def serve_until_stopped() -> None:
    """Block until SIGINT or SIGTERM, then delete the application and stop Serve (and a ``local`` cluster)."""
    import ray

    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    print("ray_serve: stopping", file=sys.stderr, flush=True)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
