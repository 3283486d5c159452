"""One prepared GPU check: parity, engine throughput (eager and compiled), GPU I/O and the HTTP service end to end.

Every step runs in its own process group with its own time cap (and the whole run within ``--budget-s``), so a slow
``torch.compile`` or a crash costs one step, never the table. Rows are written as each measurement finishes; a step
that fails or runs out of time gets a row with the reason. Progress lines carry UTC timestamps. Output: ONE Markdown
table, ``<out>/device_check.md`` (printed too), and the raw rows as ``device_check.jsonl``.

Steps (GPU sizes; ``--cpu-dry-run`` runs each at toy sizes on the CPU to prove the script):

    env       torch/CUDA/torchvision versions, device name, measured bf16 matmul peak
    parity    tiny fixture CLIP on the device vs the CPU fp32 golden fixture (config A): maps fp32 <= 1e-4,
              bf16/fp16 <= 1e-2; also the service map against our own CPU fp32 run
    engine    random full-size ViT-L/14@336, preset mvtec, eager, bf16/fp16/fp32 x batch 1/4/16/32: images/s,
              p50 ms per call, % of the bf16 peak (989 TFLOP/s dense; FLOPs per image counted analytically),
              peak GPU memory
    compiled  the same with the vision tower compiled as the service does (DHR_COMPILE, service.engine.buckets):
              bf16, default at batch 32 and 1, then reduce-overhead (CUDA graphs) at batch 1
    gpu_io    nvJPEG decode (torchvision.io.decode_jpeg on the device) vs Pillow, pinned vs pageable upload, and the
              service's views per image: Pillow decode + views vs nvJPEG + torch views (DHR_PREPROCESS)
    http      the service (create_app + uvicorn) with the random ViT-L in bf16 on the device, real photos,
              DHR_PREPROCESS cpu (Pillow) and device-decode (nvJPEG + views on the GPU, the CUDA default), each at
              concurrency 1, 8, 32: images/s, p50, p99, mean batch, server CPU ms per image
    http_compiled  (not in the default GPU run: compiling every bucket takes minutes; ``--steps http_compiled``)
              the service with DHR_COMPILE=reduce-overhead, max batch 8, device-decode, concurrency 8 and 32
    tensorrt  when tensorrt (and onnx, onnxscript) import: TensorRT engines built from the ONNX export of the tiny
              fixture CLIP (fp32 and fp16 graphs, profile batch 1..8) against torch fp32 on config A (maps
              <= 1e-3 fp32 (TF32), <= 1e-2 fp16), build time, images/s at batch 1 and 8; else one SKIPPED row
              saying what is missing (PyPI's tensorrt-cu12/13 are stubs that download from NVIDIA at install)

    bash bench/device_check.sh --out $OUT --budget-s 430   # on the GPU machine (wheels .whl/, data .devdata/)
    PYTHONPATH=$PWD .venv/bin/python bench/device_check.py --cpu-dry-run --out /tmp/dc
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tests.paths import FIXTURES, REAL_DEFECTS, ROOT

BF16_PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 (spec sheet); the "fraction of the bf16 peak"
# step -> (cap in seconds on the GPU, cap in the CPU dry run); the GPU caps of the default steps up to http sum to
# 420 s of the 430 s budget; tensorrt, last, gets what is left (without TensorRT in the image: one SKIPPED row)
STEPS = {
    "env": (20, 60),
    "parity": (40, 90),
    "engine": (75, 90),
    "compiled": (130, 120),
    "gpu_io": (25, 60),
    "http": (130, 180),
    "http_compiled": (240, 150),
    "tensorrt": (90, 30),
}
GPU_DEFAULT_STEPS = [s for s in STEPS if s != "http_compiled"]  # the dry run runs every step
COLUMNS = ("step", "config", "img/s", "p50 ms", "p99 ms", "% bf16 peak", "peak GPU MB", "max diff", "status", "note")
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S} +{time.monotonic() - T0:5.0f}s] {msg}", flush=True)


class Ctx:
    """What a step needs: the device, toy or full sizes, where rows and data live."""

    def __init__(self, args):
        import torch

        self.dry = args.cpu_dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.results = args.results
        self.fixtures = args.fixtures
        self.photos = args.photos
        self.step = args.step
        self.torch = torch

    def emit(self, config: str, **row) -> None:
        row = {"step": self.step, "config": config, **row}
        with open(self.results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        log(f"{self.step} {config}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("step", "config")))

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float | None:
        return round(self.torch.cuda.max_memory_allocated() / 2**20) if self.device == "cuda" else None


# ------------------------------------------------------------------------------------------------------- steps
def step_env(ctx: Ctx) -> None:
    import torch
    import torchvision
    from model_throughput import matmul_peak

    name = torch.cuda.get_device_name() if ctx.device == "cuda" else "CPU"
    peak = matmul_peak(ctx.device, torch.bfloat16, n=512 if ctx.dry else 8192, seconds=0.3 if ctx.dry else 2.0)
    note = (
        f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda}, torchvision {torchvision.__version__}, "
        f"numpy {np.__version__}, {os.cpu_count()} CPUs; bf16 matmul {peak / 1e12:.0f} TFLOP/s measured"
    )
    ctx.emit("versions", status="ok", note=note)


def step_parity(ctx: Ctx) -> None:
    import torch
    from PIL import Image

    from service.model import EXTRA_MAPS, build_model, load_backbone, load_checkpoint, load_views

    fx = ctx.fixtures
    expected = dict(np.load(fx / "expected.npz"))
    clip, info = load_backbone(fx / "clip_tiny_openai_format.pt")
    ck = load_checkpoint(fx / "prompt_learner_checkpoint.pth")
    images = [Image.open(fx / str(name)) for name in expected["image_files"]]

    def run(device: str, precision: str):
        model, _ = build_model(clip, ck, preset="mvtec", device=device, precision=precision, backbone_info=info)
        views = [load_views(img, model.cfg.preset) for img in images]
        whole = torch.from_numpy(np.stack([v.whole for v in views]))
        crops = torch.from_numpy(np.stack([v.crops for v in views]))
        out = model(whole, crops, EXTRA_MAPS)
        maps = {k: v.float().cpu().numpy() for k, v in out._asdict().items() if v is not None}
        return maps, out.reference.float().cpu().numpy()

    if ctx.dry:  # toy size: one image, bf16 only (CPU fp32 parity is tests/test_parity.py's job)
        images = images[:1]
        expected = {k: v[:1] for k, v in expected.items() if k.startswith("A_")}
    plan = (("bf16", 1e-2),) if ctx.dry else (("fp32", 1e-4), ("bf16", 1e-2), ("fp16", 1e-2))
    cpu = None if ctx.dry else run("cpu", "fp32")[0]
    for precision, tol in plan:
        try:
            out, score = run(ctx.device, precision)
        except Exception as exc:  # noqa: BLE001 - one precision failing is a row, not the step
            ctx.emit(f"{ctx.device} {precision}", status="ERROR", note=f"{type(exc).__name__}: {exc}"[:300])
            continue
        final = np.abs(out["eval_map"][:, ::2, ::2] - expected["A_final_map_stride2"]).max()
        raw = np.abs(out["raw_map"][:, ::2, ::2] - expected["A_raw_map_stride2"]).max()
        service = 0.0 if cpu is None else np.abs(out["anomaly_map"] - cpu["anomaly_map"]).max()
        dscore = np.abs(score - expected["A_image_score"]).max()
        worst = max(final, service)
        ctx.emit(
            f"{ctx.device} {precision} vs CPU fp32 golden (A, {len(images)} image(s))",
            diff=f"{worst:.2e}",
            status="pass" if worst <= tol else f"FAIL (> {tol:g})",
            note=f"final map {final:.2e}, service map {service:.2e}, raw map {raw:.2e}, score {dscore:.2e}",
        )


def _engine_model(ctx: Ctx, precision: str, visual=None):
    """DHRCLIP around a random backbone: full ViT-L/14@336 on the GPU, the tiny one in the dry run."""
    from harness import random_model

    return random_model("tiny" if ctx.dry else "vit-l", "mvtec", ctx.device, precision, visual)


def _flops_per_image(model) -> float:
    """Matmul FLOPs of one image (whole view + 4 crops), analytic, from the uncompiled tower's dimensions."""
    from model_throughput import analytic_flops

    vis = model.visual_for_flops
    width, layers = vis.conv1.out_channels, len(vis.transformer.resblocks)
    mlp = vis.transformer.resblocks[0].mlp.c_fc.out_features
    p, dual = model.cfg.preset, min(layers, model.cfg.dpam - 1)
    g_s, g_p = p.image_size // 14, p.crop_size // 14
    one = analytic_flops(width, layers, mlp, g_s * g_s + 1, dual, 1)
    return one + analytic_flops(width, layers, mlp, g_p * g_p + 1, dual, 4)


