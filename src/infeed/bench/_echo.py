"""Raw request-reply over each engine's own client: the baseline of figure 5 (no infeed).

A ``RawEcho`` has two ends. The responder (in its own process) takes each request's bytes, runs
the model on them (``np.frombuffer`` -> tensor -> ``mlp-784`` -> output bytes) and publishes the
output on the reply channel; the requester publishes a request and waits for the next reply. With
one sequential requester no correlation id is needed. Each engine does the least it can:

* sqlite: ``sqlite3`` in WAL mode, tables ``req`` and ``rep`` (``id INTEGER PRIMARY KEY``); a
  waiting end polls ``PRAGMA data_version`` with the same 1 ms -> 20 ms backoff as infeed's broker.
* redis: ``XADD`` and a blocking ``XREAD`` (no group, no ack: the cheapest round trip there is).
* kafka: confluent-kafka, ``linger.ms=0``, ``acks=all``, ``produce`` + ``flush``; consumers
  ``assign`` partition 0 at its high watermark (no group join) and ``poll``.
"""

from __future__ import annotations

import abc
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ENGINES", "RawEcho", "raw_echo"]

#: Engines with a raw round trip.
ENGINES = ("sqlite", "redis", "kafka")

_POLL_MIN_S = 0.001
#: Seconds a new Kafka topic may take to get a partition leader.
_SETUP_S = 30.0
_POLL_MAX_S = 0.02

Handler = Callable[[bytes], bytes]


class RawEcho(abc.ABC):
    """One end of a raw request-reply channel named ``name``."""

    @abc.abstractmethod
    def request(self, payload: bytes, timeout_s: float) -> bytes:
        """Publish ``payload``, return the next reply (raises TimeoutError)."""

    @abc.abstractmethod
    def serve(self, handler: Handler, stop: threading.Event) -> None:
        """Answer requests with ``handler`` until ``stop`` is set."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections."""


class _SQLiteEcho(RawEcho):
    def __init__(self, path: str, name: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        for table in ("req", "rep"):
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY, p BLOB NOT NULL)")
        self.last = {t: self._max(t) for t in ("req", "rep")}

    def _max(self, table: str) -> int:
        return int(self.conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0])

    def _next(self, table: str, timeout_s: float, stop: threading.Event | None = None) -> bytes | None:
        end = time.monotonic() + timeout_s
        delay = _POLL_MIN_S
        while True:
            version = self.conn.execute("PRAGMA data_version").fetchone()[0]
            row = self.conn.execute(
                f"SELECT id, p FROM {table} WHERE id > ? ORDER BY id LIMIT 1", (self.last[table],)
            ).fetchone()
            if row is not None:
                self.last[table] = row[0]
                return bytes(row[1])
            while self.conn.execute("PRAGMA data_version").fetchone()[0] == version:
                if time.monotonic() > end or (stop is not None and stop.is_set()):
                    return None
                time.sleep(delay)
                delay = min(delay * 2, _POLL_MAX_S)

    def request(self, payload: bytes, timeout_s: float) -> bytes:
        self.conn.execute("INSERT INTO req (p) VALUES (?)", (payload,))
        reply = self._next("rep", timeout_s)
        if reply is None:
            raise TimeoutError("no raw sqlite reply")
        return reply

    def serve(self, handler: Handler, stop: threading.Event) -> None:
        while not stop.is_set():
            payload = self._next("req", 0.2, stop)
            if payload is not None:
                self.conn.execute("INSERT INTO rep (p) VALUES (?)", (handler(payload),))

    def close(self) -> None:
        self.conn.close()


