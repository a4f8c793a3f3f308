"""Bookkeeping of the nats:// pull consumers (``_nats_pull``): partitions, lanes, consumer config.

A *slot* is one partition a member pulls from (one durable JetStream consumer of the group). A
*lane* is an inbox of a slot that carries one pull request at a time. JetStream delivers a message
without naming the request that asked for it, so the lane a message arrives on is what ties it to
its request, and so to the time the request was sent, where its lease starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nats.aio.subscription import Subscription

__all__ = ["Lane", "Slot", "consumer_config", "set_ack_wait"]


@dataclass(slots=True)
class Slot:
    """One partition a member pulls from, with the ack wait of its consumer."""

    partition: int
    durable: str
    next_subject: str
    ack_wait_s: float = 0.0
    #: how long this member trusts a lease: the ack wait less a margin (half, at most 1 s)
    lease_s: float = 0.0
    #: the lane this partition asks on (None: make one before the next request)
    lane: Lane | None = None
    #: the last no_wait request got a full batch (worth asking again before the caller does)
    more: bool = False
    suspect: bool = False


@dataclass(slots=True, eq=False)
class Lane:
    """An inbox of one partition, carrying one pull request at a time: what arrives on it answers
    that request, so its lease starts when the request was sent."""

    slot: Slot
    inbox: str
    sub: Subscription | None = None
    rid: int = 0  # the request on this lane (0: none, or it ended)
    expect: int = 0
    asked: int = 0
    sent_at: float = 0.0
    deadline: float = 0.0
    long: bool = False  # a long poll (else no_wait)
    epoch: int = -1
    #: what arrives is handed out (False once a seek re-created the consumer it came from)
    keep: bool = True


def set_ack_wait(slot: Slot, ack_wait_s: float) -> None:
    """Take the consumer's ack wait, and the lease the member trusts within it."""
    slot.ack_wait_s = ack_wait_s
    # The margin covers the time from the lease check to the server processing the +ACK: the
    # server accepts an ack even after it redelivered the message, so a late one goes unnoticed.
    slot.lease_s = ack_wait_s - min(0.5 * ack_wait_s, 1.0)


def consumer_config(
    durable: str, subject: str, ack_wait_s: float, max_deliver: int, max_ack_pending: int, start: int | str
) -> dict[str, Any]:
    """A durable pull consumer's config; ``start`` is 'earliest', 'latest' or a stream sequence."""
    cfg: dict[str, Any] = {
        "durable_name": durable,
        "ack_policy": "explicit",
        "ack_wait": int(ack_wait_s * 1e9),
        "max_deliver": max_deliver,
        "max_ack_pending": max_ack_pending,
        "filter_subject": subject,
        "replay_policy": "instant",
    }
    if isinstance(start, int):
        cfg.update(deliver_policy="by_start_sequence", opt_start_seq=max(1, start))
    else:
        cfg["deliver_policy"] = "all" if start == "earliest" else "new"
    return cfg
