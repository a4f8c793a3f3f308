"""Fixtures of the one contract suite, parametrized over every backend in backends.py."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from infeed.brokers import Broker, connect

from .backends import BACKENDS


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    """The backend name under test."""
    return str(request.param)


@pytest.fixture
def url(backend: str, tmp_path: Path) -> str:
    """A URL for the backend under test (real brokers: from scripts/brokers)."""
    return BACKENDS[backend](tmp_path)


@pytest.fixture
def open_broker(url: str) -> Iterator[Callable[[], Broker]]:
    """Open more connections to the same broker; all are closed at the end of the test."""
    opened: list[Broker] = []

    def make() -> Broker:
        broker = connect(url)
        opened.append(broker)
        return broker

    yield make
    for b in reversed(opened):
        b.close()


@pytest.fixture
def broker(open_broker: Callable[[], Broker]) -> Broker:
    """One connection to the backend under test."""
    return open_broker()


@pytest.fixture
def topic() -> str:
    """A fresh topic name (real brokers keep topics between tests)."""
    return f"t-{uuid.uuid4().hex[:12]}"
