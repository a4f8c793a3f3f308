"""What ``pulsar://`` offers beyond the contract: subscription types, cumulative acks, the
dead-letter policy (``max_deliveries``) and seeks to a message inside a batch entry."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any, cast
from urllib.parse import urlencode

import pytest

from infeed.brokers import Consumer, Message, connect
from infeed.brokers.base import DLQ_HEADER_COUNT, DLQ_HEADER_REASON
from infeed.errors import UnsupportedOperationError
from infeed.types import Delivery
from tests.support import broker_url

pytestmark = pytest.mark.needs_broker("pulsar")

#: Upper bound for waiting on messages known to be there.
WAIT_S = 20.0


def _url(**options: object) -> str:
    query = urlencode({"admin_url": broker_url("pulsar", "admin"), "ack_timeout_s": 2, **options})
    return f"{broker_url('pulsar')}?{query}"


@pytest.fixture
def topic() -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield name
    with connect(_url()) as broker:
        for t in (name, f"{name}.dlq"):
            if t in broker.list_topics():
                broker.delete_topic(t)


def _receive(consumer: Consumer, count: int, *, ack: bool = False) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + WAIT_S
    while len(got) < count:
        assert time.monotonic() < deadline, f"received {len(got)} of {count} within {WAIT_S}s"
        batch = consumer.receive(max_messages=count - len(got), timeout_s=1.0)
        if ack and batch:
            consumer.ack(batch)
        got.extend(batch)
    return got


def _numbered(n: int) -> list[bytes]:
    return [f"m-{i:03d}".encode() for i in range(n)]


def test_failover_cumulative_ack_settles_everything_before(topic: str) -> None:
    with connect(_url(subscription_type="failover")) as broker:
        broker.create_topic(topic, partitions=1)
        consumer = broker.subscribe(topic, group="g")
        broker.publish_many(topic, _numbered(10))
        got = _receive(consumer, 10)
        cast(Any, consumer).ack_cumulative(got[5])  # a Pulsar-only method
        consumer.close()  # the 4 after it go back unacked
        again = broker.subscribe(topic, group="g")
        rest = _receive(again, 4, ack=True)
        assert [d.payload for d in rest] == _numbered(10)[6:]
        assert [d.position for d in rest] == [d.position for d in got[6:]]
        assert again.receive(max_messages=10, timeout_s=0.5) == []


def test_cumulative_ack_needs_a_failover_subscription(topic: str) -> None:
    with connect(_url()) as broker:
        broker.create_topic(topic, partitions=1)
        consumer = broker.subscribe(topic, group="g")
        broker.publish(topic, b"one")
        (d,) = _receive(consumer, 1)
        with pytest.raises(UnsupportedOperationError, match="subscription_type=failover"):
            cast(Any, consumer).ack_cumulative(d)
        consumer.ack(d)


def test_key_shared_gives_each_key_to_one_member_in_order(topic: str) -> None:
    with connect(_url(subscription_type="key_shared", receiver_queue_size=10)) as broker:
        broker.create_topic(topic, partitions=1)
        members = [broker.subscribe(topic, group="g") for _ in range(2)]
        for m in members:  # open both Pulsar consumers before anything is published
            assert m.receive(max_messages=1, timeout_s=0.1) == []
        keys = [f"k{i}" for i in range(8)]
        sent = [(keys[i % len(keys)], f"{i:03d}".encode()) for i in range(80)]
        broker.publish_many(topic, [Message(p, k) for k, p in sent])
        by_member: list[list[Delivery]] = [[], []]
        deadline = time.monotonic() + WAIT_S
        while sum(map(len, by_member)) < len(sent):
            assert time.monotonic() < deadline, f"received {sum(map(len, by_member))} of {len(sent)}"
            for i, m in enumerate(members):
                batch = m.receive(max_messages=7, timeout_s=0.2)
                if batch:
                    m.ack(batch)
                by_member[i].extend(batch)
        owners: dict[bytes | None, set[int]] = {}
        for i, got in enumerate(by_member):
            for d in got:
                owners.setdefault(d.key, set()).add(i)
        assert all(len(who) == 1 for who in owners.values()), owners
        for got in by_member:  # per key, in publish order
            for key in {d.key for d in got}:
                mine = [d.payload for d in got if d.key == key]
                assert mine == sorted(mine)
        assert sorted(d.payload for got in by_member for d in got) == sorted(p for _, p in sent)


def test_max_deliveries_dead_letters_with_the_count(topic: str) -> None:
    with connect(_url(max_deliveries=2)) as broker:
        broker.create_topic(topic, partitions=1)
        consumer = broker.subscribe(topic, group="g")
        dlq = broker.subscribe(f"{topic}.dlq", group="inspect")
        broker.publish(topic, b"poison", key="k")
        for expected in (1, 2):
            (d,) = _receive(consumer, 1)
            assert d.delivery_count == expected
            consumer.nack(d)
        assert consumer.receive(max_messages=1, timeout_s=1.5) == []
        (dead,) = _receive(dlq, 1, ack=True)
        assert dead.payload == b"poison" and dead.key == b"k"
        assert dead.headers[DLQ_HEADER_COUNT] == "2"
        assert "max_deliveries=2" in dead.headers[DLQ_HEADER_REASON]
        assert consumer.receive(max_messages=1, timeout_s=0.5) == []


def test_seek_to_a_message_inside_a_batch(topic: str) -> None:
    with connect(_url(batching=True, batching_max_delay_s=0.05)) as broker:
        broker.create_topic(topic, partitions=1)
        consumer = broker.subscribe(topic, group="g")
        broker.publish_many(topic, _numbered(10))
        got = _receive(consumer, 10, ack=True)
        assert len({d.position.offset >> 20 for d in got}) < 10, "no batch entry was written"
        consumer.seek(got[6].position)
        again = _receive(consumer, 4, ack=True)
        assert [d.payload for d in again] == _numbered(10)[6:]
        assert [d.position for d in again] == [d.position for d in got[6:]]
        assert consumer.receive(max_messages=10, timeout_s=0.5) == []
