"""A throw-away local Ray cluster serving the app, for the scale-out acceptance test and bench/scale_out.py.

``RayServe(env, replicas)`` starts ``ray start --head --block`` in its own process group with ``env`` (so every
worker and replica inherits the ``DHR_*`` settings and ``PYTHONPATH``), deploys ``service.deploy.ray_serve`` on a
free loopback port with ``python -m service.deploy.ray_serve`` and waits for every replica. Closing it kills the
process group it started (and only that) and removes its temp folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .s3_server import free_port

RAY_BIN = Path(sys.executable).with_name("ray")


class RayServe:
    """Context manager: ``url`` of the Serve HTTP proxy once entered; ``start_s`` / ``deploy_s`` timings."""

    def __init__(self, env: dict[str, str], replicas: int, num_cpus: int = 4, timeout_s: float = 300.0) -> None:
        self.env = {
            **env,
            "DHR_RAY_MIN_REPLICAS": str(replicas),
            "DHR_RAY_MAX_REPLICAS": str(replicas),
            "DHR_RAY_CPUS_PER_REPLICA": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DEDUP_LOGS": "0",
            # a token of this cluster for the cluster and the deploy command alike: without it `ray start` turns
            # token auth on whenever ~/.ray/auth_token exists (any earlier `ray.init()` writes one) and the deploy
            # command, which does not, is refused
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
        }
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.replicas, self.num_cpus, self.timeout_s = replicas, num_cpus, timeout_s
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dhr-ray-", dir="/tmp"))  # short: Ray's socket paths
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.start_s = self.deploy_s = 0.0

    def __enter__(self) -> RayServe:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.proc is not None:
            print(f"--- Ray logs at failure ({exc_type.__name__}):\n{self.log_tail()}", file=sys.stderr)
        self.close()

    def _start(self) -> None:
        t0 = time.monotonic()
        gcs_port = free_port()
        log = open(self.temp_dir / "ray-start.log", "wb")  # noqa: SIM115 - closed with the process group
        self.proc = subprocess.Popen(
            [
                str(RAY_BIN),
                "start",
                "--head",
                "--block",
                f"--port={gcs_port}",
                f"--num-cpus={self.num_cpus}",
                "--num-gpus=0",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={self.temp_dir}",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = t0 + self.timeout_s
        while b"--block" not in (self.temp_dir / "ray-start.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {self.log_tail()}")
            time.sleep(0.2)
        self.start_s = time.monotonic() - t0
        http_port = free_port()
        cmd = [sys.executable, "-m", "service.deploy.ray_serve", "--address", f"127.0.0.1:{gcs_port}"]
        cmd += ["--port", str(http_port), "--timeout", str(self.timeout_s)]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=self.timeout_s + 60)
        if out.returncode != 0:
            raise RuntimeError(f"deploy failed ({out.returncode}): {out.stderr[-3000:]}\n{self.log_tail()}")
        info = json.loads(out.stdout.strip().splitlines()[-1])
        assert info["replicas"] == self.replicas, info
        self.url, self.deploy_s = info["url"], info["seconds"]

    def log_tail(self, chars: int = 3000) -> str:
        """The end of ``ray start``'s output and of the replicas' logs, for failure messages."""
        parts = [(self.temp_dir / "ray-start.log").read_text(errors="replace")[-chars:]]
        for path in sorted(self.temp_dir.glob("session_*/logs/serve/*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def close(self) -> None:
        """Kill the process group of ``ray start`` (gcs, raylet, workers, replicas) and remove the temp folder."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
            self.proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)
