"""Brokers: the bytes-level contract and a URL-scheme registry of backends.

A backend module is imported only when its scheme is used, so a client library that is not
installed costs nothing until it is needed, and then the error names the extra to install.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from urllib.parse import urlsplit

from infeed.brokers.base import (
    DEFAULT_ACK_TIMEOUT_S,
    DEFAULT_MAX_PAYLOAD_BYTES,
    Broker,
    BrokerConfig,
    Consumer,
    Message,
    StartFrom,
    dead_letter_topic,
)
from infeed.config import DEFAULT_BROKER_URL
from infeed.errors import ConfigError

__all__ = [
    "DEFAULT_ACK_TIMEOUT_S",
    "DEFAULT_BROKER_URL",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "Broker",
    "BrokerConfig",
    "Consumer",
    "Message",
    "StartFrom",
    "connect",
    "dead_letter_topic",
    "schemes",
]


@dataclass(frozen=True)
class _Backend:
    module: str
    cls: str
    #: the pip extra that brings the client library (None: nothing to install)
    extra: str | None
    #: top-level modules of the client library, to tell a missing extra from a bug
    client_modules: tuple[str, ...] = ()


_BACKENDS: dict[str, _Backend] = {
    "memory": _Backend("infeed.brokers.memory", "MemoryBroker", None),
    "sqlite": _Backend("infeed.brokers.sqlite", "SQLiteBroker", None),
    "redis": _Backend("infeed.brokers.redis", "RedisBroker", "redis", ("redis", "hiredis")),
    "amqp": _Backend("infeed.brokers.rabbitmq", "RabbitMQBroker", "rabbitmq", ("pika",)),
    "nats": _Backend("infeed.brokers.nats", "NATSBroker", "nats", ("nats",)),
    "kafka": _Backend("infeed.brokers.kafka", "KafkaBroker", "kafka", ("confluent_kafka",)),
    "pulsar": _Backend("infeed.brokers.pulsar", "PulsarBroker", "pulsar", ("pulsar", "_pulsar")),
}


def schemes() -> list[str]:
    """Return the URL schemes infeed knows."""
    return sorted(_BACKENDS)


def backend_class(scheme: str) -> type[Broker]:
    """Import and return the Broker class for ``scheme``.

    Raises:
        ConfigError: for an unknown scheme (with the nearest known one), or when the client
            library is not installed (naming the extra to install).
    """
    backend = _BACKENDS.get(scheme)
    if backend is None:
        close = difflib.get_close_matches(scheme, schemes(), n=1, cutoff=0.5)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown broker scheme {scheme!r}{hint} (known: {', '.join(schemes())})")
    try:
        module = importlib.import_module(backend.module)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if backend.extra and missing in backend.client_modules:
            raise ConfigError(
                f"the {scheme}:// backend needs the {missing!r} client library: "
                f"pip install 'infeed[{backend.extra}]'"
            ) from exc
        raise
    cls: type[Broker] = getattr(module, backend.cls)
    return cls


def connect(url: str | None = None) -> Broker:
    """Open the broker a URL names, e.g. ``sqlite:///data/q.db`` or ``redis://127.0.0.1:6379``.

    Args:
        url: the broker URL; ``None`` means the embedded default, ``DEFAULT_BROKER_URL``.

    Raises:
        ConfigError: for a malformed URL, an unknown scheme or option, or a missing extra.
        BrokerConnectionError: if the broker cannot be reached.
    """
    url = url or DEFAULT_BROKER_URL
    if not isinstance(url, str):
        raise TypeError(f"broker URL must be a str, got {type(url).__name__}")
    scheme = urlsplit(url).scheme
    if not scheme or "://" not in url:
        raise ConfigError(f"broker URL {url!r} has no scheme; expected e.g. {DEFAULT_BROKER_URL}")
    broker = backend_class(scheme.lower()).from_url(url)
    broker.url = url
    return broker
