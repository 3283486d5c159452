"""The runner owns the model, its device and precision; the engine wires decode -> batcher -> runner -> postprocess.

Nothing here knows HTTP. Blocking work (decode, preprocess, postprocess) runs in a thread pool; the model runs in
the batcher's single worker thread, so the event loop only awaits.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from service.inspection import ARTEFACT_KINDS
from service.model import DHRCLIP, ImageScores, ModelInfo, Views, stack_views

from .admission import Admission, Ticket
from .batcher import BatchStats, DynamicBatcher
from .decode import DecodedImage, DecodeLimits, decode_image, views_for
from .postprocess import PostResult, postprocess


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    queue_size: int = 64
    workers: int = 2  # threads for decode / preprocess / postprocess
    max_pixels: int = 40_000_000
    max_side: int = 32_768
    max_aspect_ratio: float = 64.0
    accept_truncated: bool = False
    warmup: bool = True
    request_timeout_s: float = 30.0  # one request's images must be analysed within this (the deadline)
    max_queue_wait_s: float | None = None  # expected model wait beyond which work is refused (None: the deadline)

    @property
    def limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_pixels, self.max_side, self.max_aspect_ratio, self.accept_truncated)


class AbandonedError(RuntimeError):
    """The request of this work timed out or its client left; the work stopped at the next checkpoint."""


@dataclass(frozen=True)
class ImageResult:
    """One image's model output on the CPU; a score variant ``v`` is ``getattr(result.scores, v)``."""

    scores: ImageScores[float]
    anomaly_map: np.ndarray  # (T, T) float32 in [0, 1], squashed-square geometry
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # (T, T) float32 extra maps asked for (EXTRA_MAPS)


class ModelRunner:
    """Runs batches of views through the model; the only code that touches the device."""

    def __init__(self, model: DHRCLIP):
        self.model = model
        self.preset = model.cfg.preset

    def run(self, batch: list[Views], extra: tuple[str, ...] = ()) -> list[ImageResult]:
        """Views of B images -> B results: scores, the clamped service map and the ``extra`` maps, on the CPU."""
        out = self.model(*stack_views(batch), extra)
        maps = out.anomaly_map.clamp(0, 1).float().cpu().numpy()  # (B, T, T)
        scores = torch.stack(out.scores(), 1).float().cpu().tolist()  # (B, 3)
        more = {name: getattr(out, name).float().cpu().numpy() for name in extra}  # name -> (B, T, T)
        return [
            ImageResult(ImageScores(*s), m, {name: v[i] for name, v in more.items()})
            for i, (s, m) in enumerate(zip(scores, maps, strict=True))
        ]

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """Run dummy batches once (allocations, kernel selection); returns seconds spent."""
        p = self.preset
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        for b in batch_sizes:
            views = [
                Views(
                    rng.integers(0, 256, (p.image_size, p.image_size, 3), dtype=np.uint8),
                    rng.integers(0, 256, (4, p.crop_size, p.crop_size, 3), dtype=np.uint8),
                )
                for _ in range(b)
            ]
            self.run(views)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


