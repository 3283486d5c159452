"""The runner owns the model, its device and precision; the engine wires decode -> batcher -> runner -> postprocess.

Nothing here knows HTTP. Blocking work (decode, preprocess, postprocess) runs in a thread pool; each model replica
(one per device of ``DHR_DEVICE``) runs in its runner's own worker thread, fed batches by the batcher, so the event
loop only awaits.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from service.model import DHRCLIP, ImageScores, ModelInfo, Views, stack_views
from service.model.memory import DEFAULT_FUSION_WEIGHT, DEFAULT_MAX_TOKENS, NormalMemory
from service.model.vision import VisionFeatures

from .admission import Admission, PoolLoad, Ticket
from .batcher import BatchStats, DynamicBatcher
from .buckets import batch_buckets, bucket_for, compile_tower
from .decode import DecodedImage, DecodeLimits, decode_image, views_for
from .device_views import DeviceViews, resolve_preprocess
from .knowledge import MemoryCache
from .map_codec import MAP_DTYPE, encode_map
from .postprocess import MapAnalysis, analyse_map, render_artefacts


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
    max_queue_wait_s: float | None = None  # expected model / CPU wait beyond which work is refused (None: derived)
    memory_cache_size: int = 8  # products whose normal memory stays on the device (least recently used evicted)
    memory_max_tokens: int = DEFAULT_MAX_TOKENS  # coreset cap per layer and view kind
    preprocess: str = "auto"  # where views are made (service.engine.options.PREPROCESS)
    compile: str = "off"  # torch.compile of the vision tower (service.engine.options.COMPILE)
    devices: tuple[str, ...] = ()  # one model replica per device; the first is the given model's (empty: just it)

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
    features: tuple[VisionFeatures, VisionFeatures] | None = None  # whole / crops of this image (batch of 1), CPU


@dataclass(frozen=True, eq=False)
class InferItem:
    """One image for the batcher: its views, the normal memory to judge it with (on the model's device; None:
    zero-shot) and whether to return its features (reference images)."""

    views: Views
    memory: NormalMemory | None = None
    fusion_weight: float = DEFAULT_FUSION_WEIGHT
    keep_features: bool = False


def _take(feats: VisionFeatures, index: list[int], n: int) -> VisionFeatures:
    """Rows ``index`` of batched features (the tensors themselves when ``index`` is the whole batch)."""
    if index == list(range(n)):
        return feats
    i = torch.tensor(index, device=feats.tokens.device)
    return VisionFeatures(feats.tokens.index_select(0, i), feats.cls.index_select(0, i))


class ModelRunner:
    """Runs batches of views through one model replica; the only code that touches its device.

    ``compile`` (:data:`~.options.COMPILE`) other than "off" compiles the vision tower and pads every batch to its
    bucket (``service.engine.buckets``); padding rows are dropped before scoring. ``executor`` is the runner's one
    worker thread: warm-up and batches run there, so compiled graphs (CUDA graphs are per thread) are made and
    replayed by one thread. Normal memories made on another device are copied here once (``memory_slots`` kept).
    """

    def __init__(
        self,
        model: DHRCLIP,
        compile: str = "off",
        max_batch_size: int = 8,
        memory_slots: int = 8,
        compile_backend: str = "inductor",
    ):
        self.model = model
        self.preset = model.cfg.preset
        self.device = torch.device(model.device)
        self.compile = compile
        self.buckets: tuple[int, ...] | None = None
        if compile != "off":
            compile_tower(model, compile, max_batch_size, compile_backend)
            self.buckets = batch_buckets(max_batch_size)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"dhr-runner-{self.device}")
        self._memories: OrderedDict[int, tuple[NormalMemory, NormalMemory]] = OrderedDict()
        self._memory_slots = memory_slots

    @torch.inference_mode()
    def run(self, batch: list[Views | InferItem], extra: tuple[str, ...] = ()) -> list[ImageResult]:
        """B images -> B results: scores, the clamped service map and the ``extra`` maps, on the CPU.

        The vision tower runs once for the whole batch; scoring runs once per (memory, fusion weight) group, so
        images of several products share a batch. Without memories or kept features this is one model call, the
        zero-shot path exactly.
        """
        jobs = [item if isinstance(item, InferItem) else InferItem(item) for item in batch]
        n = len(jobs)
        plain = all(j.memory is None and not j.keep_features for j in jobs)
        rows = n if self.buckets is None else bucket_for(n, self.buckets)
        views = stack_views([j.views for j in jobs], pin=self.device.type == "cuda", rows=rows)
        if self.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous batch's graph outputs are no longer read
        if plain and rows == n:
            return self._results(self.model(*views, extra), extra)
        whole, crops = (VisionFeatures(f.tokens[:n], f.cls[:n]) for f in self.model.encode_views(*views))
        if plain:
            return self._results(self.model.score(whole, crops, extra), extra)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((id(job.memory), job.fusion_weight), []).append(i)
        results: list[ImageResult | None] = [None] * n
        for index in groups.values():
            job = jobs[index[0]]
            w, c = _take(whole, index, n), _take(crops, index, n)
            out = self._results(self.model.score(w, c, extra, self._here(job.memory), job.fusion_weight), extra)
            for k, i in enumerate(index):
                feats = None
                if jobs[i].keep_features:
                    feats = tuple(VisionFeatures(f.tokens[k : k + 1].cpu(), f.cls[k : k + 1].cpu()) for f in (w, c))
                results[i] = replace(out[k], features=feats)
        return results

    def _here(self, memory: NormalMemory | None) -> NormalMemory | None:
        """``memory`` on this runner's device (a copy made once per memory when it lives on another replica's)."""
        if memory is None or memory.whole.device == self.device:
            return memory
        hit = self._memories.get(id(memory))
        if hit is None or hit[0] is not memory:
            hit = (memory, memory.to(self.device))
            self._memories[id(memory)] = hit
            while len(self._memories) > self._memory_slots:
                self._memories.popitem(last=False)
        self._memories.move_to_end(id(memory))
        return hit[1]

    @staticmethod
    def _results(out, extra: tuple[str, ...]) -> list[ImageResult]:
        """A batch's DHROutput -> one ImageResult per image, on the CPU."""
        maps = out.anomaly_map.clamp(0, 1).float().cpu().numpy()  # (b, T, T)
        scores = torch.stack(out.scores(), 1).float().cpu().tolist()  # (b, 3)
        more = {name: getattr(out, name).float().cpu().numpy() for name in extra}  # name -> (b, T, T)
        return [
            ImageResult(ImageScores(*s), m, {name: v[i] for name, v in more.items()})
            for i, (s, m) in enumerate(zip(scores, maps, strict=True))
        ]

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """Run dummy batches once (allocations, kernel selection; every bucket when compiled); returns seconds."""
        p = self.preset
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        for b in self.buckets or batch_sizes:
            views = [
                Views(
                    rng.integers(0, 256, (p.image_size, p.image_size, 3), dtype=np.uint8),
                    rng.integers(0, 256, (4, p.crop_size, p.crop_size, 3), dtype=np.uint8),
                )
                for _ in range(b)
            ]
            self.run(views)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def replicate(model: DHRCLIP, devices: tuple[str, ...], label: str = "DHR_DEVICE") -> list[DHRCLIP]:
    """``model`` and a copy of it on each device of ``devices`` after the first (the model's own)."""
    from service.model.devices import resolve_device

    return [model, *(copy.deepcopy(model).to(resolve_device(d, label)) for d in devices[1:])]


