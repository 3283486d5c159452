"""Deadline-driven dynamic batcher: many concurrent ``submit`` calls -> few ``process_batch`` calls.

The batcher knows nothing of HTTP or of the model. It owns one queue, one collector task on the event loop and
one worker thread per ``process_batch`` function it is given (one per model replica, each the only code that
touches its device). A batch goes to the first free worker; each worker runs one batch at a time.

Collection rule, for a batch whose first item was enqueued at ``t0``::

    dispatch when  len(batch) == max_batch_size  or  now >= t0 + max_wait_ms / 1000

While batch ``k`` runs the collector already gathers batch ``k + 1``. If batch ``k + 1`` is ready before a worker
is free, it is re-filled (without further waiting) round-robin from everything waiting, including the items that
arrived meanwhile, so a steady stream forms full batches and no item ever waits longer than it would have without
the top-up.

Fairness: ``submit(item, key=...)`` tags an item with its owner (one request, one client). Waiting items are kept
in one FIFO per key and batches are filled round-robin over the keys, oldest key first, so a request of 60 images
cannot make the single images of other requests wait behind all of it: each batch takes at most one item of each
key before taking a second of any.

Back-pressure: ``queue_depth`` counts the items waiting (queued or gathered for the next batch, not the batch
being processed). When ``queue_depth >= queue_size`` a new ``submit`` raises :class:`QueueFullError` at once.

Errors: if ``process_batch`` raises, every live future of that batch receives the *same* exception object (so the
caller can map e.g. a ``ValueError`` to a 4xx); if it returns a sequence of the wrong length, every future receives a
``RuntimeError`` naming both lengths. The batcher keeps serving later batches either way.

Per-item timings: ``submit(item, timings={})`` fills the given dict before returning (or raising) with
``queue_s`` (enqueue -> batch start, seconds), ``run_s`` (wall time of the ``process_batch`` call),
``batch_size`` (live items in that batch) and ``worker`` (the index of the function that ran it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .fair_queue import FairQueue, Pending

__all__ = ["BatchStats", "BatcherClosedError", "DynamicBatcher", "QueueFullError"]

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
OutT = TypeVar("OutT")


class QueueFullError(RuntimeError):
    """``queue_size`` items are already waiting; the caller should retry later (HTTP 503 + Retry-After)."""


class BatcherClosedError(RuntimeError):
    """The batcher is not running (never started, stopping or stopped); the item was not or will not be processed."""


@dataclass(frozen=True)
class BatchStats:
    """What one ``process_batch`` call did, given to ``on_batch``.

    size:   number of items in the batch (cancelled items excluded).
    wait_s: queue wait of the oldest item, ``t_start - min(t_enqueue)`` in seconds.
    run_s:  wall time of the ``process_batch`` call in the worker thread, in seconds.
    worker: index of the ``process_batch`` function (model replica) that ran it.
    """

    size: int
    wait_s: float
    run_s: float
    worker: int = 0


def _call_timed(fn: Callable[[list], Any], items: list) -> tuple[Any, Exception | None, float, float]:
    """Run ``fn(items)`` in the worker thread; return ``(outputs, error, t_start, t_end)`` instead of raising."""
    start = time.perf_counter()
    try:
        outputs, error = fn(items), None
    except Exception as exc:  # noqa: BLE001 - handed to every future of the batch, never swallowed
        outputs, error = None, exc
    return outputs, error, start, time.perf_counter()


class DynamicBatcher(Generic[ItemT, OutT]):
    """Group concurrent ``submit(item)`` calls into ``process_batch(items) -> outputs`` calls, one at a time.

    Args:
        process_batch: synchronous ``list[I] -> list[O]`` with ``len(out) == len(in)``; output ``j`` belongs to
            input ``j``. Runs in a worker thread, never on the event loop. A list of such functions (one per model
            replica): each gets its own worker, and batches run on as many at once.
        max_batch_size: most items per call (>= 1).
        max_wait_ms: longest time the first item of a batch waits for companions (>= 0).
        queue_size: most items waiting at once (>= 1); beyond it ``submit`` raises :class:`QueueFullError`.
        executor: where ``process_batch`` runs (a list: one per function). Default: a single-thread executor per
            function, owned (and shut down) by the batcher. A caller-supplied executor is not shut down; each
            function still runs one batch at a time.
        on_batch: called on the event loop with :class:`BatchStats` after every batch; its exceptions are logged.
    """

    def __init__(
        self,
        process_batch: Callable[[list[ItemT]], list[OutT]] | Sequence[Callable[[list[ItemT]], list[OutT]]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        executor: concurrent.futures.Executor | Sequence[concurrent.futures.Executor] | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        functions = list(process_batch) if isinstance(process_batch, (list, tuple)) else [process_batch]
        for fn in functions:
            if not callable(fn):
                raise TypeError(f"process_batch must be callable, got {type(fn).__name__}")
        if not functions:
            raise ValueError("process_batch: give at least one function")
        executors = list(executor) if isinstance(executor, (list, tuple)) else [executor] * len(functions)
        if len(executors) != len(functions) or (executor is not None and None in executors):
            raise ValueError(f"executor: give one per process_batch function ({len(functions)})")
        if int(max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if int(queue_size) < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self._functions = functions
        self._max_batch_size = int(max_batch_size)
        self._max_wait_s = float(max_wait_ms) / 1000.0
        self._queue_size = int(queue_size)
        self._executors = executors
        self._owns_executor = executor is None
        self._on_batch = on_batch

        self._queue = FairQueue()
        self._staged: list[Pending] = []  # gathered for the next batch, not yet running
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._accepting = False
        self._closing = False
        self._in_flight: dict[int, tuple[int, float]] = {}  # worker -> (items, perf_counter at start) of its batch
        self.batches_total = 0
        self.items_total = 0
        self.failed_batches_total = 0
        self.rejected_total = 0

    # ------------------------------------------------------------------ public API
    @property
    def queue_depth(self) -> int:
        """Items waiting (queued + gathered for the next batch); excludes the batch being processed."""
        return len(self._queue) + len(self._staged)

    @property
    def in_flight(self) -> int:
        """Items in the batches currently inside ``process_batch`` (0 when idle)."""
        return sum(size for size, _ in self._in_flight.values())

    def running_batches(self) -> list[tuple[int, float]]:
        """``(items, seconds since it started)`` of each batch inside ``process_batch`` now."""
        now = time.perf_counter()
        return [(size, now - started) for size, started in self._in_flight.values()]

    @property
    def workers(self) -> int:
        """How many batches can run at once (one per ``process_batch`` function)."""
        return len(self._functions)

    @property
    def running(self) -> bool:
        """True between ``start()`` and the beginning of ``stop()``."""
        return self._accepting

    async def start(self) -> None:
        """Create the worker threads (if not supplied) and the collector task on the running loop."""
        if self._task is not None:
            raise RuntimeError("DynamicBatcher.start() called twice; a stopped batcher cannot be restarted")
        if self._owns_executor:
            self._executors = [
                concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dhr-batcher-{i}")
                for i in range(len(self._functions))
            ]
        self._wakeup = asyncio.Event()
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._collect_loop(), name="dhr-batcher-collector")
        self._task.add_done_callback(self._on_collector_done)

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting work and wait for the collector to finish.

        drain=True: every queued item is still processed. drain=False: queued items fail with
        :class:`BatcherClosedError`. In both cases the batch already inside ``process_batch`` completes normally
        (a running device call cannot be interrupted), so after ``stop`` returns the worker threads are idle.
        """
        self._accepting = False
        self._closing = True
        if not drain:
            self._fail_waiting(BatcherClosedError("batcher stopped before this item was processed"))
        try:
            if self._task is not None:
                self._wakeup.set()
                await asyncio.shield(self._task)  # re-raises if the collector crashed (already logged)
        finally:
            if self._owns_executor:
                for ex in self._executors:
                    if ex is not None:
                        ex.shutdown(wait=False)  # idle after a normal stop; never block the loop

    async def submit(self, item: ItemT, timings: dict | None = None, key: object = None) -> OutT:
        """Queue ``item`` and return its own output once its batch has run.

        Raises :class:`QueueFullError` immediately when ``queue_size`` items are waiting,
        :class:`BatcherClosedError` when the batcher is not running, and whatever ``process_batch`` raised for
        the batch. ``timings`` (optional dict) receives ``queue_s``, ``run_s`` and ``batch_size``; ``key`` names
        the owner for round-robin fairness (items of one key keep their order).
        Cancelling the caller removes the item if its batch has not started yet.
        """
        if not self._accepting:
            raise BatcherClosedError("batcher is not running (start() not called, or stop() has begun)")
        if self.queue_depth >= self._queue_size:
            self.rejected_total += 1
            raise QueueFullError(f"inference queue is full ({self._queue_size} items waiting)")
        pending = Pending(item, asyncio.get_running_loop().create_future(), time.perf_counter(), timings, key)
        self._queue.append(pending)
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            pending.future.cancel()
            self._discard(pending)
            raise

    # ------------------------------------------------------------------ collector
    async def _collect_loop(self) -> None:
        running: dict[int, asyncio.Task] = {}  # worker -> its batch
        while await self._fill_staged():
            running = {w: t for w, t in running.items() if not t.done()}
            if len(running) == len(self._functions):
                await asyncio.wait(running.values(), return_when=asyncio.FIRST_COMPLETED)  # one batch per worker
                running = {w: t for w, t in running.items() if not t.done()}
                self._queue.push_front(self._staged)  # re-fill round-robin with the items that arrived meanwhile
                self._staged = []
                self._take_from_queue()
            batch, self._staged = self._staged, []
            if batch:
                worker = min(set(range(len(self._functions))) - set(running))
                running[worker] = asyncio.get_running_loop().create_task(self._run(batch, worker))
        if running:
            await asyncio.gather(*running.values())

    async def _fill_staged(self) -> bool:
        """Gather the next batch into ``self._staged``; return False once closing with nothing left."""
        while True:
            self._take_from_queue()
            if self._staged:
                break
            if self._closing:
                return False
            await self._wait_for_wakeup(None)
        deadline = self._staged[0].enqueued + self._max_wait_s
        while self._staged and len(self._staged) < self._max_batch_size and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            await self._wait_for_wakeup(remaining)
            self._take_from_queue()
        return True

    async def _wait_for_wakeup(self, timeout: float | None) -> None:
        self._wakeup.clear()
        if timeout is None:
            await self._wakeup.wait()
            return
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            pass

    def _take_from_queue(self) -> None:
        while self._queue and len(self._staged) < self._max_batch_size:
            pending = self._queue.popleft()
            if not pending.future.done():  # cancelled callers are dropped
                self._staged.append(pending)

    # ------------------------------------------------------------------ running one batch
    async def _run(self, batch: list[Pending], worker: int = 0) -> None:
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        loop = asyncio.get_running_loop()
        self._in_flight[worker] = (len(live), time.perf_counter())
        try:
            outputs, error, t_start, t_end = await loop.run_in_executor(
                self._executors[worker], _call_timed, self._functions[worker], [p.item for p in live]
            )
        except asyncio.CancelledError:  # the loop is shutting down under us
            self._fail(live, BatcherClosedError("batcher was cancelled while this item was being processed"))
            raise
        finally:
            self._in_flight.pop(worker, None)
        if error is None:
            error = self._check_outputs(outputs, len(live))
        self.batches_total += 1
        self.items_total += len(live)
        self.failed_batches_total += error is not None
        for j, p in enumerate(live):
            if p.timings is not None:
                p.timings.update(
                    queue_s=t_start - p.enqueued, run_s=t_end - t_start, batch_size=len(live), worker=worker
                )
            if p.future.done():  # caller cancelled while its batch ran
                continue
            if error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_result(outputs[j])
        self._report(BatchStats(len(live), t_start - min(p.enqueued for p in live), t_end - t_start, worker))

    @staticmethod
    def _check_outputs(outputs: Any, expected: int) -> RuntimeError | None:
        if not isinstance(outputs, (list, tuple)):
            return RuntimeError(f"process_batch must return a list, got {type(outputs).__name__}")
        if len(outputs) != expected:
            return RuntimeError(f"process_batch returned {len(outputs)} outputs for a batch of {expected} items")
        return None

    def _report(self, stats: BatchStats) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(stats)
        except Exception:
            logger.exception("on_batch callback failed for %s", stats)

    # ------------------------------------------------------------------ failure paths
    def _discard(self, pending: Pending) -> None:
        for container in (self._queue, self._staged):
            try:
                container.remove(pending)
            except ValueError:
                pass

    def _fail(self, pendings: list[Pending], error: BaseException) -> None:
        for p in pendings:
            if not p.future.done():
                p.future.set_exception(error)

    def _fail_waiting(self, error: BaseException) -> None:
        waiting = [*self._staged, *self._queue.drain()]
        self._staged = []
        self._fail(waiting, error)

    def _on_collector_done(self, task: asyncio.Task) -> None:
        """The collector ends normally only after ``stop``; any other end must fail the waiting callers loudly."""
        self._accepting = False
        if task.cancelled():
            self._fail_waiting(BatcherClosedError("batcher collector was cancelled"))
        elif task.exception() is not None:
            logger.error("batcher collector crashed", exc_info=task.exception())
            self._fail_waiting(RuntimeError(f"batcher collector crashed: {task.exception()!r}"))
