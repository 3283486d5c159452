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
import inspect
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "data" / "real_defects" / "bsdata" / "test" / "pitting" / "KGT1-V-138-A07_crop_0.jpg"
SIZES_MP = {"0.3MP": 0.3e6, "2.6MP": 2.6e6, "12MP": 12e6}
STAGES = ("http_parse", "decode", "views", "model", "postprocess", "store", "response")


# ------------------------------------------------------------------------------------------- server side (child)
def _stand_in_model(preset_name: str):
    """An instant object with DHRCLIP's call signature: uint8 views in, DHROutput with the real shapes out."""
    import torch

    from service.model.config import DHRConfig, get_preset
    from service.model.dhrclip import DHROutput

    cfg = DHRConfig(preset=get_preset(preset_name))
    t = cfg.preset.target_size
    yy, xx = np.mgrid[0:t, 0:t].astype(np.float32) / t
    blob = 0.08 + 0.82 * np.exp(-((xx - 0.62) ** 2 + (yy - 0.4) ** 2) / (2 * 0.05**2))  # one defect, peak 0.9
    amap = torch.from_numpy(blob.astype(np.float32))

    class StandIn:
        device = torch.device("cpu")
        precision = "fp32"

        def __init__(self):
            self.cfg = cfg

        def __call__(self, whole, crops):
            b = whole.shape[0]
            maps = amap.expand(b, t, t)
            one = torch.full((b,), 0.9)
            return DHROutput(*(maps if f.endswith("map") else one for f in DHROutput._fields))

        def eval(self):
            return self

    return StandIn()


def _fill(cls, **known):
    """An instance of a dataclass with every field not given set to "stand-in" (robust to renamed fields)."""
    return cls(**{f: known.get(f, "stand-in") for f in cls.__dataclass_fields__})


class StageClock:
    """Thread-CPU seconds per stage, summed over every call of the wrapped functions."""

    def __init__(self):
        import threading

        self.cpu = dict.fromkeys(STAGES, 0.0)
        self.lock = threading.Lock()

    def wrap(self, owner, attr: str, stage: str) -> bool:
        fn = getattr(owner, attr, None)
        if fn is None:
            return False

        def add(t0: float) -> None:
            with self.lock:
                self.cpu[stage] += time.thread_time() - t0

        def timed(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                add(t0)

        async def timed_async(*args, **kwargs):  # only for coroutines that never yield (serialize_response)
            t0 = time.thread_time()
            try:
                return await fn(*args, **kwargs)
            finally:
                add(t0)

        setattr(owner, attr, timed_async if inspect.iscoroutinefunction(fn) else timed)
        return True

    def wrap_all(self) -> list[str]:
        """Instrument whatever the tree under test has; returns the ``stage:name`` hooks installed."""
        import importlib

        import starlette.formparsers as fp
        import starlette.responses as sr

        targets = [
            (fp.multipart.MultipartParser, "write", "http_parse"),
            (sr.JSONResponse, "render", "response"),
        ]
        for mod_name, attr, stage in [
            ("service.engine.runner", "decode_image", "decode"),
            ("service.engine.runner", "views_for", "views"),
            ("service.engine.runner", "postprocess", "postprocess"),
            ("service.engine.runner", "render_artefacts", "postprocess"),
            ("service.engine.runner", "analyse_map", "postprocess"),
            ("service.storage.store", "InspectionStore.add", "store"),
            ("service.storage.store", "InspectionStore.add_many", "store"),
            ("service.engine.runner", "ModelRunner.run", "model"),
            ("fastapi.routing", "serialize_response", "response"),
        ]:
            try:
                owner = importlib.import_module(mod_name)
            except ImportError:
                continue
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part, None)
            if owner is not None:
                targets.append((owner, name, stage))
        return [f"{stage}:{attr}" for owner, attr, stage in targets if self.wrap(owner, attr, stage)]


def serve_child(args) -> None:
    """Run the service of ``args.tree`` (on sys.path) with the stand-in model until killed."""
    sys.path.insert(0, str(args.tree))
    import resource

    import uvicorn

    import service.api.state as state
    from service.api.app import create_app
    from service.api.settings import Settings
    from service.api.weights import WeightsChoice
    from service.model.loader import ModelInfo

    def load(settings):
        info = _fill(ModelInfo, prompts_sha256=None, preset=settings.preset, precision="fp32", device="cpu")
        return _stand_in_model(settings.preset), info, _fill(WeightsChoice)

    clock = StageClock()
    hooks = clock.wrap_all()
    state.load_weights = load
    app = create_app(Settings(data_dir=args.data, preset=args.preset, request_timeout_s=600, max_upload_mb=200))

    @app.get("/_bench/stats")
    def stats():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"process_cpu_s": ru.ru_utime + ru.ru_stime, "stage_cpu_s": dict(clock.cpu), "hooks": hooks}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


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
        h = int(round((pixels / aspect) ** 0.5))
        img = src.resize((int(round(h * aspect)), h), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out[label] = buf.getvalue()
    return out


def request_bytes(port: int, jpeg: bytes, name: str) -> bytes:
    boundary = "dhrbenchboundary7f3a"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + jpeg
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /segment HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}"
        f"\r\nContent-Length: {len(body)}\r\nAccept: application/json\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(reader, writer, payload: bytes) -> tuple[int, bytes]:
    writer.write(payload)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, await reader.readexactly(length)


