"""Retention of the ``sqlite://`` broker: ``trim`` on demand, and the retention options on publish.

Trimming deletes a prefix of a partition's rowid range (``_sqlite_log``) and raises its low
offset; what is dropped is gone for every group. Like the rest of the SQL, these functions run
inside the caller's write transaction.
"""

from __future__ import annotations

import math
import sqlite3
import time

from infeed.brokers._sqlite_log import OFFSET_BITS, Part, find_topic

#: Automatic retention runs at most this often per topic and broker object.
RETENTION_EVERY_S = 1.0


def trim_partition(
    conn: sqlite3.Connection, p: Part, *, committed: bool, cutoff: float | None, max_messages: int | None
) -> int:
    base, keep = p.pid << OFFSET_BITS, p.low
    if committed:
        marks = conn.execute("SELECT committed FROM group_partitions WHERE pid = ?", (p.pid,))
        keep = max(keep, min((m or 0 for (m,) in marks), default=keep))
    if max_messages is not None:
        keep = max(keep, p.high - max_messages)
    if cutoff is not None and keep < p.high:
        # Timestamps grow with offsets (both are taken inside the write transaction), so the old
        # messages are a prefix: find the first young one.
        row = conn.execute(
            "SELECT id FROM messages WHERE id >= ? AND id < ? AND ts >= ? ORDER BY id LIMIT 1",
            (base + keep, base + p.high, cutoff),
        ).fetchone()
        keep = row[0] - base if row else p.high
    if keep <= p.low:
        return 0
    conn.execute("DELETE FROM messages WHERE id >= ? AND id < ?", (base + p.low, base + keep))
    conn.execute("UPDATE partitions SET low = ? WHERE id = ?", (keep, p.pid))
    return keep - p.low


def trim_parts(
    conn: sqlite3.Connection,
    parts: list[Part],
    *,
    committed: bool,
    max_age_s: float | None,
    max_messages: int | None,
) -> int:
    """Trim every partition in ``parts`` by policy (``SQLiteBroker.trim``); return how many went."""
    cutoff = time.time() - max_age_s if max_age_s is not None else None
    return sum(
        trim_partition(conn, p, committed=committed, cutoff=cutoff, max_messages=max_messages) for p in parts
    )


class Retention:
    """The retention options of one broker object, applied to a topic right after a publish."""

    def __init__(self, *, max_age_s: float | None, max_messages: int | None) -> None:
        self.max_age_s = max_age_s
        self.max_messages = max_messages
        self._last_trim: dict[str, float] = {}

    def after_publish(self, conn: sqlite3.Connection, topic: str) -> None:
        """Trim ``topic`` if an option is set and it was not trimmed in the last second."""
        if self.max_age_s is None and self.max_messages is None:
            return
        now = time.monotonic()
        if now - self._last_trim.get(topic, -math.inf) < RETENTION_EVERY_S:
            return
        # In the publishing transaction, so a publish never fails after it was written.
        self._last_trim[topic] = now
        found = find_topic(conn, topic)
        if found is not None:
            trim_parts(
                conn, found[1], committed=False, max_age_s=self.max_age_s, max_messages=self.max_messages
            )
