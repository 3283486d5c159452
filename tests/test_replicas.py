"""Bucketed batches for a compiled tower (``DHR_COMPILE``) and one model replica per device (``DHR_DEVICE=a,b``).

On the CPU: compile runs with torch.compile's "eager" backend (dynamo tracing, no C++ build) in the fast tests and
with inductor in a slow one; replicas are two copies of the tiny CLIP model on ``cpu,cpu``. Results must equal an
uncompiled single runner's to float32 rounding.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api import create_app
from service.api.settings import Settings
from service.engine.buckets import batch_buckets, bucket_for
from service.engine.runner import Engine, EngineConfig, InferItem, ModelRunner
from service.model import build_model, load_views, stack_views

from .api_fixtures import make_settings, synthetic_image, wait_ready

PRESET = "fast"


def test_buckets_are_powers_of_two_then_the_largest_batch():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert [bucket_for(n, (1, 2, 4, 8, 12)) for n in (1, 2, 3, 5, 8, 9, 12, 13)] == [1, 2, 4, 8, 8, 12, 12, 13]
    with pytest.raises(ValueError):
        batch_buckets(0)


@pytest.fixture(scope="module")
def views():
    return [load_views(synthetic_image(seed, (120 + 8 * seed, 90)), _preset()) for seed in range(6)]


def _preset():
    from service.model import get_preset

    return get_preset(PRESET)


def test_stack_views_pads_with_the_last_image(views):
    whole, crops = stack_views(views[:3], rows=4)
    assert whole.shape[0] == 4 and crops.shape[0] == 4
    assert torch.equal(whole[3], whole[2]) and torch.equal(crops[3], crops[2])
    assert torch.equal(whole[0], torch.from_numpy(np.array(views[0].whole)))
    on_device = [type(v)(torch.from_numpy(v.whole.copy()), torch.from_numpy(v.crops.copy())) for v in views[:3]]
    w2, c2 = stack_views(on_device, rows=4)
    assert torch.equal(w2, whole) and torch.equal(c2, crops)


@pytest.fixture(scope="module")
def model_factory(tiny_clip, ref_checkpoint):
    clip, info = tiny_clip
    return lambda: build_model(clip, ref_checkpoint, preset=PRESET, backbone_info=info)


def _close(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.anomaly_map, y.anomaly_map, atol=1e-5)
        np.testing.assert_allclose(np.array(x.scores), np.array(y.scores), atol=1e-5)


def _padding_is_dropped(eager: ModelRunner, compiled: ModelRunner, views) -> None:
    rows: list[int] = []
    encode = compiled.model.encode_views
    compiled.model.encode_views = lambda w, c: (rows.append(w.shape[0]), encode(w, c))[1]
    for n in (1, 3):
        _close(compiled.run(views[:n]), eager.run(views[:n]))
    assert rows == [1, 4]
    kept = compiled.run([InferItem(v, keep_features=True) for v in views[:3]])  # the feature path, padded to 4
    ref = eager.run([InferItem(v, keep_features=True) for v in views[:3]])
    _close(kept, ref)
    for got, want in zip(kept, ref, strict=True):
        assert got.features[0].tokens.shape[0] == 1
        torch.testing.assert_close(got.features[0].tokens, want.features[0].tokens, atol=1e-5, rtol=0)
    assert rows[-1] == 4


def test_bucketed_runner_pads_and_drops_the_padding(model_factory, views):
    """The padding logic alone (the buckets a compiled runner uses, on the eager tower): fast."""
    bucketed = ModelRunner(model_factory()[0])
    bucketed.buckets = (1, 2, 4)
    _padding_is_dropped(ModelRunner(model_factory()[0]), bucketed, views)


@pytest.mark.slow  # dynamo tracing of the tiny tower at two shapes: about 40 s on the shared 2-core host
def test_compiled_runner_pads_to_buckets_and_drops_the_padding(model_factory, views):
    compiled = ModelRunner(model_factory()[0], compile="default", max_batch_size=4, compile_backend="eager")
    assert compiled.buckets == (1, 2, 4)
    _padding_is_dropped(ModelRunner(model_factory()[0]), compiled, views)


@pytest.mark.slow
def test_inductor_compiled_runner_matches_eager_on_the_cpu(model_factory, views):
    eager = ModelRunner(model_factory()[0])
    compiled = ModelRunner(model_factory()[0], compile="default", max_batch_size=2)
    compiled.warm_up()  # compiles buckets 1 and 2
    _close(compiled.run(views[:1]), eager.run(views[:1]))
    _close(compiled.run(views[:2]), eager.run(views[:2]))


def test_settings_name_the_compile_mode_and_the_device_list():
    s = Settings(_env_file=None, device="cpu, cpu", compile="reduce-overhead")
    assert s.devices == ("cpu", "cpu") and s.device == "cpu,cpu" and s.compile == "reduce-overhead"
    assert Settings(_env_file=None).compile == "off" and Settings(_env_file=None).devices == ("auto",)
    for bad in ("auto,cpu", "cpu,gpu"):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, device=bad)
    with pytest.raises(ValidationError, match="choose one of off, default, reduce-overhead"):
        Settings(_env_file=None, compile="fast")


def test_two_replicas_both_serve_batches_with_the_single_runner_results(model_factory, views, tiny_clip):
    single = ModelRunner(model_factory()[0]).run(views)
    seen: list[int] = []
    model, info = model_factory()
    cfg = EngineConfig(max_batch_size=2, max_wait_ms=1, warmup=False, devices=("cpu", "cpu"))
    engine = Engine(model, info, cfg, on_batch=lambda stats: seen.append(stats.worker))
    assert len(engine.runners) == 2 and engine.runners[1].model is not model
    assert engine.info.device == "cpu,cpu"

    async def serve():
        await engine.start()
        try:
            job = engine.admit(len(views))
            return await asyncio.gather(*(job.infer(InferItem(v)) for v in views))
        finally:
            await engine.stop()

    results = asyncio.run(serve())
    _close(results, single)
    assert set(seen) == {0, 1}, seen  # three batches of two: the second ran while the first was busy


def test_the_service_runs_one_replica_per_listed_device(tmp_path):
    from .api_fixtures import png_file

    with TestClient(create_app(make_settings(tmp_path, device="cpu,cpu"))) as client:
        wait_ready(client)
        assert client.get("/health").json()["device"] == "cpu,cpu"
        r = client.post("/segment", files=[png_file("a.png", 1)])
        assert r.status_code == 200, r.text


def test_admission_shares_the_backlog_between_replicas():
    from service.engine.admission import Admission

    one = Admission(queue_size=64, max_batch_size=4, max_wait_s=1.0, deadline_s=10.0)
    two = Admission(queue_size=64, max_batch_size=4, max_wait_s=1.0, deadline_s=10.0, workers=2)
    for adm in (one, two):
        adm.observe_batch(4, 0.5)
    assert one.drain_s(10) == pytest.approx(2 * 0.5 + 0.5 * 2 / 4)  # 2 full batches + 2 images, one replica
    assert two.drain_s(10) == pytest.approx(0.5 + 0.5 * 1 / 4)  # 5 images on each replica: 1 batch + 1 image
    assert (one.images_per_request, two.images_per_request) == (40, 64)  # 5 s of the 10 s deadline; queue 64
