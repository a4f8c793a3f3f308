"""``sqlite://``: the embedded default broker, a partitioned log in one SQLite file.

``sqlite:///rel.db`` and ``sqlite:///./rel.db`` are relative to the working directory,
``sqlite:////abs/path.db`` is absolute; options go in the query
(``sqlite:///q.db?synchronous=FULL&ack_timeout_s=5``) and missing parent folders are created.

Many threads and processes may share one file at once. The file is in WAL mode; every thread of
every process has its own connection (new ones after ``fork``); every write is one
``BEGIN IMMEDIATE`` transaction, one per ``publish_many``, ``receive``, ``ack`` and ``nack`` call.
A waiting ``receive`` checks ``PRAGMA data_version`` with a short backoff and wakes at once on
publishes from its own process. The schema is ``sqlite_schema.sql``; observable semantics are
those of ``memory://`` (the reference backend), plus ``Capability.MULTI_PROCESS``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Self
from urllib.parse import unquote, urlsplit

from infeed.brokers import _sqlite_log as log
from infeed.brokers import _sqlite_retention as retention
from infeed.brokers._sqlite_db import SCHEMA_VERSION, Pool
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
    dead_letter_headers,
    normalize_key,
)
from infeed.errors import (
    BrokerConnectionError,
    BrokerError,
    ConfigError,
    ConsumerClosedError,
    LeaseLostError,
    TopicNotFoundError,
)
from infeed.types import Capability, Delivery, PartitionInfo, Position, TopicInfo

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_S",
    "DEFAULT_POLL_MAX_S",
    "DEFAULT_SYNCHRONOUS",
    "SCHEMA_VERSION",
    "SQLiteBroker",
    "SQLiteConfig",
]

#: Commit durability. NORMAL in WAL mode survives a crash of the application, not of the machine.
DEFAULT_SYNCHRONOUS: Literal["FULL", "NORMAL", "OFF"] = "NORMAL"
#: Seconds a write waits for another writer's lock before raising BrokerTimeoutError.
DEFAULT_BUSY_TIMEOUT_S = 10.0
#: Longest pause between two change checks of a waiting ``receive`` (the first is 1 ms).
DEFAULT_POLL_MAX_S = 0.02

_POLL_MIN_S = 0.001
_SYNCHRONOUS = ("FULL", "NORMAL", "OFF")


@dataclass(frozen=True, kw_only=True)
class SQLiteConfig(BrokerConfig):
    """Options of ``sqlite://``.

    Attributes:
        path: the database file (absolute; from the URL's path).
        synchronous: SQLite's ``PRAGMA synchronous``: ``FULL``, ``NORMAL`` or ``OFF``.
        busy_timeout_s: how long a write waits for the write lock before BrokerTimeoutError.
        poll_max_s: longest pause between change checks while ``receive`` waits for messages
            from other processes (publishes from the same process wake it at once).
        retention_max_age_s: if set, publishing drops messages older than this (at most once a
            second per topic), whether consumed or not.
        retention_max_messages: if set, publishing keeps only the newest this many messages per
            partition (at most once a second per topic).
    """

    path: str
    synchronous: Literal["FULL", "NORMAL", "OFF"] = DEFAULT_SYNCHRONOUS
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
    poll_max_s: float = DEFAULT_POLL_MAX_S
    retention_max_age_s: float | None = None
    retention_max_messages: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ValueError("path must name a database file")
        if self.synchronous not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be FULL, NORMAL or OFF, got {self.synchronous!r}")
        if not self.poll_max_s > 0:
            raise ValueError(f"poll_max_s must be > 0, got {self.poll_max_s}")
        for name in ("busy_timeout_s", "retention_max_age_s", "retention_max_messages"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")


class SQLiteBroker(Broker):
    """Embedded log broker on one SQLite file (``sqlite:///path.db``); safe across processes."""

    scheme = "sqlite"
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
            Capability.MULTI_PROCESS,
        }
    )

    def __init__(self, config: SQLiteConfig) -> None:
        """Open the database ``config.path``, creating it and its parent folders if missing.

        Raises:
            BrokerConnectionError: if the file cannot be created or opened.
            BrokerError: if it is not an infeed database, or has an unknown schema version.
        """
        super().__init__(config)
        self._cfg = config
        try:
            os.makedirs(os.path.dirname(config.path) or ".", exist_ok=True)
        except OSError as exc:
            raise BrokerConnectionError(f"cannot create the folder of {config.path}: {exc}") from exc
        self._db = Pool(config.path, synchronous=config.synchronous, busy_timeout_s=config.busy_timeout_s)
        self._db.init_schema()
        self._spread = itertools.count()  # round-robin over partitions for keyless messages
        self._retention = retention.Retention(
            max_age_s=config.retention_max_age_s, max_messages=config.retention_max_messages
        )
        self._consumers: weakref.WeakSet[_SQLiteConsumer] = weakref.WeakSet()
        self._consumers_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> Self:
        """Open ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (options in the query).

        Raises:
            ConfigError: for a host, a missing path, ``:memory:``, or a bad option.
        """
        parts = urlsplit(url)
        if parts.scheme != "sqlite":
            raise ConfigError(f"not a sqlite URL: {url!r}")
        if parts.netloc or parts.fragment:
            raise ConfigError(
                f"sqlite URL {url!r} takes no host or fragment: use sqlite:///relative/path.db "
                "or sqlite:////absolute/path.db"
            )
        raw = unquote(parts.path)[1:]
        if not raw or raw.endswith("/"):
            raise ConfigError(f"sqlite URL {url!r} names no database file: use e.g. sqlite:///./queue.db")
        if raw == ":memory:" or raw.startswith("file:"):
            raise ConfigError(
                f"sqlite URL {url!r}: in-memory and URI databases are not supported "
                "(several connections share the file); use memory:// instead"
            )
        return cls(parse_options(parts.query, SQLiteConfig, path=os.path.abspath(raw)))

    def __repr__(self) -> str:
        return f"<SQLiteBroker sqlite:///{self._cfg.path}>"

    def _topic(self, conn: sqlite3.Connection, name: str, *, create: bool) -> tuple[int, list[log.Part]]:
        found = log.find_topic(conn, name)
        if found is not None:
            return found
        if not create:
            raise TopicNotFoundError(f"no topic {name!r}")
        return log.create_topic(conn, name, self._cfg.default_partitions)

    # -- topics -------------------------------------------------------------------------------

    def create_topic(self, topic: str, *, partitions: int = 1) -> None:
        """Create a topic with ``partitions`` partitions (a no-op if it exists alike).

        Raises:
            BrokerError: if it exists with another partition count.
        """
        check_topic_name(topic)
        if partitions <= 0:
            raise ValueError(f"partitions must be > 0, got {partitions}")
        with self._db.tx() as conn:
            found = log.find_topic(conn, topic)
            if found is None:
                log.create_topic(conn, topic, partitions)
            elif len(found[1]) != partitions:
                raise BrokerError(f"topic {topic!r} exists with {len(found[1])} partitions, not {partitions}")

    def delete_topic(self, topic: str) -> None:
        """Delete a topic with its messages and groups.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        with self._db.tx() as conn:
            log.delete_topic(conn, *self._topic(conn, topic, create=False))
        self._db.notify()

    def list_topics(self) -> list[str]:
        """Return topic names, sorted."""
        return sorted(r[0] for r in self._db.read("SELECT name FROM topics"))

    def describe_topic(self, topic: str) -> TopicInfo:
        """Return partitions and groups (committed offsets, lag, pending) of ``topic``.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        with self._db.tx(write=False) as conn:
            topic_id, parts = self._topic(conn, topic, create=False)
            groups = log.group_infos(conn, topic_id, parts)
        partitions = tuple(PartitionInfo(i, p.low, p.high, p.high - p.low) for i, p in enumerate(parts))
        return TopicInfo(topic, partitions, tuple(groups))

    def trim(
        self,
        topic: str,
        *,
        committed: bool = True,
        max_age_s: float | None = None,
        max_messages: int | None = None,
    ) -> int:
        """Drop old messages from every partition of ``topic``, for every group.

        Args:
            topic: the topic.
            committed: drop what every group has committed past (a group that never committed
                keeps everything).
            max_age_s: drop messages published more than this many seconds ago.
            max_messages: keep only the newest this many messages per partition.

        Returns:
            how many messages were dropped.

        Raises:
            TopicNotFoundError: if there is no such topic.
        """
        check_trim_limits(max_age_s=max_age_s, max_messages=max_messages)
        with self._db.tx() as conn:
            _, parts = self._topic(conn, topic, create=False)
            return retention.trim_parts(
                conn, parts, committed=committed, max_age_s=max_age_s, max_messages=max_messages
            )

    # -- publish ------------------------------------------------------------------------------

    def publish_many(self, topic: str, messages: Iterable[Message | bytes]) -> None:
        """Append messages in one transaction; every size is checked before it starts.

        Raises:
            PayloadTooLargeError: if any payload is too large; nothing of the call is written.
            BrokerTimeoutError: if another writer held the lock for ``busy_timeout_s``.
            BrokerError: the database failed; nothing of the call is written.
        """
        check_topic_name(topic)
        limit = self._cfg.max_payload_bytes
        prepared: list[log.Row] = []
        for m in messages:
            if type(m) is bytes and len(m) <= limit:  # the common case, without the calls below
                prepared.append((m, None, None, None))
                continue
            msg = Message(m) if isinstance(m, bytes | bytearray | memoryview) else m
            headers = check_headers(msg.headers)
            payload = check_payload(msg.payload, limit)
            text = json.dumps(headers, separators=(",", ":")) if headers else None
            prepared.append((payload, normalize_key(msg.key), text, msg.partition))
        with self._db.tx() as conn:
            self._append(conn, topic, prepared)
        self._db.notify()

    def _append(self, conn: sqlite3.Connection, topic: str, prepared: list[log.Row]) -> None:
        log.append(conn, topic, self._topic(conn, topic, create=True)[1], prepared, self._spread)
        self._retention.after_publish(conn, topic)

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
        """Join ``group`` on ``topic`` (created with ``default_partitions`` if missing).

        Args:
            topic: the topic.
            group: the consumer group name.
            start: where a group with no state yet begins: ``earliest`` or ``latest``.
            partitions: read only these partitions (manual assignment); default all.
            dead_letter_topic: where ``nack(requeue=False)`` sends; default ``TOPIC.dlq``.
        """
        check_topic_name(topic)
        if not group or not isinstance(group, str):
            raise ValueError(f"group must be a non-empty string, got {group!r}")
        if start not in ("earliest", "latest"):
            raise ValueError(f"start must be 'earliest' or 'latest', got {start!r}")
        if dead_letter_topic is not None:
            check_topic_name(dead_letter_topic)
        with self._db.tx() as conn:
            topic_id, parts = self._topic(conn, topic, create=True)
            n = len(parts)
            chosen = list(range(n)) if partitions is None else list(dict.fromkeys(partitions))
            if not chosen:
                raise ValueError("partitions must name at least one partition (or be None for all)")
            for p in chosen:
                if not 0 <= p < n:
                    raise ValueError(f"partition {p} out of range 0..{n - 1} of {topic!r}")
            group_id, gps = log.join_group(conn, topic_id, parts, group, latest=start == "latest")
        consumer = _SQLiteConsumer(self, topic, group, group_id, gps, chosen, dead_letter_topic)
        with self._consumers_lock:
            self._consumers.add(consumer)
        return consumer

    def close(self) -> None:
        """Give back the leases of this broker's open consumers, then close connections. Idempotent."""
        if self._db.closed:
            return
        with self._consumers_lock:
            consumers = list(self._consumers)
        try:
            for c in consumers:
                c.close()
        finally:
            self._db.close()


