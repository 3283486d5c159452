"""HTTP benchmark harness shared by pipeline_ceiling.py and device_check.py: a service child process, a raw client.

Server child (``python bench/harness.py serve ...``): the service of ``--tree`` (put first on ``sys.path``, so an
older commit can be measured with today's harness) built by ``create_app`` and run by uvicorn on 127.0.0.1, with
the model chosen here instead of from weight files:

    stand-in   instant, returns DHR-CLIP's output shapes (a fixed T x T map with one defect blob at peak 0.9)
    tiny       tests.tiny_clip.tiny_backbone(): real DHR-CLIP code, toy width (CPU dry runs)
    vit-l      service.model.random_backbone(): full-size random ViT-L/14@336 (real compute, meaningless scores)

``/_bench/stats`` (added to the app) answers process CPU seconds and thread-CPU seconds per stage, summed over
the stage functions that the tree has (``StageClock.wrap_all``).

Client: keep-alive raw sockets, one JPEG per POST /segment, C connections until a deadline (``run_cell``); the
request bytes are built once, so the client costs little CPU next to the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

STAGES = ("http_parse", "decode", "views", "model", "postprocess", "store", "response")
MODELS = ("stand-in", "tiny", "vit-l")


# ------------------------------------------------------------------------------------------- server side (child)
def stand_in_model(preset_name: str):
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

        def __call__(self, whole, crops, extra=()):
            b = whole.shape[0]
            maps, one = amap.expand(b, t, t), torch.full((b,), 0.9)
            fields = [
                (maps if f == "anomaly_map" or f in extra else None) if f.endswith("map") else one
                for f in DHROutput._fields
            ]
            return DHROutput(*fields)

        def eval(self):
            return self

    return StandIn()


def random_model(kind: str, preset: str, device: str, precision: str, visual=None):
    """A DHRCLIP around a random backbone (``tiny`` or ``vit-l``) with random unit text features.

    ``visual``: reuse this (fp32, CPU) vision tower instead of making a new one; it is copied, never changed.
    Returns the model; ``model.visual_for_flops`` is the uncompiled open_clip tower, ``model.source_visual`` the
    fp32 original (for the next precision).
    """
    import copy

    import torch

    from service.model import DHRCLIP, DHRConfig, get_preset, random_backbone
    from tests.tiny_clip import tiny_backbone

    if visual is None:
        visual = (tiny_backbone() if kind == "tiny" else random_backbone()).visual
    toy = {"dpam": 4, "features_list": (2, 4, 6)} if kind == "tiny" else {}  # tiny_backbone has 6 blocks
    cfg = DHRConfig(preset=get_preset(preset), **toy)
    text = torch.nn.functional.normalize(torch.randn(2, visual.proj.shape[1], generator=torch.Generator()), dim=-1)
    model = DHRCLIP(copy.deepcopy(visual), text, cfg, precision).to(device).eval()
    model.visual_for_flops, model.source_visual = model.tower.visual, visual
    return model


def fill(cls, **known):
    """An instance of a dataclass with every field not given set to "stand-in" (robust to renamed fields)."""
    return cls(**{f: known.get(f, "stand-in") for f in cls.__dataclass_fields__})


class StageClock:
    """Thread-CPU seconds per stage, summed over every call of the wrapped functions."""

    def __init__(self):
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

        targets = [(fp.multipart.MultipartParser, "write", "http_parse"), (sr.JSONResponse, "render", "response")]
        for mod_name, attr, stage in [
            ("service.engine.runner", "decode_image", "decode"),
            ("service.engine.runner", "views_for", "views"),
            ("service.engine.runner", "postprocess", "postprocess"),
            ("service.engine.runner", "analyse_map", "postprocess"),
            ("service.api.pipeline", "render_artefacts", "postprocess"),
            ("service.engine.runner", "render_artefacts", "postprocess"),
            ("service.engine.runner", "encode_map", "store"),
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


def serve(args) -> None:
    """Run the service of ``args.tree`` with the chosen model until terminated."""
    sys.path.insert(0, str(args.tree))
    import resource

    import uvicorn

    import service.api.state as state
    from service.api.app import create_app
    from service.api.settings import Settings
    from service.api.state import WeightsChoice
    from service.model.loader import ModelInfo

    def load(settings):
        if args.model == "stand-in":
            model = stand_in_model(settings.preset)
        else:
            model = random_model(args.model, settings.preset, args.device, args.precision)
        info = fill(
            ModelInfo, prompts_sha256=None, preset=settings.preset, precision=args.precision, device=args.device
        )
        return model, info, fill(WeightsChoice, device=args.device)

    if args.compile_backend:  # DHR_COMPILE through another torch.compile backend (CPU dry runs: "eager")
        import service.engine.runner as runner

        compile_tower = runner.compile_tower
        runner.compile_tower = lambda model, mode, max_batch, _backend=None: compile_tower(
            model, mode, max_batch, args.compile_backend
        )
    clock = StageClock()
    hooks = clock.wrap_all()
    settings = Settings(data_dir=args.data, preset=args.preset, device=args.device, **json.loads(args.settings))
    if "load" in inspect.signature(create_app).parameters:
        app = create_app(settings, load=load)
    else:  # an older tree (before create_app(load=)): its state module calls load_weights by name
        state.load_weights = load
        app = create_app(settings)

    @app.get("/_bench/stats")
    def stats():
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"process_cpu_s": ru.ru_utime + ru.ru_stime, "stage_cpu_s": dict(clock.cpu), "hooks": hooks}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def start_server(tree: Path, work: Path, model: str = "stand-in", preset: str = "mvtec", **opts):
    """Start a server child on a free port; returns ``(process, port)`` once /readyz answers 200.

    opts: device, precision, settings (dict of Settings fields), ready_timeout_s, compile_backend (DHR_COMPILE's
    torch.compile backend instead of inductor).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # throughput is measured under a saturating load: no deadline, and no admission bound refusing it
    settings = {"request_timeout_s": 600, "max_queue_wait_s": 600, "max_upload_mb": 200, **opts.get("settings", {})}
    cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--tree", str(tree), "--port", str(port)]
    cmd += ["--data", str(work / "data"), "--preset", preset, "--model", model, "--settings", json.dumps(settings)]
    cmd += ["--device", opts.get("device", "cpu"), "--precision", opts.get("precision", "fp32")]
    cmd += ["--compile-backend", opts.get("compile_backend") or ""]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH")) if p)}
    log = work / "server.log"
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    deadline = time.monotonic() + opts.get("ready_timeout_s", 600)
    while True:
        try:
            status, body = fetch(port, "/readyz")
        except (OSError, ValueError):
            status, body = 0, {}
        if status == 200:
            return proc, port
        if body.get("status") == "error" or proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"server not ready: {body.get('reason')}; log tail:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------------- client side
