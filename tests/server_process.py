"""A real ``dhrclip serve`` subprocess for the hostile, crash and schema tests: tiny CLIP, preset fast, CPU.

``ServerProcess(data_dir, **settings)`` starts ``python -m service.cli serve`` on a free port with ``DHR_*``
variables, waits for /readyz, and keeps the JSON log (stderr) in ``data_dir/../server-<n>.log``. ``kill()`` is
``kill -9``; ``stop()`` is SIGTERM and waits; ``start()`` may be called again on the same data directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .paths import REF_PROMPTS, ROOT, TINY_CLIP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, data_dir: Path, **settings) -> None:
        self.data_dir = Path(data_dir)
        self.settings = {
            "backbone": str(TINY_CLIP),
            "prompts": str(REF_PROMPTS),
            "preset": "fast",
            "device": "cpu",
            "warmup": "true",
            "data_dir": str(self.data_dir),
            "model_weights_dir": str(self.data_dir.parent / "no-model-weights"),
            **{k: str(v) for k, v in settings.items()},
        }
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.logs: list[Path] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300.0) -> ServerProcess:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DHR_")}
        env.update({f"DHR_{k.upper()}": v for k, v in self.settings.items()}, PYTHONPATH=str(ROOT))
        log = self.data_dir.parent / f"server-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
                cwd=self.data_dir.parent,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "server not ready in time"
            time.sleep(0.1)

    def kill(self) -> None:
        """``kill -9``: no shutdown code runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        return self.proc.returncode

    def rss_bytes(self) -> int:
        """Resident memory of the server process now (Linux)."""
        fields = Path(f"/proc/{self.proc.pid}/status").read_text().split("\n")
        kb = next(int(line.split()[1]) for line in fields if line.startswith("VmRSS:"))
        return kb * 1024

    def peak_rss_bytes(self) -> int:
        fields = Path(f"/proc/{self.proc.pid}/status").read_text().split("\n")
        kb = next(int(line.split()[1]) for line in fields if line.startswith("VmHWM:"))
        return kb * 1024

    def log_lines(self) -> list[str]:
        return [line for log in self.logs for line in log.read_text(errors="replace").splitlines()]

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
