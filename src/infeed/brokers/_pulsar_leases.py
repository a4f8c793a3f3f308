"""Process-wide pieces of ``pulsar://`` consumers: the reaper thread and remembered delivery counts.

``Reaper`` is one daemon thread per broker object: it expires the leases of every consumer of that
broker, checks their connections and parks idle members (what each step does is the consumer's
business: ``_pulsar_consumer.py``). ``DeliveryCounts`` remembers, per broker object, the count of
every delivery that ended unsettled, so its next delivery in this process counts on from there.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Protocol

__all__ = ["DeliveryCounts", "Reaped", "Reaper"]

_log = logging.getLogger("infeed.brokers.pulsar")


class Reaped(Protocol):
    """What the reaper needs of a consumer."""

    def next_due(self, now: float) -> float:
        """When the reaper should look at this consumer next (``time.monotonic`` seconds)."""

    def reap(self) -> None:
        """Expire leases past their deadline; park the member if it is idle."""


class DeliveryCounts:
    """Delivery counts of messages this process gave back unsettled, until they come back (bounded).

    Keys are ``(topic, group, partition, offset)``. A lease that ends without an ack (nack,
    expiry, close, lost connection) is remembered; the next delivery of the message in this
    process takes the larger of this and Pulsar's count.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self._given_back: collections.OrderedDict[tuple[str, str, int, int], int] = collections.OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._given_back)

    def remember(self, leases: Iterable[tuple[tuple[str, str, int, int], int]]) -> None:
        """Remember the delivery counts of leases that ended unsettled."""
        with self._lock:
            for key, count in leases:
                self._given_back[key] = max(count, self._given_back.pop(key, 0))
            while len(self._given_back) > self._limit:
                self._given_back.popitem(last=False)

    def count(self, key: tuple[str, str, int, int], broker_redeliveries: int) -> int:
        """The delivery count of a message delivered now."""
        with self._lock:
            return max(broker_redeliveries, self._given_back.pop(key, 0)) + 1

    def forget_from(self, topic: str, group: str, partition: int, offset: int) -> None:
        """Drop the memory of a partition from ``offset`` on (a seek replays them as new)."""
        with self._lock:
            for key in [k for k in self._given_back if k[:3] == (topic, group, partition) and k[3] >= offset]:
                del self._given_back[key]


class Reaper:
    """One daemon thread per broker object: expires leases, checks connections, parks idle members."""

    def __init__(self) -> None:
        self._consumers: weakref.WeakSet[Reaped] = weakref.WeakSet()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def register(self, consumer: Reaped) -> None:
        """Watch ``consumer`` (and start the thread on first use)."""
        with self._cond:
            self._consumers.add(consumer)
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="infeed-pulsar-reaper", daemon=True)
                self._thread.start()
            self._cond.notify()

    def poke(self) -> None:
        """New leases: look at the deadlines again."""
        with self._cond:
            self._cond.notify()

    def stop(self) -> None:
        """End the thread (the broker is closing)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                consumers = list(self._consumers)
                now = time.monotonic()
                due = min((c.next_due(now) for c in consumers), default=now + 60.0)
                if due > now:
                    self._cond.wait(due - now)
                    continue
            for c in consumers:
                try:
                    c.reap()
                except Exception:  # keep expiring the others' leases; say what went wrong
                    _log.exception("infeed pulsar reaper: %r failed", c)
