"""Plain ``sqlite3`` as a queue: the baseline of ``sqlite://``.

WAL with ``synchronous=NORMAL`` (infeed's default durability); one table
``(id INTEGER PRIMARY KEY, payload BLOB)``; produce is ``executemany`` of a batch per transaction.
Consume selects the next batch by id range and, in the same transaction, settles each message:
``consume-mark`` records the ids in a table ``acked (id INTEGER PRIMARY KEY)`` (the messages stay,
as in infeed's log), ``consume`` deletes them (a queue). Both run on the same filled table, the
mark first; the faster is the baseline. (A single cursor row would be cheaper still, but that is
a commit, not a per-message ack: figure 1 measures consume+ack.)
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from infeed.bench.baselines import RawSide, expect

__all__ = ["SQLiteRaw"]

_BATCH = 500


class SQLiteRaw(RawSide):
    """``sqlite3``, WAL, one table, a transaction per batch of 500."""

    label = (
        "sqlite3 WAL synchronous=NORMAL: executemany 500 rows/tx; "
        "SELECT 500 by id range + INSERT their ids into acked | + DELETE them, 1 tx per batch"
    )
    consume_ops = ("consume-mark", "consume")

    def __init__(self, *, url: str | None, workdir: Path) -> None:
        super().__init__(url=url, workdir=workdir)
        self._conns: dict[str, sqlite3.Connection] = {}

    def _path(self, topic: str) -> Path:
        return self.workdir / f"{topic}.raw.db"

    def prepare(self, topic: str) -> None:
        """Create a fresh database file with one table."""
        conn = sqlite3.connect(self._path(topic), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        conn.execute("CREATE TABLE acked (id INTEGER PRIMARY KEY)")
        self._conns[topic] = conn

    def produce(self, topic: str, batches: list[list[bytes]], op: str) -> None:
        """Insert each batch in one transaction."""
        conn = self._conns[topic]
        for batch in batches:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO q (payload) VALUES (?)", [(p,) for p in batch])
            conn.execute("COMMIT")

    def consume(self, topic: str, count: int, op: str) -> None:
        """Take 500 rows by id range and delete (or mark) them, one transaction per batch."""
        if op not in self.consume_ops:
            raise ValueError(f"unknown sqlite consume variant {op!r}")
        settle = (
            "DELETE FROM q WHERE id > ? AND id <= ?"
            if op == "consume"
            else "INSERT INTO acked (id) SELECT id FROM q WHERE id > ? AND id <= ?"
        )
        conn = self._conns[topic]
        last, got = 0, 0
        while got < count:
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(
                "SELECT id, payload FROM q WHERE id > ? ORDER BY id LIMIT ?", (last, _BATCH)
            ).fetchall()
            if rows:
                conn.execute(settle, (last, rows[-1][0]))
                last = rows[-1][0]
            conn.execute("COMMIT")
            if not rows:
                break
            got += len(rows)
        expect(got, count, f"sqlite3 {op}")

    def cleanup(self, topic: str) -> None:
        """Close the connection and remove the database files."""
        conn = self._conns.pop(topic, None)
        if conn is not None:
            conn.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{self._path(topic)}{suffix}").unlink()

    def close(self) -> None:
        """Close every open connection."""
        for topic in list(self._conns):
            self.cleanup(topic)
