"""The backends the contract suite runs against. Adding a backend = adding one entry here.

Each entry turns a per-test temporary folder into a broker URL. Real brokers come from
scripts/brokers (tests.support.broker_url fails under CI=true and skips loudly elsewhere when
one is not running). Every URL sets a short ack timeout so redelivery tests stay quick.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

#: Seconds an unacked delivery waits before redelivery, in contract tests.
ACK_TIMEOUT_S = 1.0

BACKENDS: dict[str, Callable[[Path], str]] = {
    "memory": lambda tmp: f"memory://?ack_timeout_s={ACK_TIMEOUT_S}",
    "sqlite": lambda tmp: f"sqlite:///{tmp}/contract.db?ack_timeout_s={ACK_TIMEOUT_S}",
}
