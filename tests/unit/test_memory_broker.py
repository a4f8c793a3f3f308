"""memory:// specifics the contract suite does not reach: mixed stale nacks, retention, closed use."""

from __future__ import annotations

import pytest

from infeed.brokers.memory import MemoryBroker
from infeed.errors import BrokerError, LeaseLostError


def test_mixed_stale_and_valid_nack_still_requeues_the_valid_ones() -> None:
    broker = MemoryBroker.from_url("memory://?ack_timeout_s=0.05")
    broker.create_topic("t", partitions=1)
    consumer = broker.subscribe("t", group="g")
    other = broker.subscribe("t", group="g")
    broker.publish("t", b"a")
    (stale,) = consumer.receive(max_messages=1, timeout_s=1)
    (taken,) = other.receive(max_messages=1, timeout_s=1)  # "a" again, once its lease ran out
    assert (taken.payload, taken.delivery_count) == (b"a", 2)
    other.ack(taken)
    broker.publish("t", b"b")
    (valid,) = consumer.receive(max_messages=1, timeout_s=1)
    assert valid.payload == b"b"
    with pytest.raises(LeaseLostError):
        consumer.nack([stale, valid], requeue=True)
    (again,) = consumer.receive(max_messages=1, timeout_s=1)
    assert (again.payload, again.delivery_count) == (b"b", 2)


def test_trim_by_age_count_and_commit() -> None:
    broker = MemoryBroker()
    broker.create_topic("t", partitions=1)
    consumer = broker.subscribe("t", group="g")
    broker.publish_many("t", [bytes([i]) for i in range(10)])
    assert broker.trim("t", committed=False, max_messages=8) == 2
    got = consumer.receive(max_messages=3, timeout_s=1)
    consumer.commit(got[-1].next_position)
    assert broker.trim("t") == 3
    assert broker.trim("t", committed=False, max_age_s=0.0) == 5
    assert broker.describe_topic("t").depth == 0


def test_trim_refuses_negative_limits_and_drops_nothing() -> None:
    broker = MemoryBroker()
    broker.publish_many("t", [b"a", b"b"])
    with pytest.raises(ValueError, match="max_messages must be >= 0"):
        broker.trim("t", committed=False, max_messages=-1)
    with pytest.raises(ValueError, match="max_age_s must be >= 0"):
        broker.trim("t", committed=False, max_age_s=float("nan"))
    assert broker.describe_topic("t").depth == 2


def test_closed_broker_and_bad_assignment_are_refused() -> None:
    broker = MemoryBroker()
    with pytest.raises(ValueError, match="at least one partition"):
        broker.subscribe("t", group="g", partitions=[])
    broker.close()
    with pytest.raises(BrokerError, match="closed"):
        broker.list_topics()