async def run_cell(port: int, payload: bytes, concurrency: int, seconds: float) -> dict:
    """C keep-alive connections posting ``payload`` until the deadline; returns counts, latencies, timings."""
    lat, timings, errors = [], [], []

    async def client(deadline: float | None, n: int | None):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        done = 0
        while (deadline is None or time.perf_counter() < deadline) and (n is None or done < n):
            t0 = time.perf_counter()
            status, body = await _exchange(reader, writer, payload)
            if status != 200:
                errors.append(f"{status}: {body[:200]!r}")
            elif deadline is not None:
                lat.append(time.perf_counter() - t0)
                timings.append(json.loads(body)["results"][0]["timing_ms"])
            done += 1
        writer.close()

    await asyncio.gather(*(client(None, 1) for _ in range(concurrency)))  # warm-up
    if errors:
        raise RuntimeError(errors[0])
    t0 = time.perf_counter()
    await asyncio.gather(*(client(t0 + seconds, None) for _ in range(concurrency)))
    return {"n": len(lat), "elapsed": time.perf_counter() - t0, "lat": lat, "timings": timings, "errors": errors}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def get_json(port: int, path: str) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n")[0]:
        raise RuntimeError(f"GET {path}: {head[:80]!r}")
    return json.loads(body)


def measure_tree(label: str, tree: Path, jpegs: dict[str, bytes], args) -> list[dict]:
    """Start the tree's service, run every size x concurrency cell, stop it; one row per cell."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix=f"ceiling-{label}-"))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "_serve", "--tree", str(tree), "--port", str(port)]
    cmd += ["--data", str(work / "data"), "--preset", args.preset]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stderr=open(work / "server.log", "w"))
    rows = []
    try:
        for _ in range(600):
            try:
                get_json(port, "/readyz")
                break
            except (OSError, RuntimeError, ValueError):
                if proc.poll() is not None:
                    raise RuntimeError(f"{label} server exited:\n{(work / 'server.log').read_text()[-2000:]}") from None
                time.sleep(0.1)
        for size, jpeg in jpegs.items():
            payload = request_bytes(port, jpeg, f"{size}.jpg")
            for c in args.concurrency:
                before, disk0 = get_json(port, "/_bench/stats"), folder_bytes(work / "data")
                cell = asyncio.run(run_cell(port, payload, c, args.seconds))
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
    finally:
        proc.terminate()
        proc.wait(30)
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
    sub = ap.add_subparsers(dest="cmd")
    child = sub.add_parser("_serve")
    child.add_argument("--tree", type=Path, required=True)
    child.add_argument("--port", type=int, required=True)
    child.add_argument("--data", type=Path, required=True)
    child.add_argument("--preset", default="mvtec")
    ap.add_argument("--baseline", default=None, help="git ref measured too, before the working tree (e.g. main)")
    ap.add_argument("--seconds", type=float, default=6.0, help="timed window per cell")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--sizes", default=",".join(SIZES_MP))
    ap.add_argument("--preset", default="mvtec")
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table to this file")
    args = ap.parse_args(argv)
    if args.cmd == "_serve":
        serve_child(args)
        return
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    jpegs = {k: v for k, v in make_jpegs().items() if k in args.sizes.split(",")}
    trees = [(f"base {args.baseline}", baseline_tree(args.baseline))] if args.baseline else []
    trees.append(("this tree", ROOT))
    print(f"stand-in model, preset {args.preset}, {args.seconds:g} s per cell, {os.cpu_count()} CPUs\n{HEADER}")
    rows = []
    for label, tree in trees:
        rows += measure_tree(label, tree, jpegs, args)
    lines = [HEADER, *map(format_row, rows)]
    if args.baseline:
        for size in jpegs:
            for c in args.concurrency:
                pair = [r["ips"] for r in rows if r["size"] == size and r["c"] == c]
                if len(pair) == 2:
                    lines.append(f"\nceiling ratio {size} C={c}: {pair[1] / pair[0]:.2f}x")
    print("\n".join(lines[1 + len(rows) :]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
