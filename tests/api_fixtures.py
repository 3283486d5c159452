"""Helpers shared by the API tests: settings on a tmp data dir, waiting for readiness, test images, a runner hook.

The apps run the real model code path with the tiny random CLIP of the parity fixtures and its reference-format
prompt checkpoint, at preset "fast" on the CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time

import httpx
import numpy as np
from PIL import Image

from service.api import Settings
from service.api.weights import load_weights
from service.storage import InspectionRecord, new_inspection_id

from .paths import REF_PROMPTS, TINY_CLIP

PRESET = "fast"


def make_settings(data_dir, **overrides) -> Settings:
    """Settings for a test app: tiny CLIP + fixture prompts, preset fast, CPU, no warm-up, tmp data dir."""
    values = dict(
        backbone=str(TINY_CLIP),
        prompts=str(REF_PROMPTS),
        preset=PRESET,
        device="cpu",
        warmup=False,
        data_dir=data_dir,
        max_wait_ms=5,
        model_weights_dir=data_dir / "no-model-weights",
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


def wait_ready(client, timeout_s: float = 120.0) -> None:
    """Poll /readyz until 200 (the model loads in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get("/readyz")
        if r.status_code == 200:
            return
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "loading", f"model failed to load: {r.json()}"
        assert time.monotonic() < deadline, "model not ready in time"
        time.sleep(0.05)


async def wait_ready_async(client: httpx.AsyncClient, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (r := await client.get("/readyz")).status_code != 200:
        assert r.json()["status"] == "loading", f"model failed to load: {r.json()}"
        assert time.monotonic() < deadline, "model not ready in time"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(app):
    """The app with its lifespan running, and an httpx.AsyncClient talking to it in-process (ASGITransport)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=120) as client:
            await wait_ready_async(client)
            yield client


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def synthetic_image(seed: int, size=(96, 64), mode: str = "RGB") -> Image.Image:
    """A smooth random texture with a dark blob; different seeds give different images."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(xx / (5 + seed % 7)) * np.cos(yy / (4 + seed % 5))
    cx, cy = rng.integers(0, w), rng.integers(0, h)
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (3 + seed % 4) ** 2))
    grey = np.clip(base - 120 * blob + rng.normal(0, 6, (h, w)), 0, 255).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(grey, "L")
    rgb = np.stack([grey, np.roll(grey, seed + 1, axis=1), np.flipud(grey)], axis=-1)
    return Image.fromarray(rgb, "RGB")


def png_file(name: str, seed: int, size=(96, 64), mode: str = "RGB") -> tuple[str, tuple[str, bytes, str]]:
    """One ``files=`` entry for the multipart field ``image``."""
    return ("image", (name, encode(synthetic_image(seed, size, mode)), "image/png"))


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    img.load()
    return img


class RunnerHook:
    """A loader for ``create_app(settings, load=hook.load)``: the real weights, wrapped so that every model call
    (one batch) is counted with its size, can be held until ``release()`` or made to raise ``fail``."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        self.fail: Exception | None = None

    def load(self, settings: Settings):
        model, info, choice = load_weights(settings)
        return _HookedModel(model, self), info, choice

    def hold(self) -> None:
        self.entered.clear()
        self.gate = threading.Event()

    def release(self) -> None:
        if self.gate is not None:
            self.gate.set()


class _HookedModel:
    """Stands in for the DHRCLIP the engine runs: same ``cfg`` and ``device``, the hook sees each call first."""

    def __init__(self, model, hook: RunnerHook) -> None:
        self.model, self.hook, self.cfg = model, hook, model.cfg

    @property
    def device(self):
        return self.model.device

    def __call__(self, whole, crops, extra=()):
        hook = self.hook
        hook.sizes.append(whole.shape[0])
        hook.entered.set()
        if hook.gate is not None:
            assert hook.gate.wait(60), "test gate never opened"
        if hook.fail is not None:
            raise hook.fail
        return self.model(whole, crops, extra)


def make_record(created_at, verdict: str = "defect", **kw) -> InspectionRecord:
    """A record to write straight into a store (score 0.75 for a defect, 0.25 otherwise; threshold 0.5)."""
    fields = dict(
        id=new_inspection_id(created_at),
        created_at=created_at,
        product="bottle",
        line="L1",
        width=8,
        height=6,
        score=0.75 if verdict == "defect" else 0.25,
        threshold=0.5,
        verdict=verdict,
        image_score="reference",
        pixel_threshold=0.5,
        defect_area_ratio=0.125,
    )
    fields.update(kw)
    return InspectionRecord(**fields)
