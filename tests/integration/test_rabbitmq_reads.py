"""RabbitMQ: the connection reads its socket ``RECV_BYTES`` at a time, and messages larger than a
read and than a frame (RabbitMQ's ``frame_max`` is 128 KiB) arrive whole and in order.

The read size is set on pika's transport, a private attribute: if a pika release renames it, the
test fails instead of the consumer silently going back to 4 KiB reads.
"""

from __future__ import annotations

import os
import random
import time

import pytest

from infeed.brokers import connect
from infeed.types import Delivery
from tests.support import broker_url

pytest.importorskip("pika")

from infeed.brokers._rabbitmq_io import RECV_BYTES


def _topic(name: str) -> str:
    return f"{name}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"


@pytest.mark.parametrize("query", ["", "?queue_type=stream"], ids=["queue", "stream"])
def test_messages_larger_than_a_read_and_a_frame_arrive_whole(query: str) -> None:
    rng = random.Random(7)
    sizes = [1, RECV_BYTES - 1, RECV_BYTES, RECV_BYTES + 1, 131_072 + 3, 300_000, 3_140]
    payloads = [rng.randbytes(n) for n in sizes]
    topic = _topic("reads")
    with connect(f"{broker_url('rabbitmq')}{query}") as broker:
        broker.create_topic(topic)
        try:
            transport = broker._live()._conn._transport  # type: ignore[attr-defined]
            assert transport._MAX_RECV_BYTES == RECV_BYTES
            consumer = broker.subscribe(topic, group="g", start="earliest")
            broker.publish_many(topic, payloads)
            got: list[Delivery] = []
            deadline = time.monotonic() + 30
            while len(got) < len(payloads) and time.monotonic() < deadline:
                got += consumer.receive_acked(max_messages=3, timeout_s=1.0)
            consumer.close()
            assert [bytes(d.payload) for d in got] == payloads
        finally:
            broker.delete_topic(topic)
