"""DynamicBatcher: batch formation, deadlines, back-pressure, failures, shutdown, cancellation, threading."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time

import pytest

from service.engine.batcher import BatcherClosedError, BatchStats, DynamicBatcher, QueueFullError
from service.engine.fair_queue import FairQueue, Pending


class Recorder:
    """A process_batch that squares its inputs, sleeps ``delay_s``, records batches and threads, may block."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay_s = delay_s
        self.gate = gate
        self.batches: list[list] = []
        self.threads: list[threading.Thread] = []
        self.started_at: list[float] = []

    def __call__(self, items: list) -> list:
        self.started_at.append(time.perf_counter())
        self.threads.append(threading.current_thread())
        self.batches.append(list(items))
        if self.gate is not None:
            assert self.gate.wait(5.0), "test gate never opened"
        if self.delay_s:
            time.sleep(self.delay_s)
        if any(isinstance(x, str) and x == "bad" for x in items):
            raise ValueError("bad item in batch")
        return [x * x for x in items]


async def wait_until(predicate, timeout_s: float = 2.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not predicate():
        assert time.perf_counter() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def test_concurrent_submits_form_full_batches_in_one_worker_thread():
    fn = Recorder(delay_s=0.02)

    async def main():
        b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=20, queue_size=64)
        await b.start()
        results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        await b.stop()
        return b, results

    b, results = asyncio.run(main())
    assert results == [i * i for i in range(10)]  # every caller gets f(own item), in order
    assert [len(x) for x in fn.batches] == [4, 4, 2]
    assert fn.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert (b.batches_total, b.items_total, b.failed_batches_total) == (3, 10, 0)
    assert len(set(fn.threads)) == 1 and fn.threads[0] is not threading.main_thread()
    assert fn.threads[0].name.startswith("dhr-batcher")


def test_single_item_waits_for_max_wait_then_runs_alone():
    fn = Recorder()

    async def main():
        b = DynamicBatcher(fn, max_batch_size=8, max_wait_ms=60, queue_size=8)
        await b.start()
        t0 = time.perf_counter()
        timings: dict = {}
        out = await b.submit(7, timings)
        await b.stop()
        return out, fn.started_at[0] - t0, timings

    out, dispatched_after, timings = asyncio.run(main())
    assert out == 49
    assert fn.batches == [[7]]
    assert dispatched_after >= 0.055  # not before the 60 ms deadline (small allowance for clock granularity)
    assert dispatched_after < 1.0
    assert timings["batch_size"] == 1
    assert 0.055 <= timings["queue_s"] < 1.0
    assert 0.0 <= timings["run_s"] < 0.5


def test_full_batch_is_dispatched_without_waiting_for_deadline():
    fn = Recorder()

    async def main():
        b = DynamicBatcher(fn, max_batch_size=3, max_wait_ms=10_000, queue_size=8)
        await b.start()
        t0 = time.perf_counter()
        results = await asyncio.gather(*(b.submit(i) for i in (2, 3, 4)))
        elapsed = time.perf_counter() - t0
        await b.stop()
        return results, elapsed

    results, elapsed = asyncio.run(main())
    assert results == [4, 9, 16]
    assert fn.batches == [[2, 3, 4]]
    assert elapsed < 2.0  # the 10 s deadline was not waited for


def test_batch_waiting_for_busy_worker_is_topped_up_with_later_arrivals():
    gate = threading.Event()
    fn = Recorder(gate=gate)

    async def main():
        b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=1, queue_size=64)
        await b.start()
        first = asyncio.ensure_future(b.submit(100))
        await wait_until(lambda: b.in_flight == 1)
        rest = []
        for i in range(6):  # arrive one by one, each after the 1 ms deadline of the batch being gathered
            rest.append(asyncio.ensure_future(b.submit(i)))
            await asyncio.sleep(0.01)
        depth = b.queue_depth
        gate.set()
        results = await asyncio.gather(first, *rest)
        await b.stop()
        return results, depth

    results, depth = asyncio.run(main())
    assert depth == 6
    assert results == [10000] + [i * i for i in range(6)]
    assert fn.batches == [[100], [0, 1, 2, 3], [4, 5]]  # full batch although each deadline had expired


def test_queue_full_rejects_immediately_and_accepted_items_finish():
    gate = threading.Event()
    fn = Recorder(gate=gate)

    async def main():
        b = DynamicBatcher(fn, max_batch_size=2, max_wait_ms=5, queue_size=3)
        await b.start()
        accepted = [asyncio.ensure_future(b.submit(i)) for i in range(2)]
        await wait_until(lambda: b.in_flight == 2)  # batch [0, 1] is inside process_batch
        accepted += [asyncio.ensure_future(b.submit(i)) for i in range(2, 5)]
        await wait_until(lambda: b.queue_depth == 3)
        with pytest.raises(QueueFullError, match="3 items waiting"):
            await b.submit(99)
        depth, in_flight = b.queue_depth, b.in_flight
        gate.set()
        results = await asyncio.gather(*accepted)
        await b.stop()
        return results, depth, in_flight, b.rejected_total

    results, depth, in_flight, rejected = asyncio.run(main())
    assert (depth, in_flight, rejected) == (3, 2, 1)
    assert results == [0, 1, 4, 9, 16]
    assert 99 not in [x for batch in fn.batches for x in batch]


