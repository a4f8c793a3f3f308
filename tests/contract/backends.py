"""The backends the contract suite runs against. Adding a backend = adding one entry here.

Each entry turns a per-test temporary folder into a broker URL. Real brokers come from
scripts/brokers (tests.support.broker_url fails under CI=true and skips loudly elsewhere when
one is not running). Every URL sets a short ack timeout so redelivery tests stay quick.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

from tests.support import broker_url

#: Seconds an unacked delivery waits before redelivery, in contract tests.
ACK_TIMEOUT_S = 1.0


def real(name: str, *, urls: tuple[str, ...] = (), **options: object) -> Callable[[Path], str]:
    """A URL maker for the real broker ``name`` started by scripts/brokers.

    Args:
        name: the broker's name in scripts/brokers.
        urls: more of the broker's URLs (keys of its ``urls`` entry) passed as ``KEY_url=...``
            options, e.g. Pulsar's admin API.
        options: more query options.
    """

    def make(tmp: Path) -> str:
        url = broker_url(name)
        extra = {f"{key}_url": broker_url(name, key) for key in urls}
        query = urlencode({"ack_timeout_s": ACK_TIMEOUT_S, **extra, **options})
        return f"{url}{'&' if '?' in url else '?'}{query}"

    return make


BACKENDS: dict[str, Callable[[Path], str]] = {
    "memory": lambda tmp: f"memory://?ack_timeout_s={ACK_TIMEOUT_S}",
    "sqlite": lambda tmp: f"sqlite:///{tmp}/contract.db?ack_timeout_s={ACK_TIMEOUT_S}",
}

# Backends under construction join the suite as soon as their module exists.
_REAL: dict[str, tuple[str, Callable[[Path], str]]] = {
    "redis": ("infeed.brokers.redis", real("redis")),
    "rabbitmq": ("infeed.brokers.rabbitmq", real("rabbitmq")),
    "rabbitmq-stream": ("infeed.brokers.rabbitmq", real("rabbitmq", queue_type="stream")),
    "nats": ("infeed.brokers.nats", real("nats")),
    "kafka": ("infeed.brokers.kafka", real("kafka")),
    "pulsar": ("infeed.brokers.pulsar", real("pulsar", urls=("admin",))),
}
for _name, (_module, _make) in _REAL.items():
    if importlib.util.find_spec(_module) is not None:
        BACKENDS[_name] = _make
