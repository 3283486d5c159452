"""The layers import only what they may (``api -> engine -> model``): checked in one fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .paths import ROOT

# layer -> (third-party packages it must not load, service modules it may load besides itself); service.runtime
# (standard library only) is imported by the package's __init__ itself. Layers are imported in this order.
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

PROBE = """
import importlib, json, sys
rules = json.loads(sys.argv[1])
bad = {}
for layer, (forbidden, allowed) in rules.items():
    importlib.import_module(layer)
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
