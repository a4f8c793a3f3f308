"""``Scorer``: topic-to-topic scoring on memory:// and sqlite://, restarts and crashes in process."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from infeed.brokers import Broker, connect
from infeed.brokers.base import DLQ_HEADER_REASON, dead_letter_topic
from infeed.brokers.memory import MemoryBroker
from infeed.codecs import (
    Field,
    MsgpackCodec,
    RecordBatch,
    Schema,
    decode_message,
    default_registry,
    encode_message,
)
from infeed.errors import ConfigError, UnsupportedOperationError
from infeed.inference import BatchConfig, ModelRegistry, ScoreConfig, Scorer
from infeed.inference._frontier import FRONTIER_HEADER, decode_frontier
from infeed.types import Capability
from tests.inference_models import POISON, publish_probe

CODEC = MsgpackCodec()
FAST = ScoreConfig(batch=BatchConfig(max_batch_size=4), id_field="id", events_topic=None, max_messages=4)


@pytest.fixture(params=["memory", "sqlite"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/q.db"
    with connect(url) as b:
        yield b


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "reg")
    publish_probe(reg, "m", 1, 2.0)
    return reg


def produce(broker: Broker, ids: range, *, per_message: int = 1, topic: str = "in") -> None:
    """Publish samples ``{"id", "x": id * ones(4)}``, ``per_message`` to a message."""
    for start in range(ids.start, ids.stop, per_message):
        chunk = np.arange(start, min(start + per_message, ids.stop))
        if per_message == 1:
            broker.publish(topic, CODEC.encode({"id": int(chunk[0]), "x": np.full(4, chunk[0], np.float32)}))
            continue
        x = np.repeat(chunk.astype(np.float32)[:, None], 4, axis=1)
        payload, headers = encode_message(CODEC, RecordBatch({"id": chunk.astype(np.int64), "x": x}))
        broker.publish(topic, payload, headers=headers)


def drain(scorer: Scorer) -> int:
    total = 0
    while n := scorer.run_once(timeout_s=0.2):
        total += n
    return total


def read_scores(broker: Broker, topic: str = "out") -> list[dict[str, Any]]:
    """Every output record, in order, with its message's headers."""
    consumer = broker.subscribe(topic, group="check", start="earliest")
    out: list[dict[str, Any]] = []
    try:
        while got := consumer.receive(max_messages=500, timeout_s=0.3):
            for d in got:
                batch = decode_message(d.payload, d.headers, default_registry())
                out += [dict(batch.record(i), headers=d.headers) for i in range(len(batch))]
            consumer.ack(got)
    finally:
        consumer.close()
    return out


def test_scores_records_and_record_batches(broker: Broker, registry: ModelRegistry) -> None:
    produce(broker, range(5))
    produce(broker, range(5, 17), per_message=4)
    with Scorer(broker, registry, "m", in_topic="in", out_topic="out", config=FAST) as scorer:
        assert scorer.run_once(timeout_s=1.0) == 4  # a batch is 4 rows, here 4 messages
        assert scorer.frontier == {0: 4}
        assert drain(scorer) == 13
        assert scorer.frontier == {0: 8}
    scores = read_scores(broker)
    assert [int(s["id"]) for s in scores] == list(range(17))
    for s in scores:
        np.testing.assert_array_equal(s["output"], np.full(4, 2.0 * s["id"], np.float32))
        assert s["model_version"] == 1
    assert [(s["input"], int(s["record"])) for s in scores[5:9]] == [("in:0:5", i) for i in range(4)]
    topic, offsets = decode_frontier(scores[-1]["headers"][FRONTIER_HEADER])
    assert (topic, offsets) == ("in", {0: 8})


def test_restart_resumes_from_the_output_topic(broker: Broker, registry: ModelRegistry) -> None:
    produce(broker, range(20))
    with Scorer(broker, registry, "m", in_topic="in", out_topic="out", config=FAST) as scorer:
        assert scorer.run_once(timeout_s=1.0) > 0
        first = scorer.frontier
    produce(broker, range(20, 25))
    with Scorer(broker, registry, "m", in_topic="in", out_topic="out", config=FAST) as scorer:
        assert scorer.frontier == first
        drain(scorer)
    assert sorted(int(s["id"]) for s in read_scores(broker)) == list(range(25))


class _DiesAfterPublish(Scorer):
    """Stands for a process killed after its outputs were published and before it acked."""

    def _settle(self, items: Any) -> None:
        raise RuntimeError("killed")


