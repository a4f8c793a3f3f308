"""The SQL of the ``sqlite://`` broker's operations, one function per step, inside a transaction.

Callers open the transaction (``Pool.tx``) and check arguments; these functions read and write
the tables of sqlite_schema.sql. A partition's messages are one rowid range of ``messages``:
``id = partition id << OFFSET_BITS | offset``, so appending, reading a batch, trimming and
deleting a topic are range operations on one B-tree, with no second index to keep up.
"""

from __future__ import annotations

import bisect
import itertools
import json
import operator
import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple, cast

from infeed.brokers.base import partition_for_key
from infeed.errors import BrokerError
from infeed.types import Delivery, GroupInfo, Position, trusted_delivery, trusted_position

OFFSET_BITS = 42
_MAX_PARTITION_ID = (1 << (63 - OFFSET_BITS)) - 1

#: A message ready to insert: payload, key, headers as JSON text, explicit partition.
Row = tuple[bytes, bytes | None, str | None, int | None]

_PARTITION = operator.itemgetter(3)

EXTENTS_SQL = (
    "SELECT p.part, gp.id, p.low, p.high FROM group_partitions gp "
    "JOIN partitions p ON p.id = gp.pid WHERE gp.group_id = ?"
)
COMMITTED_SQL = (
    "SELECT p.part, gp.committed FROM group_partitions gp "
    "JOIN partitions p ON p.id = gp.pid WHERE gp.group_id = ?"
)


class Part(NamedTuple):
    pid: int  # global partition id (partitions.id)
    low: int
    high: int


def find_topic(conn: sqlite3.Connection, name: str) -> tuple[int, list[Part]] | None:
    row = conn.execute("SELECT id FROM topics WHERE name = ?", (name,)).fetchone()
    if row is None:
        return None
    parts = conn.execute("SELECT id, low, high FROM partitions WHERE topic_id = ? ORDER BY part", row)
    return row[0], [Part(*p) for p in parts]


def create_topic(conn: sqlite3.Connection, name: str, n: int) -> tuple[int, list[Part]]:
    cur = conn.execute("INSERT INTO topics (name, created_at) VALUES (?, ?)", (name, time.time()))
    topic_id = cast(int, cur.lastrowid)
    (first,) = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM partitions").fetchone()
    pids = list(range(first, first + n))
    if pids[-1] > _MAX_PARTITION_ID:  # the ids are spent: reuse those of deleted topics
        used = {r[0] for r in conn.execute("SELECT id FROM partitions")}
        pids = list(itertools.islice((i for i in range(1, _MAX_PARTITION_ID + 1) if i not in used), n))
        if len(pids) < n:
            raise BrokerError(f"the database holds {len(used)} partitions, its limit; delete topics")
    conn.executemany(
        "INSERT INTO partitions (id, topic_id, part) VALUES (?, ?, ?)",
        [(pid, topic_id, i) for i, pid in enumerate(pids)],
    )
    return topic_id, [Part(pid, 0, 0) for pid in pids]


def delete_topic(conn: sqlite3.Connection, topic_id: int, parts: list[Part]) -> None:
    for p in parts:
        base = p.pid << OFFSET_BITS
        conn.execute("DELETE FROM messages WHERE id >= ? AND id < ?", (base, base + (1 << OFFSET_BITS)))
    groups = "SELECT id FROM consumer_groups WHERE topic_id = ?"
    conn.execute(
        f"DELETE FROM leases WHERE gp IN (SELECT id FROM group_partitions WHERE group_id IN ({groups}))",
        (topic_id,),
    )
    conn.execute(f"DELETE FROM group_partitions WHERE group_id IN ({groups})", (topic_id,))
    conn.execute("DELETE FROM consumer_groups WHERE topic_id = ?", (topic_id,))
    conn.execute("DELETE FROM partitions WHERE topic_id = ?", (topic_id,))
    conn.execute("DELETE FROM topics WHERE id = ?", (topic_id,))


def group_infos(conn: sqlite3.Connection, topic_id: int, parts: list[Part]) -> list[GroupInfo]:
    out = []
    for group_id, name in conn.execute(
        "SELECT id, name FROM consumer_groups WHERE topic_id = ?", (topic_id,)
    ).fetchall():
        rows = conn.execute(COMMITTED_SQL, (group_id,)).fetchall()
        committed = {part: c for part, c in sorted(rows) if c is not None}
        lag = {i: p.high - max(committed.get(i, p.low), p.low) for i, p in enumerate(parts)}
        (pending,) = conn.execute(
            "SELECT coalesce(sum(stop - start), 0) FROM leases WHERE owner IS NOT NULL AND gp IN "
            "(SELECT id FROM group_partitions WHERE group_id = ?)",
            (group_id,),
        ).fetchone()
        out.append(GroupInfo(name, committed, lag, pending))
    return sorted(out, key=lambda g: g.name)


