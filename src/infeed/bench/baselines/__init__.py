"""Raw-client baselines: the best each client library reaches on its own broker, without infeed.

Every baseline is a ``Side`` (as is infeed's own side in ``infeed.bench.brokers``), so the two run
the same rounds: ``prepare`` a fresh topic (outside the clock), ``produce`` the batches and
``consume`` them (each timed), then ``cleanup``. A module per engine imports its client library
only when it is loaded, so a missing library skips that engine alone.
"""

from __future__ import annotations

import abc
import importlib
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "CLIENT_PACKAGES",
    "RAW_BASELINES",
    "RECEIVE_TIMEOUT_S",
    "BenchError",
    "RawSide",
    "Side",
    "expect",
    "load_baseline",
]

#: Engine -> "module:Class" of its raw baseline.
RAW_BASELINES = {
    "sqlite": "infeed.bench.baselines.sqlite:SQLiteRaw",
    "redis": "infeed.bench.baselines.redis:RedisRaw",
    "rabbitmq": "infeed.bench.baselines.rabbitmq:RabbitMQRaw",
    "nats": "infeed.bench.baselines.nats:NATSRaw",
    "kafka": "infeed.bench.baselines.kafka:KafkaRaw",
    "pulsar": "infeed.bench.baselines.pulsar:PulsarRaw",
}

#: Distributions whose versions a result records (the clients the baselines use).
CLIENT_PACKAGES = (
    "redis",
    "hiredis",
    "pika",
    "nats-py",
    "confluent-kafka",
    "pulsar-client",
    "numpy",
    "msgpack",
)

#: How long a consume waits for the next batch before the round fails.
RECEIVE_TIMEOUT_S = 10.0


class BenchError(RuntimeError):
    """A measurement could not be taken (lost messages, a timeout, a broker error)."""


class Side(abc.ABC):
    """One side of a side-by-side measurement: infeed, or a raw client, on one broker."""

    #: One line saying what this side does (printed and written to the JSON).
    label: str = ""
    #: The produce variants this side measures, each on its own fresh topic; the consume
    #: variants read what the first one wrote. The fastest is the baseline.
    produce_ops: tuple[str, ...] = ("produce",)
    #: The consume variants this side measures, in the order they run on the same filled topic
    #: (each reads every message); the fastest is the baseline.
    consume_ops: tuple[str, ...] = ("consume",)

    @abc.abstractmethod
    def prepare(self, topic: str) -> None:
        """Create ``topic`` (fresh) and the consumer group(s) that will read it; not timed."""

    @abc.abstractmethod
    def produce(self, topic: str, batches: list[list[bytes]], op: str) -> None:
        """Publish every batch with variant ``op``; return once the broker holds them all (timed)."""

    @abc.abstractmethod
    def consume(self, topic: str, count: int, op: str) -> None:
        """Receive and ack exactly ``count`` messages with variant ``op`` (timed).

        Raises:
            BenchError: if fewer than ``count`` arrive within ``RECEIVE_TIMEOUT_S`` of each other.
        """

    @abc.abstractmethod
    def cleanup(self, topic: str) -> None:
        """Delete ``topic`` and its groups; not timed. Must not raise for a half-prepared topic."""

    def close(self) -> None:  # noqa: B027 - optional: sides without a connection keep no state
        """Release the client's connections."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RawSide(Side):
    """A raw client's side: built from the broker's URL and a scratch folder."""

    def __init__(self, *, url: str | None, workdir: Path) -> None:
        self.url = url
        self.workdir = workdir

    def _require_url(self) -> str:
        if not self.url:
            raise ValueError(f"{type(self).__name__} needs the broker's URL")
        return self.url


def load_baseline(engine: str, url: str | None, workdir: Path) -> RawSide:
    """Build the raw baseline of ``engine``.

    Args:
        engine: a key of ``RAW_BASELINES``.
        url: the broker's URL from scripts/brokers (None for embedded engines).
        workdir: a folder for files the baseline writes (the SQLite databases).

    Raises:
        KeyError: for an engine without a baseline.
        ImportError: if the client library is not installed.
    """
    module_name, cls_name = RAW_BASELINES[engine].split(":")
    cls: type[RawSide] = getattr(importlib.import_module(module_name), cls_name)
    return cls(url=url, workdir=workdir)


def expect(got: int, count: int, what: str) -> None:
    """Raise BenchError unless exactly ``count`` messages came back."""
    if got != count:
        raise BenchError(f"{what}: expected {count} messages, got {got}")
