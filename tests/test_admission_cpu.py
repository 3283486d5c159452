"""Admission bounds the CPU thread pool's backlog too (decode / map analysis / PNGs), not only the model's.

On an accelerator the model drains fast and the pool (``DHR_WORKERS`` threads) is the slow stage: a burst must get
fast 503s with Retry-After instead of piling up in the pool until the deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import service.engine.runner as runner_module
from service.api import create_app
from service.api.weights import load_weights
from service.engine.admission import Admission, OverloadedError, PoolLoad
from service.model.dhrclip import DHROutput

from .api_fixtures import make_settings, png_file, running


# ------------------------------------------------------------------------------------------------------------ unit
def test_the_cpu_backlog_is_refused_beyond_the_wait_bound_with_retry_after_from_its_drain_time():
    pool = PoolLoad(workers=2)
    adm = Admission(queue_size=64, max_batch_size=8, max_wait_s=0.5, deadline_s=30.0, pool=pool)
    pool.jobs = 20  # queued or running
    adm.admit(1).release()  # no job measured yet: never refused by the CPU rule
    pool.observe(0.2)
    pool.observe(0.3)
    assert pool.job_s == pytest.approx(0.25)  # the mean of the first samples
    assert pool.wait_s() == pytest.approx(18 * 0.25 / 2)  # 18 jobs beyond the 2 busy threads
    with pytest.raises(OverloadedError, match=r"2\.25 s in the CPU stage .*20 jobs for DHR_WORKERS=2") as err:
        adm.admit(1)
    assert err.value.retry_after_s == 3  # ceil(20 jobs x 0.25 s / 2 threads = 2.5 s)
    pool.jobs = 6  # 4 beyond the threads: 0.5 s, at the bound
    adm.admit(1).release()
    pool.jobs = 7  # 0.625 s
    with pytest.raises(OverloadedError) as err:
        adm.admit(1)
    assert err.value.retry_after_s == 1  # ceil(0.875 s)
    assert adm.refused_total == 2 and adm.outstanding == 0
    pool.jobs = 2  # both threads busy, nothing queued: no wait whatever a job costs
    pool.observe(100.0)
    adm.admit(1).release()


def test_admitted_images_count_in_the_cpu_backlog_until_their_request_submits_a_pool_job():
    pool = PoolLoad(workers=1)
    adm = Admission(queue_size=64, max_batch_size=8, max_wait_s=0.5, deadline_s=30.0, pool=pool)
    pool.observe(0.25)
    tickets = [adm.admit(1) for _ in range(4)]  # a burst at the door: 0, 0, 0.25 and 0.5 s ahead of each
    assert (pool.arriving, pool.backlog) == (4, 4)
    with pytest.raises(OverloadedError, match=r"0\.75 s in the CPU stage .*4 jobs for DHR_WORKERS=1") as err:
        adm.admit(1)
    assert err.value.retry_after_s == 1  # ceil(4 x 0.25 s)
    tickets[0].submitted()  # its decode goes to the pool (PoolLoad.run counts it in ``jobs``)
    tickets[0].submitted()  # its next job: no arriving image left to convert
    assert (tickets[0].arriving, pool.arriving) == (0, 3)
    big = tickets[1]
    adm.resize(big, 3)  # its body held 3 images: 1 given back, 3 checked (0.5 s ahead) and held
    assert (big.arriving, pool.arriving, adm.outstanding) == (3, 5, 6)
    for ticket in tickets:
        ticket.release()
    assert (pool.arriving, adm.outstanding) == (0, 0)


def test_the_pool_job_time_follows_the_same_mean_then_ewma_rule_as_batches():
    pool, adm = PoolLoad(workers=1), Admission(queue_size=8, max_batch_size=1, max_wait_s=None, deadline_s=10.0)
    for s in (0.1, 0.3, 0.2, 0.6, 0.4, 1.0, 0.05):
        pool.observe(s)
        adm.observe_batch(1, s)
        assert pool.job_s == pytest.approx(adm.batch_s(1))
    # mean of the first five (0.32), then 0.8 * 0.32 + 0.2 * 1.0 = 0.456, then 0.8 * 0.456 + 0.2 * 0.05 = 0.3748
    assert pool.job_s == pytest.approx(0.3748)


def test_pool_jobs_are_counted_while_queued_or_running_and_given_back_on_errors_and_cancellation():
    async def main():
        pool, gate = PoolLoad(workers=1), threading.Event()
        with ThreadPoolExecutor(1) as executor:

            def held():
                assert gate.wait(10)
                return "done"

            def failing():
                raise ValueError("corrupt")

            first = asyncio.create_task(pool.run(executor, held))
            second = asyncio.create_task(pool.run(executor, failing))
            third = asyncio.create_task(pool.run(executor, held))
            await asyncio.sleep(0.05)
            seen = pool.jobs  # one running, two queued
            third.cancel()
            await asyncio.gather(third, return_exceptions=True)
            after_cancel = pool.jobs
            gate.set()
            results = await asyncio.gather(first, second, return_exceptions=True)
        return seen, after_cancel, results, pool

    seen, after_cancel, results, pool = asyncio.run(main())
    assert (seen, after_cancel, pool.jobs) == (3, 2, 0)
    assert results[0] == "done" and isinstance(results[1], ValueError)
    assert 0.03 < pool.job_s < 5  # only the job that finished was measured: the held one (>= 50 ms)


# ------------------------------------------------------------------------------------------------------ engine/API
class _Instant:
    """Stands in for the DHRCLIP the engine runs: its ``cfg`` and ``device``, an instant constant output."""

    def __init__(self, model) -> None:
        self.cfg, self.device = model.cfg, model.device

    def __call__(self, whole, crops, extra=()):
        b, t = whole.shape[0], self.cfg.preset.target_size
        yy, xx = torch.meshgrid(torch.arange(t) / t, torch.arange(t) / t, indexing="ij")
        amap = (0.1 + 0.8 * torch.exp(-((xx - 0.6) ** 2 + (yy - 0.4) ** 2) / 0.005)).expand(b, t, t)
        score = torch.full((b,), 0.9)
        return DHROutput(score, score, score, amap)


def _instant_load(settings):
    model, info, choice = load_weights(settings)
    return _Instant(model), info, choice


def test_a_burst_on_a_slow_cpu_stage_gets_fast_503s_and_the_rest_200(tmp_path, monkeypatch):
    real = runner_module.analyse_map

    def slow_analyse(*args, **kwargs):  # the pool is the bottleneck: 0.25 s per map analysis
        time.sleep(0.25)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "analyse_map", slow_analyse)
    app = create_app(make_settings(tmp_path, workers=1), load=_instant_load)

    async def post(client, i: int):
        t0 = time.perf_counter()
        r = await client.post("/segment", files=[png_file(f"b{i}.png", i)])
        return r, time.perf_counter() - t0

    async def main():
        async with running(app) as client:
            engine = app.state.ctx.engine
            for i in range(2):  # measured: two decodes (ms) and two analyses (0.25 s) -> ~0.13 s per pool job
                assert (await client.post("/segment", files=[png_file(f"w{i}.png", i)])).status_code == 200
            answers = await asyncio.gather(*(post(client, i) for i in range(12)))
            return answers, engine.admission

    answers, admission = asyncio.run(main())
    statuses = [r.status_code for r, _ in answers]
    refused = [(r, s) for r, s in answers if r.status_code == 503]
    assert set(statuses) == {200, 503} and len(refused) >= 6, statuses  # 12 x 0.25 s would queue 3 s deep
    assert admission.refused_total == len(refused) and admission.pool.jobs == 0
    for r, seconds in refused:
        assert r.headers["content-type"] == "application/problem+json"
        body = r.json()
        assert body["title"] == "Inference queue full" and "CPU stage" in body["detail"], body
        assert "DHR_WORKERS=1" in body["detail"], body
        assert r.headers["retry-after"] == "1"  # ceil(2 jobs ahead x ~0.13 s / 1 thread)
        assert seconds < 1.0  # refused at the door, not after queueing
    slowest = max(s for r, s in answers if r.status_code == 200)
    assert slowest < 2.0  # the accepted ones did not queue behind the whole burst (12 x 0.25 s = 3 s)
