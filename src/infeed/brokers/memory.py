"""``memory://``: an in-process log broker.

A real backend with the full contract (groups, leases, commits, seek, dead-letter, retention),
for unit tests and notebooks. Every ``MemoryBroker`` instance is its own world; nothing is shared
between processes (so ``Capability.MULTI_PROCESS`` is not declared).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import urlsplit

from infeed.brokers._url import parse_options
from infeed.brokers.base import (
    Broker,
    BrokerConfig,
    Consumer,
    Message,
    StartFrom,
    as_deliveries,
    as_positions,
    check_headers,
    check_payload,
    check_topic_name,
    check_trim_limits,
    dead_letter_copy,
    normalize_key,
    partition_for_key,
)
from infeed.errors import (
    BrokerError,
    ConfigError,
    ConsumerClosedError,
    LeaseLostError,
    TopicNotFoundError,
)
from infeed.types import (
    Capability,
    Delivery,
    GroupInfo,
    PartitionInfo,
    Position,
    TopicInfo,
    trusted_delivery,
    trusted_position,
)

__all__ = ["MemoryBroker", "MemoryConfig"]


@dataclass(frozen=True, kw_only=True)
class MemoryConfig(BrokerConfig):
    """Options of ``memory://`` (only the common ones)."""


@dataclass(slots=True)
class _Record:
    offset: int
    key: bytes | None
    headers: dict[str, str]
    payload: bytes
    timestamp: float


@dataclass(slots=True)
class _Lease:
    token: int
    deadline: float
    count: int
    owner: int


@dataclass
class _GroupPartition:
    cursor: int
    committed: int | None = None
    inflight: dict[int, _Lease] = field(default_factory=dict)
    #: offsets given back (nack/expiry/close) -> their delivery count so far
    ready: dict[int, int] = field(default_factory=dict)


@dataclass
class _Topic:
    partitions: list[list[_Record]]
    lows: list[int]
    highs: list[int]
    groups: dict[str, list[_GroupPartition]] = field(default_factory=dict)