def _inputs(model, b: int):
    import torch

    p = model.cfg.preset
    g = torch.Generator().manual_seed(b)
    whole = torch.randint(0, 256, (b, p.image_size, p.image_size, 3), dtype=torch.uint8, generator=g)
    crops = torch.randint(0, 256, (b, 4, p.crop_size, p.crop_size, 3), dtype=torch.uint8, generator=g)
    return whole, crops


def _time_model(ctx: Ctx, model, b: int, seconds: float, warm: int = 1, before=None) -> tuple[float, float, float]:
    """(images/s, p50 ms per call, p99 ms per call) of ``model`` on host uint8 batches of ``b`` images (pinned on
    CUDA, as the service's runner stacks them); ``before()`` runs ahead of every call."""
    whole, crops = _inputs(model, b)
    if ctx.device == "cuda":
        whole, crops = whole.pin_memory(), crops.pin_memory()
    before = before or (lambda: None)
    for _ in range(warm):
        before()
        model(whole, crops)
    ctx.sync()
    lat, t_end, min_calls = [], time.perf_counter() + seconds, 1 if ctx.dry else 3
    while time.perf_counter() < t_end or len(lat) < min_calls:
        before()
        t0 = time.perf_counter()
        model(whole, crops)
        ctx.sync()
        lat.append(time.perf_counter() - t0)
    return b * len(lat) / sum(lat), 1000 * statistics.median(lat), 1000 * float(np.percentile(lat, 99))


