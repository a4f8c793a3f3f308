"""Worker policy as small middleware: hooks around batches, and Prometheus metrics built on them.

A ``Middleware`` subclass overrides the hooks it needs; the ``Worker`` calls every middleware's
hook in order. ``InferenceMetrics`` is the one the CLI installs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from infeed.inference.batcher import Pending
from infeed.inference.protocol import ErrorCode

__all__ = ["BATCH_SIZE_BUCKETS", "LATENCY_BUCKETS_S", "InferenceMetrics", "Middleware"]

#: Histogram buckets of batch sizes, in rows.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: Histogram buckets of queue wait and compute times, in seconds.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Middleware:
    """Hooks the ``Worker`` calls; every hook does nothing unless overridden."""

    def before_batch(self, requests: Sequence[Pending], version: int) -> None:
        """Called just before the model runs on ``requests`` (one model call)."""

    def after_batch(self, requests: Sequence[Pending], version: int, compute_s: float) -> None:
        """Called after the model ran on ``requests`` without error, taking ``compute_s``."""

    def after_error(self, pending: Pending | None, code: ErrorCode, *, dead_lettered: bool) -> None:
        """Called for each request answered with an error (``pending`` is None when undecodable)."""

    def after_swap(self, version: int) -> None:
        """Called when ``version`` becomes the version unpinned requests use."""


class InferenceMetrics(Middleware):
    """Prometheus metrics of a worker, on a registry the caller passes (nothing is process-global).

    Args:
        registry: where the metrics are registered (a new one when None); serve it with
            ``prometheus_client.generate_latest(registry)``.

    Attributes:
        batch_size: ``infeed_inference_batch_size_rows``, rows per model call.
        queue_wait: ``infeed_inference_queue_wait_seconds``, publish to compute start.
        compute: ``infeed_inference_compute_seconds``, per model call.
        requests: ``infeed_inference_requests_total{outcome}``, by outcome (ok or an error code).
        deadline_misses: ``infeed_inference_deadline_misses_total``, answered DEADLINE_EXCEEDED.
        dead_lettered: ``infeed_inference_dead_lettered_total``, copies sent to the dead-letter topic.
        model_version: ``infeed_inference_model_version``, the version unpinned requests use.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.batch_size = Histogram(
            "infeed_inference_batch_size_rows", "Rows per model call.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "infeed_inference_queue_wait_seconds",
            "Seconds from publish to compute start.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.compute = Histogram(
            "infeed_inference_compute_seconds",
            "Seconds per model call.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.requests = Counter(
            "infeed_inference_requests", "Requests answered, by outcome.", ["outcome"], registry=r
        )
        self.deadline_misses = Counter(
            "infeed_inference_deadline_misses",
            "Requests answered DEADLINE_EXCEEDED, never computed.",
            registry=r,
        )
        self.dead_lettered = Counter(
            "infeed_inference_dead_lettered", "Requests copied to the dead-letter topic.", registry=r
        )
        self.model_version = Gauge(
            "infeed_inference_model_version", "The version unpinned requests use.", registry=r
        )

    def before_batch(self, requests: Sequence[Pending], version: int) -> None:
        """Record batch size and queue wait."""
        now = time.time()  # wall clock: publish times come from the broker
        self.batch_size.observe(sum(p.request.rows for p in requests))
        for p in requests:
            if p.delivery.timestamp > 0:
                self.queue_wait.observe(max(0.0, now - p.delivery.timestamp))

    def after_batch(self, requests: Sequence[Pending], version: int, compute_s: float) -> None:
        """Record compute time and successes."""
        self.compute.observe(compute_s)
        self.requests.labels(outcome="ok").inc(len(requests))

    def after_error(self, pending: Pending | None, code: ErrorCode, *, dead_lettered: bool) -> None:
        """Count the error, deadline misses and dead letters."""
        self.requests.labels(outcome=str(code)).inc()
        if code is ErrorCode.DEADLINE_EXCEEDED:
            self.deadline_misses.inc()
        if dead_lettered:
            self.dead_lettered.inc()

    def after_swap(self, version: int) -> None:
        """Show the current version."""
        self.model_version.set(version)