class _SQLiteConsumer(Consumer):
    def __init__(
        self,
        broker: SQLiteBroker,
        topic: str,
        group: str,
        group_id: int,
        gps: dict[int, int],
        partitions: list[int],
        dlq: str | None,
    ) -> None:
        super().__init__(broker, topic, group, dlq)
        self._b = broker
        self._db = broker._db
        self._group_id = group_id
        self._gps = gps  # partition -> group_partitions.id, for every partition of the topic
        self._assigned = [(p, gps[p]) for p in partitions]
        self._owner = random.getrandbits(62)  # marks this member's leases, for close()
        self._pid = os.getpid()
        self._closed = False
        self._next = 0
        marks = ", ".join("?" * len(self._assigned))
        self._probe_sql = (
            "SELECT p.high - max(gp.cursor, p.low), (SELECT min(deadline) FROM leases WHERE gp = gp.id) "
            f"FROM group_partitions gp JOIN partitions p ON p.id = gp.pid WHERE gp.id IN ({marks})"
        )

    def _check(self) -> None:
        if self._closed:
            raise ConsumerClosedError(f"consumer of group {self.group!r} on {self.topic!r} is closed")
        if self._db.closed:
            raise BrokerError("broker is closed")

    def _gone(self) -> TopicNotFoundError:
        return TopicNotFoundError(f"topic {self.topic!r} was deleted")

    def receive(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        return self._receive(max_messages, timeout_s, acked=False)

    def receive_acked(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        """``receive`` whose transaction writes no lease (the ack is the same transaction)."""
        return self._receive(max_messages, timeout_s, acked=True)

    def _receive(self, max_messages: int, timeout_s: float, *, acked: bool) -> list[Delivery]:
        if max_messages <= 0:
            raise ValueError(f"max_messages must be > 0, got {max_messages}")
        self._check()
        deadline = time.monotonic() + max(0.0, timeout_s)
        delay = _POLL_MIN_S
        while True:
            generation, version = self._db.generation, self._db.data_version()
            ready, due = self._probe()
            if ready:
                out = self._take(max_messages, acked=acked)
                if out:
                    return out
                due = math.inf  # another member was faster: its commit changes data_version
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                woken = self._db.wait(generation, min(delay, remaining, max(0.0, due - time.time())))
                delay = min(delay * 2, self._b._cfg.poll_max_s)
                self._check()
                if woken or time.time() >= due or self._db.data_version() != version:
                    break

    def _probe(self) -> tuple[bool, float]:
        """Read-only: is anything deliverable now; if not, when does the next lease fall due?"""
        rows = self._db.read(self._probe_sql, [gp for _, gp in self._assigned])
        if len(rows) != len(self._assigned):
            raise self._gone()
        now, due = time.time(), math.inf
        for new, deadline in rows:
            if new > 0 or (deadline is not None and deadline <= now):
                return True, now
            if deadline is not None:
                due = min(due, deadline)
        return False, due

    def _take(self, limit: int, *, acked: bool) -> list[Delivery]:
        """One write transaction over the assigned partitions, starting one further each call."""
        out: list[Delivery] = []
        n = len(self._assigned)
        with self._db.tx() as conn:
            # Lease deadlines are compared between processes, so they are wall-clock time:
            # time.monotonic() has an origin private to each process (STYLE.md wants it elsewhere).
            now = time.time()
            until = now + self._b._cfg.ack_timeout_s
            for k in range(n):
                if len(out) >= limit:
                    break
                part, gp = self._assigned[(self._next + k) % n]
                got = log.lease(
                    conn,
                    Position(self.topic, part, 0),
                    gp,
                    limit - len(out),
                    self._owner,
                    now,
                    until,
                    acked=acked,
                )
                if got is None:
                    raise self._gone()
                out.extend(got)
        self._next = (self._next + 1) % n
        return out

    def _settle(self, conn: sqlite3.Connection, items: list[Delivery], *, requeue: bool) -> list[Delivery]:
        """Ack (or requeue) the lease of each delivery; return those whose lease was stale."""
        gps = self._gps
        keys = [
            (gps.get(d.position.partition, -1), d.position.offset, r if type(r) is int else -1, i)
            for i, d in enumerate(items)
            for r in (d.receipt,)
        ]
        by_gp: dict[int, list[tuple[int, int, int, int]]] = {}
        if len({k[0] for k in keys}) == 1:
            by_gp[keys[0][0]] = keys
        else:
            for k in keys:
                by_gp.setdefault(k[0], []).append(k)
        lost = [k[3] for k in by_gp.pop(-1, [])]
        for gp, group in by_gp.items():
            lost += log.settle(conn, gp, group, requeue=requeue)
        if (
            lost
            and not conn.execute("SELECT 1 FROM consumer_groups WHERE id = ?", (self._group_id,)).fetchone()
        ):
            raise self._gone()
        return [items[i] for i in sorted(lost)]

    def _deliveries(self, deliveries: Delivery | Iterable[Delivery]) -> list[Delivery]:
        items = as_deliveries(deliveries)
        for topic in {d.position.topic for d in items} - {self.topic}:
            raise ValueError(f"delivery from topic {topic!r} given to a {self.topic!r} consumer")
        self._check()
        return items

    def ack(self, deliveries: Delivery | Iterable[Delivery]) -> None:
        items = self._deliveries(deliveries)
        if items:
            with self._db.tx() as conn:
                lost = self._settle(conn, items, requeue=False)
            _raise_lost(lost)

    def nack(
        self, deliveries: Delivery | Iterable[Delivery], *, requeue: bool = True, reason: str = ""
    ) -> None:
        items = self._deliveries(deliveries)
        if not items:
            return
        with self._db.tx() as conn:
            # The valid leases are settled (and dead-lettered) even when some are stale.
            lost = self._settle(conn, items, requeue=requeue)
            if not requeue:
                stale = {id(d) for d in lost}
                dead: list[log.Row] = [
                    (
                        d.payload,
                        d.key,
                        json.dumps(dead_letter_headers(d, reason), separators=(",", ":")),
                        None,
                    )
                    for d in items
                    if id(d) not in stale
                ]
                if dead:
                    self._b._append(conn, self.dead_letter_topic, dead)
        self._db.notify()
        _raise_lost(lost)

    def commit(self, positions: Position | Iterable[Position]) -> None:
        items = as_positions(positions)
        self._check()
        with self._db.tx() as conn:
            extents = self._extents(conn)
            for pos in items:
                _check_position(pos, self.topic, extents)
            conn.executemany(
                "UPDATE group_partitions SET committed = ? WHERE id = ?",
                [(pos.offset, self._gps[pos.partition]) for pos in items],
            )

    def committed(self) -> dict[int, Position]:
        self._check()
        rows = self._db.read(log.COMMITTED_SQL, (self._group_id,))
        if not rows:
            raise self._gone()
        return {part: Position(self.topic, part, c) for part, c in sorted(rows) if c is not None}

    def seek(self, positions: Position | Iterable[Position]) -> None:
        items = as_positions(positions)
        self._check()
        with self._db.tx() as conn:
            extents = self._extents(conn)
            for pos in items:
                _check_position(pos, self.topic, extents)
                log.seek(conn, self._gps[pos.partition], pos.offset, extents[pos.partition][0])
        self._db.notify()

    def _extents(self, conn: sqlite3.Connection) -> dict[int, tuple[int, int]]:
        """Partition -> (low, high) of the topic."""
        rows = conn.execute(log.EXTENTS_SQL, (self._group_id,)).fetchall()
        if not rows:
            raise self._gone()
        return {part: (low, high) for part, _, low, high in rows}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A copy inherited through fork must not give back the parent's leases.
        if self._pid == os.getpid() and not self._db.closed:
            with self._db.tx() as conn:
                log.release(conn, self._owner, list(self._gps.values()))
            self._db.notify()


def _raise_lost(lost: list[Delivery]) -> None:
    if lost:
        raise LeaseLostError(
            f"{len(lost)} deliveries lost their lease (first: {lost[0].position}); "
            "they were or will be delivered to another member",
            positions=[d.position for d in lost],
        )


def _check_position(pos: Position, topic: str, extents: dict[int, tuple[int, int]]) -> None:
    if pos.topic != topic:
        raise ValueError(f"position {pos} is not on topic {topic!r}")
    if pos.partition not in extents:
        raise ValueError(f"position {pos}: no partition {pos.partition}")
    high = extents[pos.partition][1]
    if pos.offset > high:
        raise ValueError(f"position {pos} is past the end of partition {pos.partition} (next offset {high})")
