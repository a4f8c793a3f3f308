"""Ack and commit kept apart; redelivery; nack to requeue or dead-letter; seek and replay."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from infeed.brokers import Broker, Consumer, Message, dead_letter_topic
from infeed.brokers.base import DLQ_HEADER_COUNT, DLQ_HEADER_OFFSET, DLQ_HEADER_REASON, DLQ_HEADER_TOPIC
from infeed.errors import LeaseLostError
from infeed.types import Capability, Delivery, Position

from .backends import ACK_TIMEOUT_S
from .helpers import WAIT_S, assert_nothing_more, drain, numbered, payloads, require


def test_ack_does_not_commit(broker: Broker, topic: str) -> None:
    require(broker, Capability.OFFSET_COMMIT)
    consumer = broker.subscribe(topic, group="g")
    broker.publish_many(topic, numbered(5))
    drain(consumer, 5, ack=True)
    assert consumer.committed() == {}


def test_commit_does_not_ack(broker: Broker, topic: str) -> None:
    require(broker, Capability.OFFSET_COMMIT, Capability.REDELIVERY)
    broker.create_topic(topic, partitions=1)
    consumer = broker.subscribe(topic, group="g")
    broker.publish_many(topic, numbered(5))
    got = drain(consumer, 5, ack=False)
    consumer.commit(got[-1].next_position)
    assert consumer.committed() == {0: got[-1].next_position}
    consumer.close()  # unacked deliveries go back to the group, committed or not
    again = broker.subscribe(topic, group="g")
    redelivered = drain(again, 5, timeout_s=ACK_TIMEOUT_S + 20)
    assert payloads(redelivered) == numbered(5)
    assert all(d.delivery_count == 2 for d in redelivered)


def test_commit_is_durable_across_connections(open_broker: Callable[[], Broker], topic: str) -> None:
    first = open_broker()
    require(first, Capability.OFFSET_COMMIT, Capability.MULTI_PROCESS)
    first.create_topic(topic, partitions=1)
    consumer = first.subscribe(topic, group="g")
    first.publish_many(topic, numbered(3))
    got = drain(consumer, 3)
    consumer.commit([got[1].next_position])
    consumer.close()
    first.close()
    second = open_broker()
    assert second.subscribe(topic, group="g").committed() == {
        0: Position(topic, 0, got[1].next_position.offset)
    }
    info = second.describe_topic(topic)
    (group,) = [g for g in info.groups if g.name == "g"]
    assert group.committed[0] == got[1].next_position.offset
    assert group.lag[0] == 1


def test_unacked_delivery_is_redelivered_after_ack_timeout(broker: Broker, topic: str) -> None:
    require(broker, Capability.REDELIVERY)
    holder = broker.subscribe(topic, group="g")
    broker.publish(topic, b"slow")
    (first,) = drain(holder, 1, ack=False)
    other = broker.subscribe(topic, group="g")
    (second,) = drain(other, 1, timeout_s=ACK_TIMEOUT_S + 20, ack=False)
    assert second.payload == b"slow"
    assert second.position == first.position
    assert second.delivery_count == 2
    with pytest.raises(LeaseLostError) as lost:
        holder.ack(first)
    assert lost.value.positions == (first.position,)
    other.ack(second)
    assert_nothing_more(other, wait_s=ACK_TIMEOUT_S + 0.5)


def test_nack_requeue_delivers_again(broker: Broker, topic: str) -> None:
    consumer = broker.subscribe(topic, group="g")
    broker.publish_many(topic, [b"a", b"b"])
    got = drain(consumer, 2, ack=False)
    consumer.nack(got[0], requeue=True)
    consumer.ack(got[1])
    (again,) = drain(consumer, 1)
    assert again.payload == b"a"
    assert again.delivery_count == 2
    assert_nothing_more(consumer)


def test_nack_dead_letters_with_reason(broker: Broker, topic: str) -> None:
    require(broker, Capability.DEAD_LETTER)
    consumer = broker.subscribe(topic, group="g")
    broker.publish(topic, b"poison", key=b"k", headers={"h": "v"})
    dlq = broker.subscribe(dead_letter_topic(topic), group="inspect")
    (d,) = drain(consumer, 1, ack=False)
    consumer.nack(d, requeue=False, reason="shape (3,) != (784,)")
    assert_nothing_more(consumer)
    (dead,) = drain(dlq, 1)
    assert dead.payload == b"poison"
    assert dead.headers["h"] == "v"
    assert dead.headers[DLQ_HEADER_REASON] == "shape (3,) != (784,)"
    assert dead.headers[DLQ_HEADER_TOPIC] == topic
    assert dead.headers[DLQ_HEADER_OFFSET] == str(d.position.offset)
    assert dead.headers[DLQ_HEADER_COUNT] == "1"


def test_seek_replays_from_a_saved_position(broker: Broker, topic: str) -> None:
    require(broker, Capability.SEEK, Capability.REPLAY)
    broker.create_topic(topic, partitions=1)
    sent = numbered(20)
    consumer = broker.subscribe(topic, group="g")
    broker.publish_many(topic, sent)
    got = drain(consumer, 20)
    saved = got[7].position
    consumer.seek(saved)
    replay = drain(consumer, 13)
    assert payloads(replay) == sent[7:]
    assert_nothing_more(consumer)
    # a second connection (a restarted process) seeks to the saved position too
    other = broker.subscribe(topic, group="other")
    other.seek(Position.from_json(saved.to_json()))
    assert payloads(drain(other, 13)) == sent[7:]


def test_seek_forward_skips(broker: Broker, topic: str) -> None:
    require(broker, Capability.SEEK, Capability.REPLAY)
    broker.create_topic(topic, partitions=1)
    broker.publish_many(topic, numbered(10))
    positions = [d.position for d in drain(broker.subscribe(topic, group="scout"), 10)]
    consumer = broker.subscribe(topic, group="g")
    consumer.seek(positions[6])
    assert payloads(drain(consumer, 4)) == numbered(10)[6:]
    assert_nothing_more(consumer)


def _drain_acked(consumer: Consumer, count: int, *, timeout_s: float) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got += consumer.receive_acked(max_messages=count - len(got), timeout_s=1.0)
    assert len(got) == count, f"received {len(got)} of {count} messages within {timeout_s}s"
    return got


def test_receive_acked_hands_out_in_order_and_acks(broker: Broker, topic: str) -> None:
    broker.create_topic(topic, partitions=1)
    consumer = broker.subscribe(topic, group="g")
    broker.publish_many(topic, numbered(20))
    got = _drain_acked(consumer, 20, timeout_s=WAIT_S)
    assert payloads(got) == numbered(20)
    assert [d.delivery_count for d in got] == [1] * 20
    assert_nothing_more(consumer, wait_s=ACK_TIMEOUT_S + 0.5)  # no lease ran out: nothing comes back
    consumer.close()
    assert_nothing_more(broker.subscribe(topic, group="g"), wait_s=ACK_TIMEOUT_S + 0.5)


def test_receive_acked_takes_a_redelivery(broker: Broker, topic: str) -> None:
    require(broker, Capability.REDELIVERY)
    consumer = broker.subscribe(topic, group="g")
    broker.publish(topic, b"slow")
    (first,) = drain(consumer, 1, ack=False)
    (again,) = _drain_acked(consumer, 1, timeout_s=ACK_TIMEOUT_S + 20)
    assert again.payload == b"slow"
    assert again.position == first.position
    assert again.delivery_count == 2
    assert_nothing_more(consumer, wait_s=ACK_TIMEOUT_S + 0.5)


def test_receive_acked_over_partitions_keeps_each_order_and_the_bound(broker: Broker, topic: str) -> None:
    require(broker, Capability.PARTITIONS)
    broker.create_topic(topic, partitions=4)
    consumer = broker.subscribe(topic, group="g")
    broker.publish_many(
        topic, [Message(f"p{p}-{i:03d}".encode(), partition=p) for i in range(30) for p in range(4)]
    )
    got: list[Delivery] = []
    deadline = time.monotonic() + WAIT_S
    while len(got) < 120 and time.monotonic() < deadline:
        batch = consumer.receive_acked(max_messages=3, timeout_s=1.0)
        assert len(batch) <= 3
        got += batch
    assert len(got) == 120, f"received {len(got)} of 120 messages within {WAIT_S}s"
    for p in range(4):
        assert [d.payload for d in got if d.partition == p] == [f"p{p}-{i:03d}".encode() for i in range(30)]
    consumer.close()
    assert_nothing_more(broker.subscribe(topic, group="g"), wait_s=ACK_TIMEOUT_S + 0.5)


def test_receive_acked_waits_for_a_message(open_broker: Callable[[], Broker], topic: str) -> None:
    broker, publisher = open_broker(), open_broker()
    require(broker, Capability.MULTI_PROCESS)  # the publisher is another connection
    broker.create_topic(topic, partitions=1)
    consumer = broker.subscribe(topic, group="g")
    late = threading.Timer(0.5, publisher.publish, args=(topic, b"late"))
    late.start()
    try:
        got = consumer.receive_acked(max_messages=10, timeout_s=WAIT_S)
    finally:
        late.join()
    assert payloads(got) == [b"late"]
    assert_nothing_more(consumer, wait_s=ACK_TIMEOUT_S + 0.5)
