"""Prometheus metrics of one app, in its own ``CollectorRegistry`` (several apps in one process never collide).

The load metrics carry a ``replica`` label (``DHR_REPLICA_NAME``; under Ray Serve the replica id), so that series
of several replicas behind one endpoint stay apart: queue depth and in-flight requests for autoscaling, and
``rate(dhr_images_total[1m])`` summed by replica for per-replica throughput. Example rule for a KEDA
``ScaledObject`` (Prometheus trigger) or an HPA on an external metric, for plain Kubernetes Deployments: scale out
when the images waiting per replica exceed 8::

    avg(avg_over_time(dhr_queue_depth[1m]))                  # threshold: "8"

and, for the in-flight view, ``sum(dhr_inflight_requests) / count(dhr_inflight_requests)``.

===========================================  =========  ===============================================================
name                                         type       labels / meaning
===========================================  =========  ===============================================================
dhr_http_requests_total                      counter    method, route (template, e.g. /inspections/{inspection_id}),
                                                        status
dhr_http_request_duration_seconds            histogram  method, route, status: request wall time
dhr_queue_depth                              gauge      replica: images waiting for a batch (read at scrape time)
dhr_inflight_requests                        gauge      replica: HTTP requests being answered (operations routes
                                                        /health, /livez, /readyz, /metrics not counted)
dhr_batch_size                               histogram  images per model call
dhr_batch_wait_seconds                       histogram  queue wait of the oldest image of each batch
dhr_inference_seconds                        histogram  wall time of one model call (one batch)
dhr_batches_total                            counter    model calls made by the batcher (read from the engine)
dhr_failed_batches_total                     counter    model calls that raised (read from the engine)
dhr_queue_rejections_total                   counter    requests refused with 503: queue full or wait too long
dhr_images_total                             counter    replica, verdict (ok | review | defect): images inspected and
                                                        stored
dhr_reviews_total                            counter    decision (confirm_defect | false_reject | escape): reviews
                                                        stored
dhr_model_ready                              gauge      1 when the model serves, else 0
dhr_model_info                               info       backbone, backbone_sha256, prompts, prompts_kind, preset,
                                                        precision, device, layer_features
===========================================  =========  ===============================================================
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from service.engine.batcher import BatchStats
from service.inspection import REVIEW_DECISIONS, VERDICTS

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
UNMATCHED_ROUTE = "<unmatched>"


class Metrics:
    """The collectors of one app; :meth:`render` gives the text exposition format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, replica: str = "") -> None:
        self.replica = replica
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ["method", "route", "status"]
        self.requests = Counter("dhr_http_requests", "HTTP requests answered", labels, registry=r)
        self.latency = Histogram(
            "dhr_http_request_duration_seconds",
            "HTTP request wall time in seconds",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("dhr_queue_depth", "Images waiting for a model batch", ["replica"], registry=r).labels(
            replica=replica
        )
        self.inflight = Gauge(
            "dhr_inflight_requests", "HTTP requests being answered (not operations routes)", ["replica"], registry=r
        ).labels(replica=replica)
        self.batch_size = Histogram("dhr_batch_size", "Images per model call", buckets=BATCH_BUCKETS, registry=r)
        self.batch_wait = Histogram(
            "dhr_batch_wait_seconds", "Queue wait of the oldest image of a batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "dhr_inference_seconds",
            "Wall time of one model call (one batch) in seconds",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._batcher: Callable[[], object | None] = lambda: None
        r.register(_BatcherCollector(lambda: self._batcher()))
        self.images = Counter(
            "dhr_images", "Images inspected and stored, by verdict", ["replica", "verdict"], registry=r
        )
        for verdict in VERDICTS:
            self.images.labels(replica=replica, verdict=verdict)  # export zeros from the start
        self.reviews = Counter("dhr_reviews", "Reviews stored, by decision", ["decision"], registry=r)
        for decision in REVIEW_DECISIONS:
            self.reviews.labels(decision=decision)
        self.ready = Gauge("dhr_model_ready", "1 when the model is loaded and serving, else 0", registry=r)
        self.model_info = Info("dhr_model", "Identity of the served model", registry=r)

    def bind_engine(self, read_engine: Callable[[], object | None]) -> None:
        """Read queue depth and batch counters from ``read_engine()`` (the serving Engine or None)."""
        self._batcher = read_engine
        self.queue_depth.set_function(lambda: float(getattr(read_engine(), "queue_depth", 0)))

    def set_model(self, info: dict | None) -> None:
        """Publish the model identity (None: not loaded) and the ready gauge."""
        if info is None:
            self.ready.set(0)
            return
        self.model_info.info({k: "" if v is None else str(v) for k, v in info.items()})
        self.ready.set(1)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = {"method": method, "route": route, "status": str(status)}
        self.requests.labels(**key).inc()
        self.latency.labels(**key).observe(seconds)

    def observe_image(self, verdict: str) -> None:
        """One inspected and stored image of this replica."""
        self.images.labels(replica=self.replica, verdict=verdict).inc()

    def observe_batch(self, stats: BatchStats) -> None:
        """The engine's ``on_batch`` callback (runs on the event loop after every model call)."""
        self.batch_size.observe(stats.size)
        self.batch_wait.observe(stats.wait_s)
        self.inference.observe(stats.run_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BatcherCollector(Collector):
    """Exports the batcher's own counters at scrape time (0 while no engine runs)."""

    FIELDS = (
        ("dhr_batches", "batches_total", "Model calls made by the batcher"),
        ("dhr_failed_batches", "failed_batches_total", "Model calls that raised"),
        ("dhr_queue_rejections", "rejected_total", "Requests refused (503): queue full or expected wait too long"),
    )

    def __init__(self, read: Callable[[], object | None]) -> None:
        self._read = read

    def collect(self):
        batcher = self._read()
        for name, attr, doc in self.FIELDS:
            yield CounterMetricFamily(name, doc, value=float(getattr(batcher, attr, 0)))
