"""Consumer groups: one member per message, every group sees everything, where a new group starts."""

from __future__ import annotations

import time

import pytest

from infeed.brokers import Broker
from infeed.types import Capability

from .helpers import WAIT_S, assert_nothing_more, drain, numbered, payloads, require


def test_each_message_goes_to_one_member(broker: Broker, topic: str) -> None:
    broker.create_topic(topic, partitions=2 if Capability.PARTITIONS in broker.capabilities else 1)
    sent = set(numbered(400))
    a = broker.subscribe(topic, group="g")
    b = broker.subscribe(topic, group="g")
    broker.publish_many(topic, sorted(sent))
    seen_a: list[bytes] = []
    seen_b: list[bytes] = []
    deadline = time.monotonic() + WAIT_S
    while len(seen_a) + len(seen_b) < len(sent):
        if time.monotonic() > deadline:
            pytest.fail(f"only {len(seen_a) + len(seen_b)} of {len(sent)} messages arrived")
        for consumer, seen in ((a, seen_a), (b, seen_b)):
            batch = consumer.receive(max_messages=25, timeout_s=0.2)
            consumer.ack(batch)
            seen.extend(d.payload for d in batch)
    assert not set(seen_a) & set(seen_b), "a message went to two members of one group"
    assert set(seen_a) | set(seen_b) == sent
    assert len(seen_a) + len(seen_b) == len(sent)


def test_every_group_gets_every_message(broker: Broker, topic: str) -> None:
    sent = numbered(100)
    g1 = broker.subscribe(topic, group="g1")
    g2 = broker.subscribe(topic, group="g2")
    broker.publish_many(topic, sent)
    assert sorted(payloads(drain(g1, 100))) == sent
    assert sorted(payloads(drain(g2, 100))) == sent


def test_new_group_starts_where_asked(broker: Broker, topic: str) -> None:
    require(broker, Capability.REPLAY)
    broker.create_topic(topic, partitions=1)
    broker.publish_many(topic, [b"old-1", b"old-2"])
    earliest = broker.subscribe(topic, group="from-start", start="earliest")
    latest = broker.subscribe(topic, group="from-end", start="latest")
    broker.publish(topic, b"new")
    assert payloads(drain(earliest, 3)) == [b"old-1", b"old-2", b"new"]
    assert payloads(drain(latest, 1)) == [b"new"]
    assert_nothing_more(latest)


def test_group_state_survives_consumer_close(broker: Broker, topic: str) -> None:
    first = broker.subscribe(topic, group="g")
    broker.publish_many(topic, numbered(10))
    assert payloads(drain(first, 4, max_messages=4)) == numbered(10)[:4]
    first.close()
    second = broker.subscribe(topic, group="g")
    assert payloads(drain(second, 6)) == numbered(10)[4:]