def append(
    conn: sqlite3.Connection, topic: str, parts: list[Part], prepared: Sequence[Row], spread: Iterator[int]
) -> None:
    n = len(parts)
    highs = [p.high for p in parts]
    now = time.time()  # taken inside the write transaction, so timestamps grow with offsets
    if n == 1:
        if any(map(_PARTITION, prepared)):  # an explicit partition other than 0
            raise ValueError(f"partition out of range 0..0 of {topic!r}")
        base = (parts[0].pid << OFFSET_BITS) + highs[0]
        rows = [
            (base + j, key, headers, payload, now) for j, (payload, key, headers, _) in enumerate(prepared)
        ]
        highs[0] += len(rows)
    else:
        rows = []
        bases = [p.pid << OFFSET_BITS for p in parts]
        for payload, key, headers, partition in prepared:
            if partition is not None:
                if not 0 <= partition < n:
                    raise ValueError(f"partition {partition} out of range 0..{n - 1} of {topic!r}")
                i = partition
            elif key is not None:
                i = partition_for_key(key, n)
            else:
                i = next(spread) % n
            rows.append((bases[i] + highs[i], key, headers, payload, now))
            highs[i] += 1
    if max(highs) >> OFFSET_BITS:
        raise BrokerError(f"topic {topic!r} is out of offsets (2**{OFFSET_BITS}); use a new topic")
    conn.executemany("INSERT INTO messages (id, msg_key, headers, payload, ts) VALUES (?, ?, ?, ?, ?)", rows)
    conn.executemany(
        "UPDATE partitions SET high = ? WHERE id = ?",
        [(h, p.pid) for p, h in zip(parts, highs, strict=True) if h != p.high],
    )


def join_group(
    conn: sqlite3.Connection, topic_id: int, parts: list[Part], group: str, *, latest: bool
) -> tuple[int, dict[int, int]]:
    """Return the group's id and its group_partitions ids per partition, creating them if new."""
    cur = conn.execute(
        "INSERT OR IGNORE INTO consumer_groups (topic_id, name) VALUES (?, ?)", (topic_id, group)
    )
    if cur.rowcount:
        conn.executemany(
            "INSERT INTO group_partitions (group_id, pid, cursor) VALUES (?, ?, ?)",
            [(cur.lastrowid, p.pid, p.high if latest else p.low) for p in parts],
        )
    (group_id,) = conn.execute(
        "SELECT id FROM consumer_groups WHERE topic_id = ? AND name = ?", (topic_id, group)
    ).fetchone()
    return group_id, {part: gp for part, gp, *_ in conn.execute(EXTENTS_SQL, (group_id,))}


def lease(
    conn: sqlite3.Connection,
    pos: Position,
    gp: int,
    limit: int,
    owner: int,
    now: float,
    until: float,
    *,
    acked: bool = False,
) -> list[Delivery] | None:
    """Lease up to ``limit`` messages of one partition (``pos`` names it): those due again first.

    With ``acked`` they are handed out acked instead: no lease is written (and a due one taken
    is deleted), as if ``settle`` had acked them in the same transaction.

    Returns None if the group's partition is gone (the topic was deleted).
    """
    row = conn.execute(
        "SELECT gp.cursor, p.low, p.high, p.id FROM group_partitions gp "
        "JOIN partitions p ON p.id = gp.pid WHERE gp.id = ?",
        (gp,),
    ).fetchone()
    if row is None:
        return None
    cursor, low, high, pid = row
    base = pid << OFFSET_BITS
    if low:  # due leases of trimmed messages go away
        conn.execute("DELETE FROM leases WHERE gp = ? AND stop <= ? AND deadline <= ?", (gp, low, now))
        conn.execute(
            "UPDATE leases SET start = ? WHERE gp = ? AND start < ? AND deadline <= ?", (low, gp, low, now)
        )
    out: list[Delivery] = []
    for start, stop, count in conn.execute(
        "SELECT start, stop, deliveries FROM leases WHERE gp = ? AND deadline <= ? ORDER BY start LIMIT ?",
        (gp, now, limit),
    ).fetchall():
        if len(out) >= limit:
            break
        token, end = random.getrandbits(62), min(stop, start + limit - len(out))
        if end < stop:  # take the front of the range; the rest stays due
            conn.execute("UPDATE leases SET start = ? WHERE gp = ? AND start = ?", (end, gp, start))
            if not acked:
                conn.execute(
                    "INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (gp, start, end, token, owner, until, count + 1),
                )
        elif acked:
            conn.execute("DELETE FROM leases WHERE gp = ? AND start = ?", (gp, start))
        else:
            conn.execute(
                "UPDATE leases SET token = ?, owner = ?, deadline = ?, deliveries = ? "
                "WHERE gp = ? AND start = ?",
                (token, owner, until, count + 1, gp, start),
            )
        out += _read(conn, pos, base, start, end, count + 1, token)
    first = max(cursor, low)
    end = min(high, first + limit - len(out))
    if end > first:
        token = random.getrandbits(62)
        if not acked:
            conn.execute(
                "INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, 1)", (gp, first, end, token, owner, until)
            )
        conn.execute("UPDATE group_partitions SET cursor = ? WHERE id = ?", (end, gp))
        out += _read(conn, pos, base, first, end, 1, token)
    return out


