"""Small helpers for contract tests."""

from __future__ import annotations

import time

import pytest

from infeed.brokers import Broker, Consumer
from infeed.types import Capability, Delivery

#: Upper bound for waiting on messages that are known to be there (real brokers are slower).
WAIT_S = 20.0


def require(broker: Broker, *capabilities: Capability) -> None:
    """Skip the test, naming the capability, where the backend declares it lacks one."""
    for cap in capabilities:
        if cap not in broker.capabilities:
            pytest.skip(f"{type(broker).__name__} does not declare Capability.{cap.name}")


def drain(
    consumer: Consumer,
    count: int,
    *,
    timeout_s: float = WAIT_S,
    ack: bool = True,
    max_messages: int = 500,
) -> list[Delivery]:
    """Receive until ``count`` deliveries arrived (or fail after ``timeout_s``), acking them."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"received {len(got)} of {count} messages within {timeout_s}s")
        batch = consumer.receive(
            max_messages=min(max_messages, count - len(got)), timeout_s=min(remaining, 2.0)
        )
        if batch and ack:
            consumer.ack(batch)
        got.extend(batch)
    return got


def assert_nothing_more(consumer: Consumer, *, wait_s: float = 0.5) -> None:
    """Assert no further delivery arrives within ``wait_s``."""
    extra = consumer.receive(max_messages=10, timeout_s=wait_s)
    assert extra == [], f"unexpected extra deliveries: {[d.position for d in extra]}"


def payloads(deliveries: list[Delivery]) -> list[bytes]:
    """The payloads of ``deliveries`` in order."""
    return [d.payload for d in deliveries]


def numbered(n: int, prefix: str = "m") -> list[bytes]:
    """``n`` distinct payloads ``m-00000`` ... in order."""
    return [f"{prefix}-{i:05d}".encode() for i in range(n)]
