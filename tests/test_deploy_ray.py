"""The Ray Serve wrapper's options and the deployment files in deploy/ray/ (Serve schema, Kubernetes pod specs)."""

from __future__ import annotations

import importlib

import pytest
import yaml

from .api_fixtures import make_settings
from .paths import ROOT

pytest.importorskip("ray.serve")
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from service.deploy.ray_serve import DEPLOYMENT, deployment_options  # noqa: E402

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
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": group["template"]}
        kubernetes_validate.validate(pod, "1.30.0", strict=True)  # raises on an unknown or mistyped field
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert worker["limits"]["nvidia.com/gpu"] == "1"
