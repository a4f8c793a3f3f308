"""The topic registry of the ``amqp://`` backend: one RabbitMQ stream that every client folds.

AMQP 0-9-1 cannot list exchanges, queues or bindings (only the management plugin can), so the
backend keeps its own record of topics and groups in the durable stream queue ``infeed:registry``
(``:`` cannot appear in a topic name, so it never clashes with one). Each client reads it from the
start once, then follows its tail. A read that must see every earlier write (list, describe,
create, delete) first appends a ``sync`` record with a fresh nonce and waits until its own reader
has folded it: linearizable, at the cost of one small record per read.

Records (JSON bodies): ``topic`` (name, model, partitions, queue_type, max_priority; the first one
after a ``delete`` wins), ``group`` (name, group), ``delete`` (name), ``sync`` (nonce).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika

from infeed.brokers._rabbitmq_io import Chan, Item, Loop
from infeed.errors import BrokerTimeoutError

REGISTRY_QUEUE = "infeed:registry"
_PROPS = pika.BasicProperties(delivery_mode=2, content_type="application/json")


@dataclass
class TopicMeta:
    """What the registry knows about one topic."""

    model: str  # "queue" or "stream"
    partitions: int
    queue_type: str
    max_priority: int = 0
    groups: set[str] = field(default_factory=set)

    def record(self, name: str) -> dict[str, Any]:
        return {
            "op": "topic",
            "name": name,
            "model": self.model,
            "partitions": self.partitions,
            "queue_type": self.queue_type,
            "max_priority": self.max_priority,
        }

    def copy(self) -> TopicMeta:
        return TopicMeta(self.model, self.partitions, self.queue_type, self.max_priority, set(self.groups))


def item(record: dict[str, Any]) -> Item:
    return ("", REGISTRY_QUEUE, json.dumps(record).encode(), _PROPS)


class Registry:
    """Folded registry state plus the stream reader that keeps it current."""

    def __init__(self, live: Callable[[], Loop], publish: Callable[[Sequence[Item]], None]) -> None:
        self._live = live
        self._publish = publish
        self._cond = threading.Condition()
        self._topics: dict[str, TopicMeta] = {}
        self._next: int | None = None  # next stream offset to fold
        self._chan: Chan | None = None
        self._wanted: set[str] = set()
        self._seen: set[str] = set()

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        self._publish([item(r) for r in records])

    def sync(self) -> dict[str, TopicMeta]:
        """Return every topic, after folding every record written before this call."""
        loop = self._live()
        self._ensure_reader(loop)
        nonce = uuid.uuid4().hex
        with self._cond:
            self._wanted.add(nonce)
        try:
            self.append([{"op": "sync", "nonce": nonce}])
            deadline = time.monotonic() + loop.timeout_s
            with self._cond:
                while nonce not in self._seen:
                    chan = self._chan
                    if chan is not None and chan.error is not None:
                        raise chan.error
                    if loop.error is not None:
                        raise loop.error
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BrokerTimeoutError(
                            f"the RabbitMQ registry reader fell {loop.timeout_s}s behind"
                        )
                    self._cond.wait(min(left, 0.1))
                return {name: meta.copy() for name, meta in self._topics.items()}
        finally:
            with self._cond:
                self._wanted.discard(nonce)
                self._seen.discard(nonce)

    def _ensure_reader(self, loop: Loop) -> None:
        with self._cond:
            chan = self._chan
            if chan is not None and chan.loop is loop and not chan.closed:
                return
            start = "first" if self._next is None else self._next
        chan = loop.channel()
        chan.rpc(
            lambda cb: chan.impl.queue_declare(
                REGISTRY_QUEUE, durable=True, arguments={"x-queue-type": "stream"}, callback=cb
            ),
            "declaring the registry stream",
        )
        chan.rpc(lambda cb: chan.impl.basic_qos(prefetch_count=1000, callback=cb), "registry qos")
        chan.rpc(
            lambda cb: chan.impl.basic_consume(
                REGISTRY_QUEUE, self._on_record, arguments={"x-stream-offset": start}, callback=cb
            ),
            "reading the registry stream",
        )
        with self._cond:
            self._chan = chan
            self._cond.notify_all()

    def _on_record(self, impl: Any, method: Any, props: Any, body: bytes) -> None:
        # on the I/O thread
        impl.basic_ack(method.delivery_tag)
        offset = int((props.headers or {}).get("x-stream-offset", -1))
        with self._cond:
            if self._next is not None and 0 <= offset < self._next:
                return  # read again after a reconnect
            if offset >= 0:
                self._next = offset + 1
            try:
                record = json.loads(body)
                self._fold(record)
            except (ValueError, KeyError, TypeError):
                return  # not ours: the registry ignores what it cannot read
            self._cond.notify_all()

    def _fold(self, r: dict[str, Any]) -> None:
        op = r["op"]
        if op == "sync":
            if r["nonce"] in self._wanted:
                self._seen.add(r["nonce"])
        elif op == "topic":
            if r["name"] not in self._topics:
                self._topics[r["name"]] = TopicMeta(
                    str(r["model"]), int(r["partitions"]), str(r["queue_type"]), int(r.get("max_priority", 0))
                )
        elif op == "group":
            meta = self._topics.get(r["name"])
            if meta is not None:
                meta.groups.add(str(r["group"]))
        elif op == "delete":
            self._topics.pop(r["name"], None)