def _engine_row(ctx: Ctx, model, config: str, b: int, seconds: float, note: str = "", before=None) -> None:
    flops = _flops_per_image(model)
    ctx.reset_peak()
    ips, p50, p99 = _time_model(ctx, model, b, seconds, before=before)
    peak = BF16_PEAK_FLOPS if ctx.device == "cuda" else None
    ctx.emit(
        config,
        ips=round(ips, 2),
        p50=round(p50, 1),
        p99=round(p99, 1),
        frac=f"{100 * ips * flops / peak:.1f}" if peak else "",
        mem=ctx.peak_mb(),
        status="ok",
        note=(note + f"; {flops / 1e12:.2f} TFLOP/img").lstrip("; "),
    )


def step_engine(ctx: Ctx) -> None:
    batches = (1, 2) if ctx.dry else (1, 4, 16, 32)
    precisions = ("bf16",) if ctx.dry else ("bf16", "fp16", "fp32")
    visual = None
    for precision in precisions:
        model = _engine_model(ctx, precision, visual)
        visual = model.source_visual
        for b in batches:
            _engine_row(ctx, model, f"eager {precision} batch {b}", b, 0.2 if ctx.dry else 1.0)
        del model
        if ctx.device == "cuda":
            ctx.torch.cuda.empty_cache()


def step_compiled(ctx: Ctx) -> None:
    import torch

    from service.engine.buckets import compile_tower

    backend = "eager" if ctx.dry else "inductor"  # the dry run proves the code path without a C++ toolchain
    model = _engine_model(ctx, "bf16")
    eager_encoder = model.encoder
    plan = [("default", 1)] if ctx.dry else [("default", 32), ("default", 1), ("reduce-overhead", 1)]
    for mode, b in plan:
        torch._dynamo.reset()
        model.encoder = eager_encoder
        compile_tower(model, mode, b, backend)  # what DHR_COMPILE does to each replica
        step = torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead" else None  # as ModelRunner
        t0 = time.perf_counter()
        for _ in range(3 if mode == "reduce-overhead" else 1):  # CUDA graphs record on the 2nd/3rd call
            if step:
                step()
            model(*_inputs(model, b))
        ctx.sync()
        compile_s = time.perf_counter() - t0
        seconds = 0.2 if ctx.dry else 1.5
        _engine_row(ctx, model, f"compiled {mode} bf16 batch {b}", b, seconds, f"compile {compile_s:.0f} s", step)


def _photo_bytes(ctx: Ctx, limit: int = 64) -> list[tuple[str, bytes]]:
    files = sorted(p for p in ctx.photos.rglob("*.jpg") if "ground_truth" not in p.parts)[:limit]
    if not files:
        raise RuntimeError(f"no JPEG photos under {ctx.photos}")
    return [(p.name, p.read_bytes()) for p in files]