def _read(
    conn: sqlite3.Connection, pos: Position, base: int, start: int, stop: int, count: int, token: int
) -> list[Delivery]:
    """Messages [start, stop) of the partition ``pos`` names, as deliveries."""
    topic, part = pos.topic, pos.partition
    return [
        trusted_delivery(
            payload,
            key,
            json.loads(headers) if headers else {},
            trusted_position(topic, part, i - base),
            count,
            ts,
            token,
        )
        for i, key, headers, payload, ts in conn.execute(
            "SELECT id, msg_key, headers, payload, ts FROM messages WHERE id >= ? AND id < ? ORDER BY id",
            (base + start, base + stop),
        )
    ]


def settle(
    conn: sqlite3.Connection, gp: int, keys: list[tuple[int, int, int, int]], *, requeue: bool
) -> list[int]:
    """Ack (or requeue) deliveries of one group partition, given as (gp, offset, token, index).

    Returns the indices of those whose lease was stale (held by no one, or under another token);
    the others are settled all the same.
    """
    keys.sort()
    lost: list[int] = []
    taken: list[tuple[tuple[int, int, int | None, int | None, float, int], list[int]]] = []
    i = 0
    while i < len(keys):
        offset = keys[i][1]
        row = conn.execute(
            "SELECT start, stop, token, owner, deadline, deliveries FROM leases "
            "WHERE gp = ? AND start <= ? ORDER BY start DESC LIMIT 1",
            (gp, offset),
        ).fetchone()
        if row is None or offset >= row[1]:
            lost.append(keys[i][3])
            i += 1
            continue
        j = bisect.bisect_left(keys, (gp, row[1]), i)  # every key inside this lease
        chunk, i = keys[i:j], j
        offsets = [k[1] for k in chunk]
        if {k[2] for k in chunk} == {row[2]} and len(set(offsets)) == len(offsets):
            taken.append((row, offsets))  # the common case: all valid, no duplicates
            continue
        done: list[int] = []
        for _, o, t, index in chunk:
            if t != row[2] or (done and done[-1] == o):  # stale, or the same delivery twice
                lost.append(index)
            else:
                done.append(o)
        if done:
            taken.append((row, done))
    for (start, stop, token, owner, deadline, count), done in taken:
        kept, gone = _split(start, stop, done)
        conn.execute("DELETE FROM leases WHERE gp = ? AND start = ?", (gp, start))
        rows: list[tuple[int, int, int, int | None, int | None, float, int]]
        rows = [(gp, a, b, token, owner, deadline, count) for a, b in kept]
        if requeue:
            rows += [(gp, a, b, None, None, 0.0, count) for a, b in gone]
        conn.executemany("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    return lost


def _split(start: int, stop: int, done: list[int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split [start, stop) into the runs not in ``done`` (sorted offsets) and the runs in it."""
    if len(done) == stop - start:
        return [], [(start, stop)]
    kept: list[tuple[int, int]] = []
    gone: list[tuple[int, int]] = []
    at = start
    for offset in done:
        if offset > at:
            kept.append((at, offset))
        if gone and gone[-1][1] == offset:
            gone[-1] = (gone[-1][0], offset + 1)
        else:
            gone.append((offset, offset + 1))
        at = offset + 1
    if at < stop:
        kept.append((at, stop))
    return kept, gone


def release(conn: sqlite3.Connection, owner: int, gps: list[int]) -> None:
    """Give back every lease ``owner`` holds on these group partitions: due at once, same count."""
    conn.execute(
        "UPDATE leases SET token = NULL, owner = NULL, deadline = 0 "
        f"WHERE owner = ? AND gp IN ({', '.join('?' * len(gps))})",
        (owner, *gps),
    )


def seek(conn: sqlite3.Connection, gp: int, offset: int, low: int) -> None:
    """Drop the group partition's leases at or after ``offset`` and move its cursor there."""
    conn.execute("DELETE FROM leases WHERE gp = ? AND start >= ?", (gp, offset))
    conn.execute(
        "UPDATE leases SET stop = ? WHERE gp = ? AND start < ? AND stop > ?", (offset, gp, offset, offset)
    )
    conn.execute("UPDATE group_partitions SET cursor = ? WHERE id = ?", (max(offset, low), gp))
