"""Payload limits, admin operations, close and reopen."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from infeed.brokers import Broker, Message
from infeed.errors import PayloadTooLargeError, TopicNotFoundError
from infeed.types import Capability

from .helpers import assert_nothing_more, drain, numbered, payloads, require


def test_payload_over_limit_is_refused_and_nothing_written(broker: Broker, topic: str) -> None:
    broker.create_topic(topic, partitions=1)
    consumer = broker.subscribe(topic, group="g")
    limit = broker.max_payload_bytes
    with pytest.raises(PayloadTooLargeError, match=str(limit)):
        broker.publish(topic, b"x" * (limit + 1))
    with pytest.raises(PayloadTooLargeError):
        broker.publish_many(topic, [b"ok-1", Message(b"y" * (limit + 1)), b"ok-2"])
    assert broker.describe_topic(topic).depth == 0
    assert_nothing_more(consumer)
    broker.publish(topic, b"after")
    assert payloads(drain(consumer, 1)) == [b"after"]


def test_payload_at_a_realistic_size_round_trips(broker: Broker, topic: str) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB
    assert len(big) <= broker.max_payload_bytes
    consumer = broker.subscribe(topic, group="g")
    broker.publish(topic, big)
    (d,) = drain(consumer, 1)
    assert d.payload == big


def test_payload_at_the_limit_arrives_whole_between_small_ones(broker: Broker, topic: str) -> None:
    """A message as large as allowed is fetched whole, in order (Kafka: larger than a partition fetch)."""
    limit = broker.max_payload_bytes
    big = bytes(range(256)) * (limit // 256) + b"z" * (limit % 256)
    consumer = broker.subscribe(topic, group="g")
    broker.publish_many(topic, [b"before", big, b"after"])
    assert payloads(drain(consumer, 3)) == [b"before", big, b"after"]


def test_admin_create_describe_list_delete(broker: Broker, topic: str) -> None:
    partitions = 3 if Capability.PARTITIONS in broker.capabilities else 1
    broker.create_topic(topic, partitions=partitions)
    broker.create_topic(topic, partitions=partitions)  # idempotent
    broker.subscribe(topic, group="g").close()
    assert topic in broker.list_topics()
    broker.publish_many(topic, numbered(9))
    info = broker.describe_topic(topic)
    assert info.name == topic
    assert len(info.partitions) == partitions
    assert info.depth == 9
    broker.delete_topic(topic)
    assert topic not in broker.list_topics()
    with pytest.raises(TopicNotFoundError):
        broker.describe_topic(topic)
    with pytest.raises(TopicNotFoundError):
        broker.delete_topic(topic)


def test_describe_reports_lag_per_group(broker: Broker, topic: str) -> None:
    require(broker, Capability.OFFSET_COMMIT)
    broker.create_topic(topic, partitions=1)
    consumer = broker.subscribe(topic, group="g")
    broker.publish_many(topic, numbered(10))
    got = drain(consumer, 4, max_messages=4)
    consumer.commit(got[-1].next_position)
    (group,) = [g for g in broker.describe_topic(topic).groups if g.name == "g"]
    assert group.lag == {0: 6}
    assert group.total_lag == 6


def test_close_and_reopen_keeps_messages(open_broker: Callable[[], Broker], topic: str) -> None:
    first = open_broker()
    require(first, Capability.MULTI_PROCESS)
    consumer = first.subscribe(topic, group="g")
    first.publish_many(topic, numbered(5))
    drain(consumer, 2, max_messages=2)
    consumer.close()
    first.close()
    first.close()  # idempotent
    second = open_broker()
    assert payloads(drain(second.subscribe(topic, group="g"), 3)) == numbered(5)[2:]


def test_bad_arguments_are_named(broker: Broker, topic: str) -> None:
    with pytest.raises(ValueError, match="topic"):
        broker.publish("bad topic/name", b"x")
    with pytest.raises(TypeError, match="payload"):
        broker.publish(topic, "not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_messages"):
        broker.subscribe(topic, group="g").receive(max_messages=0)