def test_failing_batch_fails_all_its_callers_and_next_batch_succeeds():
    fn = Recorder()

    async def main():
        b = DynamicBatcher(fn, max_batch_size=3, max_wait_ms=50, queue_size=8)
        await b.start()
        first = await asyncio.gather(b.submit(1), b.submit("bad"), b.submit(2), return_exceptions=True)
        second = await asyncio.gather(b.submit(5), b.submit(6))
        await b.stop()
        return b, first, second

    b, first, second = asyncio.run(main())
    assert all(isinstance(e, ValueError) and str(e) == "bad item in batch" for e in first)
    assert first[0] is first[1] is first[2]  # the same exception object reaches every caller
    assert second == [25, 36]
    assert (b.batches_total, b.failed_batches_total, b.items_total) == (2, 1, 5)


@pytest.mark.parametrize("bad_output", [[1], [1, 2, 3], "ab"])
def test_wrong_output_length_or_type_fails_every_caller(bad_output):
    async def main():
        b = DynamicBatcher(lambda items: bad_output, max_batch_size=2, max_wait_ms=50, queue_size=8)
        await b.start()
        errors = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        await b.stop()
        return errors

    errors = asyncio.run(main())
    assert len(errors) == 2 and all(isinstance(e, RuntimeError) for e in errors)
    expected = "must return a list, got str" if isinstance(bad_output, str) else f"returned {len(bad_output)} outputs"
    assert all(expected in str(e) for e in errors)


def test_stop_with_drain_finishes_queued_work_and_refuses_new_items():
    gate = threading.Event()
    fn = Recorder(gate=gate)

    async def main():
        b = DynamicBatcher(fn, max_batch_size=2, max_wait_ms=10_000, queue_size=16)
        await b.start()
        futs = [asyncio.ensure_future(b.submit(i)) for i in range(2)]
        await wait_until(lambda: b.in_flight == 2)
        futs += [asyncio.ensure_future(b.submit(i)) for i in range(2, 7)]
        await wait_until(lambda: b.queue_depth == 5)
        stopping = asyncio.ensure_future(b.stop(drain=True))
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherClosedError):
            await b.submit(50)
        gate.set()
        await stopping
        return await asyncio.gather(*futs)

    results = asyncio.run(main())
    assert results == [i * i for i in range(7)]
    assert fn.batches == [[0, 1], [2, 3], [4, 5], [6]]  # the 10 s deadline is not honoured while draining


def test_stop_without_drain_fails_queued_items_but_completes_running_batch():
    gate = threading.Event()
    fn = Recorder(gate=gate)

    async def main():
        b = DynamicBatcher(fn, max_batch_size=2, max_wait_ms=5, queue_size=16)
        await b.start()
        running = [asyncio.ensure_future(b.submit(i)) for i in range(2)]
        await wait_until(lambda: b.in_flight == 2)
        queued = [asyncio.ensure_future(b.submit(i)) for i in range(2, 5)]
        await wait_until(lambda: b.queue_depth == 3)
        stopping = asyncio.ensure_future(b.stop(drain=False))
        queued_results = await asyncio.gather(*queued, return_exceptions=True)
        gate.set()
        await stopping
        return await asyncio.gather(*running), queued_results, b.queue_depth

    running_results, queued_results, depth = asyncio.run(main())
    assert running_results == [0, 1]
    assert all(isinstance(e, BatcherClosedError) for e in queued_results) and len(queued_results) == 3
    assert depth == 0
    assert fn.batches == [[0, 1]]


def test_cancelled_callers_are_dropped_or_skipped_without_breaking_the_batcher():
    gate = threading.Event()
    fn = Recorder(gate=gate)

    async def main():
        b = DynamicBatcher(fn, max_batch_size=4, max_wait_ms=5, queue_size=16)
        await b.start()
        in_batch = asyncio.ensure_future(b.submit(1))  # will be cancelled while its batch runs
        await wait_until(lambda: b.in_flight == 1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.submit(2), timeout=0.02)  # cancelled before its batch starts
        depth_after_timeout = b.queue_depth
        kept = asyncio.ensure_future(b.submit(3))
        in_batch.cancel()
        await asyncio.sleep(0)
        gate.set()
        kept_result = await kept
        later = await asyncio.gather(b.submit(4), b.submit(5))
        await b.stop()
        return depth_after_timeout, kept_result, later, in_batch.cancelled()

    depth_after_timeout, kept_result, later, was_cancelled = asyncio.run(main())
    assert depth_after_timeout == 0  # the timed-out item left the queue at once
    assert was_cancelled
    assert kept_result == 9 and later == [16, 25]
    assert fn.batches == [[1], [3], [4, 5]]  # item 2 never reached process_batch


