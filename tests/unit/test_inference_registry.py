"""ModelRegistry: versions as safetensors + JSON, idempotent publish, load, announcements."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infeed.brokers.memory import MemoryBroker
from infeed.codecs import default_registry
from infeed.codecs.message import decode_message
from infeed.inference import ModelRegistry, announce
from infeed.training.models import mlp

FACTORY = "infeed.training.models:mlp"
KWARGS = {"in_features": 4, "hidden": [3], "out_features": 2}


def test_publish_latest_and_load(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    assert registry.latest("m") is None
    torch.manual_seed(1)
    first = mlp(4, (3,), 2)
    second = mlp(4, (3,), 2)
    registry.publish("m", first, version=2, factory=FACTORY, kwargs=KWARGS, step=2, samples=20)
    published = registry.publish(
        "m", second, version=10, factory=FACTORY, kwargs=KWARGS, metrics={"loss": 0.5}
    )
    assert registry.versions("m") == [2, 10]  # numeric order
    latest = registry.latest("m")
    assert latest == published and latest.metrics == {"loss": 0.5}
    assert (latest.path / "model.safetensors").is_file() and (latest.path / "config.json").is_file()
    loaded = registry.load("m")
    assert not loaded.training
    for key, value in second.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    older = registry.load("m", 2)
    assert torch.equal(older.state_dict()["0.weight"], first.state_dict()["0.weight"])


def test_publishing_a_version_again_keeps_the_first(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    a, b = mlp(4, (3,), 2), mlp(4, (3,), 2)
    registry.publish("m", a, version=1, factory=FACTORY, kwargs=KWARGS)
    registry.publish("m", b, version=1, factory=FACTORY, kwargs=KWARGS)
    assert torch.equal(registry.load("m", 1).state_dict()["0.weight"], a.state_dict()["0.weight"])


def test_bad_names_and_missing_versions(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    with pytest.raises(ValueError, match="model name"):
        registry.publish("../x", mlp(), version=1, factory=FACTORY)
    with pytest.raises(ValueError, match="module:function"):
        registry.publish("m", mlp(), version=1, factory="nofactory")
    with pytest.raises(LookupError):
        registry.get("m", 3)
    with pytest.raises(LookupError):
        registry.load("m")


def test_announce_publishes_a_json_event(tmp_path: Path) -> None:
    broker = MemoryBroker()
    version = ModelRegistry(tmp_path).publish(
        "m", mlp(4, (3,), 2), version=7, factory=FACTORY, kwargs=KWARGS, step=7
    )
    events = broker.subscribe("events", group="follower")
    announce(broker, version, topic="events")
    (delivery,) = events.receive(max_messages=5, timeout_s=1)
    assert delivery.headers["x-infeed-codec"] == "json"
    record = decode_message(delivery.payload, delivery.headers, default_registry()).record(0)
    assert record["model"] == "m" and int(record["version"]) == 7 and record["path"] == str(version.path)


def test_training_re_exports_the_registry() -> None:
    import infeed.inference as inference
    import infeed.training as training

    assert training.ModelRegistry is inference.ModelRegistry
    assert training.announce is inference.announce
    assert training.DEFAULT_EVENTS_TOPIC == inference.DEFAULT_EVENTS_TOPIC
