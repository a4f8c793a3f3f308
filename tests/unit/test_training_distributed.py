"""Group training pieces: partition assignment, state re-mapping, and a group of one in-process."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from infeed.brokers.memory import MemoryBroker
from infeed.codecs import Field, RecordBatch, Schema
from infeed.streams import Producer
from infeed.training import QueueDataset, Trainer
from infeed.training.distributed import DistContext, assign_partitions, check_group_dataset
from infeed.training.distributed_state import dataset_files, remap_state
from infeed.training.models import mlp
from infeed.training.state import STATE_FORMAT, encode_positions
from infeed.types import Position

SCHEMA = Schema({"x": Field("float32", (4,)), "y": Field("int64"), "id": Field("int64")})


def test_partition_p_goes_to_rank_p_mod_world() -> None:
    assert assign_partitions(5, 0, 2) == [0, 2, 4]
    assert assign_partitions(5, 1, 2) == [1, 3]
    assert assign_partitions(1, 1, 2) == []
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        assign_partitions(4, 2, 2)


def test_dataset_file_names_make_a_single_process_checkpoint_a_world_of_one() -> None:
    assert dataset_files(0) == ("dataset.json", "dataset.safetensors")
    assert dataset_files(3) == ("dataset.rank-0003.json", "dataset.rank-0003.safetensors")


def _state(
    offsets: dict[int, int], held: list[int], *, epoch: int = 0, finished: bool = False
) -> dict[str, Any]:
    n = len(held)
    meta = {
        "format": STATE_FORMAT,
        "topic": "t",
        "fields": SCHEMA.to_dict(),
        "positions": encode_positions({p: Position("t", p, o, 1) for p, o in offsets.items()}),
        "epoch": epoch,
        "epochs": 1,
        "epoch_start": sorted((p, 0) for p in offsets),
        "epoch_end": sorted((p, 100) for p in offsets),
        "finished": finished,
        "records": 10 * n,
        "batches": n,
        "dead_lettered": 0,
    }
    arrays = {
        "x": np.zeros((n, 4), np.float32),
        "y": np.zeros(n, np.int64),
        "id": np.array(held, np.int64),
    }
    return {"meta": meta, "arrays": arrays}


def _offsets(state: dict[str, Any]) -> dict[int, int]:
    return {p["partition"]: p["offset"] for p in state["meta"]["positions"]}


def test_three_ranks_remapped_to_two_keep_every_position_and_held_record_once() -> None:
    old = [_state({0: 5, 3: 6}, [1, 2]), _state({1: 7, 4: 8}, [3]), _state({2: 9}, [4, 5, 6])]
    new = [remap_state(old, r, 2, assign_partitions(5, r, 2)) for r in range(2)]
    assert _offsets(new[0]) == {0: 5, 2: 9, 4: 8}
    assert _offsets(new[1]) == {1: 7, 3: 6}
    # Old rank r's held records go to new rank r % 2.
    assert new[0]["arrays"]["id"].tolist() == [1, 2, 4, 5, 6]
    assert new[1]["arrays"]["id"].tolist() == [3]
    assert new[0]["meta"]["epoch_end"] == [(0, 100), (2, 100), (4, 100)]


def test_same_world_and_partitions_keeps_each_rank_state() -> None:
    old = [_state({0: 5, 2: 1}, [1]), _state({1: 7}, [])]
    assert remap_state(old, 1, 2, [1]) is not old[1]
    assert remap_state(old, 1, 2, [1])["meta"] == old[1]["meta"]


def test_growing_the_world_gives_ranks_without_donors_no_held_records() -> None:
    new = remap_state([_state({0: 5, 1: 3}, [1, 2])], 1, 2, [1])
    assert _offsets(new) == {1: 3}
    assert new["arrays"]["id"].tolist() == []
    assert new["arrays"]["x"].shape == (0, 4)


def test_ranks_in_different_epochs_are_not_merged() -> None:
    old = [_state({0: 5}, [], epoch=1), _state({1: 7}, [], epoch=0)]
    old[0]["meta"]["epochs"] = 3
    with pytest.raises(ValueError, match="epochs \\[0, 1\\]"):
        remap_state(old, 0, 1, [0, 1])
    done = [_state({0: 100}, [], epoch=1, finished=True), _state({1: 7}, [], epoch=0)]
    merged = remap_state(done, 0, 1, [0, 1])
    assert merged["meta"]["epoch"] == 0 and not merged["meta"]["finished"]


def test_a_partition_in_two_states_is_refused() -> None:
    with pytest.raises(ValueError, match="partition 0 appears in two"):
        remap_state([_state({0: 5}, []), _state({0: 6}, [])], 0, 1, [0])


# -- a group of one, in this process --------------------------------------------------------------


@pytest.fixture
def group_of_one(monkeypatch: pytest.MonkeyPatch) -> Iterator[DistContext]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(port))
    ctx = DistContext.from_env(backend="gloo")
    assert ctx is not None
    yield ctx
    ctx.close()


def _broker(n: int = 240) -> MemoryBroker:
    rng = np.random.default_rng(0)
    broker = MemoryBroker()
    broker.create_topic("t", partitions=3)
    with Producer(broker, "t", records_per_message=8) as producer:
        producer.send_batch(
            RecordBatch(
                {
                    "x": rng.random((n, 4), dtype=np.float32),
                    "y": rng.integers(0, 3, n, dtype=np.int64),
                    "id": np.arange(n, dtype=np.int64),
                }
            )
        )
    return broker


def _train(broker: MemoryBroker, ckpt: Path, ctx: DistContext | None, **options: Any) -> Trainer:
    torch.manual_seed(0)
    model = mlp(4, (8,), 3)
    with QueueDataset(
        broker, "t", group=str(ckpt), schema=SCHEMA, batch_size=16, epochs=1, partitions=[0, 1, 2]
    ) as ds:
        trainer = Trainer(
            model,
            torch.optim.Adam(model.parameters(), lr=1e-2),
            torch.nn.functional.cross_entropy,
            ds,
            checkpoint_dir=ckpt,
            checkpoint_every_steps=4,
            audit_field="id",
            distributed=ctx,
            progress_topic="progress",
            **options,
        )
        trainer.fit()
    return trainer


def test_a_group_of_one_trains_like_one_process_and_resumes_from_either(
    group_of_one: DistContext, tmp_path: Path
) -> None:
    assert os.environ["WORLD_SIZE"] == "1" and dist.is_initialized()
    broker = _broker()
    alone = _train(broker, tmp_path / "alone", None)
    group = _train(broker, tmp_path / "group", group_of_one)
    assert group.samples == alone.samples == 240
    for a, b in zip(alone.model.parameters(), group.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    from safetensors.numpy import load_file

    latest = tmp_path / "group" / (tmp_path / "group" / "LATEST").read_text().strip()
    audit = load_file(str(latest / "audit.safetensors"))
    assert sorted(audit["values"].tolist()) == list(range(240))
    # A group of one stopped half way resumes from its own checkpoint, exactly once.
    half = _train(broker, tmp_path / "half", group_of_one, max_samples=112)
    assert half.samples == 112
    rest = _train(broker, tmp_path / "half", group_of_one)
    assert rest.samples == 240
    latest = tmp_path / "half" / (tmp_path / "half" / "LATEST").read_text().strip()
    assert sorted(load_file(str(latest / "audit.safetensors"))["values"].tolist()) == list(range(240))
    # Progress events name the step, the samples and every rank's positions.
    consumer = broker.subscribe("progress", group="follower")
    events = consumer.receive(max_messages=100, timeout_s=1.0)
    assert events and b'"world_size":1' in events[-1].payload.replace(b" ", b"")


def test_a_group_needs_partitions_and_seek() -> None:
    with QueueDataset(_broker(), "t", group="g", schema=SCHEMA, batch_size=4) as ds:
        with pytest.raises(ValueError, match="partitions=assign_partitions"):
            check_group_dataset(ds)


# -- QueueDataset.poll and merged held records --------------------------------------------------


def _ids(n: int, start: int = 0) -> RecordBatch:
    rng = np.random.default_rng(start)
    return RecordBatch(
        {
            "x": rng.random((n, 4), dtype=np.float32),
            "y": np.zeros(n, np.int64),
            "id": np.arange(start, start + n, dtype=np.int64),
        }
    )


def test_poll_gives_up_at_its_deadline_and_keeps_what_it_read() -> None:
    broker = MemoryBroker()
    with Producer(broker, "t", records_per_message=5) as producer:
        producer.send_batch(_ids(15))
    with QueueDataset(broker, "t", group="g", schema=SCHEMA, batch_size=10, idle_timeout_s=30.0) as ds:
        first = ds.poll(5.0)
        assert first is not None and first["id"].tolist() == list(range(10))
        assert ds.poll(0.05) is None and not ds.ended
        state = ds.state_dict()
        assert state["arrays"]["id"].tolist() == [10, 11, 12, 13, 14]  # read, held, not trained
        with Producer(broker, "t", records_per_message=5) as producer:
            producer.send_batch(_ids(5, 15))
        second = ds.poll(5.0)
        assert second is not None and second["id"].tolist() == list(range(10, 20))


def test_held_records_merged_beyond_one_batch_are_cut_into_batches() -> None:
    broker = MemoryBroker()
    with Producer(broker, "t", records_per_message=5) as producer:
        producer.send_batch(_ids(40))
    with QueueDataset(broker, "t", group="a", schema=SCHEMA, batch_size=10, epochs=1) as ds:
        ds.poll(5.0)
        state = ds.state_dict()
    # Two ranks' held records (23 > one batch) re-mapped onto one rank.
    held = _ids(23, 100)
    state["arrays"] = {name: np.asarray(held.columns[name]) for name in SCHEMA.fields}
    with QueueDataset(broker, "t", group="b", schema=SCHEMA, batch_size=10, epochs=1) as ds:
        ds.load_state_dict(state)
        sizes, ids = [], []
        while not ds.ended:
            batch = ds.poll(5.0)
            if batch is not None:
                sizes.append(len(batch["id"]))
                ids += batch["id"].tolist()
    assert sorted(ids) == list(range(10, 40)) + list(range(100, 123))
    assert sizes[:2] == [10, 10] and max(sizes) == 10