class MemoryBroker(Broker):
    """In-process log broker (``memory://``)."""

    scheme = "memory"
    capabilities = frozenset(
        {
            Capability.REPLAY,
            Capability.SEEK,
            Capability.PER_MESSAGE_ACK,
            Capability.OFFSET_COMMIT,
            Capability.PARTITIONS,
            Capability.DEAD_LETTER,
            Capability.REDELIVERY,
            Capability.CRASH_DELIVERY_COUNT,
            Capability.RETENTION,
        }
    )

    def __init__(self, config: MemoryConfig | None = None) -> None:
        super().__init__(config or MemoryConfig())
        self._topics: dict[str, _Topic] = {}
        self._cond = threading.Condition()
        self._tokens = itertools.count(1)
        self._round_robin = itertools.count()
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Build from ``memory://[?options]``."""
        parts = urlsplit(url)
        if parts.scheme != "memory" or parts.netloc or parts.path not in ("", "/"):
            raise ConfigError(f"memory broker URL takes no host or path: {url!r}")
        return cls(parse_options(parts.query, MemoryConfig))

    # -- topics -------------------------------------------------------------------------------

    def _topic(self, name: str, *, create: bool) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            if not create:
                raise TopicNotFoundError(f"no topic {name!r}")
            n = self.config.default_partitions
            topic = _Topic([[] for _ in range(n)], [0] * n, [0] * n)
            self._topics[name] = topic
        return topic

    def create_topic(self, topic: str, *, partitions: int = 1) -> None:
        """Create a topic with ``partitions`` partitions."""
        check_topic_name(topic)
        if partitions <= 0:
            raise ValueError(f"partitions must be > 0, got {partitions}")
        with self._cond:
            existing = self._topics.get(topic)
            if existing is not None:
                if len(existing.partitions) != partitions:
                    raise BrokerError(
                        f"topic {topic!r} exists with {len(existing.partitions)} partitions, not {partitions}"
                    )
                return
            self._topics[topic] = _Topic([[] for _ in range(partitions)], [0] * partitions, [0] * partitions)

    def delete_topic(self, topic: str) -> None:
        """Delete a topic and its groups."""
        with self._cond:
            if self._topics.pop(topic, None) is None:
                raise TopicNotFoundError(f"no topic {topic!r}")
            self._cond.notify_all()

    def list_topics(self) -> list[str]:
        """Return topic names, sorted."""
        with self._cond:
            self._check_open()
            return sorted(self._topics)

    def describe_topic(self, topic: str) -> TopicInfo:
        """Return partitions and groups of ``topic``."""
        with self._cond:
            self._check_open()
            t = self._topic(topic, create=False)
            parts = tuple(
                PartitionInfo(i, t.lows[i], t.highs[i], len(t.partitions[i]))
                for i in range(len(t.partitions))
            )
            groups = []
            for name, gps in sorted(t.groups.items()):
                committed = {i: gp.committed for i, gp in enumerate(gps) if gp.committed is not None}
                lag = {i: t.highs[i] - max(committed.get(i, t.lows[i]), t.lows[i]) for i in range(len(gps))}
                pending = sum(len(gp.inflight) for gp in gps)
                groups.append(GroupInfo(name, committed, lag, pending))
            return TopicInfo(topic, parts, tuple(groups))

    def trim(
        self,
        topic: str,
        *,
        committed: bool = True,
        max_age_s: float | None = None,
        max_messages: int | None = None,
    ) -> int:
        """Drop old messages by policy.

        Drops what every group has committed past (``committed``), what is older than
        ``max_age_s``, and all but the newest ``max_messages`` per partition.

        Returns:
            how many messages were dropped.

        Raises:
            ValueError: a negative (or NaN) limit; nothing dropped.
        """
        check_trim_limits(max_age_s=max_age_s, max_messages=max_messages)
        oldest = time.time() - max_age_s if max_age_s is not None else None
        with self._cond:
            self._check_open()
            t = self._topic(topic, create=False)
            dropped = 0
            for i, records in enumerate(t.partitions):
                keep_from = t.lows[i]
                if committed and t.groups:
                    marks = [gps[i].committed for gps in t.groups.values()]
                    keep_from = max(keep_from, min(m if m is not None else 0 for m in marks))
                if max_messages is not None:
                    keep_from = max(keep_from, t.highs[i] - max_messages)
                if oldest is not None:
                    young = next((r.offset for r in records if r.timestamp >= oldest), t.highs[i])
                    keep_from = max(keep_from, young)
                n = sum(1 for r in records if r.offset < keep_from)
                if n:
                    del records[:n]
                    dropped += n
                t.lows[i] = max(t.lows[i], keep_from)
            return dropped

    # -- publish ------------------------------------------------------------------------------

    def publish_many(self, topic: str, messages: Iterable[Message | bytes]) -> None:
        """Append messages; all-or-nothing on size checks."""
        check_topic_name(topic)
        limit = self.config.max_payload_bytes
        prepared = []
        for m in messages:
            msg = Message(m) if isinstance(m, bytes | bytearray | memoryview) else m
            payload = check_payload(msg.payload, limit)
            prepared.append((payload, normalize_key(msg.key), check_headers(msg.headers), msg.partition))
        now = time.time()
        with self._cond:
            self._check_open()
            t = self._topic(topic, create=True)
            n = len(t.partitions)
            for payload, key, headers, partition in prepared:
                p = self._choose_partition(partition, key, n)
                t.partitions[p].append(_Record(t.highs[p], key, headers, payload, now))
                t.highs[p] += 1
            self._cond.notify_all()

    def _choose_partition(self, partition: int | None, key: bytes | None, n: int) -> int:
        if partition is not None:
            if not 0 <= partition < n:
                raise ValueError(f"partition {partition} out of range 0..{n - 1}")
            return partition
        if key is not None:
            return partition_for_key(key, n)
        return next(self._round_robin) % n

    # -- consume ------------------------------------------------------------------------------

    def subscribe(
        self,
        topic: str,
        *,
        group: str,
        start: StartFrom = "earliest",
        partitions: Sequence[int] | None = None,
        dead_letter_topic: str | None = None,
    ) -> Consumer:
        """Join ``group`` on ``topic``."""
        check_topic_name(topic)
        if not group:
            raise ValueError("group must be a non-empty string")
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', got {start!r}")
        with self._cond:
            self._check_open()
            t = self._topic(topic, create=True)
            n = len(t.partitions)
            chosen = list(range(n)) if partitions is None else sorted(set(partitions))
            if not chosen:
                raise ValueError("partitions must name at least one partition (or be None for all)")
            for p in chosen:
                if not 0 <= p < n:
                    raise ValueError(f"partition {p} out of range 0..{n - 1} of {topic!r}")
            if group not in t.groups:
                marks = t.lows if start == "earliest" else t.highs
                t.groups[group] = [_GroupPartition(cursor=marks[i]) for i in range(n)]
        return _MemoryConsumer(self, topic, group, chosen, dead_letter_topic)

    def close(self) -> None:
        """Mark closed; the data goes when the object does."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise BrokerError("broker is closed")


class _MemoryConsumer(Consumer):
    def __init__(
        self,
        broker: MemoryBroker,
        topic: str,
        group: str,
        partitions: list[int],
        dlq: str | None,
    ) -> None:
        super().__init__(broker, topic, group, dlq)
        self._b = broker
        self._partitions = partitions
        self._token = next(broker._tokens)
        self._closed = False
        self._next_partition = 0

    def _state(self) -> tuple[_Topic, list[_GroupPartition]]:
        if self._closed:
            raise ConsumerClosedError("consumer is closed")
        self._b._check_open()
        t = self._b._topics.get(self.topic)
        if t is None or self.group not in t.groups:
            raise TopicNotFoundError(f"topic {self.topic!r} was deleted")
        return t, t.groups[self.group]

    def receive(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        if max_messages <= 0:
            raise ValueError(f"max_messages must be > 0, got {max_messages}")
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._b._cond:
            while True:
                out = self._take(max_messages)
                if out:
                    return out
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._b._cond.wait(min(remaining, self._next_expiry()))

    def _next_expiry(self) -> float:
        _, gps = self._state()
        now = time.monotonic()
        soonest = min(
            (lease.deadline for p in self._partitions for lease in gps[p].inflight.values()),
            default=now + 1.0,
        )
        return max(0.001, soonest - now)

    def _take(self, limit: int) -> list[Delivery]:
        t, gps = self._state()
        now = time.monotonic()
        lease_s = self._b.config.ack_timeout_s
        out: list[Delivery] = []
        n = len(self._partitions)
        for k in range(n):
            if len(out) >= limit:
                break
            p = self._partitions[(self._next_partition + k) % n]
            gp = gps[p]
            for offset, lease in list(gp.inflight.items()):
                if lease.deadline <= now:
                    del gp.inflight[offset]
                    gp.ready[offset] = lease.count
            records = t.partitions[p]
            base = records[0].offset if records else t.highs[p]
            todo = sorted(o for o in gp.ready if o >= t.lows[p])
            for o in [o for o in gp.ready if o < t.lows[p]]:
                del gp.ready[o]
            while len(out) < limit and (todo or gp.cursor < t.highs[p]):
                if todo:
                    offset = todo.pop(0)
                    count = gp.ready.pop(offset) + 1
                else:
                    offset = max(gp.cursor, t.lows[p])
                    gp.cursor = offset + 1
                    count = 1
                rec = records[offset - base]
                token = next(self._b._tokens)
                gp.inflight[offset] = _Lease(token, now + lease_s, count, self._token)
                out.append(
                    trusted_delivery(
                        rec.payload,
                        rec.key,
                        rec.headers,
                        trusted_position(self.topic, p, offset),
                        count,
                        rec.timestamp,
                        token,
                    )
                )
        self._next_partition = (self._next_partition + 1) % n
        return out

    def _settle(
        self, deliveries: list[Delivery]
    ) -> tuple[list[tuple[_GroupPartition, Delivery]], list[Delivery]]:
        """Remove the leases of ``deliveries``; return (settled, lost to another member)."""
        _, gps = self._state()
        for d in deliveries:
            if d.topic != self.topic:
                raise ValueError(f"delivery from topic {d.topic!r} given to a {self.topic!r} consumer")
        settled, lost = [], []
        for d in deliveries:
            gp = gps[d.partition] if d.partition < len(gps) else None
            lease = gp.inflight.get(d.position.offset) if gp is not None else None
            if gp is None or lease is None or lease.token != d.receipt:
                lost.append(d)
                continue
            del gp.inflight[d.position.offset]
            settled.append((gp, d))
        return settled, lost

    def ack(self, deliveries: Delivery | Iterable[Delivery]) -> None:
        with self._b._cond:
            _, lost = self._settle(as_deliveries(deliveries))
        _raise_lost(lost)

    def nack(
        self, deliveries: Delivery | Iterable[Delivery], *, requeue: bool = True, reason: str = ""
    ) -> None:
        with self._b._cond:
            settled, lost = self._settle(as_deliveries(deliveries))
            if requeue:
                for gp, d in settled:
                    gp.ready[d.position.offset] = d.delivery_count
                self._b._cond.notify_all()
            elif settled:
                # Under the (re-entrant) lock: the lease goes and the copy appears together.
                msgs = [dead_letter_copy(d, reason) for _, d in settled]
                self._b.publish_many(self.dead_letter_topic, msgs)
        _raise_lost(lost)

    def commit(self, positions: Position | Iterable[Position]) -> None:
        with self._b._cond:
            t, gps = self._state()
            for pos in as_positions(positions):
                _check_position(pos, self.topic, t)
                gps[pos.partition].committed = pos.offset

    def committed(self) -> dict[int, Position]:
        with self._b._cond:
            _, gps = self._state()
            return {
                i: Position(self.topic, i, gp.committed)
                for i, gp in enumerate(gps)
                if gp.committed is not None
            }

    def seek(self, positions: Position | Iterable[Position]) -> None:
        with self._b._cond:
            t, gps = self._state()
            for pos in as_positions(positions):
                _check_position(pos, self.topic, t)
                gp = gps[pos.partition]
                gp.cursor = max(pos.offset, t.lows[pos.partition])
                gp.ready = {o: c for o, c in gp.ready.items() if o < pos.offset}
                gp.inflight = {o: lease for o, lease in gp.inflight.items() if o < pos.offset}
            self._b._cond.notify_all()

    def close(self) -> None:
        if self._closed:
            return
        with self._b._cond:
            t = self._b._topics.get(self.topic)
            if t is not None and self.group in t.groups:
                # Deliveries still leased by this consumer become available to the group now.
                for gp in t.groups[self.group]:
                    for offset, lease in list(gp.inflight.items()):
                        if lease.owner == self._token:
                            del gp.inflight[offset]
                            gp.ready[offset] = lease.count
            self._closed = True
            self._b._cond.notify_all()


def _raise_lost(lost: list[Delivery]) -> None:
    if lost:
        raise LeaseLostError(
            f"{len(lost)} deliveries lost their lease (first: {lost[0].position}); "
            "they were or will be delivered to another member",
            positions=[d.position for d in lost],
        )


def _check_position(pos: Position, topic: str, t: _Topic) -> None:
    if pos.topic != topic:
        raise ValueError(f"position {pos} is not on topic {topic!r}")
    if not 0 <= pos.partition < len(t.partitions):
        raise ValueError(f"position {pos}: no partition {pos.partition}")
    if pos.offset > t.highs[pos.partition]:
        raise ValueError(
            f"position {pos} is past the end of partition {pos.partition} "
            f"(next offset {t.highs[pos.partition]})"
        )