class Engine:
    """Async facade used by the API: ``job = engine.admit(n)``, then per image ``job.decode`` -> ``job.infer`` ->
    ``job.analyse`` (-> ``job.render`` of the PNGs asked for inline), and ``job.close()`` at the end of the request."""

    def __init__(self, model: DHRCLIP, info: ModelInfo, cfg: EngineConfig = EngineConfig(), on_batch=None):
        self.model, self.info, self.cfg = model, info, cfg
        self.runners = [
            ModelRunner(m, cfg.compile, cfg.max_batch_size, cfg.memory_cache_size)
            for m in replicate(model, cfg.devices)  # copies made before any compile
        ]
        self.runner = self.runners[0]
        if len(self.runners) > 1:  # /health and the records name every device
            self.info = replace(info, device=",".join(str(r.device) for r in self.runners))
        self.preprocess = resolve_preprocess(cfg.preprocess, model.device)
        self.device_views = (
            None
            if self.preprocess == "cpu"
            else DeviceViews(model.device, model.cfg.preset, decode_jpegs=self.preprocess == "device-decode")
        )
        self.memories = MemoryCache(model.device, cfg.memory_cache_size)
        self.pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="dhr-cpu")
        self.batcher: DynamicBatcher[Views | InferItem, ImageResult] = DynamicBatcher(
            [r.run for r in self.runners],
            executor=[r.executor for r in self.runners],
            max_batch_size=cfg.max_batch_size,
            max_wait_ms=cfg.max_wait_ms,
            queue_size=cfg.queue_size,
            on_batch=self._on_batch,
        )
        self.admission = Admission(
            cfg.queue_size,
            cfg.max_batch_size,
            cfg.max_queue_wait_s,
            cfg.request_timeout_s,
            self.batcher.running_batches,
            workers=len(self.runners),
            pool=PoolLoad(cfg.workers),
        )
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
        if self.cfg.warmup:  # each replica in its own worker thread, all at once
            loop = asyncio.get_running_loop()
            sizes = (1, self.cfg.max_batch_size) if self.runner.device.type == "cuda" else (1,)
            t0 = time.perf_counter()
            await asyncio.gather(*(loop.run_in_executor(r.executor, r.warm_up, sizes) for r in self.runners))
            self.warmup_s = time.perf_counter() - t0
        await self.batcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop(drain=True)
        self.pool.shutdown(wait=True)
        for runner in self.runners:
            runner.close()

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
      checks between steps (decode -> views; resize -> regions; each PNG), so abandoned work stops early and
      raises :class:`AbandonedError`;
    - admission: each image leaves the outstanding count once its model output is back; ``close()`` gives back the
      rest.
    """

    def __init__(self, engine: Engine, ticket: Ticket) -> None:
        self.engine, self.ticket = engine, ticket
        self.key = object()
        self._cpu = asyncio.Semaphore(engine.cfg.workers)
        self._abandoned = threading.Event()

    def resize(self, n: int) -> None:
        """Hold ``n`` images instead of the number admitted (raises like ``Engine.admit``, see admission)."""
        self.engine.admission.resize(self.ticket, n)

    def checkpoint(self) -> None:
        """Called by thread-pool work between steps; raises once the request is gone."""
        if self._abandoned.is_set():
            raise AbandonedError("the request was abandoned (timed out or the client left)")

    async def _on_pool(self, fn):
        async with self._cpu:
            self.checkpoint()
            self.ticket.submitted()  # an arriving image of this request becomes this job (admission)
            return await self.engine.admission.pool.run(self.engine.pool, fn)  # counted in the pool's backlog

    async def decode(self, data: bytes, name: str) -> tuple[DecodedImage, Views]:
        """Decode + DHR views in the thread pool (raises ImageError); views on the device unless DHR_PREPROCESS is
        cpu (every check of ``decode_image`` runs first, on the CPU, either way)."""
        device_views = self.engine.device_views

        def work():
            defer = device_views is not None and device_views.decode_jpegs
            decoded = decode_image(data, name, self.engine.cfg.limits, defer_jpeg=defer)
            self.checkpoint()
            if device_views is None:
                return decoded, views_for(decoded, self.engine.runner.preset)
            return decoded, device_views(decoded)

        return await self._on_pool(work)

    async def infer(self, views: Views | InferItem, timings: dict | None = None) -> ImageResult:
        """Queue one image (or an :class:`InferItem`) for the next batch (round-robin with other requests)."""
        try:
            return await self.engine.batcher.submit(views, timings, key=self.key)
        finally:
            self.ticket.done()

    async def analyse(
        self, result: ImageResult, decoded: DecodedImage, pixel_threshold: float
    ) -> tuple[MapAnalysis, bytes]:
        """Map resize, mask and regions at the original size, and the map's stored form, in the thread pool (no
        PNG is made).

        The map is analysed as it is stored (float16, :mod:`service.engine.map_codec`), so what is rendered later
        from the stored map is byte-identical to what is rendered now.
        """
        limits = self.engine.cfg.limits
        stored = result.anomaly_map.astype(MAP_DTYPE)

        def work():
            analysis = analyse_map(
                stored, decoded.width, decoded.height, pixel_threshold, 0, limits.max_pixels, self.checkpoint
            )
            return analysis, encode_map(stored)

        return await self._on_pool(work)

    async def render(
        self, analysis: MapAnalysis, decoded: DecodedImage, kinds, anchor: tuple[float, float] | None = None
    ) -> dict[str, bytes]:
        """PNGs of the asked-for kinds only (``{}`` for none), in the thread pool."""
        if not kinds:
            return {}

        def work():
            rgb = decoded.rgb() if "overlay" in kinds else None
            return render_artefacts(analysis, rgb, kinds, checkpoint=self.checkpoint, anchor=anchor)

        return await self._on_pool(work)

    def close(self) -> None:
        """Stop whatever work of this request is still running or queued, and release its reservation."""
        self._abandoned.set()
        self.ticket.release()
