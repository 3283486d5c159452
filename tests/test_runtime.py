"""The thread policy (service/runtime.py): applied once per process, the same object for the CLI and the service,
in the environment before torch loads OpenMP, switchable off for benchmarks, a bad value reported as one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from fastapi.testclient import TestClient

from service import runtime
from service.api.app import create_app
from service.cli import main
from service.runtime import applied_thread_policy, apply_thread_policy

from .api_fixtures import make_settings, wait_ready
from .paths import ROOT

PROBE = (
    "import json, os, sys\n"
    "import {module}\n"
    "from service.runtime import applied_thread_policy\n"
    "p = applied_thread_policy()\n"
    "print(json.dumps([p.name, p.wait_policy, p.effective, os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules]))"
)


def _probe(module: str, **env: str) -> list:
    """Import ``module`` in a fresh interpreter; the policy it applied, the environment and whether torch loaded."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", runtime.POLICY_ENV)}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        env={**base, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_service_gets_the_passive_policy_before_torch_loads():
    # the service's model runner imports torch; the policy was set first (package import), so libgomp reads it
    assert _probe("service.engine.runner") == ["passive", "PASSIVE", True, "PASSIVE", True]


def test_default_policy_leaves_openmp_alone_and_a_user_setting_wins():
    assert _probe("service.runtime", DHR_THREAD_POLICY="default") == ["default", None, True, None, False]
    assert _probe("service.runtime", OMP_WAIT_POLICY="ACTIVE") == ["passive", "ACTIVE", True, "ACTIVE", False]


def test_policy_is_applied_once_and_shared_by_cli_and_service(tmp_path, monkeypatch):
    policy = apply_thread_policy()
    assert applied_thread_policy() is policy
    # a later change of the variable does not re-decide: the policy was chosen once, at start
    monkeypatch.setenv(runtime.POLICY_ENV, "default")
    assert apply_thread_policy() is policy
    (tmp_path / "part" / "test" / "good").mkdir(parents=True)
    assert main(["data", "index", str(tmp_path / "part")]) == 0
    assert applied_thread_policy() is policy
    app = create_app(make_settings(tmp_path))
    assert app.state.thread_policy is policy
    assert policy.describe().startswith(f"threads: policy {policy.name} (")


def test_unknown_policy_is_one_cli_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.setenv(runtime.POLICY_ENV, "spin")
    assert main(["data", "index", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dhrclip data: DHR_THREAD_POLICY='spin': expected one of passive, default"]
    assert not (tmp_path / "meta.json").exists()


def test_service_start_up_line_is_rounded_and_names_the_policy(tmp_path, caplog):
    caplog.set_level("INFO", logger="dhrclip.api")
    with TestClient(create_app(make_settings(tmp_path, warmup=True))) as client:
        wait_ready(client)
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model ready")]
    assert len(ready) == 1
    pattern = r"model ready in \d+\.\d s \(warm-up \d+\.\d\d s\): .+; threads: policy \w+ \(.+\), \d+ intra-op threads"
    assert re.match(pattern, ready[0]), ready[0]
