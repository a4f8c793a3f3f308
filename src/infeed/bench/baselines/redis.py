"""redis-py (with hiredis) on Redis Streams: the baseline of ``redis://``.

Produce: XADD pipelined 500 per round trip, both plain (``produce``) and wrapped in MULTI/EXEC
(``produce-multi``): with ``appendfsync always`` a plain pipeline pays an fsync for every socket
read the server makes of it, MULTI/EXEC one per batch. Consume: XREADGROUP COUNT 500, then one
XACK of the whole batch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import redis

from infeed.bench.baselines import RECEIVE_TIMEOUT_S, BenchError, RawSide, expect

__all__ = ["RedisRaw"]

_BATCH = 500
_GROUP = "bench"
_FIELD = b"p"


class RedisRaw(RawSide):
    """redis-py: XADD pipelined 500 / XREADGROUP COUNT 500 + XACK."""

    label = (
        "redis-py+hiredis: XADD pipelined 500/round trip (plain | MULTI); "
        "XREADGROUP COUNT 500 + XACK of the batch"
    )
    produce_ops = ("produce", "produce-multi")

    def __init__(self, *, url: str | None, workdir: Path) -> None:
        super().__init__(url=url, workdir=workdir)
        self._r: Any = redis.Redis.from_url(self._require_url(), protocol=2)

    def prepare(self, topic: str) -> None:
        """Create the stream with its group (from the start)."""
        self._r.delete(topic)
        self._r.xgroup_create(topic, _GROUP, id="0", mkstream=True)

    def produce(self, topic: str, batches: list[list[bytes]], op: str) -> None:
        """XADD each batch in one pipeline (a MULTI/EXEC one for ``produce-multi``)."""
        multi = op == "produce-multi"
        for batch in batches:
            pipe = self._r.pipeline(transaction=multi)
            for payload in batch:
                pipe.xadd(topic, {_FIELD: payload})
            pipe.execute()

    def consume(self, topic: str, count: int, op: str) -> None:
        """XREADGROUP 500 at a time; XACK each batch."""
        got = 0
        block_ms = int(RECEIVE_TIMEOUT_S * 1000)
        while got < count:
            reply = self._r.xreadgroup(_GROUP, "c1", {topic: ">"}, count=_BATCH, block=block_ms)
            if not reply:
                break
            entries = reply[0][1]
            if not entries:
                raise BenchError(f"XREADGROUP on {topic} returned an empty batch")
            self._r.xack(topic, _GROUP, *[entry_id for entry_id, _ in entries])
            got += len(entries)
        expect(got, count, "redis consume")

    def cleanup(self, topic: str) -> None:
        """Delete the stream (and with it its group)."""
        with contextlib.suppress(redis.RedisError):
            self._r.delete(topic)

    def close(self) -> None:
        """Close the connection pool."""
        self._r.close()
