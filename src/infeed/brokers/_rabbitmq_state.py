"""Durable group state of the stream model, and the end of a stream (``amqp://?queue_type=stream``).

RabbitMQ keeps no consumer offsets for AMQP 0-9-1 stream readers (only its stream protocol does),
so each group's state lives in a classic queue ``TOPIC:state:GROUP`` (``x-max-length=1``: a new
record pushes the old one out): ``{"seq", "upto", "pending", "committed"}`` where ``upto`` is the
first offset never delivered to the group, ``pending`` maps delivered-but-unacked offsets to their
delivery counts, and ``committed`` is the group's committed resume offset. Only the member that
holds the group writes it. A reader takes every record it finds with ``basic.get``, puts them back
and keeps the newest ``seq`` (a record put back by a concurrent reader can sit beside a newer one).

The end of a stream (for ``start="latest"`` and ``describe_topic``) is found by appending an empty
marker record and reading its offset back: offsets therefore have gaps, which readers skip.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions

from infeed.brokers._rabbitmq_io import Chan, Item, fail, resolve, wait
from infeed.brokers._rabbitmq_registry import TopicMeta
from infeed.types import GroupInfo, PartitionInfo, TopicInfo

if TYPE_CHECKING:
    from infeed.brokers.rabbitmq import RabbitMQBroker

H_MARKER = "x-infeed-amqp-marker"
_STATE_ARGS = {"x-queue-type": "classic", "x-max-length": 1}


def _name(topic: str, kind: str, group: str) -> str:
    name = f"{topic}:{kind}:{group}"
    if len(name.encode()) > 255:
        raise ValueError(f"topic and group names are too long for a RabbitMQ queue name: {name!r}")
    return name


def state_queue(topic: str, group: str) -> str:
    return _name(topic, "state", group)


def lock_queue(topic: str, group: str) -> str:
    return _name(topic, "lock", group)


def wait_queue(topic: str, group: str) -> str:
    return _name(topic, "wait", group)


def stream_queues(topic: str, meta: TopicMeta) -> list[str]:
    """Every queue a stream topic owns (the stream, then each group's state and wait queues)."""
    return [topic, *(q for g in sorted(meta.groups) for q in (state_queue(topic, g), wait_queue(topic, g)))]


@dataclass
class GroupState:
    upto: int = 0
    pending: dict[int, int] = field(default_factory=dict)
    committed: int | None = None

    def item(self, topic: str, group: str) -> Item:
        body = {
            "seq": time.time_ns(),
            "upto": self.upto,
            "pending": self.pending,
            "committed": self.committed,
        }
        props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        return ("", state_queue(topic, group), json.dumps(body).encode(), props)

    @classmethod
    def parse(cls, body: bytes) -> tuple[int, GroupState]:
        r = json.loads(body)
        pending = {int(k): int(v) for k, v in r.get("pending", {}).items()}
        committed = r.get("committed")
        return int(r["seq"]), cls(int(r["upto"]), pending, None if committed is None else int(committed))


def declare_stream(chan: Chan, topic: str) -> None:
    chan.rpc(
        lambda cb: chan.impl.queue_declare(
            topic, durable=True, arguments={"x-queue-type": "stream"}, callback=cb
        ),
        f"declaring stream {topic!r}",
    )


def create_state(broker: RabbitMQBroker, topic: str, group: str, initial: Callable[[], GroupState]) -> None:
    """Create the group's state queue with ``initial()`` unless it exists already."""
    name = state_queue(topic, group)

    def exists(chan: Chan) -> bool:
        try:
            chan.rpc(
                lambda cb: chan.impl.queue_declare(name, passive=True, callback=cb), "checking group state"
            )
            return True
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return False
            raise

    if broker._admin("checking group state", exists):
        return
    broker._admin(
        "creating group state",
        lambda chan: chan.rpc(
            lambda cb: chan.impl.queue_declare(name, durable=True, arguments=_STATE_ARGS, callback=cb),
            "creating group state",
        ),
    )
    broker._publish_items([initial().item(topic, group)])


def read_state(broker: RabbitMQBroker, topic: str, group: str) -> GroupState | None:
    """The group's newest state record (None: the group has none)."""
    name = state_queue(topic, group)

    def read(chan: Chan) -> GroupState | None:
        impl = chan.impl
        deadline = time.monotonic() + broker.config.timeout_s
        while True:
            try:
                chan.rpc(
                    lambda cb: impl.queue_declare(name, passive=True, callback=cb), "reading group state"
                )
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:
                    return None
                raise
            found: list[tuple[int, GroupState]] = []
            last_tag = 0
            while True:
                got = chan.rpc(lambda cb: _get(impl, name, cb), "reading group state")
                if got is None:
                    break
                method, _props, body = got
                last_tag = method.delivery_tag
                try:
                    found.append(GroupState.parse(body))
                except (ValueError, KeyError, TypeError):
                    pass  # not a state record: ignore it
            if last_tag:
                chan.loop.call(
                    functools.partial(impl.basic_nack, last_tag, multiple=True, requeue=True), "put back"
                )
            if found:
                return max(found, key=lambda f: f[0])[1]
            if time.monotonic() > deadline:  # exists, but always empty: another reader holds it
                return None
            time.sleep(0.02)  # another reader holds the record for one round trip; no event to wait on

    return broker._admin("reading group state", read)


def _get(impl: Any, queue: str, reply: Any) -> None:
    impl.add_callback(lambda _frame: reply(None), [pika.spec.Basic.GetEmpty], one_shot=True)
    impl.basic_get(queue, lambda _ch, method, props, body: reply((method, props, body)))


def end_offset(broker: RabbitMQBroker, topic: str) -> int:
    """One past the last message of ``topic`` now.

    Appends a marker and reads its offset back. Markers take offsets too but are no messages
    (consumers skip them), so the end is one past the last message before the marker: read back
    from the marker in windows that double until one holds a message (or the stream's start).
    """
    marker = _append_marker(broker, topic)
    window = 1
    while True:
        start = max(0, marker - window)
        last = _last_message_before(broker, topic, start, marker)
        if last is not None:
            return last + 1
        if start == 0:
            return 0
        window *= 2


def _append_marker(broker: RabbitMQBroker, topic: str) -> int:
    nonce = uuid.uuid4().hex

    def find(chan: Chan) -> int:
        impl = chan.impl
        seen: Future[int] = Future()  # completed by the marker's delivery
        chan.close_listeners.append(lambda exc: fail(seen, exc))

        def on_message(_ch: Any, method: Any, props: Any, _body: bytes) -> None:
            impl.basic_ack(method.delivery_tag)
            headers = props.headers or {}
            if headers.get(H_MARKER) == nonce:
                resolve(seen, int(headers["x-stream-offset"]))

        chan.rpc(lambda cb: impl.basic_qos(prefetch_count=100, callback=cb), "qos")
        chan.rpc(
            lambda cb: impl.basic_consume(
                topic, on_message, arguments={"x-stream-offset": "next"}, callback=cb
            ),
            "attaching at the end",
        )
        props = pika.BasicProperties(delivery_mode=2, headers={H_MARKER: nonce})
        broker._publish_items([("", topic, b"", props)])
        return int(wait(seen, broker.config.timeout_s, "the end-of-stream marker"))

    return broker._admin("finding the end of a stream", find)


def _last_message_before(broker: RabbitMQBroker, topic: str, start: int, stop: int) -> int | None:
    """The offset of the last message (not a marker) in ``[start, stop)``; ``stop`` must exist."""

    def scan(chan: Chan) -> int | None:
        impl = chan.impl
        done: Future[int | None] = Future()  # completed when the entry at ``stop`` arrives
        last: list[int] = []
        chan.close_listeners.append(lambda exc: fail(done, exc))

        def on_message(_ch: Any, method: Any, props: Any, _body: bytes) -> None:
            impl.basic_ack(method.delivery_tag)
            headers = props.headers or {}
            offset = int(headers.get("x-stream-offset", -1))
            if offset >= stop:
                resolve(done, last[-1] if last else None)
            elif offset >= start and H_MARKER not in headers:
                last[:] = [offset]

        chan.rpc(lambda cb: impl.basic_qos(prefetch_count=100, callback=cb), "qos")
        chan.rpc(
            lambda cb: impl.basic_consume(
                topic, on_message, arguments={"x-stream-offset": start}, callback=cb
            ),
            "reading back from the end",
        )
        found: int | None = wait(done, broker.config.timeout_s, "the stream up to the end-of-stream marker")
        return found

    return broker._admin("finding the last message of a stream", scan)


def describe_stream(
    broker: RabbitMQBroker, topic: str, meta: TopicMeta, states: dict[str, GroupState]
) -> TopicInfo:
    """TopicInfo of a stream topic; ``states`` holds the in-process view of groups held here."""
    high = end_offset(broker, topic)
    groups = []
    for g in sorted(meta.groups):
        state = states.get(g) or read_state(broker, topic, g)
        if state is None:
            continue
        committed = {} if state.committed is None else {0: state.committed}
        lag = {0: max(0, high - (state.committed or 0))}
        groups.append(GroupInfo(g, committed, lag, len(state.pending)))
    return TopicInfo(topic, (PartitionInfo(0, 0, high, high),), tuple(groups), {"queue_type": "stream"})
