"""The prepared GPU check, proved on the CPU: bench/device_check.py --cpu-dry-run runs every step at toy sizes.

A step that fails or times out is a row in the table, not a crash, so this test reads the table and requires every
step to have measured something with status ok/pass (the GPU run then differs only in sizes and the device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .paths import FIXTURES, REAL_DEFECTS, ROOT

STEPS = ("env", "parity", "engine", "compiled", "gpu_io", "http", "http_compiled")


def test_cpu_dry_run_measures_every_step(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "device_check.py"), "--cpu-dry-run", "--out", str(tmp_path)]
    cmd += ["--fixtures", str(FIXTURES), "--photos", str(REAL_DEFECTS), "--budget-s", "600"]
    scratch = tmp_path / "tmp"  # the script's temporary folders (its servers' data) go here and must be gone after
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p.name for p in scratch.iterdir() if p.name.startswith("device-check")] == []
    rows = [json.loads(line) for line in (tmp_path / "device_check.jsonl").read_text().splitlines()]
    table = (tmp_path / "device_check.md").read_text()
    for step in STEPS:
        mine = [r for r in rows if r["step"] == step]
        assert mine, f"step {step} wrote no row:\n{table}"
        assert all(r["status"] in ("ok", "pass") for r in mine), f"step {step}:\n{table}"
    by_config = {r["config"]: r for r in rows}
    assert by_config["eager bf16 batch 2"]["ips"] > 0
    assert by_config["compiled default bf16 batch 1"]["ips"] > 0
    assert float(by_config["cpu bf16 vs CPU fp32 golden (A, 1 image(s))"]["diff"]) <= 1e-2
    assert int(by_config["service views on cpu: checks + decode_jpeg + torch views, per image"]["diff"].split()[0]) <= 8
    http = [r for r in rows if r["step"].startswith("http")]
    assert [r["config"] for r in http] == [
        f"HTTP tiny fp32 {label} concurrency {c}"
        for label, levels in (("cpu", (1, 2)), ("device-decode", (1, 2)), ("compiled default", (2,)))
        for c in levels
    ]
    assert all(r["ips"] > 0 and r["p50"] <= r["p99"] for r in http)
    (trt,) = [r for r in rows if r["step"] == "tensorrt"]  # no GPU here: one row saying why it did not run
    assert trt["status"] == "SKIPPED" and "download from NVIDIA" in trt["note"], trt
    assert table.count("\n|") == len(rows) + 1  # header rule + one line per row: ONE table
