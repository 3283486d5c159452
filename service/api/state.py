"""Everything one app owns: settings, store, engine, model status, counters and background tasks.

``create_app`` makes one :class:`ServiceContext`; its lifespan opens and closes it; routes reach it through the
dependencies of ``service.api.deps``.

Lifecycle (driven by the app's lifespan)::

    open()    store opened in a thread; the model starts loading in a background task, so /livez answers at once
              and /health, /readyz answer 503 {"status": "loading"} until the engine has warmed up
    ...       status "ready" (engine serving) or "error" with a one-line reason (e.g. missing weights: which file
              and how to provide it); the process keeps running either way so the reason can be read
    close()   retention and loading tasks cancelled, the engine drained (every accepted image finishes), the
              heartbeat stopped (this process's ``instances`` row deleted), store closed

While the store is open, a heartbeat thread (``service.storage.heartbeat``) tells the replicas sharing the database
that this process is alive, every ``DHR_HEARTBEAT_S``; the Idempotency-Keys it holds are claimed in its name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

from service.engine import DHRCLIP, ModelInfo
from service.engine.runner import Engine, EngineConfig
from service.errors import UserError
from service.inspection import VERDICTS
from service.runtime import apply_thread_policy
from service.storage import InspectionStore, StorageUnavailableError, open_artefact_store, open_store
from service.storage.artefacts import ArtefactStoreError
from service.storage.heartbeat import Heartbeat

from .metrics import Metrics
from .problems import service_unavailable
from .settings import Settings
from .weights import WeightsChoice, load_weights

logger = logging.getLogger("dhrclip.api")

LOADING, READY, ERROR = "loading", "ready", "error"
LOADING_RETRY_AFTER_S = 5


@dataclass
class Counts:
    """Inspections answered since start, in total and by verdict."""

    total: int = 0
    by_verdict: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))

    def add(self, verdict: str) -> None:
        self.total += 1
        self.by_verdict[verdict] += 1

    def to_dict(self) -> dict[str, int]:
        """``{"total": n, <verdict>: n, ...}``."""
        return {"total": self.total, **self.by_verdict}


Loader = Callable[[Settings], tuple[DHRCLIP, ModelInfo, WeightsChoice]]


@dataclass(frozen=True)
class NotReady:
    """Why /segment cannot be served now: ``status`` "loading" (with ``retry_after_s``) or "error"."""

    status: str
    reason: str
    retry_after_s: int | None


@dataclass
class ServiceContext:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    load: Loader = load_weights  # blocking; runs in a thread at start-up (tests inject their own)
    store: InspectionStore | None = None
    heartbeat: Heartbeat | None = None  # this process's liveness in the database while the store is open
    engine: Engine | None = None
    choice: WeightsChoice | None = None
    status: str = LOADING
    reason: str = "the model is loading"
    started_at: float = field(default_factory=time.time)
    counts: Counts = field(default_factory=Counts)
    product_locks: dict[str, asyncio.Lock] = field(default_factory=dict)  # reference / calibration changes
    _load_task: asyncio.Task | None = None
    _retention_task: asyncio.Task | None = None

    # ------------------------------------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        s = self.settings
        self.status, self.reason, self.started_at, self.counts = LOADING, "the model is loading", time.time(), Counts()
        self.metrics.bind_engine(lambda: self.engine)
        self.metrics.set_model(None)
        try:
            await self._open_store()
        except (StorageUnavailableError, ArtefactStoreError, OSError, ValueError) as exc:
            self.status, self.reason = ERROR, f"storage unavailable: {exc}"
            logger.error("%s", self.reason)  # one line; the service stays up to say why, never falls back
            return
        self._load_task = asyncio.create_task(self._load(), name="dhr-model-load")
        if s.retention_enabled:
            self._retention_task = asyncio.create_task(self._retention_loop(), name="dhr-retention")

    async def _open_store(self) -> None:
        """The store, and this process's heartbeat in its database (the store is closed again if that fails)."""
        s = self.settings
        artefacts = open_artefact_store(s.artefact_url, s.data_dir)
        store = await asyncio.to_thread(open_store, s.resolved_database_url(), artefacts, s.state_refresh_s, s.data_dir)
        try:
            heartbeat = Heartbeat(store, s.resolved_replica_name(), s.heartbeat_s)
            self.heartbeat = await asyncio.to_thread(heartbeat.start)
        except BaseException:
            await asyncio.to_thread(store.close)
            raise
        self.store = store

    async def close(self) -> None:
        for task in (self._retention_task, self._load_task):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.engine is not None:
            self.status, self.reason = LOADING, "the service is shutting down"
            await self.engine.stop()  # drains: every accepted image is processed
            self.engine = None
        self.metrics.set_model(None)
        if self.heartbeat is not None:  # after the drain: the keys of requests still running stay held until here
            await asyncio.to_thread(self.heartbeat.stop)
            self.heartbeat = None
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    async def _load(self) -> None:
        """Load weights (thread), build and warm up the engine; on failure record the reason, keep running."""
        s = self.settings
        t0 = time.perf_counter()
        engine = None
        try:
            model, info, self.choice = await asyncio.to_thread(self.load, s)
            cfg = EngineConfig(**{f.name: getattr(s, f.name) for f in fields(EngineConfig)})  # same names
            engine = Engine(model, info, cfg, on_batch=self.metrics.observe_batch)
            await engine.start()
        except asyncio.CancelledError:
            if engine is not None:
                engine.pool.shutdown(wait=False, cancel_futures=True)
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure is reported by /health, /readyz and /segment
            self.status, self.reason = ERROR, f"model not loaded: {exc}"
            logger.error(
                "model load failed after %.1f s: %s",
                time.perf_counter() - t0,
                exc,
                exc_info=not isinstance(exc, UserError),  # a traceback only for bugs
            )
            return
        self.engine = engine
        self.status, self.reason = READY, ""
        self.metrics.set_model(engine.info.to_dict())
        warmup = "no warm-up" if engine.warmup_s is None else f"warm-up {engine.warmup_s:.2f} s"
        logger.info(
            "model ready in %.1f s (%s): %s; %s",
            time.perf_counter() - t0,
            warmup,
            self.choice.describe(),
            apply_thread_policy().describe(),
        )

    async def _retention_loop(self) -> None:
        """Apply DHR_RETENTION_DAYS / DHR_RETENTION_MAX_COUNT now and every DHR_RETENTION_INTERVAL_S."""
        s = self.settings
        while True:
            try:
                deleted = await asyncio.to_thread(self.store.enforce_retention, s.retention_days, s.retention_max_count)
                if deleted:
                    logger.info("retention: deleted %d inspections", deleted)
            except Exception:  # noqa: BLE001 - logged with traceback; the next pass tries again
                logger.exception("retention pass failed; retrying in %.0f s", s.retention_interval_s)
            await asyncio.sleep(s.retention_interval_s)

    # ------------------------------------------------------------------------------------------------- queries
    def not_ready(self) -> NotReady | None:
        """The one readiness rule: None when the engine serves, else why not (used by /segment, /readyz, /health)."""
        if self.status == READY and self.engine is not None and self.engine.ready:
            return None
        if self.status == ERROR:
            return NotReady(ERROR, self.reason, None)
        return NotReady(LOADING, self.reason or "the model is loading", LOADING_RETRY_AFTER_S)

    @property
    def ready(self) -> bool:
        return self.not_ready() is None

    def require_engine(self) -> Engine:
        """The serving engine, or a 503 problem (Retry-After while loading; none after a load error)."""
        why = self.not_ready()
        if why is None:
            return self.engine
        if why.status == ERROR:
            raise service_unavailable(why.reason, None, "model-unavailable", "Model unavailable")
        raise service_unavailable(why.reason, why.retry_after_s)

    def require_store(self) -> InspectionStore:
        """The open store, or a 503 problem: storage unavailable (the reason), or the lifespan never ran."""
        if self.store is None and self.status == ERROR:
            raise service_unavailable(self.reason, None, "storage-unavailable", "Storage unavailable")
        if self.store is None:
            raise service_unavailable(
                "the service has not started: run the app with its lifespan", None, "not-started", "Service not started"
            )
        return self.store

    @property
    def instance_id(self) -> str | None:
        """The id this process's Idempotency-Key claims carry (None before the heartbeat runs)."""
        return None if self.heartbeat is None else self.heartbeat.instance.id

    def last_inference_iso(self) -> str | None:
        at = self.engine.last_inference_at if self.engine is not None else None
        return None if at is None else datetime.fromtimestamp(at, UTC).isoformat()