def step_gpu_io(ctx: Ctx) -> None:
    import io

    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    photos = _photo_bytes(ctx)
    datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for _, d in photos]
    t0 = time.perf_counter()
    ref = [np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for _, d in photos]
    pil_s = time.perf_counter() - t0
    decode_jpeg(datas[:2], mode=ImageReadMode.RGB, device=ctx.device)  # warm-up (nvJPEG handles)
    ctx.sync()
    t0 = time.perf_counter()
    out = decode_jpeg(datas, mode=ImageReadMode.RGB, device=ctx.device)
    ctx.sync()
    dev_s = time.perf_counter() - t0
    pairs = zip(out, ref, strict=True)
    diff = max(int(np.abs(o.permute(1, 2, 0).cpu().numpy().astype(int) - r).max()) for o, r in pairs)
    pixels = sum(r.shape[0] * r.shape[1] for r in ref) / len(ref)
    ctx.emit(
        f"decode_jpeg on {ctx.device}, {len(photos)} photos (batched)",
        ips=round(len(photos) / dev_s, 1),
        diff=f"{diff} levels",
        status="ok",
        note=f"Pillow 1 thread: {len(photos) / pil_s:.1f} img/s; mean {pixels / 1e6:.2f} MP",
    )
    _service_views(ctx, photos)
    if ctx.device == "cuda":
        batch = torch.randint(0, 256, (32, 5, 336, 336, 3), dtype=torch.uint8)
        for label, host in (("pageable", batch), ("pinned", batch.pin_memory())):
            host.to("cuda", non_blocking=True)
            ctx.sync()
            t0 = time.perf_counter()
            for _ in range(10):
                host.to("cuda", non_blocking=True)
            ctx.sync()
            gbps = 10 * host.numel() / (time.perf_counter() - t0) / 1e9
            ctx.emit(f"upload of a batch-32 view tensor, {label}", status="ok", note=f"{gbps:.1f} GB/s")


def _service_views(ctx: Ctx, photos: list[tuple[str, bytes]]) -> None:
    """Per image, one thread, as the service's decode step does it: Pillow decode + Pillow views (DHR_PREPROCESS
    cpu) against checked-then-deferred decode + nvJPEG + torch views on the device (device-decode)."""
    from service.engine.decode import decode_image, views_for
    from service.engine.device_views import DeviceViews
    from service.model import get_preset

    preset = get_preset("mvtec")
    dv = DeviceViews(ctx.device, preset, decode_jpegs=True)
    for _ in range(2):  # the second pass is timed (decoder handles, kernels warm)
        t0 = time.perf_counter()
        ref = [views_for(decode_image(data, name), preset) for name, data in photos]
        cpu_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = [dv(decode_image(data, name, defer_jpeg=True)) for name, data in photos]
        ctx.sync()
        dev_s = time.perf_counter() - t0
    diff = max(int(np.abs(g.whole.cpu().numpy().astype(int) - r.whole).max()) for g, r in zip(got, ref, strict=True))
    ctx.emit(
        f"service views on {ctx.device}: checks + decode_jpeg + torch views, per image",
        ips=round(len(photos) / dev_s, 1),
        diff=f"{diff} levels",
        status="ok",
        note=f"Pillow decode + views (DHR_PREPROCESS=cpu), 1 thread: {len(photos) / cpu_s:.1f} img/s",
    )


def _http_cells(ctx: Ctx, label: str, levels: tuple[int, ...], settings: dict, compile_backend: str = "") -> None:
    """One server of the random model with ``settings``, measured at each concurrency of ``levels``."""
    from harness import start_server

    model, precision = ("tiny", "fp32") if ctx.dry else ("vit-l", "bf16")
    base = {"max_batch_size": 32, "max_wait_ms": 5, "queue_size": 512, "workers": 2 if ctx.dry else 12}
    work = Path(tempfile.mkdtemp(prefix="device-check-http-"))
    t0 = time.perf_counter()
    try:
        proc, port = start_server(
            ROOT,
            work,
            model,
            "mvtec",
            device=ctx.device,
            precision=precision,
            settings={**base, **settings},
            compile_backend=compile_backend,
        )
        log(f"http: server ready in {time.perf_counter() - t0:.0f} s ({model} {precision} {label} on {ctx.device})")
        _measure_http(ctx, proc, port, f"HTTP {model} {precision} {label}", levels)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the stored inspections: CI's dry run would leave ~10 MB a call