class Engine:
    """Async facade used by the API: ``job = engine.admit(n)``, then per image ``job.decode`` -> ``job.infer`` ->
    ``job.postprocess``, and ``job.close()`` at the end of the request."""

    def __init__(self, model: DHRCLIP, info: ModelInfo, cfg: EngineConfig = EngineConfig(), on_batch=None):
        self.model, self.info, self.cfg = model, info, cfg
        self.runner = ModelRunner(model)
        self.pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="dhr-cpu")
        self.batcher: DynamicBatcher[Views, ImageResult] = DynamicBatcher(
            self.runner.run,
            max_batch_size=cfg.max_batch_size,
            max_wait_ms=cfg.max_wait_ms,
            queue_size=cfg.queue_size,
            on_batch=self._on_batch,
        )
        deadline = cfg.request_timeout_s
        wait = deadline if cfg.max_queue_wait_s is None else cfg.max_queue_wait_s
        self.admission = Admission(cfg.queue_size, cfg.max_batch_size, wait, deadline, lambda: self.batcher.in_flight)
        self._user_on_batch = on_batch
        self.ready = False
        self.warmup_s: float | None = None
        self.last_inference_at: float | None = None
        self.last_batch: BatchStats | None = None

    def _on_batch(self, stats: BatchStats) -> None:
        self.last_inference_at = time.time()
        self.last_batch = stats
        self.admission.observe_batch(stats.size, stats.run_s)
        if self._user_on_batch is not None:
            self._user_on_batch(stats)

    async def start(self) -> None:
        if self.cfg.warmup:
            loop = asyncio.get_running_loop()
            sizes = (1, self.cfg.max_batch_size) if self.model.device.type == "cuda" else (1,)
            self.warmup_s = await loop.run_in_executor(self.pool, self.runner.warm_up, sizes)
        await self.batcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop(drain=True)
        self.pool.shutdown(wait=True)

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    @property
    def batches_total(self) -> int:
        return self.batcher.batches_total

    @property
    def failed_batches_total(self) -> int:
        return self.batcher.failed_batches_total

    @property
    def rejected_total(self) -> int:
        """Images refused for load: by admission (before decoding) and by the batcher's own queue bound."""
        return self.admission.refused_total + self.batcher.rejected_total

    def admit(self, n: int) -> Job:
        """Reserve ``n`` images before any work (raises OverloadedError / TooManyImagesError, see admission)."""
        return Job(self, self.admission.admit(n))


class Job:
    """The images of one request inside the engine.

    - fairness: its images share one batcher key (round-robin against other requests) and at most
      ``workers`` of its CPU steps are queued on the thread pool at a time, so a request of many images cannot
      fill the pool ahead of everyone else;
    - cancellation: ``close()`` (request answered, timed out or client gone) sets a flag that the thread-pool work
      checks between steps (decode -> views; resize -> regions -> each PNG), so abandoned work stops early and
      raises :class:`AbandonedError`;
    - admission: each image leaves the outstanding count once its model output is back; ``close()`` gives back the
      rest.
    """

    def __init__(self, engine: Engine, ticket: Ticket) -> None:
        self.engine, self.ticket = engine, ticket
        self.key = object()
        self._cpu = asyncio.Semaphore(engine.cfg.workers)
        self._abandoned = threading.Event()

    def checkpoint(self) -> None:
        """Called by thread-pool work between steps; raises once the request is gone."""
        if self._abandoned.is_set():
            raise AbandonedError("the request was abandoned (timed out or the client left)")

    async def _on_pool(self, fn):
        async with self._cpu:
            self.checkpoint()
            return await asyncio.get_running_loop().run_in_executor(self.engine.pool, fn)

    async def decode(self, data: bytes, name: str) -> tuple[DecodedImage, Views]:
        """Decode + DHR views in the thread pool (raises ImageError)."""

        def work():
            decoded = decode_image(data, name, self.engine.cfg.limits)
            self.checkpoint()
            return decoded, views_for(decoded, self.engine.runner.preset)

        return await self._on_pool(work)

    async def infer(self, views: Views, timings: dict | None = None) -> ImageResult:
        """Queue one image for the next batch (round-robin with other requests)."""
        try:
            return await self.engine.batcher.submit(views, timings, key=self.key)
        finally:
            self.ticket.done()

    async def postprocess(
        self, result: ImageResult, decoded: DecodedImage, pixel_threshold: float, include=ARTEFACT_KINDS
    ) -> PostResult:
        limits = self.engine.cfg.limits

        def work():
            return postprocess(
                result.anomaly_map,
                decoded.rgb(),
                pixel_threshold,
                include=include,
                max_pixels=limits.max_pixels,
                checkpoint=self.checkpoint,
            )

        return await self._on_pool(work)

    def close(self) -> None:
        """Stop whatever work of this request is still running or queued, and release its reservation."""
        self._abandoned.set()
        self.ticket.release()
