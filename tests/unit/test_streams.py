"""Producer batching and StreamConsumer decoding / dead-lettering, on the in-process broker."""

from __future__ import annotations

import numpy as np
import pytest

from infeed.brokers.base import DLQ_HEADER_REASON
from infeed.brokers.memory import MemoryBroker
from infeed.codecs import Field, RecordBatch, Schema, decode_message, default_registry
from infeed.streams import Producer, StreamConsumer

SCHEMA = Schema({"x": Field("float32", (4,)), "y": Field("int64", ())})


def sample(i: int) -> dict[str, object]:
    return {"x": np.full(4, i, dtype=np.float32), "y": np.int64(i)}


def test_records_are_packed_into_batches_and_flushed() -> None:
    broker = MemoryBroker()
    consumer = StreamConsumer(broker.subscribe("s", group="g"), schema=SCHEMA)
    with Producer(broker, "s", records_per_message=8, messages_per_publish=2) as producer:
        producer.send_many(sample(i) for i in range(21))
        assert producer.messages_sent == 2  # two full messages went out as one publish
    assert (producer.records_sent, producer.messages_sent) == (21, 3)
    assert producer.bytes_sent > 21 * 4 * 4
    received = consumer.receive(max_messages=10, timeout_s=1)
    assert [len(r.batch) for r in received] == [8, 8, 5]
    ys = np.concatenate([r.batch.columns["y"] for r in received])
    assert ys.tolist() == list(range(21))
    assert received[0].batch.columns["x"].shape == (8, 4)


def test_single_records_with_keys() -> None:
    broker = MemoryBroker()
    broker.create_topic("s", partitions=4)
    consumer = StreamConsumer(broker.subscribe("s", group="g"))
    with Producer(broker, "s", key=lambda r: str(r["y"])) as producer:
        producer.send_many(sample(i) for i in range(8))
    got = consumer.receive(max_messages=10, timeout_s=1)
    assert sorted(int(r.batch.columns["y"][0]) for r in got) == list(range(8))
    assert {r.delivery.key for r in got} == {str(i).encode() for i in range(8)}


def test_producer_refuses_bad_records_before_sending() -> None:
    broker = MemoryBroker()
    producer = Producer(broker, "s", schema=SCHEMA)
    with pytest.raises(ValueError, match="x"):
        producer.send({"x": [1.0, 2.0], "y": 1})
    with pytest.raises(ValueError, match="records_per_message"):
        Producer(broker, "s", records_per_message=0)


def test_poison_is_dead_lettered_and_the_rest_flows() -> None:
    broker = MemoryBroker()
    consumer = StreamConsumer(broker.subscribe("s", group="g"), schema=SCHEMA)
    dlq = broker.subscribe("s.dlq", group="inspect")
    good = [sample(i) for i in range(3)]
    bad_nan = {"x": np.array([np.nan, 0, 0, 0], dtype=np.float32), "y": np.int64(99)}
    with Producer(broker, "s", records_per_message=4) as producer:
        producer.send_many([*good, bad_nan])
    broker.publish("s", b"\xc1 not msgpack")
    received = consumer.receive(max_messages=10, timeout_s=1)
    assert len(received) == 1
    assert received[0].batch.columns["y"].tolist() == [0, 1, 2]
    assert received[0].indices == (0, 1, 2)
    assert received[0].index_in_message(2) == 2
    assert consumer.dead_lettered == 2
    dead = dlq.receive(max_messages=10, timeout_s=1)
    reasons = sorted(d.headers[DLQ_HEADER_REASON] for d in dead)
    assert any("record 3" in r and "x" in r for r in reasons), reasons
    assert any(r.startswith("undecodable") for r in reasons), reasons
    record_copy = next(d for d in dead if "x-infeed-dlq-record" in d.headers)
    back = decode_message(record_copy.payload, record_copy.headers, default_registry())
    assert back.columns["y"].tolist() == [99]
    consumer.ack(received)


def test_batch_send_splits_into_messages() -> None:
    broker = MemoryBroker()
    raw = broker.subscribe("s", group="g")
    batch = RecordBatch.from_records([sample(i) for i in range(10)])
    with Producer(broker, "s", records_per_message=4) as producer:
        producer.send_batch(batch)
    sizes = [d.headers.get("x-infeed-records") for d in raw.receive(max_messages=10, timeout_s=1)]
    assert sizes == ["4", "4", "2"]
