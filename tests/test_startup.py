"""``dhrclip`` starts fast: its parser and the commands that need no model load no heavy library
(read from ``python -X importtime``, which lists every module a run imports)."""

from __future__ import annotations

import os
import subprocess
import sys

from .paths import ROOT

# top-level packages that take seconds to import; only the handler of a sub-command that needs one may load it
HEAVY = {"torch", "open_clip", "cv2", "sklearn", "skimage", "scipy", "fastapi", "starlette", "uvicorn", "sqlalchemy"}


def _imported(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime -m service.cli ARGV``; the process and the top-level packages it imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "service.cli", *argv],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, {name.split(".")[0] for name in names}


def test_help_imports_no_heavy_library():
    proc, top = _imported("--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: dhrclip")
    assert "service" in top  # the measurement sees our own imports
    assert not top & HEAVY, sorted(top & HEAVY)
    assert "numpy" not in top and "pydantic" not in top


def test_every_sub_command_help_is_cheap():
    for command in ("serve", "predict", "train", "evaluate", "weights", "data"):
        proc, top = _imported(command, "--help")
        assert proc.returncode == 0 and f"usage: dhrclip {command}" in proc.stdout, proc.stderr[-500:]
        assert not top & HEAVY, (command, sorted(top & HEAVY))


def test_data_index_runs_without_torch(tmp_path):
    (tmp_path / "part" / "test" / "good").mkdir(parents=True)
    proc, top = _imported("data", "index", str(tmp_path / "part"))
    assert proc.returncode == 0, proc.stderr[-500:]
    assert (tmp_path / "part" / "meta.json").is_file()
    assert not top & HEAVY, sorted(top & HEAVY)