def step_http(ctx: Ctx) -> None:
    levels = (1, 2) if ctx.dry else (1, 8, 32)
    for preprocess in ("cpu", "device-decode"):
        _http_cells(ctx, preprocess, levels, {"preprocess": preprocess})


def step_http_compiled(ctx: Ctx) -> None:
    mode = "default" if ctx.dry else "reduce-overhead"
    settings = {"preprocess": "device-decode", "compile": mode, "max_batch_size": 2 if ctx.dry else 8}
    _http_cells(ctx, f"compiled {mode}", (2,) if ctx.dry else (8, 32), settings, "eager" if ctx.dry else "")


def _measure_http(ctx: Ctx, proc, port: int, label: str, levels: tuple[int, ...]) -> None:
    from harness import get_json, request_bytes, run_cell, stop_server

    photos = _photo_bytes(ctx)
    try:
        payloads = [request_bytes(port, data, name) for name, data in photos]
        for c in levels:
            before = get_json(port, "/_bench/stats")
            cell = asyncio.run(run_cell(port, payloads, c, 1.5 if ctx.dry else 8.0))
            after = get_json(port, "/_bench/stats")
            cpu_ms = 1000 * (after["process_cpu_s"] - before["process_cpu_s"]) / (cell["n"] + c)
            wall = {
                k: statistics.median(t.get(k, float("nan")) for t in cell["timings"])
                for k in ("decode", "queue", "inference", "postprocess", "store")
            }
            batch = statistics.mean(t.get("batch_size", 1) for t in cell["timings"])
            ctx.emit(
                f"{label} concurrency {c}",
                ips=round(cell["n"] / cell["elapsed"], 2),
                p50=round(1000 * statistics.median(cell["lat"]), 1),
                p99=round(1000 * float(np.percentile(cell["lat"], 99)), 1),
                status="ok" if not cell["errors"] else f"{len(cell['errors'])} errors: {cell['errors'][0][:80]}",
                note=f"mean batch {batch:.1f}; server CPU {cpu_ms:.0f} ms/img; wall ms "
                + ", ".join(f"{k} {v:.0f}" for k, v in wall.items()),
            )
    finally:
        stop_server(proc)


def _missing(*modules: str) -> list[str]:
    import importlib.util

    return [m for m in modules if importlib.util.find_spec(m) is None]


def step_tensorrt(ctx: Ctx) -> None:
    missing = _missing("tensorrt", "onnx", "onnxscript")
    if missing or ctx.dry:
        why = f"{', '.join(missing)} not importable" if missing else "CPU dry run (TensorRT needs the GPU)"
        note = f"{why}; PyPI's tensorrt-cu12/13 are stubs that download from NVIDIA at install (no network here)"
        print(f"tensorrt: SKIPPED: {note}", flush=True)
        ctx.emit("TensorRT engines", status="SKIPPED", note=note)
        return
    import torch
    from PIL import Image

    from service.engine.backends import load_exported
    from service.engine.export import export_model
    from service.model import build_model, load_backbone, load_checkpoint, load_views, stack_views

    fx = ctx.fixtures
    clip, binfo = load_backbone(fx / "clip_tiny_openai_format.pt")
    ck = load_checkpoint(fx / "prompt_learner_checkpoint.pth")
    names = [str(n) for n in np.load(fx / "expected.npz")["image_files"]]
    ref_model, _ = build_model(clip, ck, preset="mvtec", backbone_info=binfo)
    batch = stack_views([load_views(Image.open(fx / n), ref_model.cfg.preset) for n in names])
    with torch.inference_mode():
        ref = ref_model(*batch).anomaly_map
    with tempfile.TemporaryDirectory(prefix="device-check-trt-") as tmp:
        work = Path(tmp)
        for precision, tol in (("fp32", 1e-3), ("fp16", 1e-2)):
            export_model(
                *build_model(clip, ck, preset="mvtec", precision=precision, backbone_info=binfo), work / precision
            )
            t0 = time.perf_counter()
            model, _ = load_exported("tensorrt", work / precision, preset="mvtec", precision=precision, device="cuda")
            build_s = time.perf_counter() - t0
            with torch.inference_mode():
                diff = float((model(*batch).anomaly_map.float().cpu() - ref).abs().max())
            ctx.emit(
                f"TensorRT {precision} tiny CLIP vs torch fp32 (A, {len(names)} images)",
                diff=f"{diff:.2e}",
                status="pass" if diff <= tol else f"FAIL (> {tol:g})",
                note=f"engine built in {build_s:.0f} s (profile batch 1..8)",
            )
            for b in (1, 8):
                with torch.inference_mode():
                    ips, p50, p99 = _time_model(ctx, model, b, 1.0)
                row = {"ips": round(ips, 1), "p50": round(p50, 1), "p99": round(p99, 1), "status": "ok"}
                ctx.emit(f"TensorRT {precision} tiny batch {b}", **row)


