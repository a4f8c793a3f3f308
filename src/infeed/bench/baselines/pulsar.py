"""pulsar-client on Apache Pulsar: the baseline of ``pulsar://``.

Produce: ``send_async`` with batching (500 messages or 5 ms per batch), then ``flush``. Consume: an
exclusive subscription (cumulative acks need one), ``batch_receive`` of up to 500 and one
``acknowledge_cumulative`` of the last message of each batch.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pulsar

from infeed.bench.baselines import RECEIVE_TIMEOUT_S, BenchError, RawSide, expect

__all__ = ["PulsarRaw"]

_BATCH = 500


class PulsarRaw(RawSide):
    """pulsar-client: send_async with batching + flush; batch_receive + acknowledge_cumulative."""

    label = (
        "pulsar-client: send_async, batching 500 msgs/5 ms, flush; "
        "batch_receive 500 + acknowledge_cumulative (exclusive)"
    )

    def __init__(self, *, url: str | None, workdir: Path) -> None:
        super().__init__(url=url, workdir=workdir)
        # infeed's URL carries options (admin_url=...) in its query; the client takes the bare URL.
        # A Python logger can abort the interpreter at exit when a client thread logs during
        # shutdown, so the client keeps its own console logger (as infeed's backend does).
        service_url = self._require_url().split("?", 1)[0]
        self._client: Any = pulsar.Client(service_url, logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Warn))
        self._producer: Any = None
        self._consumer: Any = None

    @staticmethod
    def _full(topic: str) -> str:
        return f"persistent://public/default/{topic}"

    def prepare(self, topic: str) -> None:
        """Subscribe (earliest) and create a batching producer on a fresh topic."""
        self._consumer = self._client.subscribe(
            self._full(topic),
            "bench",
            consumer_type=pulsar.ConsumerType.Exclusive,
            initial_position=pulsar.InitialPosition.Earliest,
            receiver_queue_size=1000,
            batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(_BATCH, -1, 100),
        )
        self._producer = self._client.create_producer(
            self._full(topic),
            batching_enabled=True,
            batching_max_messages=_BATCH,
            batching_max_allowed_size_in_bytes=4 * 1024 * 1024,
            batching_max_publish_delay_ms=5,
            max_pending_messages=10_000,
            block_if_queue_full=True,
        )

    def produce(self, topic: str, batches: list[list[bytes]], op: str) -> None:
        """``send_async`` everything, then ``flush``; fail on any error result."""
        errors: list[Any] = []

        def done(result: Any, _msg_id: Any) -> None:
            if result != pulsar.Result.Ok:
                errors.append(result)

        producer = self._producer
        for batch in batches:
            for payload in batch:
                producer.send_async(payload, done)
        producer.flush()
        if errors:
            raise BenchError(f"Pulsar produce: {len(errors)} failed sends, first: {errors[0]}")

    def consume(self, topic: str, count: int, op: str) -> None:
        """``batch_receive`` and a cumulative ack of each batch."""
        consumer = self._consumer
        got = 0
        idle_since = time.monotonic()
        while got < count and time.monotonic() - idle_since < RECEIVE_TIMEOUT_S:
            msgs = consumer.batch_receive()
            if not msgs:
                continue
            consumer.acknowledge_cumulative(msgs[-1])
            got += len(msgs)
            idle_since = time.monotonic()
        expect(got, count, "Pulsar consume")

    def cleanup(self, topic: str) -> None:
        """Close the producer and drop the subscription."""
        with contextlib.suppress(pulsar.PulsarException):
            if self._producer is not None:
                self._producer.close()
            if self._consumer is not None:
                self._consumer.unsubscribe()
        self._producer = self._consumer = None

    def close(self) -> None:
        """Close the client."""
        with contextlib.suppress(pulsar.PulsarException):
            self._client.close()
