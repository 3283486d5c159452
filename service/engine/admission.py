"""Admission control: refuse work before any of it is done, by count and by expected wait.

An image is *outstanding* from admission until its model output is back (its request's body still arriving,
decoding, waiting for a batch or inside a running batch); it is *waiting* unless it is inside a running batch. A
request of ``n`` images is admitted when both hold::

    waiting + n <= queue_size
    wait_s <= wait_bound_s        wait_s = left_s + drain_s(waiting)   (0 when idle)

``left_s`` is what remains of the running batch that ends first (``T(size) - elapsed``, at least 0; 0 while a
replica is free). ``drain_s(q)`` is the time the model needs for ``q`` images in batches of ``max_batch_size``, from
the measured wall time of recent batches: ``T(b)`` is the mean run time of the first batches of ``b`` images, then
an exponential moving average (weight ``EWMA_WEIGHT``); an unmeasured size is scaled linearly from the nearest
measured one, which over-estimates large batches (refusing early is the safe side)::

    drain_s(q) = floor(q' / B) * T(B) + T(q' mod B),   q' = ceil(q / W)

with ``W`` model replicas (``DHR_DEVICE=cuda:0,cuda:1``: one batch on each at once) sharing the images.

The wait bound is ``max_wait_s`` when it is set (``DHR_MAX_QUEUE_WAIT_S``), else derived from the measurements::

    wait_bound_s = min(deadline, max(MIN_WAIT_S, WAIT_FACTOR * T(1)))      (WAIT_FACTOR = 1/2)

so an accepted image's model output is due within about 1.5 single-image calls: on a CPU, where batching buys
little, a request is accepted while nothing waits and the running image is past half-way (the next one is decoded
by the time the model is free, so the model stays busy), and its latency stays within twice the unloaded one (the
target of ``bench/overload.py``). On an accelerator, where one call of ``B`` images costs little more than one
image, the floor ``MIN_WAIT_S`` (a tenth of a second) lets full batches queue, so a burst the device drains in a
tenth of a second is accepted rather than refused. Before anything is measured the wait is 0 (nothing is refused by
time).

The CPU thread pool (``DHR_WORKERS`` threads: decode, map analysis, PNGs) is bounded by the same wait. On an
accelerator the model drains fast and the pool becomes the slow stage; its backlog would otherwise grow until
requests time out. With ``J`` pool jobs queued or running (counted by the engine) and ``t`` the seconds one job
runs in its thread (the same mean-then-EWMA rule, all job kinds together), a request is also admitted only when::

    cpu_wait_s <= wait_bound_s      cpu_wait_s = max(0, J - K) * t / K     cpu_drain_s = J * t / K

with ``K = DHR_WORKERS``: the jobs beyond the busy threads, shared by them (0 before a job is measured). ``J`` also
counts one job for each admitted image whose request has not submitted a job for it yet, so a burst whose requests
all reach the door before any reaches the pool is seen there, as the model rule sees outstanding images.

Refusals raise :class:`OverloadedError` carrying ``retry_after_s = ceil(drain_s(outstanding))`` (at least 1):
when the backlog in front of a retry will have drained; a refusal by the CPU rule carries ``ceil(cpu_drain_s)``
(at least 1) instead. A request that could not finish within the deadline even
on an idle model (``drain_s(n) > deadline_fraction * deadline``) raises :class:`TooManyImagesError` instead, with
the number of images that would fit: it must be split, waiting does not help.

A ticket can be taken for one image when a request arrives (before its body is read) and resized to the request's
image count once it is known (:meth:`Admission.resize`): concurrent arrivals then see each other, so a burst is
refused at the door instead of after every body has been parsed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from .batcher import QueueFullError

EWMA_WEIGHT = 0.2
DEADLINE_FRACTION = 0.5  # share of the deadline one request's images may take on an idle model
WAIT_FACTOR = 0.5  # derived wait bound: this many single-image model calls (see the module docstring)
MIN_WAIT_S = 0.1  # ... but never below this
T = TypeVar("T")


def ewma(mean: float, sample: float, seen: int) -> float:
    """``mean`` updated with the ``seen``-th sample (counted from 1): the plain mean of the first
    ``1 / EWMA_WEIGHT`` samples, then an exponential moving average of weight ``EWMA_WEIGHT``."""
    weight = max(EWMA_WEIGHT, 1.0 / seen)
    return (1 - weight) * mean + weight * sample


class PoolLoad:
    """The CPU thread pool's backlog (``DHR_WORKERS`` threads: decode, map analysis, PNGs), see the module docstring.

    Jobs go through :meth:`run` (the engine's ``Job._on_pool``): ``jobs`` (queued or running) is counted there on
    the event loop, and the seconds a finished job ran in its worker thread are observed. ``arriving`` counts the
    admitted images whose request has not submitted a job for them yet (kept by their :class:`Ticket`).
    """

    def __init__(self, workers: int) -> None:
        self.workers = max(1, int(workers))
        self.jobs = 0
        self.arriving = 0
        self.job_s = 0.0  # EWMA of one job's seconds (0 before any is measured)
        self._seen = 0

    async def run(self, executor: Executor, fn: Callable[[], T]) -> T:
        """``fn()`` on ``executor``, counted in ``jobs`` while queued or running (on the event loop), its run time
        in the worker thread observed once it returns (a failed or abandoned job stopped early: not measured)."""
        spent: list[float] = []

        def timed() -> T:
            t0 = time.perf_counter()
            out = fn()
            spent.append(time.perf_counter() - t0)
            return out

        self.jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, timed)
        finally:
            self.jobs -= 1
            if spent:
                self.observe(spent[0])

    def observe(self, run_s: float) -> None:
        if not run_s >= 0:
            return
        self._seen += 1
        self.job_s = ewma(self.job_s, run_s, self._seen)

    @property
    def backlog(self) -> int:
        """Jobs queued or running, and one for each admitted image not yet in the pool."""
        return self.jobs + self.arriving

    def wait_s(self) -> float:
        """Expected seconds before a job submitted now starts: the backlog beyond the busy threads, shared by them."""
        return max(0, self.backlog - self.workers) * self.job_s / self.workers

    def drain_s(self) -> float:
        """Expected seconds until the whole backlog is done."""
        return self.backlog * self.job_s / self.workers


class OverloadedError(QueueFullError):
    """Too much work is waiting; ``retry_after_s``: seconds until the backlog has drained (>= 1)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = int(retry_after_s)


class TooManyImagesError(ValueError):
    """One request holds more images than the deadline allows; ``allowed``: how many would fit now."""

    def __init__(self, message: str, allowed: int):
        super().__init__(message)
        self.allowed = int(allowed)


class Admission:
    """Counts outstanding images and estimates drain time; all calls come from the event loop (no locks)."""

    def __init__(
        self,
        queue_size: int,
        max_batch_size: int,
        max_wait_s: float | None,
        deadline_s: float,
        running: Callable[[], list[tuple[int, float]]] = list,
        workers: int = 1,
        pool: PoolLoad | None = None,
    ) -> None:
        self._running = running  # () -> [(images, seconds since start)] of the batches running now
        self.pool = pool  # the CPU thread pool's backlog (None: not bounded)
        self.workers = max(1, int(workers))
        self.queue_size = int(queue_size)
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = None if max_wait_s is None else float(max_wait_s)
        self.deadline_s = float(deadline_s)
        self.outstanding = 0
        self.refused_total = 0
        self._batch_s: dict[int, float] = {}  # batch size -> EWMA of its run time in seconds
        self._seen: dict[int, int] = {}  # batch size -> batches measured

    # ------------------------------------------------------------------------------------------ measurements
    def observe_batch(self, size: int, run_s: float) -> None:
        """Record one model call of ``size`` images that took ``run_s`` seconds."""
        if size < 1 or not run_s >= 0:
            return
        seen = self._seen.get(size, 0) + 1
        self._seen[size] = seen
        self._batch_s[size] = ewma(self._batch_s.get(size, 0.0), run_s, seen)

    def batch_s(self, size: int) -> float:
        """Estimated run time of a batch of ``size`` images (0 before any batch was measured)."""
        if size <= 0 or not self._batch_s:
            return 0.0
        if size in self._batch_s:
            return self._batch_s[size]
        nearest = min(self._batch_s, key=lambda k: (abs(k - size), -k))
        return self._batch_s[nearest] * size / nearest

    def drain_s(self, items: int) -> float:
        """Seconds the model replicas need for ``items`` images in full batches (see the module docstring)."""
        full, rest = divmod(math.ceil(max(0, int(items)) / self.workers), self.max_batch_size)
        return full * self.batch_s(self.max_batch_size) + self.batch_s(rest)

    def wait_s(self) -> tuple[float, int]:
        """``(expected seconds before newly admitted images start, images waiting)`` (module docstring)."""
        running = self._running()
        waiting = self.outstanding - sum(size for size, _ in running)
        left = 0.0
        if running and len(running) >= self.workers:
            left = min(max(0.0, self.batch_s(size) - elapsed) for size, elapsed in running)
        return left + self.drain_s(waiting), waiting

    @property
    def wait_bound_s(self) -> float:
        """Longest expected wait at which new images are admitted: ``max_wait_s``, else derived (module docstring)."""
        if self.max_wait_s is not None:
            return self.max_wait_s
        return min(self.deadline_s, max(MIN_WAIT_S, WAIT_FACTOR * self.batch_s(1)))

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.drain_s(self.outstanding)))

    @property
    def images_per_request(self) -> int:
        """Most images one request may hold: within ``queue_size`` and within the deadline on an idle model."""
        budget = DEADLINE_FRACTION * self.deadline_s
        n = self.queue_size
        while n > 1 and self.drain_s(n) > budget:
            n -= 1
        return n

    # ------------------------------------------------------------------------------------------------ checks
    def check(self, n: int) -> None:
        """Raise unless ``n`` more images could be admitted now (nothing is reserved)."""
        self._check_size(n)
        wait, waiting = self.wait_s()
        if waiting + n > self.queue_size:
            self._refuse(f"inference queue is full ({waiting} images waiting, DHR_QUEUE_SIZE={self.queue_size})")
        bound = self.wait_bound_s
        how = "DHR_MAX_QUEUE_WAIT_S" if self.max_wait_s is not None else "half a single-image model call"
        if wait > bound:  # idle: the wait is 0, never refused by time
            self._refuse(f"the expected wait of {wait:.2f} s exceeds {bound:.2f} s ({how})")
        pool = self.pool
        if pool is not None and pool.wait_s() > bound:  # nothing measured yet: the mean is 0, never refused
            self._refuse(
                f"the expected wait of {pool.wait_s():.2f} s in the CPU stage (decode / postprocess: {pool.backlog} "
                f"jobs for DHR_WORKERS={pool.workers} threads) exceeds {bound:.2f} s ({how})",
                pool.drain_s(),
            )

    def _check_size(self, n: int) -> None:
        """TooManyImagesError when ``n`` images could not fit the queue or the deadline even on an idle model."""
        if n > self.queue_size or (n > 1 and self.drain_s(n) > DEADLINE_FRACTION * self.deadline_s):
            allowed = self.images_per_request
            raise TooManyImagesError(
                f"{n} images in one request; at most {allowed} fit the deadline of {self.deadline_s:g} s "
                f"(DHR_REQUEST_TIMEOUT_S) and the queue of {self.queue_size} (DHR_QUEUE_SIZE); split the request",
                allowed,
            )

    def admit(self, n: int) -> Ticket:
        """Reserve ``n`` images or raise (OverloadedError: retry later; TooManyImagesError: split the request)."""
        self.check(n)
        return Ticket(self, n)

    def resize(self, ticket: Ticket, n: int) -> None:
        """Make ``ticket`` hold ``n`` images: unchanged when it holds that many already, else its images are given
        back and ``n`` are checked as a new request (raises like :meth:`admit`, leaving the ticket empty)."""
        if n == ticket.held:
            return
        ticket.release()
        self.check(n)
        ticket.hold(n)

    def _refuse(self, why: str, drain_s: float | None = None) -> None:
        """Count and raise; Retry-After from ``drain_s`` (seconds) when given, else from the model's backlog."""
        self.refused_total += 1
        retry = self.retry_after_s() if drain_s is None else max(1, math.ceil(drain_s))
        raise OverloadedError(f"the service is busy: {why}", retry)


class Ticket:
    """The reservation of one request; ``done()`` once per image whose model output is back (or that failed)."""

    def __init__(self, admission: Admission, n: int) -> None:
        self._admission, self.held, self.arriving = admission, 0, 0
        self.hold(n)

    def hold(self, n: int) -> None:
        """Take ``n`` more images (checked already): outstanding until their model output is back, and arriving
        at the CPU pool until the request submits a job for each (:meth:`submitted`)."""
        self.held += n
        self._admission.outstanding += n
        self._arrive(n)

    def done(self, n: int = 1) -> None:
        n = min(n, self.held)
        self.held -= n
        self._admission.outstanding -= n

    def submitted(self) -> None:
        """The request submits a pool job now: one arriving image (if any is left) becomes that counted job."""
        if self.arriving:
            self._arrive(-1)

    def _arrive(self, n: int) -> None:
        if self._admission.pool is not None:
            self.arriving += n
            self._admission.pool.arriving += n

    def release(self) -> None:
        """Give back whatever is still reserved (idempotent)."""
        self.done(self.held)
        self._arrive(-self.arriving)