STEP_FUNCS = {
    "env": step_env,
    "parity": step_parity,
    "engine": step_engine,
    "compiled": step_compiled,
    "gpu_io": step_gpu_io,
    "http": step_http,
    "http_compiled": step_http_compiled,
    "tensorrt": step_tensorrt,
}
assert set(STEP_FUNCS) == set(STEPS)


# ------------------------------------------------------------------------------------------------------ driver
def run_step(name: str, args, cap: float) -> tuple[str, str]:
    """Run one step in its own process group; ('ok' | 'TIMEOUT ...' | 'FAILED ...', stderr tail)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--results", str(args.results)]
    cmd += ["--fixtures", str(args.fixtures), "--photos", str(args.photos)] + (["--cpu-dry-run"] * args.cpu_dry_run)
    err_path = args.out / f"{name}.stderr.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stderr=err, env=env, start_new_session=True)
        try:
            rc = proc.wait(cap)
            status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"TIMEOUT after {cap:.0f} s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the step and anything it started (a server child)
            except ProcessLookupError:
                pass
            proc.wait()
    tail = [ln for ln in err_path.read_text(errors="replace").splitlines() if ln.strip()][-3:]
    return status, " / ".join(tail)[-300:]


def markdown(rows: list[dict]) -> str:
    keys = ("step", "config", "ips", "p50", "p99", "frac", "mem", "diff", "status", "note")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = ["" if r.get(k) is None else str(r.get(k, "")).replace("|", "/") for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def drive(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    args.results = args.out / "device_check.jsonl"
    args.results.write_text("")
    chosen = args.steps.split(",") if args.steps else list(STEPS) if args.cpu_dry_run else GPU_DEFAULT_STEPS
    deadline = time.monotonic() + args.budget_s
    log(f"device check ({'CPU dry run' if args.cpu_dry_run else 'GPU'}): steps {chosen}, budget {args.budget_s:.0f} s")
    failures = []
    for name in chosen:
        cap = min(STEPS[name][1 if args.cpu_dry_run else 0], deadline - time.monotonic())
        if cap < 5:
            failures.append({"step": name, "status": "SKIPPED", "note": "the run's time budget is spent"})
            continue
        log(f"step {name}: start (cap {cap:.0f} s)")
        status, tail = run_step(name, args, cap)
        log(f"step {name}: {status}")
        if status != "ok":
            failures.append({"step": name, "status": status, "note": tail})
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    order = {name: i for i, name in enumerate(chosen)}
    table = markdown(sorted(rows + failures, key=lambda r: order.get(r["step"], 99)))
    (args.out / "device_check.md").write_text(table + "\n")
    print("\n" + table, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder of the table")
    ap.add_argument("--cpu-dry-run", action="store_true", help="every step at toy sizes on the CPU")
    ap.add_argument(
        "--steps",
        default=None,
        help=f"comma list of steps (default on the GPU: {','.join(GPU_DEFAULT_STEPS)}; the dry run: all of "
        f"{','.join(STEPS)})",
    )
    ap.add_argument("--budget-s", type=float, default=430.0, help="the whole run's time limit")
    devdata = ROOT / ".devdata"
    ap.add_argument("--fixtures", type=Path, default=devdata / "reference_parity")
    ap.add_argument("--photos", type=Path, default=devdata / "photos")
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--results", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for attr, shared in (("fixtures", FIXTURES), ("photos", REAL_DEFECTS)):
        if not getattr(args, attr).is_dir():  # no carried copy: the shared assets beside the repository
            setattr(args, attr, shared)
    if args.step is None:
        return drive(args)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    STEP_FUNCS[args.step](Ctx(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
