"""QueueDataset: exact batches whatever the packing, exact resume, epochs, shuffle, poison, acks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from infeed.brokers.base import DLQ_HEADER_REASON, Message
from infeed.brokers.memory import MemoryBroker
from infeed.codecs import Field, MsgpackCodec, RecordBatch, Schema, encode_message
from infeed.streams import Producer
from infeed.training import QueueDataset
from infeed.training._prefetch import ByteQueue, Idle, Prefetcher
from infeed.training.state import decode_state, encode_state
from infeed.types import Capability

SCHEMA = Schema({"x": Field("float32", (3,)), "id": Field("int64")})


def records(start: int, stop: int) -> RecordBatch:
    ids = np.arange(start, stop, dtype=np.int64)
    return RecordBatch({"x": np.stack([ids, ids, ids], axis=1).astype(np.float32), "id": ids})


def filled(n: int, per_message: int, broker: MemoryBroker | None = None) -> MemoryBroker:
    broker = broker or MemoryBroker()
    with Producer(broker, "t", records_per_message=per_message, messages_per_publish=7) as producer:
        producer.send_batch(records(0, n))
    return broker


def dataset(broker: MemoryBroker, **options: Any) -> QueueDataset:
    settings: dict[str, Any] = {"group": "g", "schema": SCHEMA, "batch_size": 10, "epochs": 1}
    settings.update(options)
    return QueueDataset(broker, "t", **settings)


def ids_of(batches: Iterator[dict[str, torch.Tensor]], limit: int | None = None) -> list[list[int]]:
    out = []
    for batch in batches:
        assert batch["x"].dtype == torch.float32 and batch["x"].shape[1:] == (3,)
        assert torch.equal(batch["x"][:, 0].long(), batch["id"])
        out.append(batch["id"].tolist())
        if limit is not None and len(out) == limit:
            break
    return out


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def message(batch: RecordBatch) -> Message:
    payload, headers = encode_message(MsgpackCodec(), batch)
    return Message(payload, headers=headers)


@pytest.mark.parametrize("per_message", [1, 7, 64])
def test_batches_are_cut_from_the_record_stream_whatever_the_packing(per_message: int) -> None:
    with dataset(filled(95, per_message)) as ds:
        got = ids_of(iter(ds))
    assert got == [list(range(i, min(i + 10, 95))) for i in range(0, 95, 10)]
    assert ds.finished and ds.records == 95 and ds.batches == 10


def test_drop_last_never_yields_a_short_batch() -> None:
    with dataset(filled(95, 64), drop_last=True) as ds:
        assert [len(b) for b in ids_of(iter(ds))] == [10] * 9


@pytest.mark.parametrize(("per_message", "shuffle"), [(1, 0), (7, 0), (64, 0), (1, 25), (64, 40)])
def test_a_state_taken_mid_message_resumes_exactly(per_message: int, shuffle: int) -> None:
    broker = filled(200, per_message)
    with dataset(broker, group="clean", shuffle_buffer=shuffle, seed=3, epochs=2) as ds:
        clean = ids_of(iter(ds))
    assert sorted(flat(clean)) == sorted(list(range(200)) * 2)
    with dataset(broker, shuffle_buffer=shuffle, seed=3, epochs=2) as ds:
        first = ids_of(iter(ds), limit=13)
        saved = ds.state_dict()
        ds.commit(saved)
    meta_bytes, array_bytes = encode_state(saved)
    state = decode_state(meta_bytes, array_bytes)
    assert state["meta"]["positions"][0]["offset"] >= 0
    with dataset(broker, shuffle_buffer=shuffle, seed=3, epochs=2) as ds:
        ds.load_state_dict(state)
        rest = ids_of(iter(ds))
    assert first + rest == clean


def test_batches_read_ahead_by_a_prefetcher_that_ended_are_still_yielded() -> None:
    # The whole topic fits in the prefetch queue: the thread reads it all and ends before the
    # first batch is asked for; iterating must drain its queue, not start a reader over.
    with dataset(filled(95, 7)) as ds:
        ds.open()
        prefetch = ds._prefetch
        assert isinstance(prefetch, Prefetcher)
        assert prefetch._thread is not None
        prefetch._thread.join(timeout=30)  # it ends by itself after the last epoch
        assert not prefetch.is_alive() and prefetch.queue.nbytes > 0
        got = ids_of(iter(ds))
    assert flat(got) == list(range(95)) and ds.finished


def test_the_shuffle_is_seeded() -> None:
    broker = filled(100, 16)
    orders = []
    for group, seed in (("a", 1), ("b", 1), ("c", 2)):
        with dataset(broker, group=group, shuffle_buffer=30, seed=seed) as ds:
            orders.append(flat(ids_of(iter(ds))))
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[2]) == list(range(100)) != orders[2]


def test_epochs_replay_the_topic_and_a_finished_state_yields_nothing() -> None:
    broker = filled(30, 8)
    with dataset(broker, epochs=3) as ds:
        got = flat(ids_of(iter(ds)))
        state = ds.state_dict()
    assert got == list(range(30)) * 3 and ds.epoch == 3
    assert state["meta"]["positions"][0]["offset"] == 4  # committed at the end, not the start
    with dataset(broker, epochs=3) as ds:
        ds.load_state_dict(state)
        assert list(ds) == []
    with dataset(broker, epochs=4) as ds:  # one more epoch than the state's run
        ds.load_state_dict(state)
        assert flat(ids_of(iter(ds))) == list(range(30))


def test_poison_is_dead_lettered_counted_and_never_stops_the_stream() -> None:
    broker = MemoryBroker()
    good = records(0, 20)
    bad = records(20, 30)
    x = bad.columns["x"].copy()
    x[3, 1] = np.nan  # one NaN record inside a record batch
    nan_batch = RecordBatch({"x": x, "id": bad.columns["id"]})
    wrong_shape = RecordBatch({"x": np.zeros((2, 4), np.float32), "id": np.arange(2)})
    messages = [
        message(good.slice(0, 10)),
        Message(b"\x00not msgpack"),
        message(nan_batch),
        message(wrong_shape),
        message(good.slice(10, 20)),
    ]
    broker.publish_many("t", messages)
    with dataset(broker) as ds:
        got = flat(ids_of(iter(ds)))
        assert ds.dead_lettered == 3
    assert got == [*range(10), *(i for i in range(20, 30) if i != 23), *range(10, 20)]
    dlq = broker.subscribe("t.dlq", group="inspect").receive(max_messages=10, timeout_s=0)
    reasons = sorted(d.headers[DLQ_HEADER_REASON] for d in dlq)
    assert len(reasons) == 3
    assert any("undecodable" in r for r in reasons)
    assert any("NaN" in r for r in reasons) and any("shape" in r for r in reasons)


def test_a_stream_idles_out_and_goes_on_when_data_comes() -> None:
    broker = filled(25, 5)
    with dataset(broker, epochs=None, idle_timeout_s=0.2) as ds:
        assert [len(b) for b in ids_of(iter(ds))] == [10, 10, 5]
        with Producer(broker, "t", records_per_message=5) as producer:
            producer.send_batch(records(25, 40))
        assert flat(ids_of(iter(ds))) == list(range(25, 40))
        assert ds.lag() == 0


class _QueueBroker(MemoryBroker):
    """The in-process broker as a queue: no replay, no seek (as RabbitMQ's classic queues)."""

    capabilities = MemoryBroker.capabilities - {Capability.SEEK, Capability.REPLAY, Capability.OFFSET_COMMIT}


def test_without_seek_exact_resume_is_refused_naming_the_capability() -> None:
    broker = filled(60, 8, _QueueBroker())
    with pytest.raises(ValueError, match="replay and seek"):
        dataset(broker)
    with dataset(broker, epochs=None, idle_timeout_s=0.2) as ds:
        assert not ds.ack_on_receipt
        batches = iter(ds)
        assert flat(ids_of(batches, limit=2)) == list(range(20))  # streaming works...
        with pytest.raises(ValueError, match="SEEK"):  # ...but no checkpoint can resume it exactly
            ds.state_dict()
        assert flat(ids_of(batches)) == list(range(20, 60))
    # Messages are acked once their records are handed out (at least once).
    assert broker.describe_topic("t").groups[0].pending == 0
    with dataset(broker, epochs=None) as ds, pytest.raises(ValueError, match="SEEK"):
        ds.load_state_dict({"meta": {}, "arrays": {}})


def test_bad_settings_are_refused() -> None:
    broker = MemoryBroker()
    with pytest.raises(ValueError, match="batch_size"):
        dataset(broker, batch_size=0)
    with pytest.raises(ValueError, match="str field"):
        QueueDataset(broker, "t", group="g", schema=Schema({"s": Field("str")}), batch_size=1)
    with dataset(broker) as ds, pytest.raises(ValueError, match="topic"):
        ds.load_state_dict({"meta": {**ds.state_dict()["meta"], "topic": "other"}, "arrays": {}})


def test_the_prefetch_queue_is_bounded_in_bytes() -> None:
    q = ByteQueue(100)
    assert q.put(Idle(), 300, wake=lambda: False)  # one item always goes in, however large
    assert not q.put(Idle(), 10, wake=lambda: True)  # full: the put gives up when told to
    assert q.get(0.0) == Idle() and q.nbytes == 0
    assert q.get(0.0) is None
