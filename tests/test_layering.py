"""The layers import only what they may (``api -> engine -> model``): checked in one fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .paths import ROOT

# layer -> (third-party packages it must not load, service modules it may load besides itself); service.runtime
# (standard library only) is imported by the package's __init__ itself, service.lazy by packages that re-export
# names on first use (every name of a layer's __all__ is loaded). Layers are imported in this order.
RULES = {
    "service.model": (
        ("fastapi", "starlette", "pydantic", "pydantic_settings", "sqlalchemy"),
        ("service.errors", "service.lazy", "service.runtime"),
    ),
    "service.engine": (
        ("fastapi", "starlette", "sqlalchemy"),
        ("service.errors", "service.inspection", "service.lazy", "service.model", "service.runtime"),
    ),
}

PROBE = """
import importlib, json, sys
rules = json.loads(sys.argv[1])
bad = {}
for layer, (forbidden, allowed) in rules.items():
    module = importlib.import_module(layer)
    [getattr(module, name) for name in module.__all__]  # lazily re-exported names load their modules
    own = [m for m in sys.modules if m.startswith("service.") and not m.startswith((layer, *allowed))]
    bad[layer] = sorted([m for m in forbidden if m in sys.modules] + own)
print(json.dumps(bad))
"""


def test_layers_load_nothing_above_them():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(RULES)], capture_output=True, text=True, env=env, cwd=ROOT, check=True
    )
    assert json.loads(run.stdout) == {layer: [] for layer in RULES}
