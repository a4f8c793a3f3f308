"""``QueueDataset`` on a queue (no ``SEEK``): every message is read, whatever order its positions come in.

RabbitMQ's queue model names a delivery by its publish stamp (the producer's clock), and a queue
hands messages out in its own order: higher priorities first, several producers' clocks
interleaved. So the positions a dataset reads from one partition need not grow, and nothing may be
dropped as "read already" because a later one came first.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from infeed.brokers import Message, connect
from infeed.codecs import Field, MsgpackCodec, Schema, encode_message
from infeed.training import QueueDataset
from tests.support import broker_url

pytest.importorskip("pika")

SCHEMA = Schema({"x": Field("float32", (4,)), "id": Field("int64")})


def _message(i: int, priority: int | None = None) -> Message:
    payload, headers = encode_message(MsgpackCodec(), {"x": np.full(4, i, np.float32), "id": i})
    if priority is not None:
        headers["priority"] = str(priority)
    return Message(payload, headers=headers)


@pytest.mark.parametrize("feed", ["auto", "thread"])
def test_a_message_stamped_later_but_delivered_first_drops_none_of_the_others(feed: str) -> None:
    topic = f"qorder-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    with connect(f"{broker_url('rabbitmq')}?max_priority=5") as broker:
        broker.create_topic(topic)
        try:
            broker.subscribe(topic, group="g").close()  # a queue routes only to groups that exist
            broker.publish_many(topic, [_message(i) for i in range(20)])
            broker.publish_many(topic, [_message(20, priority=5)])  # stamped last, handed out first
            ids: list[int] = []
            with QueueDataset(
                broker, topic, group="g", schema=SCHEMA, batch_size=6, idle_timeout_s=2.0, feed=feed
            ) as ds:
                for batch in ds:
                    ids += [int(i) for i in batch["id"]]
            assert ids[0] == 20
            assert sorted(ids) == list(range(21))
            assert broker.describe_topic(topic).depth == 0  # every message acked
        finally:
            broker.delete_topic(topic)
