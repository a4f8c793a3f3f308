"""confluent-kafka on Apache Kafka: the baseline of ``kafka://``.

Produce: one ``Producer`` (``linger.ms=5``, ``acks=all``) with ``produce`` per message and a
``flush`` at the end (delivery reports only for failures). Consume: ``Consumer.consume(500)`` and
a synchronous ``commit`` of the batch's last message, the group joined before the clock starts.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from infeed.bench.baselines import RECEIVE_TIMEOUT_S, BenchError, RawSide, expect

__all__ = ["KafkaRaw", "bootstrap_servers"]

_BATCH = 500
_SETUP_TIMEOUT_S = 30.0


def bootstrap_servers(url: str) -> str:
    """Return ``host:port[,host:port]`` from ``kafka://host:port[,...]`` (or a bare list)."""
    return urlsplit(url).netloc if "://" in url else url


class KafkaRaw(RawSide):
    """confluent-kafka: Producer with linger + flush; consume(500) + commit."""

    label = (
        "confluent-kafka: Producer linger.ms=5 acks=all, produce + flush; Consumer.consume(500) + sync commit"
    )

    def __init__(self, *, url: str | None, workdir: Path) -> None:
        super().__init__(url=url, workdir=workdir)
        self._servers = bootstrap_servers(self._require_url())
        self._admin = AdminClient({"bootstrap.servers": self._servers})
        self._producer: Any = None
        self._consumer: Any = None
        self._errors: list[KafkaError] = []

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self._errors.append(err)

    def prepare(self, topic: str) -> None:
        """Create a one-partition topic, a producer, and a consumer that has joined its group."""
        for future in self._admin.create_topics([NewTopic(topic, 1, 1)]).values():
            future.result(_SETUP_TIMEOUT_S)
        self._errors = []
        self._producer = Producer(
            {
                "bootstrap.servers": self._servers,
                "linger.ms": 5,
                "acks": "all",
                "queue.buffering.max.messages": 1_000_000,
                "delivery.report.only.error": True,
                "on_delivery": self._on_delivery,
            }
        )
        assigned: list[TopicPartition] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": self._servers,
                "group.id": f"{topic}-bench",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self._consumer.subscribe([topic], on_assign=lambda _c, parts: assigned.extend(parts))
        deadline = time.monotonic() + _SETUP_TIMEOUT_S
        while not assigned:  # join the group now: a rebalance is no part of the throughput
            if time.monotonic() > deadline:
                raise BenchError(f"Kafka consumer got no partition of {topic} in {_SETUP_TIMEOUT_S:.0f} s")
            msg = self._consumer.poll(0.1)
            if msg is not None:
                raise BenchError(f"Kafka: unexpected message on the fresh topic {topic}")

    def produce(self, topic: str, batches: list[list[bytes]], op: str) -> None:
        """``produce`` every message (waiting on a full queue), then ``flush``."""
        producer = self._producer
        for batch in batches:
            for payload in batch:
                try:
                    producer.produce(topic, payload)
                except BufferError:
                    producer.poll(0.05)
                    producer.produce(topic, payload)
            producer.poll(0)
        left = producer.flush(RECEIVE_TIMEOUT_S)
        if left or self._errors:
            raise BenchError(f"Kafka produce: {left} messages unsent, errors: {self._errors[:3]}")

    def consume(self, topic: str, count: int, op: str) -> None:
        """``consume(500)`` then a synchronous commit of the batch."""
        consumer = self._consumer
        got = 0
        while got < count:
            msgs = consumer.consume(min(_BATCH, count - got), RECEIVE_TIMEOUT_S)
            if not msgs:
                break
            for msg in msgs:
                if msg.error() is not None:
                    raise BenchError(f"Kafka consume: {msg.error()}")
            consumer.commit(message=msgs[-1], asynchronous=False)
            got += len(msgs)
        expect(got, count, "Kafka consume")

    def cleanup(self, topic: str) -> None:
        """Close the clients and delete the topic."""
        if self._consumer is not None:
            with contextlib.suppress(KafkaException, RuntimeError):
                self._consumer.close()
            self._consumer = None
        if self._producer is not None:
            self._producer.flush(1.0)
            self._producer = None
        with contextlib.suppress(KafkaException):
            for future in self._admin.delete_topics([topic]).values():
                future.result(_SETUP_TIMEOUT_S)
