"""Pipeline ceiling: the most images/s the service's non-model path can feed, and its CPU cost per stage.

The real service (``create_app`` + uvicorn, one process, default DHR_* settings) runs on 127.0.0.1 with the model
replaced by an instant stand-in that returns DHR-CLIP's output shapes (a fixed T x T map with one defect blob). A
light raw-socket client posts one JPEG per request (keep-alive) with C concurrent connections for ``--seconds``
per cell; JPEGs of 0.3, 2.6 and 12 MP are made from one real ball-screw photo (synthetic texture without it).

Reported per tree x size x concurrency: images/s, client p50 latency, the service's own per-stage wall medians
(``timing_ms`` of the answers), and CPU-ms per image per stage, measured inside the server with ``thread_time``
around the stage functions::

    http_parse   multipart parsing (python_multipart writes)     decode     Pillow decode + prepare
    views        squash/resize/crops                             model      the stand-in (batch stacking)
    postprocess  map resize, regions, PNG/artefact rendering     store      the durable record (files + row)
    response     response-model validation + JSON rendering      other      process CPU - the stages above

Two trees are measured in one run (``--baseline REF``: a ``git archive`` of REF beside the working tree), so the
ratio on this shared machine compares like with like; disk bytes per inspection come from the data folder.

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python bench/pipeline_ceiling.py --baseline main --seconds 6
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from harness import STAGES, get_json, request_bytes, run_cell, start_server, stop_server

from tests.paths import REAL_DEFECTS, ROOT

PHOTO = REAL_DEFECTS / "bsdata" / "test" / "pitting" / "KGT1-V-138-A07_crop_0.jpg"  # 2819 x 930, 2.6 MP
SIZES_MP = {"0.3MP": 0.3e6, "2.6MP": 2.6e6, "12MP": 12e6}


# ------------------------------------------------------------------------------------------------- client side
def make_jpegs() -> dict[str, bytes]:
    from PIL import Image

    if PHOTO.is_file():
        src = Image.open(PHOTO).convert("RGB")
    else:  # a textured stand-in photo
        rng = np.random.default_rng(0)
        base = rng.normal(128, 30, (930, 2819, 3)).clip(0, 255).astype(np.uint8)
        src = Image.fromarray(base)
    aspect = src.width / src.height
    out = {}
    for label, pixels in SIZES_MP.items():
        h = round((pixels / aspect) ** 0.5)
        img = src.resize((round(h * aspect), h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out[label] = buf.getvalue()
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure_tree(label: str, tree: Path, jpegs: dict[str, bytes], args) -> list[dict]:
    """Start the tree's service, run every size x concurrency cell, stop it; one row per cell."""
    work = Path(tempfile.mkdtemp(prefix=f"ceiling-{label.replace(' ', '-')}-"))
    proc, port = start_server(tree, work, "stand-in", args.preset)
    rows = []
    try:
        for size, jpeg in jpegs.items():
            payload = request_bytes(port, jpeg, f"{size}.jpg")
            for c in args.concurrency:
                before, disk0 = get_json(port, "/_bench/stats"), folder_bytes(work / "data")
                cell = asyncio.run(run_cell(port, [payload], c, args.seconds))
                after, disk1 = get_json(port, "/_bench/stats"), folder_bytes(work / "data")
                n_all = cell["n"] + c  # the warm-up requests count towards CPU and disk
                cpu = {k: 1000 * (after["stage_cpu_s"][k] - before["stage_cpu_s"][k]) / n_all for k in STAGES}
                total = 1000 * (after["process_cpu_s"] - before["process_cpu_s"]) / n_all
                wall = {
                    k: float(np.median([t.get(k, np.nan) for t in cell["timings"]]))
                    for k in ("decode", "queue", "postprocess", "store", "total")
                }
                rows.append(
                    dict(
                        tree=label,
                        size=size,
                        jpeg_kb=len(jpeg) / 1024,
                        c=c,
                        ips=cell["n"] / cell["elapsed"],
                        p50=1000 * float(np.median(cell["lat"])),
                        cpu=cpu,
                        cpu_total=total,
                        wall=wall,
                        disk_kb=(disk1 - disk0) / n_all / 1024,
                        hooks=after["hooks"],
                    )
                )
                print(format_row(rows[-1]), flush=True)
                if cell["errors"]:  # refusals and failures are not in img/s: say so beside the row
                    print(f"{len(cell['errors'])} answers were not 200, first: {cell['errors'][0]}", flush=True)
    finally:
        stop_server(proc)
        shutil.rmtree(work, ignore_errors=True)  # each cell stores hundreds of inspections: ~0.5 GB a tree
    return rows


def format_row(r: dict) -> str:
    other = r["cpu_total"] - sum(r["cpu"].values())
    stages = " | ".join(f"{r['cpu'][k]:.1f}" for k in STAGES)
    w = r["wall"]
    return (
        f"| {r['tree']} | {r['size']} | {r['c']} | {r['ips']:.1f} | {r['p50']:.0f} | {r['cpu_total']:.1f} | {stages} "
        f"| {other:.1f} | {w['decode']:.0f} / {w['queue']:.0f} / {w['postprocess']:.0f} / {w['store']:.0f} "
        f"| {r['disk_kb']:.0f} (+{r['disk_kb'] - r['jpeg_kb']:.0f}) |"
    )


HEADER = (
    "| tree | image | C | img/s | p50 ms | CPU ms/img | " + " | ".join(STAGES) + " | other | wall ms decode / queue / "
    "post / store | disk KB/img (+ over JPEG) |\n|" + "---|" * (15)
)


def baseline_tree(ref: str) -> Path:
    """A copy of the repository at ``ref`` (``git archive``), in a temporary folder."""
    out = Path(tempfile.mkdtemp(prefix="ceiling-baseline-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=None, help="git ref measured too, before the working tree (e.g. main)")
    ap.add_argument("--seconds", type=float, default=6.0, help="timed window per cell")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--sizes", default=",".join(SIZES_MP))
    ap.add_argument("--preset", default="mvtec")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table to this file")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    jpegs = {k: v for k, v in make_jpegs().items() if k in args.sizes.split(",")}
    trees = [(f"base {args.baseline}", baseline_tree(args.baseline))] if args.baseline else []
    trees.append(("this tree", ROOT))
    print(f"stand-in model, preset {args.preset}, {args.seconds:g} s per cell, {os.cpu_count()} CPUs\n{HEADER}")
    rows = []
    try:
        for label, tree in trees:
            rows += measure_tree(label, tree, jpegs, args)
    finally:
        if args.baseline:
            shutil.rmtree(trees[0][1], ignore_errors=True)
    lines = [HEADER, *map(format_row, rows)]
    if args.baseline:
        for size in jpegs:
            for c in args.concurrency:
                pair = [r for r in rows if r["size"] == size and r["c"] == c]
                if len(pair) == 2:
                    ips, cpu = pair[1]["ips"] / pair[0]["ips"], pair[0]["cpu_total"] / pair[1]["cpu_total"]
                    lines.append(f"\nceiling ratio {size} C={c}: {ips:.2f}x images/s, {cpu:.2f}x less CPU per image")
    print("\n".join(lines[1 + len(rows) :]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
