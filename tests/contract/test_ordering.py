"""FIFO per partition, key stickiness, headers and keys intact."""

from __future__ import annotations

from collections import defaultdict

from infeed.brokers import Broker, Message
from infeed.types import Capability

from .helpers import assert_nothing_more, drain, numbered, payloads, require


def test_fifo_single_partition(broker: Broker, topic: str) -> None:
    broker.create_topic(topic, partitions=1)
    consumer = broker.subscribe(topic, group="g")
    sent = numbered(300)
    broker.publish_many(topic, sent[:200])
    for p in sent[200:]:
        broker.publish(topic, p)
    got = drain(consumer, 300)
    assert payloads(got) == sent
    offsets = [d.position.offset for d in got]
    assert offsets == sorted(offsets) and len(set(offsets)) == 300
    assert all(d.delivery_count == 1 for d in got)
    assert_nothing_more(consumer)


def test_key_sticks_to_partition_and_keeps_order(broker: Broker, topic: str) -> None:
    require(broker, Capability.PARTITIONS)
    broker.create_topic(topic, partitions=4)
    consumer = broker.subscribe(topic, group="g")
    msgs = [Message(f"{k}:{i}".encode(), key=f"key-{k}") for i in range(40) for k in range(10)]
    broker.publish_many(topic, msgs)
    got = drain(consumer, len(msgs))
    partitions_of_key: dict[bytes, set[int]] = defaultdict(set)
    seq_of_key: dict[bytes, list[int]] = defaultdict(list)
    for d in got:
        assert d.key is not None
        partitions_of_key[d.key].add(d.partition)
        seq_of_key[d.key].append(int(d.payload.split(b":")[1]))
    assert all(len(p) == 1 for p in partitions_of_key.values()), partitions_of_key
    assert len({p for ps in partitions_of_key.values() for p in ps}) > 1, "keys all hashed to one partition"
    for key, seq in seq_of_key.items():
        assert seq == list(range(40)), f"order broken for {key!r}"


def test_explicit_partition_and_assignment(broker: Broker, topic: str) -> None:
    require(broker, Capability.PARTITIONS)
    broker.create_topic(topic, partitions=3)
    only_two = broker.subscribe(topic, group="g", partitions=[2])
    broker.publish_many(
        topic, [Message(f"p{p}-{i}".encode(), partition=p) for i in range(5) for p in range(3)]
    )
    got = drain(only_two, 5)
    assert [d.partition for d in got] == [2] * 5
    assert payloads(got) == [f"p2-{i}".encode() for i in range(5)]
    assert_nothing_more(only_two)


def test_headers_key_and_metadata_round_trip(broker: Broker, topic: str) -> None:
    consumer = broker.subscribe(topic, group="g")
    broker.publish(topic, b"\x00binary\xff", key=b"k\x00", headers={"codec": "msgpack", "trace": "abc"})
    (d,) = drain(consumer, 1)
    assert d.payload == b"\x00binary\xff"
    assert d.key == b"k\x00"
    assert dict(d.headers) == {"codec": "msgpack", "trace": "abc"}
    assert d.topic == topic
    assert d.timestamp > 1.6e9
    assert d.next_position.offset > d.position.offset


def test_empty_topic_receive_times_out_empty(broker: Broker, topic: str) -> None:
    consumer = broker.subscribe(topic, group="g")
    assert consumer.receive(max_messages=10, timeout_s=0.2) == []
