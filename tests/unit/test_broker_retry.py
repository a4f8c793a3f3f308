"""The retry helpers the backends share: backoff waits and RabbitMQ's retry after a lost connection."""

from __future__ import annotations

import pytest

from infeed.brokers._rabbitmq_io import retry_on_loss
from infeed.brokers._retry import backoff_s, backoff_total_s
from infeed.errors import BrokerConnectionError


def test_backoff_doubles_from_the_first_wait_up_to_the_longest() -> None:
    assert [backoff_s(n, 0.1, 1.0) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_backoff_total_adds_up_the_waits() -> None:
    assert backoff_total_s(0, 0.25, 5.0) == 0.0
    assert backoff_total_s(6, 0.25, 5.0) == 0.25 + 0.5 + 1.0 + 2.0 + 4.0 + 5.0


def test_retry_on_loss_reconnects_until_the_call_succeeds() -> None:
    connects: list[int] = []

    def connect() -> int:
        connects.append(len(connects))
        return connects[-1]

    def run(held: int) -> str:
        if held < 2:
            raise ConnectionResetError(f"dropped on connection {held}")
        return f"done on connection {held}"

    def give_up(failures: int, exc: Exception) -> BrokerConnectionError:
        return BrokerConnectionError(f"gave up after {failures}: {exc}")

    assert retry_on_loss(3, connect, run, lambda _held: None, give_up) == "done on connection 2"
    assert connects == [0, 1, 2]


def test_retry_on_loss_gives_up_after_the_attempts() -> None:
    def run(held: int) -> str:
        raise ConnectionResetError(f"dropped on connection {held}")

    with pytest.raises(BrokerConnectionError, match=r"^gave up after 3: dropped on connection 7$") as info:
        retry_on_loss(
            3,
            lambda: 7,
            run,
            lambda _held: None,
            lambda failures, exc: BrokerConnectionError(f"gave up after {failures}: {exc}"),
        )
    assert isinstance(info.value.__cause__, ConnectionResetError)


def test_retry_on_loss_raises_other_errors_at_once() -> None:
    calls: list[int] = []

    def run(held: int) -> str:
        calls.append(held)
        raise ValueError("not a lost connection")

    with pytest.raises(ValueError, match="not a lost connection"):
        retry_on_loss(
            3,
            lambda: 1,
            run,
            lambda _held: None,
            lambda failures, exc: BrokerConnectionError(f"gave up after {failures}: {exc}"),
        )
    assert calls == [1]