def test_death_between_publish_and_ack_duplicates_nothing(tmp_path: Path, registry: ModelRegistry) -> None:
    url = f"sqlite:///{tmp_path}/q.db?ack_timeout_s=0.3"
    with connect(url) as dead, connect(url) as b:  # ``dead`` is left as a killed process leaves it
        produce(b, range(12))
        dying = _DiesAfterPublish(dead, registry, "m", in_topic="in", out_topic="out", config=FAST)
        with pytest.raises(RuntimeError):
            dying.run_once(timeout_s=1.0)  # its leases stay until they time out
        with Scorer(b, registry, "m", in_topic="in", out_topic="out", config=FAST) as scorer:
            assert scorer.frontier == {0: 4}
            drain(scorer)
            for _ in range(20):  # the dead one's leases run out: redelivered, then skipped
                if scorer.skipped:
                    break
                scorer.run_once(timeout_s=0.5)
            assert scorer.skipped == 4
            drain(scorer)
        assert Counter(int(s["id"]) for s in read_scores(b)) == Counter(range(12))


def test_bad_records_and_model_failures_are_dead_lettered(broker: Broker, registry: ModelRegistry) -> None:
    schema = Schema({"id": Field("int64"), "x": Field("float32", (4,))})
    produce(broker, range(3))
    broker.publish("in", CODEC.encode({"id": 3, "x": np.full(4, POISON, np.float32)}))
    broker.publish("in", CODEC.encode({"id": 4, "x": np.zeros(3, np.float32)}))  # fails the schema
    produce(broker, range(5, 8))
    config = ScoreConfig(id_field="id", events_topic=None, schema=schema)
    with Scorer(broker, registry, "m", in_topic="in", out_topic="out", config=config) as scorer:
        assert drain(scorer) == 6
        assert scorer.frontier == {0: 8}
    assert [int(s["id"]) for s in read_scores(broker)] == [0, 1, 2, 5, 6, 7]
    dlq = broker.subscribe(dead_letter_topic("in"), group="check").receive(max_messages=10, timeout_s=0.5)
    reasons = sorted(d.headers[DLQ_HEADER_REASON] for d in dlq)
    assert len(reasons) == 2 and "poison input" in reasons[0] and "record 0" in reasons[1]


def test_pinned_version_and_missing_input_field(broker: Broker, registry: ModelRegistry) -> None:
    publish_probe(registry, "m", 2, 3.0)
    produce(broker, range(2))
    config = ScoreConfig(events_topic=None, version=1, inputs=("x",))
    with Scorer(broker, registry, "m", in_topic="in", out_topic="out", config=config) as scorer:
        drain(scorer)
    assert [int(s["model_version"]) for s in read_scores(broker)] == [1, 1]
    broker.publish("in", CODEC.encode({"id": 9, "y": np.ones(4, np.float32)}))
    with Scorer(broker, registry, "m", in_topic="in", out_topic="out", config=config) as scorer:
        drain(scorer)
        assert scorer.dead_lettered == 1


class _NoSeek(MemoryBroker):
    capabilities: ClassVar[frozenset[Capability]] = MemoryBroker.capabilities - {Capability.SEEK}


def test_refuses_a_broker_without_seek(registry: ModelRegistry) -> None:
    with _NoSeek.from_url("memory://") as b, pytest.raises(UnsupportedOperationError, match="SEEK"):
        Scorer(b, registry, "m", in_topic="in", out_topic="out", config=FAST)


def test_refuses_an_output_partition_written_by_others(broker: Broker, registry: ModelRegistry) -> None:
    broker.publish("out", b"not a score")
    with pytest.raises(ConfigError, match="of its own"):
        Scorer(broker, registry, "m", in_topic="in", out_topic="out", config=FAST)
    with pytest.raises(ValueError, match="must differ"):
        Scorer(broker, registry, "m", in_topic="in", out_topic="in", config=FAST)


def test_two_scorers_split_the_input_partitions(broker: Broker, registry: ModelRegistry) -> None:
    broker.create_topic("in", partitions=2)
    broker.create_topic("out", partitions=2)
    for i in range(12):
        broker.publish("in", CODEC.encode({"id": i, "x": np.full(4, i, np.float32)}), partition=i % 2)

    def scorer(part: int) -> Scorer:
        config = ScoreConfig(
            batch=BatchConfig(max_batch_size=2),
            id_field="id",
            events_topic=None,
            partitions=(part,),
            out_partition=part,
        )
        return Scorer(broker, registry, "m", in_topic="in", out_topic="out", config=config)

    with scorer(0) as a, scorer(1) as b:
        assert a.run_once(timeout_s=1.0) == 2 and b.run_once(timeout_s=1.0) == 2
    with scorer(0) as a, scorer(1) as b:
        assert (a.frontier, b.frontier) == ({0: 2}, {1: 2})  # offsets count per partition
        drain(a)
        drain(b)
        assert (a.frontier, b.frontier) == ({0: 6}, {1: 6})
    scores = read_scores(broker)
    assert sorted(int(s["id"]) for s in scores) == list(range(12))
    assert {s["input"].split(":")[1] for s in scores if int(s["id"]) % 2} == {"1"}
