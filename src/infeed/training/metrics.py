"""Prometheus metrics of a training run, on a registry the caller passes (nothing is process-global)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["CHECKPOINT_BUCKETS_S", "TrainingMetrics"]

#: Histogram buckets of checkpoint durations, in seconds.
CHECKPOINT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class TrainingMetrics:
    """The metrics a :class:`~infeed.training.Trainer` keeps up to date.

    Args:
        registry: where the metrics are registered (a new one when None); serve it with
            ``prometheus_client.generate_latest(registry)``.

    Attributes:
        samples: ``infeed_train_samples_total``, records trained.
        steps: ``infeed_train_steps_total``, optimizer steps.
        loss: ``infeed_train_loss``, the last step's loss.
        samples_per_second: ``infeed_train_samples_per_second``, over the last report window.
        consumer_lag: ``infeed_train_consumer_lag_messages``, messages after the read position.
        data_wait: ``infeed_train_data_wait_seconds_total``, time steps waited for a batch.
        compute: ``infeed_train_compute_seconds_total``, time in forward, backward and step.
        data_stall_ratio: ``infeed_train_data_stall_ratio``, wait / (wait + compute) over the window.
        checkpoint_duration: ``infeed_train_checkpoint_duration_seconds``, write + commit + announce.
        dead_lettered: ``infeed_train_dead_lettered_total``, poison messages and records.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.samples = Counter("infeed_train_samples", "Records trained.", registry=r)
        self.steps = Counter("infeed_train_steps", "Optimizer steps taken.", registry=r)
        self.loss = Gauge("infeed_train_loss", "Loss of the last step.", registry=r)
        self.samples_per_second = Gauge(
            "infeed_train_samples_per_second", "Records trained per second, last window.", registry=r
        )
        self.consumer_lag = Gauge(
            "infeed_train_consumer_lag_messages", "Messages after the read position.", registry=r
        )
        self.data_wait = Counter(
            "infeed_train_data_wait_seconds", "Seconds steps waited for a batch.", registry=r
        )
        self.compute = Counter(
            "infeed_train_compute_seconds", "Seconds in forward, backward and optimizer step.", registry=r
        )
        self.data_stall_ratio = Gauge(
            "infeed_train_data_stall_ratio", "Wait / (wait + compute), last window.", registry=r
        )
        self.checkpoint_duration = Histogram(
            "infeed_train_checkpoint_duration_seconds",
            "Seconds per checkpoint: durable write, commit and announcement.",
            buckets=CHECKPOINT_BUCKETS_S,
            registry=r,
        )
        self.dead_lettered = Counter(
            "infeed_train_dead_lettered", "Poison messages and records dead-lettered.", registry=r
        )
