"""The Ray Serve wrapper's options and the deployment files in deploy/ray/ (Serve schema, Kubernetes pod specs)."""

from __future__ import annotations

import asyncio
import importlib
import json
from types import SimpleNamespace

import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray.exceptions import ActorDiedError
from ray.serve.schema import ServeDeploySchema
from starlette.requests import Request as StarletteRequest

from service.deploy import ray_serve
from service.deploy.ray_serve import DEPLOYMENT, Gateway, Inspector, call_asgi, deployment_options

from .api_fixtures import make_settings
from .paths import ROOT

SERVE_CONFIG = ROOT / "deploy" / "ray" / "serve_config.yaml"
RAYSERVICE = ROOT / "deploy" / "ray" / "rayservice.yaml"


def test_one_gpu_per_replica_on_gpu_clusters_cpu_elsewhere(tmp_path):
    s = make_settings(tmp_path, ray_min_replicas=2, ray_max_replicas=6, ray_target_ongoing=4, max_batch_size=16)
    gpu = deployment_options(s, cluster_gpus=8)
    assert gpu["name"] == DEPLOYMENT
    assert gpu["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert gpu["autoscaling_config"] == {
        "min_replicas": 2,
        "initial_replicas": 2,
        "max_replicas": 6,
        "target_ongoing_requests": 4.0,
    }
    assert gpu["max_ongoing_requests"] == 16  # at least one full batch per replica
    assert deployment_options(s, cluster_gpus=0)["ray_actor_options"] == {"num_cpus": 1.0}
    forced = make_settings(tmp_path, ray_gpus_per_replica=0.5, ray_cpus_per_replica=2)
    assert deployment_options(forced, cluster_gpus=0)["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    scale_to_zero = deployment_options(make_settings(tmp_path, ray_min_replicas=0), cluster_gpus=1)
    assert scale_to_zero["autoscaling_config"]["min_replicas"] == 0
    assert scale_to_zero["autoscaling_config"]["initial_replicas"] == 1


def _check_serve_config(config: dict) -> None:
    parsed = ServeDeploySchema.model_validate(config)
    (application,) = parsed.applications
    module, _, name = application.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    env = application.runtime_env["env_vars"]
    assert all(key.startswith("DHR_") for key in env), "credentials belong in the node environment, not here"
    make_settings(ROOT, **{k.removeprefix("DHR_").lower(): v for k, v in env.items()})  # every value is valid


def test_serve_config_and_rayservice_are_valid():
    _check_serve_config(yaml.safe_load(SERVE_CONFIG.read_text()))
    service = yaml.safe_load(RAYSERVICE.read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    _check_serve_config(yaml.safe_load(service["spec"]["serveConfigV2"]))
    cluster = service["spec"]["rayClusterConfig"]
    import ray

    assert cluster["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    import kubernetes_validate

    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": group["template"]}
        kubernetes_validate.validate(pod, "1.30.0", strict=True)  # raises on an unknown or mistyped field
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert worker["limits"]["nvidia.com/gpu"] == "1"


def _echo_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo/{name}")
    async def echo(name: str, request: Request):
        body = await request.body()
        text = f"{name} {request.query_params['q']} {request.headers['x-test']} {request.client.host} {body.decode()}"
        return PlainTextResponse(text, status_code=201, headers={"x-out": "1"})

    @app.get("/stream")
    async def stream():
        return StreamingResponse(iter([b"a,b\n", b"1,2\n"]), media_type="text/csv")

    return app


def test_a_forwarded_request_runs_through_the_app_whole():
    app = _echo_app()
    request = ("POST", "/echo/cap", b"q=7", [(b"x-test", b"yes")], b"body bytes", ("10.0.0.9", 5000))
    status, headers, body = asyncio.run(call_asgi(app, request))
    assert (status, body) == (201, b"cap 7 yes 10.0.0.9 body bytes") and (b"x-out", b"1") in headers
    assert asyncio.run(call_asgi(app, ("GET", "/stream", b"", [], b"", None)))[::2] == (200, b"a,b\n1,2\n")
    assert asyncio.run(call_asgi(app, ("GET", "/nowhere", b"", [], b"", None)))[0] == 404


class _Replicas:
    """A stand-in for the deployment handle: ``forward.remote`` fails with ActorDiedError ``deaths`` times."""

    def __init__(self, deaths: int) -> None:
        self.deaths, self.calls = deaths, []
        self.forward = self

    def remote(self, request):
        self.calls.append(request)

        async def answer():
            if len(self.calls) <= self.deaths:
                raise ActorDiedError()
            return (
                200,
                [(b"content-type", b"text/plain"), (b"x-dhr-replica", b"r2"), (b"x-request-id", b"req-1")],
                b"ok",
            )

        return answer()


def _call_gateway(replicas: _Replicas, method: str, headers: list | None = None, body: bytes = b"payload"):
    scope = {
        "type": "http",
        "method": method,
        "path": "/inspections/x",
        "query_string": b"a=1",
        "headers": headers or [],
        "client": ("127.0.0.1", 1234),
    }

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return asyncio.run(Gateway(replicas, max_body_bytes=10)(StarletteRequest(scope, receive)))


def test_the_gateway_retries_a_get_once_when_its_replica_dies():
    replicas = _Replicas(deaths=1)
    response = _call_gateway(replicas, "GET", [(b"x-request-id", b"req-1")])
    assert (response.status_code, response.body, response.headers["x-dhr-replica"]) == (200, b"ok", "r2")
    assert "x-request-id" not in response.headers  # Ray's proxy sets it once
    assert len(replicas.calls) == 2 and replicas.calls[0] == replicas.calls[1]
    method, path, query, headers, body, client = replicas.calls[0]
    assert (method, path, query, body, client) == ("GET", "/inspections/x", b"a=1", b"payload", ("127.0.0.1", 1234))
    assert headers == [(b"x-request-id", b"req-1")]


@pytest.mark.parametrize(("method", "deaths"), [("POST", 1), ("GET", 2)])
def test_a_replica_lost_mid_request_is_503_with_retry_after_never_500(method, deaths):
    replicas = _Replicas(deaths=deaths)
    response = _call_gateway(replicas, method)
    assert len(replicas.calls) == deaths
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/problem+json"
    body = json.loads(response.body)
    request_id = dict(replicas.calls[0][3])[b"x-request-id"].decode()  # the id the replica was given
    assert body == {
        "type": "urn:dhrclip:problem:replica-lost",
        "title": "Replica lost",
        "status": 503,
        "detail": body["detail"],
        "instance": "/inspections/x",
        "request_id": request_id,
    }
    assert "Idempotency-Key" in body["detail"] and len(request_id) == 32


def test_the_gateway_refuses_a_body_over_the_upload_limit_before_forwarding():
    replicas = _Replicas(deaths=0)
    response = _call_gateway(replicas, "POST", body=b"x" * 11)
    assert replicas.calls == [] and response.status_code == 413
    assert json.loads(response.body)["type"] == "urn:dhrclip:problem:upload-too-large"


@pytest.mark.parametrize(("answers", "polls"), [(["loading", "loading", "ready"], 3), (["loading", "error"], 2)])
def test_a_new_replica_is_healthy_once_its_model_loaded_or_failed(monkeypatch, answers, polls):
    """Ray sends a replica requests only after its first health check: that check waits while /readyz is loading."""
    monkeypatch.setattr(ray_serve, "READY_POLL_S", 0.001)
    app, seen = FastAPI(), []

    @app.get("/readyz")
    async def readyz():
        seen.append(answers[len(seen)])
        return JSONResponse({"status": seen[-1]}, status_code=200 if seen[-1] == "ready" else 503)

    asyncio.run(Inspector.check_health(SimpleNamespace(app=app)))
    assert seen == answers[:polls]


def test_invalid_settings_are_one_line_before_a_cluster_starts(monkeypatch, capsys):
    """Were a pydantic ValidationError traceback from app(), after ray.init and serve.start."""

    def no_cluster(*args, **kwargs):
        raise AssertionError("deploy must not start")

    monkeypatch.setattr(ray_serve, "deploy", no_cluster)
    monkeypatch.setenv("DHR_PRECISION", "fp8")
    assert ray_serve.main(["--address", "local"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ray_serve: invalid settings: DHR_PRECISION: ") and err.count("\n") == 1, err
