"""The URL-scheme registry and URL options."""

from __future__ import annotations

import sys

import pytest

from infeed.brokers import DEFAULT_BROKER_URL, connect, schemes
from infeed.brokers.memory import MemoryBroker
from infeed.errors import ConfigError


def test_unknown_scheme_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"unknown broker scheme 'kafak' — did you mean 'kafka'\?"):
        connect("kafak://localhost:9092")


def test_url_without_scheme_is_refused() -> None:
    with pytest.raises(ConfigError, match="no scheme"):
        connect("localhost:9092")


def test_missing_client_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make the client library unimportable, as on a machine without the extra.
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.delitem(sys.modules, "infeed.brokers.redis", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'infeed\[redis\]'"):
        connect("redis://127.0.0.1:1")


def test_known_schemes() -> None:
    assert set(schemes()) >= {"memory", "sqlite", "redis", "amqp", "nats", "kafka", "pulsar"}
    assert DEFAULT_BROKER_URL.startswith("sqlite:///")


def test_options_are_typed_and_checked() -> None:
    broker = connect("memory://?ack_timeout_s=2.5&default_partitions=3")
    assert isinstance(broker, MemoryBroker)
    assert broker.config.ack_timeout_s == 2.5
    assert broker.config.default_partitions == 3
    with pytest.raises(ConfigError, match="did you mean 'ack_timeout_s'"):
        connect("memory://?ack_timeout=2")
    with pytest.raises(ConfigError, match="not a valid float"):
        connect("memory://?ack_timeout_s=soon")
    with pytest.raises(ConfigError, match="ack_timeout_s must be > 0"):
        connect("memory://?ack_timeout_s=0")
    with pytest.raises(ConfigError, match="given twice"):
        connect("memory://?ack_timeout_s=1&ack_timeout_s=2")