def request_bytes(port: int, jpeg: bytes, name: str) -> bytes:
    """One complete HTTP/1.1 POST /segment request (multipart, field ``image``)."""
    boundary = "dhrbenchboundary7f3a"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
    body = (part + "Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
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


async def run_cell(port: int, payloads: list[bytes], concurrency: int, seconds: float) -> dict:
    """C keep-alive connections posting the payloads in turn until the deadline (after one warm-up each).

    Returns n (answered in the window), elapsed s, lat (s, per request), timings (the answers' timing_ms),
    errors (non-200 answers, first 200 bytes).
    """
    lat, timings, errors = [], [], []
    counter = iter(range(1 << 62))

    async def client(deadline: float | None, n: int | None):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        done = 0
        while (deadline is None or time.perf_counter() < deadline) and (n is None or done < n):
            t0 = time.perf_counter()
            status, body = await _exchange(reader, writer, payloads[next(counter) % len(payloads)])
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


def fetch(port: int, path: str) -> tuple[int, dict]:
    """GET on the server: (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def get_json(port: int, path: str) -> dict:
    """GET on the server; raises RuntimeError unless 200."""
    status, body = fetch(port, path)
    if status != 200:
        raise RuntimeError(f"GET {path}: {status} {body}")
    return body


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    child = sub.add_parser("serve", help="run a service child (used by the benchmarks)")
    child.add_argument("--tree", type=Path, required=True)
    child.add_argument("--port", type=int, required=True)
    child.add_argument("--data", type=Path, required=True)
    child.add_argument("--preset", default="mvtec")
    child.add_argument("--model", choices=MODELS, default="stand-in")
    child.add_argument("--device", default="cpu")
    child.add_argument("--precision", default="fp32")
    child.add_argument("--settings", default="{}", help="JSON object of Settings fields")
    child.add_argument("--compile-backend", default="", help="torch.compile backend for DHR_COMPILE (default inductor)")
    serve(ap.parse_args(argv))


if __name__ == "__main__":
    main()
