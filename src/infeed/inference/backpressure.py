"""Backpressure: refuse a request at once (``QueueFull``) when its topic's backlog is too deep.

The backlog of a request topic is what the workers have not yet done. On a log engine the topic
keeps every message, so its depth is not the backlog: the workers' group lag is (workers commit
the position after what they acked). Where the group has no state yet, every held message is
backlog. The depth is read with ``describe_topic`` at most once per ``cache_s`` per topic, so a
client does not pay a broker round trip per request.
"""

from __future__ import annotations

import threading
import time

from infeed.brokers.base import Broker
from infeed.errors import QueueFull, TopicNotFoundError
from infeed.types import TopicInfo

__all__ = ["DEFAULT_DEPTH_CACHE_S", "DepthGate", "backlog"]

#: How long a depth reading is reused before the broker is asked again.
DEFAULT_DEPTH_CACHE_S = 0.25


def backlog(info: TopicInfo, group: str) -> int:
    """Return the messages of ``info``'s topic that ``group`` has not done yet."""
    for g in info.groups:
        if g.name == group:
            return g.total_lag
    return info.depth


class DepthGate:
    """Raises ``QueueFull`` when a topic's backlog is above ``max_depth``.

    Args:
        broker: where the topics are.
        group: the workers' consumer group.
        max_depth: the deepest backlog accepted.
        cache_s: how long a reading is reused.
    """

    def __init__(
        self, broker: Broker, group: str, *, max_depth: int, cache_s: float = DEFAULT_DEPTH_CACHE_S
    ) -> None:
        if type(max_depth) is not int or max_depth < 0:
            raise ValueError(f"max_depth must be an int >= 0, got {max_depth!r}")
        if not cache_s >= 0:
            raise ValueError(f"cache_s must be >= 0, got {cache_s!r}")
        self.broker = broker
        self.group = group
        self.max_depth = max_depth
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._readings: dict[str, tuple[float, int]] = {}

    def depth(self, topic: str) -> int:
        """Return ``topic``'s backlog, from a reading at most ``cache_s`` old."""
        now = time.monotonic()
        with self._lock:
            found = self._readings.get(topic)
            if found is not None and now - found[0] < self.cache_s:
                return found[1]
        try:
            depth = backlog(self.broker.describe_topic(topic), self.group)
        except TopicNotFoundError:
            depth = 0
        with self._lock:
            self._readings[topic] = (time.monotonic(), depth)
        return depth

    def check(self, topic: str) -> None:
        """Return if ``topic`` takes more requests.

        Raises:
            QueueFull: its backlog is above ``max_depth``.
        """
        depth = self.depth(topic)
        if depth > self.max_depth:
            raise QueueFull(
                f"{topic} holds {depth} requests, over the limit of {self.max_depth}; retry later",
                retry_after_s=max(self.cache_s, 0.1),
            )