class _RedisEcho(RawEcho):
    def __init__(self, url: str, name: str) -> None:
        import redis

        self.r: Any = redis.Redis.from_url(url, protocol=2)
        self.req, self.rep = f"{name}.req", f"{name}.rep"
        self.last: dict[str, Any] = {}
        for key in (self.req, self.rep):  # a concrete id, not "$": nothing sent from now on is missed
            entries = self.r.xrevrange(key, count=1)
            self.last[key] = entries[0][0] if entries else b"0-0"

    def _next(self, key: str, block_ms: int) -> bytes | None:
        reply = self.r.xread({key: self.last[key]}, count=1, block=block_ms)
        if not reply:
            return None
        entry_id, fields = reply[0][1][0]
        self.last[key] = entry_id
        return bytes(fields[b"p"])

    def request(self, payload: bytes, timeout_s: float) -> bytes:
        self.r.xadd(self.req, {b"p": payload})
        reply = self._next(self.rep, int(timeout_s * 1000))
        if reply is None:
            raise TimeoutError("no raw redis reply")
        return reply

    def serve(self, handler: Handler, stop: threading.Event) -> None:
        while not stop.is_set():
            payload = self._next(self.req, 200)
            if payload is not None:
                self.r.xadd(self.rep, {b"p": handler(payload)})

    def close(self) -> None:
        self.r.close()


class _KafkaEcho(RawEcho):
    def __init__(self, url: str, name: str) -> None:
        from confluent_kafka import Consumer, Producer, TopicPartition
        from confluent_kafka.admin import AdminClient
        from confluent_kafka.cimpl import NewTopic

        servers = urlsplit(url).netloc
        self.req, self.rep = f"{name}.req", f"{name}.rep"
        admin = AdminClient({"bootstrap.servers": servers})
        existing = admin.list_topics(timeout=30).topics
        new = [NewTopic(t, 1, 1) for t in (self.req, self.rep) if t not in existing]
        for future in admin.create_topics(new).values() if new else ():
            try:
                future.result(30)
            except Exception as exc:  # created by the other end meanwhile
                if "already exists" not in str(exc).lower():
                    raise
        self.producer: Any = Producer({"bootstrap.servers": servers, "linger.ms": 0, "acks": "all"})
        self.consumers: dict[str, Any] = {}
        for topic in (self.req, self.rep):
            consumer = Consumer(
                {"bootstrap.servers": servers, "group.id": f"{topic}.raw", "enable.auto.commit": False}
            )
            # A concrete offset, not OFFSET_END (resolved lazily): nothing sent from now on is missed.
            consumer.assign([TopicPartition(topic, 0, _high_watermark(consumer, topic))])
            self.consumers[topic] = consumer

    def _next(self, topic: str, timeout_s: float) -> bytes | None:
        msg = self.consumers[topic].poll(timeout_s)
        if msg is None:
            return None
        if msg.error() is not None:
            raise RuntimeError(f"raw Kafka consume: {msg.error()}")
        value: bytes = msg.value()
        return value

    def request(self, payload: bytes, timeout_s: float) -> bytes:
        self.producer.produce(self.req, payload)
        self.producer.flush(timeout_s)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            reply = self._next(self.rep, max(0.0, end - time.monotonic()))
            if reply is not None:
                return reply
        raise TimeoutError("no raw Kafka reply")

    def serve(self, handler: Handler, stop: threading.Event) -> None:
        while not stop.is_set():
            payload = self._next(self.req, 0.2)
            if payload is not None:
                self.producer.produce(self.rep, handler(payload))
                self.producer.flush(30)

    def close(self) -> None:
        for consumer in self.consumers.values():
            consumer.close()
        self.producer.flush(1)


def _high_watermark(consumer: Any, topic: str) -> int:
    """Partition 0's high watermark, retried while a new topic has no leader yet."""
    from confluent_kafka import KafkaException, TopicPartition

    deadline = time.monotonic() + _SETUP_S
    while True:
        try:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
            return int(high)
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def raw_echo(engine: str, url: str, name: str) -> RawEcho:
    """Open one end of the raw channel ``name`` on ``engine`` at ``url`` (sqlite: a file path).

    Raises:
        ValueError: no raw round trip for ``engine``.
    """
    if engine == "sqlite":
        return _SQLiteEcho(str(Path(url)), name)
    if engine == "redis":
        return _RedisEcho(url, name)
    if engine == "kafka":
        return _KafkaEcho(url, name)
    raise ValueError(f"no raw round trip for {engine!r}; known: {', '.join(ENGINES)}")
