"""The layers import only what they may (``api -> engine -> model``): checked in a fresh interpreter each."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .paths import ROOT

# layer -> (third-party packages it must not load, service modules it may load besides itself); service.runtime
# (standard library only) is imported by the package's __init__ itself
RULES = {
    "service.model": (
        ("fastapi", "starlette", "pydantic", "pydantic_settings", "sqlalchemy"),
        ("service.errors", "service.runtime"),
    ),
    "service.engine": (
        ("fastapi", "starlette", "sqlalchemy"),
        ("service.errors", "service.inspection", "service.model", "service.runtime"),
    ),
}


@pytest.mark.parametrize("layer", RULES)
def test_layer_loads_nothing_above_it(layer):
    forbidden, allowed = RULES[layer]
    code = (
        f"import sys, {layer}\n"
        f"bad = [m for m in {forbidden!r} if m in sys.modules]\n"
        f"bad += sorted(m for m in sys.modules if m.startswith('service.')\n"
        f"              and not m.startswith(({layer!r},) + {allowed!r}))\n"
        "print(' '.join(bad))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"import {layer} loads {out.stdout.strip()}"
