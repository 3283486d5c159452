"""The work of /segment for a list of uploads: decode -> batched inference -> analyse -> decide -> store.

Admission comes first: a request takes a place for one image when it arrives, before its body is read
(``admit(engine, 1)``), and resizes it to its image count once the body is parsed (``resize(job, n)``); either step
refuses the whole request (503 + Retry-After when busy, 413 when it holds more images than the deadline allows)
before a single byte is decoded. All images of a request then run
concurrently, so they (and those of concurrent requests) share model batches. The
request is all-or-nothing up to storage: if any image fails (bad data, full queue, timeout, model error), the
others are cancelled (an image not yet in a running batch leaves the queue), the failure of the first failing
image in upload order is answered, and nothing is stored. Only when every image is analysed are the records
written as one unit (every artefact, then every row with the request's idempotency key in one transaction; one thread
call) and only then is the answer sent.

What is stored per image (:func:`artefacts_of`): the uploaded bytes as they came (``original``) and the float16
map in its coded form (``map``, ``service.engine.map_codec``); no PNG. The request renders only the PNG kinds it asks
for inline; the others are rendered from the stored pair on first request (``service.api.rendering``). With
``DHR_STORE_ORIGINALS=false`` the upload is not kept: the overlay (the one kind that needs the image) is then
rendered while answering and stored as a PNG, heatmap and mask stay renderable from the map.

Decision rule for one image: ``score = getattr(result.scores, image_score)``, ``verdict(score, thresholds)``
(``service.inspection``). ``thresholds`` and ``image_score`` come from the product profile when the request names a
product that has one, else from the settings; a request's ``image_score`` overrides the variant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from service.engine.admission import OverloadedError, TooManyImagesError
from service.engine.batcher import BatcherClosedError, QueueFullError
from service.engine.decode import DecodedImage, ImageError
from service.engine.knowledge import DEFAULT_FUSION_WEIGHT, NormalMemory
from service.engine.postprocess import MapAnalysis
from service.engine.runner import AbandonedError, Engine, ImageResult, InferItem, Job
from service.inspection import Thresholds, verdict
from service.storage import InspectionRecord, InspectionStore
from service.storage.artefacts import ArtefactStoreError
from service.storage.idempotency import IdempotencyEntry

from .problems import ClientDisconnected, Problem, image_problem, service_unavailable

logger = logging.getLogger("dhrclip.api")
STORAGE_RETRY_S = 5  # Retry-After of a storage failure: long enough for an operator's fix to be worth a retry

QUEUE_FULL_RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Upload:
    index: int
    filename: str
    data: bytes


@dataclass(frozen=True)
class Decision:
    """How the images of one request are judged."""

    product: str | None
    line: str | None
    part_id: str | None
    image_score: str  # a variant of IMAGE_SCORES
    thresholds: Thresholds
    memory: NormalMemory | None = None  # the product's normal memory on the model's device (None: zero-shot)
    fusion_weight: float = DEFAULT_FUSION_WEIGHT
    memory_version: str | None = None
    calibration_version: str | None = None
    colour_anchor: tuple[float, float] | None = None  # (good pixel level, pixel threshold) of a calibration


@dataclass
class Analysed:
    upload: Upload
    decoded: DecodedImage
    result: ImageResult
    post: MapAnalysis
    map_png: bytes  # the stored form of the float16 map
    png: dict[str, bytes]  # the PNG kinds rendered while answering
    timing_ms: dict  # decode, queue, inference, batch_size, postprocess


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


async def analyse(
    job: Job,
    upload: Upload,
    pixel_threshold: float,
    anchor: tuple[float, float] | None = None,
    kinds: tuple[str, ...] = (),
    **item,
) -> Analysed:
    """One image through decode, the batcher, map analysis and the PNGs of ``kinds`` (those rendered now).

    ``anchor``: the heatmap colour scale of a calibrated product; ``item``: the
    :class:`~service.engine.runner.InferItem` options (``memory``, ``fusion_weight``, ``keep_features``).
    """
    t0 = time.perf_counter()
    decoded, views = await job.decode(upload.data, upload.filename)
    t1 = time.perf_counter()
    batch: dict = {}
    result = await job.infer(InferItem(views, **item), batch)
    t2 = time.perf_counter()
    post, map_png = await job.analyse(result, decoded, pixel_threshold)
    png = await job.render(post, decoded, kinds, anchor)
    t3 = time.perf_counter()
    timing = {
        "decode": _ms(t1 - t0),
        "queue": _ms(batch.get("queue_s", 0.0)),
        "inference": _ms(batch.get("run_s", t2 - t1)),
        "batch_size": int(batch.get("batch_size", 1)),
        "postprocess": _ms(t3 - t2),
    }
    return Analysed(upload, decoded, result, post, map_png, png, timing)


def failure_problem(exc: BaseException, upload: Upload, timeout_s: float) -> Problem:
    """The answer for the first failing image of a request."""
    if isinstance(exc, ImageError):
        return image_problem(exc)
    if isinstance(exc, TooManyImagesError):
        return Problem(413, "Too many images", str(exc), "too-many-images", extra={"max_images": exc.allowed})
    if isinstance(exc, QueueFullError):
        retry = exc.retry_after_s if isinstance(exc, OverloadedError) else QUEUE_FULL_RETRY_AFTER_S
        return service_unavailable(f"{exc}; retry later", retry, "queue-full", "Inference queue full")
    if isinstance(exc, BatcherClosedError):
        return service_unavailable(
            f"{upload.filename}: the service is shutting down",
            QUEUE_FULL_RETRY_AFTER_S,
            "shutting-down",
            "Service shutting down",
        )
    if isinstance(exc, TimeoutError | AbandonedError):
        return Problem(
            504,
            "Inference timed out",
            f"{upload.filename}: not analysed within {timeout_s:g} s (DHR_REQUEST_TIMEOUT_S)",
            "timeout",
        )
    logger.error("analysis of %s failed", upload.filename, exc_info=(type(exc), exc, exc.__traceback__))
    return Problem(500, "Inference failed", f"{upload.filename}: {type(exc).__name__}: {exc}", "inference-failed")


@contextlib.contextmanager
def _refusals(engine: Engine):
    """Admission refusals become the 503 / 413 problem."""
    try:
        yield
    except (OverloadedError, TooManyImagesError) as exc:
        raise failure_problem(exc, Upload(0, "request", b""), engine.cfg.request_timeout_s) from None


def admit(engine: Engine, n: int) -> Job:
    """Reserve ``n`` images in the engine or raise the 503 / 413 problem (nothing is decoded yet)."""
    with _refusals(engine):
        return engine.admit(n)


def resize(job: Job, n: int) -> None:
    """Make the job's reservation ``n`` images (the request's count, once its body is read) or raise 503 / 413."""
    with _refusals(job.engine):
        job.resize(n)


async def analyse_all(
    job: Job,
    uploads: list[Upload],
    pixel_threshold: float,
    timeout_s: float,
    client_gone: Callable[[], Awaitable[None]] | None = None,
    **options,
) -> list[Analysed]:
    """Every upload concurrently, each bounded by ``timeout_s``; raises the Problem of the first failure.

    ``client_gone`` (optional) returns when the client has disconnected: the work is then cancelled (threads stop
    at their next checkpoint) and :class:`ClientDisconnected` is raised. The job is closed in every case.
    """
    tasks = [
        asyncio.create_task(asyncio.wait_for(analyse(job, u, pixel_threshold, **options), timeout_s)) for u in uploads
    ]
    first_failure = asyncio.create_task(asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION))
    watcher = asyncio.create_task(client_gone()) if client_gone is not None else None
    try:
        await asyncio.wait([t for t in (first_failure, watcher) if t], return_when=asyncio.FIRST_COMPLETED)
        if watcher is not None and watcher.done() and not first_failure.done():
            raise ClientDisconnected("the client disconnected before the answer was ready")
    finally:
        job.close()
        pending = [t for t in (*tasks, first_failure, watcher) if t is not None and not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    failures = [(u, t.exception()) for u, t in zip(uploads, tasks, strict=True) if not t.cancelled()]  # all read
    for upload, exc in failures:
        if exc is not None:
            raise failure_problem(exc, upload, timeout_s) from exc
    return [task.result() for task in tasks]


def build_record(item: Analysed, decision: Decision, model: dict) -> InspectionRecord:
    """The inspection record of one analysed image (not yet stored)."""
    score = float(getattr(item.result.scores, decision.image_score))
    return InspectionRecord(
        product=decision.product,
        line=decision.line,
        part_id=decision.part_id,
        filename=item.upload.filename,
        width=item.decoded.width,
        height=item.decoded.height,
        score=score,
        threshold=decision.thresholds.image,
        verdict=verdict(score, decision.thresholds),
        image_score=decision.image_score,
        pixel_threshold=decision.thresholds.pixel,
        defect_area_ratio=float(item.post.defect_area_ratio),
        regions=[r.to_dict() for r in item.post.regions],
        model=dict(model),
        timing_ms=dict(item.timing_ms),
        memory_version=decision.memory_version,
        calibration_version=decision.calibration_version,
    )


def artefacts_of(item: Analysed, keep_original: bool = True) -> dict[str, bytes]:
    """What is stored of one image: the upload as it came and the coded map; without the original, the overlay
    PNG instead (rendered while answering, see :func:`rendered_kinds`)."""
    if keep_original:
        return {"original": item.upload.data, "map": item.map_png}
    return {"map": item.map_png, "overlay": item.png["overlay"]}


def rendered_kinds(asked: tuple[str, ...], keep_original: bool) -> tuple[str, ...]:
    """The PNG kinds to render while answering: those asked for inline, and the overlay when no original is kept
    (it could not be rendered later)."""
    return asked if keep_original or "overlay" in asked else (*asked, "overlay")


STORAGE_ERRORS = (OSError, ArtefactStoreError, SQLAlchemyError)  # a full disk, a lost database or bucket


def storage_problem(exc: BaseException, what: str = "the inspection") -> Problem:
    """503 for a storage failure (nothing of the request was kept: ``add_many`` is all or nothing); the cause is
    logged, not sent (it may name server paths)."""
    logger.error("%s not stored, the request is refused: %s: %s", what, type(exc).__name__, exc)
    detail = f"{what} could not be stored ({type(exc).__name__}); nothing was kept: retry later"
    return service_unavailable(detail, STORAGE_RETRY_S, slug="storage-unavailable", title="Storage unavailable")


def store_all(
    store: InspectionStore,
    records: list[InspectionRecord],
    analysed: list[Analysed],
    idempotency: IdempotencyEntry | None = None,
    keep_original: bool = True,
) -> list[tuple[InspectionRecord, float, float]]:
    """Blocking: write every record with its artefacts and ``idempotency`` as one unit (``InspectionStore.add_many``,
    whose transaction is shared with the other requests finishing at the same time: group commit).

    Returns ``(stored record, store ms, perf_counter() when committed)`` per record (the whole write's ms: the
    records are committed together).
    """
    t0 = time.perf_counter()
    try:
        stored = store.add_many(
            [(r, artefacts_of(a, keep_original)) for r, a in zip(records, analysed, strict=True)], idempotency
        )
    except STORAGE_ERRORS as exc:
        raise storage_problem(exc) from exc
    t1 = time.perf_counter()
    return [(record, _ms(t1 - t0), t1) for record in stored]
