"""Concurrency through the HTTP layer: shared batches, back-pressure (503), timeouts (504), failed batches (500)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.api import create_app
from service.engine.runner import ModelRunner
from service.model import load_model, load_views

from .api_fixtures import PRESET, RunnerHook, encode, make_settings, png_file, running, synthetic_image
from .paths import REF_PROMPTS, TINY_CLIP


def post_one(client, name: str, seed: int, **kw):
    return client.post("/segment", files=[png_file(name, seed)], **kw)


def test_concurrent_requests_share_batches_and_keep_their_own_results(tmp_path):
    n = 4
    hook = RunnerHook()
    app = create_app(make_settings(tmp_path, max_batch_size=8, max_wait_ms=300), load=hook.load)
    images = [synthetic_image(100 + i) for i in range(n)]

    async def main():
        async with running(app) as client:
            engine = app.state.ctx.engine
            before = engine.batcher.batches_total
            responses = await asyncio.gather(
                *(
                    client.post("/segment", files=[("image", (f"c{i}.png", encode(img), "image/png"))])
                    for i, img in enumerate(images)
                )
            )
            metrics = (await client.get("/metrics")).text
            return responses, engine.batcher.batches_total - before, metrics

    responses, batches, metrics = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * n
    assert batches < n and len(hook.sizes) == batches  # fewer model calls than requests
    assert max(hook.sizes) >= 2
    results = [r.json()["results"][0] for r in responses]
    assert [x["filename"] for x in results] == [f"c{i}.png" for i in range(n)]
    assert sum(1 for x in results if x["timing_ms"]["batch_size"] >= 2) >= 2
    # the batch histograms hold one observation per model call: its size, the wait of its oldest image (the
    # largest queue time of its results) and its run time (each result of a batch reports the batch's)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    by_batch: dict[tuple[float, int], float] = {}
    for t in (x["timing_ms"] for x in results):
        key = (t["inference"], t["batch_size"])
        by_batch[key] = max(by_batch.get(key, 0.0), t["queue"])
    assert sorted(size for _, size in by_batch) == sorted(hook.sizes)
    for name in ("dhr_batch_size", "dhr_batch_wait_seconds", "dhr_inference_seconds"):
        assert samples[(f"{name}_count", ())] == len(hook.sizes), name
    assert samples[("dhr_batch_size_sum", ())] == n
    assert samples[("dhr_inference_seconds_sum", ())] == pytest.approx(sum(r for r, _ in by_batch) / 1e3, abs=1e-5)
    assert samples[("dhr_batch_wait_seconds_sum", ())] == pytest.approx(sum(by_batch.values()) / 1e3, abs=1e-5)
    segment = (("method", "POST"), ("route", "/segment"), ("status", "200"))
    assert samples[("dhr_http_request_duration_seconds_count", segment)] == n
    assert (
        samples[("dhr_http_request_duration_seconds_sum", segment)]
        >= sum(x["timing_ms"]["total"] for x in results) / 1e3
    )

    model, _ = load_model(TINY_CLIP, REF_PROMPTS, preset=PRESET, device="cpu")
    runner = ModelRunner(model)
    for img, res in zip(images, results, strict=True):  # each equals the image served alone
        alone = runner.run([load_views(img, runner.preset)])[0]
        assert res["score"] == pytest.approx(alone.scores.reference, abs=1e-5)
    assert len({round(x["score"], 8) for x in results}) == n


def test_full_queue_answers_503_with_retry_after_and_accepted_requests_finish(tmp_path):
    hook = RunnerHook()
    settings = make_settings(tmp_path, max_batch_size=1, queue_size=1, max_wait_ms=0, replica_name="r1")
    app = create_app(settings, load=hook.load)

    async def main():
        async with running(app) as client:
            engine = app.state.ctx.engine
            hook.hold()
            first = asyncio.create_task(post_one(client, "first.png", 1))
            await asyncio.to_thread(hook.entered.wait, 30)  # the first image is inside the model
            second = asyncio.create_task(post_one(client, "second.png", 2))
            while engine.queue_depth < 1:  # the second image waits in the queue
                await asyncio.sleep(0.01)
            third = await post_one(client, "third.png", 3)
            metrics = (await client.get("/metrics")).text
            hook.release()
            return await first, await second, third, metrics, (await client.get("/readyz")).status_code

    first, second, third, metrics, ready = asyncio.run(main())
    assert third.status_code == 503
    assert third.headers["content-type"] == "application/problem+json"
    assert third.headers["retry-after"] == "1"
    assert third.json()["title"] == "Inference queue full" and "DHR_QUEUE_SIZE=1" in third.json()["detail"]
    assert "dhr_queue_rejections_total 1.0" in metrics and 'dhr_queue_depth{replica="r1"} 1.0' in metrics
    assert 'dhr_inflight_requests{replica="r1"} 2.0' in metrics  # first and second; /metrics itself not counted
    assert [first.status_code, second.status_code] == [200, 200]
    assert [first.json()["results"][0]["filename"], second.json()["results"][0]["filename"]] == [
        "first.png",
        "second.png",
    ]
    assert ready == 200 and hook.sizes == [1, 1]


def test_timeout_answers_504_and_the_service_recovers(tmp_path):
    hook = RunnerHook()
    app = create_app(make_settings(tmp_path, request_timeout_s=3.0), load=hook.load)

    async def main():
        async with running(app) as client:
            hook.hold()
            hook.fail = RuntimeError("abandoned batch")  # once released, the held batch ends at once
            slow = await post_one(client, "slow.png", 7)
            hook.release()
            while app.state.ctx.engine.batcher.in_flight:
                await asyncio.sleep(0.01)
            hook.fail = None
            later = await post_one(client, "later.png", 8)
            listed = (await client.get("/inspections")).json()["items"]
            return slow, later, listed

    slow, later, listed = asyncio.run(main())
    assert slow.status_code == 504 and slow.headers["content-type"] == "application/problem+json"
    assert slow.json()["title"] == "Inference timed out" and "DHR_REQUEST_TIMEOUT_S" in slow.json()["detail"]
    assert later.status_code == 200
    assert [x["filename"] for x in listed] == ["later.png"]  # the timed-out image was never stored


def test_failed_batch_answers_500_and_the_service_stays_ready(tmp_path):
    hook = RunnerHook()
    app = create_app(make_settings(tmp_path), load=hook.load)

    async def main():
        async with running(app) as client:
            hook.fail = RuntimeError("simulated device failure")
            failed = await client.post("/segment", files=[png_file("f1.png", 1), png_file("f2.png", 2)])
            hook.fail = None
            ready = await client.get("/readyz")
            ok = await post_one(client, "ok.png", 3)
            metrics = (await client.get("/metrics")).text
            return failed, ready, ok, metrics

    failed, ready, ok, metrics = asyncio.run(main())
    assert failed.status_code == 500 and failed.headers["content-type"] == "application/problem+json"
    body = failed.json()
    assert body["title"] == "Inference failed" and "simulated device failure" in body["detail"]
    assert ready.status_code == 200 and ok.status_code == 200
    assert "dhr_failed_batches_total 1.0" in metrics
    assert 'dhr_http_requests_total{method="POST",route="/segment",status="500"} 1.0' in metrics