def test_on_batch_receives_stats_and_its_errors_are_only_logged(caplog):
    stats: list[BatchStats] = []

    def on_batch(s: BatchStats) -> None:
        stats.append(s)
        raise RuntimeError("metrics backend down")

    fn = Recorder(delay_s=0.03)

    async def main():
        b = DynamicBatcher(fn, max_batch_size=3, max_wait_ms=10, queue_size=8, on_batch=on_batch)
        await b.start()
        first = await asyncio.gather(*(b.submit(i) for i in range(3)))
        second = await b.submit(4)
        await b.stop()
        return first, second

    with caplog.at_level(logging.ERROR, logger="service.engine.batcher"):
        first, second = asyncio.run(main())
    assert first == [0, 1, 4] and second == 16
    assert [s.size for s in stats] == [3, 1]
    assert all(0.029 <= s.run_s < 1.0 for s in stats)
    assert all(0.0 <= s.wait_s < 1.0 for s in stats)
    assert stats[1].wait_s >= 0.009  # a lone item waits out the 10 ms deadline
    assert sum("on_batch callback failed" in r.getMessage() for r in caplog.records) == 2


def test_supplied_executor_is_used_and_not_shut_down():
    fn = Recorder()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="caller-pool")

    async def main():
        b = DynamicBatcher(fn, max_batch_size=2, max_wait_ms=1, queue_size=4, executor=pool)
        await b.start()
        out = await b.submit(3)
        await b.stop()
        return out

    try:
        assert asyncio.run(main()) == 9
        assert fn.threads[0].name.startswith("caller-pool")
        assert pool.submit(lambda: 42).result(timeout=2) == 42  # still usable
    finally:
        pool.shutdown()


def test_lifecycle_and_argument_errors():
    fn = Recorder()
    for kwargs, message in [
        ({"max_batch_size": 0, "max_wait_ms": 1, "queue_size": 1}, "max_batch_size"),
        ({"max_batch_size": 1, "max_wait_ms": -1, "queue_size": 1}, "max_wait_ms"),
        ({"max_batch_size": 1, "max_wait_ms": 1, "queue_size": 0}, "queue_size"),
    ]:
        with pytest.raises(ValueError, match=message):
            DynamicBatcher(fn, **kwargs)

    async def main():
        b = DynamicBatcher(fn, max_batch_size=1, max_wait_ms=1, queue_size=1)
        with pytest.raises(BatcherClosedError, match="not running"):
            await b.submit(1)
        await b.start()
        with pytest.raises(RuntimeError, match="twice"):
            await b.start()
        assert await b.submit(2) == 4
        await b.stop()
        await b.stop()  # idempotent
        with pytest.raises(BatcherClosedError):
            await b.submit(3)

    asyncio.run(main())
    assert fn.batches == [[2]]


def test_several_functions_run_batches_at_once_each_in_its_own_thread():
    gate = threading.Event()
    held, free = Recorder(gate=gate), Recorder()
    stats: list[BatchStats] = []

    async def main():
        batcher = DynamicBatcher([held, free], max_batch_size=1, max_wait_ms=0, queue_size=8, on_batch=stats.append)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(2))
        await wait_until(lambda: held.batches)
        timings: dict = {}
        assert await batcher.submit(3, timings) == 9  # the second worker serves while the first is held
        assert timings["worker"] == 1 and batcher.in_flight == 1 and batcher.workers == 2
        gate.set()
        assert await first == 4
        await batcher.stop()

    asyncio.run(main())
    assert held.batches == [[2]] and free.batches == [[3]]
    assert held.threads[0] is not free.threads[0]
    assert sorted(s.worker for s in stats) == [0, 1]
    with pytest.raises(ValueError, match="one per process_batch"):
        DynamicBatcher([held, free], max_batch_size=1, max_wait_ms=0, queue_size=1, executor=[None])


def test_fair_queue_serves_keys_round_robin_and_counts_removals():
    """The waiting line itself: round-robin over keys (a key that was served goes last), push_front puts the given
    items ahead by key in their order, remove() (a caller cancelled while queued) frees its place in the count."""

    def item(name: str) -> Pending:
        return Pending(item=name, future=None, enqueued=0.0, timings=None, key=name[0])

    q = FairQueue()
    a1, a2, b1, a3, c1 = (item(n) for n in ("a1", "a2", "b1", "a3", "c1"))
    for p in (a1, a2, b1, a3, c1):
        q.append(p)
    q.remove(a2)
    assert len(q) == 4
    with pytest.raises(ValueError):
        q.remove(a2)
    assert [q.popleft().item for _ in range(4)] == ["a1", "b1", "c1", "a3"]
    assert len(q) == 0 and not q
    q.append(lone := item("d1"))
    q.remove(lone)  # its key leaves the rotation with it
    assert len(q) == 0 and not q
    for name in ("b2", "a6", "b3"):
        q.append(item(name))
    q.push_front([item("a4"), item("c2"), item("a5")])
    assert len(q) == 6
    assert [q.popleft().item for _ in range(4)] == ["a4", "c2", "b2", "a5"]
    assert [p.item for p in q.drain()] == ["b3", "a6"] and len(q) == 0 and not q
