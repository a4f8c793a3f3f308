"""Trainer: resume after a crash equals a run never stopped; metrics; stop; registry versions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from infeed.brokers.memory import MemoryBroker
from infeed.codecs import Field, RecordBatch, Schema
from infeed.streams import Producer
from infeed.training import ModelRegistry, QueueDataset, StepInfo, Trainer, TrainingMetrics
from infeed.training.models import mlp

SCHEMA = Schema({"x": Field("float32", (4,)), "y": Field("int64"), "id": Field("int64")})
N = 300


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def broker() -> MemoryBroker:
    rng = np.random.default_rng(0)
    b = MemoryBroker()
    batch = RecordBatch(
        {
            "x": rng.random((N, 4), dtype=np.float32),
            "y": rng.integers(0, 3, N, dtype=np.int64),
            "id": np.arange(N, dtype=np.int64),
        }
    )
    with Producer(b, "t", records_per_message=24) as producer:
        producer.send_batch(batch)
    return b


class Crash(Exception):
    pass


def run(
    broker: MemoryBroker, checkpoints: Path, group: str, started: list[Trainer] | None = None, **options: Any
) -> tuple[Trainer, dict[str, Any]]:
    torch.manual_seed(0)
    model = mlp(4, (8,), 3)
    with QueueDataset(
        broker, "t", group=group, schema=SCHEMA, batch_size=16, epochs=2, shuffle_buffer=20
    ) as ds:
        trainer = Trainer(
            model,
            torch.optim.Adam(model.parameters(), lr=0.01),
            torch.nn.functional.cross_entropy,
            ds,
            checkpoint_dir=checkpoints,
            checkpoint_every_steps=5,
            audit_field="id",
            **options,
        )
        if started is not None:
            started.append(trainer)
        try:
            trainer.fit()
        except Crash:
            pass
    return trainer, model.state_dict()


def test_a_run_that_crashed_and_resumed_equals_one_that_never_stopped(
    broker: MemoryBroker, tmp_path: Path
) -> None:
    trainer, clean = run(broker, tmp_path / "clean", "clean")
    assert trainer.step == 38 and trainer.samples == 2 * N  # 600 records: 37 batches of 16 and one of 8

    def crash_at_12(info: StepInfo) -> None:
        if info.step == 12:
            raise Crash

    crashed, _ = run(broker, tmp_path / "b", "b", on_step=crash_at_12)
    assert crashed.step == 12  # its last checkpoint was after step 10
    resumed, weights = run(broker, tmp_path / "b", "b")
    assert resumed.restore() == 10 and resumed.step == 38
    for key, value in clean.items():
        assert torch.equal(weights[key], value)
    latest = resumed.store.latest()
    assert latest is not None
    from safetensors.numpy import load

    audit = load(latest.read_bytes("audit.safetensors"))["values"]
    assert sorted(audit.tolist()) == sorted(list(range(N)) * 2)


def test_metrics_stop_and_versions(broker: MemoryBroker, tmp_path: Path) -> None:
    metrics = TrainingMetrics(CollectorRegistry())
    registry = ModelRegistry(tmp_path / "registry")
    events = broker.subscribe("events", group="follower")

    started: list[Trainer] = []

    def stop_at_7(info: StepInfo) -> None:
        if info.step == 7:
            started[0].stop()

    trainer, _ = run(
        broker,
        tmp_path / "c",
        "c",
        started,
        metrics=metrics,
        on_step=stop_at_7,
        lag_every_s=0.0,
        registry=registry,
        model_name="m",
        model_factory="infeed.training.models:mlp",
        model_kwargs={"in_features": 4, "hidden": [8], "out_features": 3},
        events_topic="events",
    )
    assert trainer.step == 7
    value = metrics.registry.get_sample_value
    assert value("infeed_train_samples_total") == 7 * 16
    assert value("infeed_train_steps_total") == 7
    assert value("infeed_train_checkpoint_duration_seconds_count") == 2  # after step 5, and at the stop
    assert value("infeed_train_consumer_lag_messages") is not None
    ratio = value("infeed_train_data_stall_ratio")
    assert ratio is not None and 0.0 <= ratio <= 1.0
    assert registry.versions("m") == [5, 7]
    assert len(events.receive(max_messages=10, timeout_s=1)) == 2


def test_bad_settings_are_refused(broker: MemoryBroker, tmp_path: Path) -> None:
    model = mlp(4, (8,), 3)
    with QueueDataset(broker, "t", group="g", schema=SCHEMA, batch_size=4) as ds:
        opt = torch.optim.Adam(model.parameters())
        loss = torch.nn.functional.cross_entropy
        with pytest.raises(ValueError, match="model_name"):
            Trainer(model, opt, loss, ds, checkpoint_dir=tmp_path, registry=ModelRegistry(tmp_path))
        with pytest.raises(ValueError, match="'label' is not in"):
            Trainer(model, opt, loss, ds, checkpoint_dir=tmp_path, target_field="label")
        with pytest.raises(ValueError, match="checkpoint_every_steps"):
            Trainer(model, opt, loss, ds, checkpoint_dir=tmp_path, checkpoint_every_steps=0)
