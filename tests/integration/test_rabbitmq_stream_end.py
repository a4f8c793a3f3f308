"""RabbitMQ streams: ``describe_topic``'s ``high`` is one past the last message, however often asked.

Finding the end appends a marker, which takes an offset but is no message; the end must not move
past messages because of earlier markers, or a reader waiting for offset ``high - 1`` (an epoch's
end) waits forever.
"""

from __future__ import annotations

import os
import time

import pytest

from infeed.brokers import connect
from infeed.types import Delivery
from tests.support import broker_url


def test_the_end_of_a_stream_is_one_past_its_last_message_whatever_the_markers() -> None:
    pytest.importorskip("pika")
    url = f"{broker_url('rabbitmq')}?queue_type=stream"
    topic = f"stream-end-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    with connect(url) as broker:
        broker.create_topic(topic)
        try:
            assert broker.describe_topic(topic).partitions[0].high == 0
            broker.publish_many(topic, [b"a", b"b", b"c"])
            highs = [broker.describe_topic(topic).partitions[0].high for _ in range(3)]
            assert highs[0] >= 3 and highs == highs[:1] * 3  # the markers after "c" do not count
            broker.publish(topic, b"d")  # after three markers
            assert broker.describe_topic(topic).partitions[0].high == highs[0] + 4
            consumer = broker.subscribe(topic, group="g", start="earliest")
            got: list[Delivery] = []
            deadline = time.monotonic() + 30
            while len(got) < 4 and time.monotonic() < deadline:
                got += consumer.receive(max_messages=10, timeout_s=1.0)
            consumer.close()
            assert [bytes(d.payload) for d in got] == [b"a", b"b", b"c", b"d"]
            assert got[-1].position.offset + 1 == broker.describe_topic(topic).partitions[0].high
        finally:
            broker.delete_topic(topic)
