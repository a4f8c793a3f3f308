"""The queue-model consumer of ``amqp://`` (classic and quorum queues).

A receive starts a consumer on each partition queue with a per-consumer prefetch of what it asks
for, and the consumer keeps running while the caller keeps receiving, so messages stream in while
the caller works on the previous batch. When the caller stops receiving for ``idle_s`` the I/O
thread cancels the consumers: an idle member does not sit on messages another member could take.
A consumer whose credit is used up by deliveries the caller still holds is replaced by a fresh one.
consume, qos and cancel are sent without waiting for their replies. Messages that arrived but were
never handed out go back to their place in the queue after ``ack_timeout_s`` or at ``close``; the
broker then marks them redelivered, so their next delivery count can read one higher.

Leases and the ack timeout are client-side: RabbitMQ's ``consumer_timeout`` is broker-wide and
closes the whole channel. A timer on the I/O thread gives back every delivery handed out more than
``ack_timeout_s`` ago; a later ack of it raises ``LeaseLostError`` (AMQP delivery tags are per
channel, so a stale tag is never sent). Unacked deliveries of a dead connection are requeued by
RabbitMQ itself.

Delivery count = deliveries counted before a republish (header) + the broker's own count of
redeliveries + 1. Quorum queues keep ``x-delivery-count``, so the count is exact and a nack or an
expired lease uses ``basic.nack(requeue)`` (the message keeps its place). Classic queues only have
the ``redelivered`` flag (one bit), so a nack or an expired lease republishes a copy carrying the
count so far to the back of the group's queue, then acks the original; a crash redelivery adds 1.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions

from infeed.brokers import _rabbitmq_io as io
from infeed.brokers import _rabbitmq_wire as wire
from infeed.brokers._rabbitmq_io import Chan, Item
from infeed.brokers._rabbitmq_registry import TopicMeta
from infeed.brokers._rabbitmq_topology import queue_name
from infeed.brokers.base import Consumer, as_deliveries, dead_letter_copy
from infeed.errors import BrokerConnectionError, ConsumerClosedError, LeaseLostError
from infeed.types import (
    Delivery,
    GroupInfo,
    PartitionInfo,
    TopicInfo,
    trusted_delivery,
    trusted_position,
)

if TYPE_CHECKING:
    from infeed.brokers.rabbitmq import RabbitMQBroker

_MAX_PREFETCH = 65535  # basic.qos prefetch_count is an AMQP short
_FORGET_S = 30.0  # a cancelled consumer's late deliveries come within milliseconds


class _Acks:
    """Unsettled delivery tags of one channel, to settle runs of them with one ``multiple`` frame."""

    def __init__(self) -> None:
        self.unsettled: set[int] = set()
        self.order: collections.deque[int] = collections.deque()
        self.last = 0

    def delivered(self, tag: int) -> list[int]:
        """Record a delivery; return earlier tags that never reached us.

        Tags of a channel count its deliveries 1, 2, 3, ...; pika drops (without settling) a
        delivery for a consumer it no longer knows. Such a tag must never fall under an ack with
        ``multiple``, or its message would be acked unseen: the caller requeues it at once.
        """
        missed = list(range(self.last + 1, tag))
        self.last = max(self.last, tag)
        self.unsettled.add(tag)
        self.order.append(tag)
        return missed

    def settle(self, impl: Any, tags: Iterable[int], requeue: bool | None = None) -> None:
        """Ack (``requeue=None``) or nack ``tags``; on the I/O thread."""
        if requeue is None:
            send = impl.basic_ack
        else:
            send = functools.partial(impl.basic_nack, requeue=requeue)
        order, unsettled = self.order, self.unsettled
        todo = sorted({t for t in tags if t in unsettled})
        while order and order[0] not in unsettled:
            order.popleft()
        k = 0
        for tag in todo:
            if not order or order[0] != tag:
                break
            order.popleft()
            unsettled.discard(tag)
            k += 1
            while order and order[0] not in unsettled:
                order.popleft()
        if not impl.is_open:
            return
        if k:
            send(todo[k - 1], multiple=True)
        for tag in todo[k:]:
            unsettled.discard(tag)
            send(tag, multiple=False)


class _State:
    """One channel of a consumer and what hangs on it."""

    def __init__(self, chan: Chan) -> None:
        self.chan = chan
        self.acks = _Acks()
        self.prefetch = 0  # basic.qos last sent (I/O thread)
        self.subs: dict[str, _Sub] = {}  # queue -> running consumer
        self.cancelled: dict[str, float] = {}  # consumer tag -> when it was cancelled


class _Sub:
    """One ``basic.consume`` on one queue; ``unacked`` counts against its prefetch."""

    __slots__ = ("partition", "prefetch", "queue", "tag", "unacked")

    def __init__(self, partition: int, queue: str, prefetch: int) -> None:
        self.partition, self.queue, self.prefetch = partition, queue, prefetch
        self.tag = f"infeed-{uuid.uuid4().hex}"
        self.unacked = 0


class _Lease:
    __slots__ = ("body", "count", "deadline", "live", "owner", "props", "queue", "state", "sub", "tag")

    def __init__(
        self, owner: QueueConsumer, state: _State, sub: _Sub, tag: int, count: int, body: bytes, props: Any
    ):
        self.owner, self.state, self.sub, self.tag, self.queue = owner, state, sub, tag, sub.queue
        self.count, self.body, self.props = count, body, props
        self.deadline = 0.0
        self.live = True


_Arrival = tuple[Any, Any, bytes, _Sub, float]  # method, props, body, consumer, arrived at


class QueueConsumer(Consumer):
    """A member of a group in the queue model."""

    def __init__(
        self,
        broker: RabbitMQBroker,
        topic: str,
        group: str,
        meta: TopicMeta,
        queues: list[tuple[int, str]],
        dlq: str | None,
    ) -> None:
        super().__init__(broker, topic, group, dlq)
        self._b = broker
        self._queues = queues
        self._quorum = meta.queue_type == "quorum"
        self._timeout_s = broker.config.ack_timeout_s
        self._idle_s = min(broker.config.idle_s, self._timeout_s / 4)
        self._tick_s = max(0.02, min(self._timeout_s / 4, self._idle_s, 1.0))
        self._cond = threading.Condition()
        self._state: _State | None = None
        self._leases: collections.OrderedDict[int, _Lease] = collections.OrderedDict()
        self._arrived: list[_Arrival] = []
        self._want = 1
        self._last_arrival = 0.0
        self._receiving = False
        self._stopping: list[_Sub] = []
        self._last_receive = 0.0
        self._closed = False

    # -- channel ------------------------------------------------------------------------------

    def _channel(self) -> _State:
        state = self._state
        if state is not None and not state.chan.closed:
            return state
        with self._cond:
            self._drop_all()
        chan = self._b._live().channel()
        state = _State(chan)
        chan.close_listeners.append(lambda _exc: self._wake())
        self._state = state
        chan.loop.soon(lambda: self._tick(state))
        return state

    def _drop_all(self) -> None:
        for lease in self._leases.values():
            lease.live = False
        self._leases.clear()
        self._arrived.clear()
        self._stopping.clear()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise ConsumerClosedError(f"consumer of {self.topic!r} (group {self.group!r}) is closed")

    # -- receive ------------------------------------------------------------------------------

    def receive(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        """Wait up to ``timeout_s`` for messages and return at most ``max_messages``."""
        if max_messages <= 0:
            raise ValueError(f"max_messages must be > 0, got {max_messages}")
        self._check_open()
        deadline = time.monotonic() + max(0.0, timeout_s)
        url = self._b.config.url
        with io.map_errors(url):
            return io.retry_on_loss(
                self._b.config.reconnect_attempts,
                self._channel,
                lambda state: self._receive(state, min(max_messages, _MAX_PREFETCH), deadline),
                lambda state: state.chan.loop,
                lambda _failures, exc: BrokerConnectionError(f"receiving from {url}: {exc}"),
            )

    def _receive(self, state: _State, need: int, deadline: float) -> list[Delivery]:
        chan = state.chan
        with self._cond:
            if self._arrived:
                return self._hand_out(state, need)
            each = -(-need // len(self._queues))
            stale, fresh = [], []
            for p, queue in self._queues:
                sub = state.subs.get(queue)
                if sub is None or sub.prefetch < each or sub.unacked >= sub.prefetch:
                    if sub is not None:
                        stale.append(sub)
                    state.subs[queue] = sub = _Sub(p, queue, each)
                    fresh.append(sub)
            self._receiving = True
        if fresh:
            chan.loop.soon(lambda: self._start(state, stale, fresh))
        linger = self._b.config.linger_s
        try:
            with self._cond:
                self._want = need
                while not chan.closed:
                    got, now = len(self._arrived), time.monotonic()
                    if got >= need or now >= deadline:
                        break
                    quiet = now - self._last_arrival
                    if got and quiet >= linger:
                        break
                    self._cond.wait(deadline - now if not got else min(deadline - now, linger - quiet))
                self._want = _MAX_PREFETCH + 1
                if chan.error is not None:
                    raise chan.error
                return self._hand_out(state, need)
        finally:
            with self._cond:
                self._receiving = False
                self._last_receive = time.monotonic()

    def _start(self, state: _State, stale: list[_Sub], fresh: list[_Sub]) -> None:
        """Replace consumers (I/O thread); errors close the channel, which receive reports."""
        impl = state.chan.impl
        if not impl.is_open:
            return
        for sub in stale:
            _cancel(state, sub.tag)
        for sub in fresh:
            if sub.prefetch != state.prefetch:
                impl.basic_qos(prefetch_count=sub.prefetch)
                state.prefetch = sub.prefetch
            impl.basic_consume(
                sub.queue, functools.partial(self._on_message, state, sub), consumer_tag=sub.tag
            )

    def _on_message(self, state: _State, sub: _Sub, impl: Any, method: Any, props: Any, body: bytes) -> None:
        # on the I/O thread
        for tag in state.acks.delivered(method.delivery_tag):
            impl.basic_nack(tag, requeue=True)
        with self._cond:
            if self._state is not state or self._closed:
                return
            sub.unacked += 1
            self._last_arrival = now = time.monotonic()
            self._arrived.append((method, props, body, sub, now))
            if len(self._arrived) in (1, self._want):  # the first one starts the linger clock
                self._cond.notify_all()

    def _hand_out(self, state: _State, limit: int) -> list[Delivery]:
        batch, self._arrived[:limit] = self._arrived[:limit], []
        deadline = time.monotonic() + self._timeout_s
        topic, leases, out = self.topic, self._leases, []
        for method, props, body, sub, _ in batch:
            d = wire.decode(props)
            again = d.broker_count if d.broker_count is not None else int(method.redelivered)
            count = d.prior + again + 1
            lease = _Lease(self, state, sub, method.delivery_tag, count, body, props)
            lease.deadline = deadline
            leases[method.delivery_tag] = lease
            position = trusted_position(topic, sub.partition, d.stamp)
            out.append(trusted_delivery(body, d.key, d.headers, position, count, d.stamp / 1e9, lease))
        return out

    # -- lease timer (I/O thread) -------------------------------------------------------------

    def _tick(self, state: _State) -> None:
        if self._closed or self._state is not state or state.chan.closed:
            return
        now = time.monotonic()
        expired, stale, idle = [], [], []
        with self._cond:
            while self._leases:
                lease = next(iter(self._leases.values()))
                if lease.deadline > now:
                    break
                self._leases.popitem(last=False)
                lease.live = False
                lease.sub.unacked -= 1
                expired.append(lease)
            while self._arrived and self._arrived[0][4] + self._timeout_s <= now:
                method, _, _, sub, _ = self._arrived.pop(0)
                sub.unacked -= 1
                stale.append(method.delivery_tag)
            if not self._receiving and now - self._last_receive >= self._idle_s:
                idle, state.subs = list(state.subs.values()), {}
        impl = state.chan.impl
        for tag, at in list(state.cancelled.items()):
            if now - at > _FORGET_S:
                del state.cancelled[tag]
                impl._consumers.pop(tag, None)
        for sub in idle:  # the caller stopped receiving: stop taking messages for it
            _cancel(state, sub.tag)
        if stale:  # arrived but never asked for: back to their place in the queue
            state.acks.settle(impl, stale, requeue=True)
        if expired:
            self._give_back(state, expired, None)
        state.chan.loop.call_later(self._tick_s, lambda: self._tick(state))

    def _give_back(self, state: _State, leases: list[_Lease], done: Any) -> None:
        """Requeue handed-out deliveries with their count (I/O thread); ``done(exc)`` after."""
        impl = state.chan.impl
        if self._quorum:
            state.acks.settle(impl, [lease.tag for lease in leases], requeue=True)
            if done is not None:
                done(None)
            return
        items: list[Item] = [
            ("", lease.queue, lease.body, wire.recount(lease.props, lease.count)) for lease in leases
        ]

        def confirmed(exc: BaseException | None, _job: Any) -> None:
            # a failed republish falls back to a plain requeue: the message is kept, its count may read low
            state.acks.settle(impl, [lease.tag for lease in leases], requeue=True if exc else None)
            if done is not None:
                done(exc)

        state.chan.loop.publisher.submit(items, confirmed)

    # -- settle -------------------------------------------------------------------------------

    def _take(
        self, deliveries: Delivery | Iterable[Delivery]
    ) -> tuple[_State | None, list[_Lease], list[Delivery]]:
        """End the leases of ``deliveries``; those of a replaced (closed) channel are lost.

        Settling frees prefetch credit, and RabbitMQ would fill it at once with messages nobody
        asked for yet; so the consumers stop first (``_stopped``), and the next receive starts
        new ones.
        """
        self._check_open()
        leases, lost = [], []
        with self._cond:
            state = self._state
            if state is not None and not self._receiving and state.subs:
                self._stopping.extend(state.subs.values())
                state.subs = {}
            usable = state is not None and not state.chan.closed
            pop = self._leases.pop
            for d in as_deliveries(deliveries):
                lease = d.receipt
                if type(lease) is not _Lease or lease.owner is not self:
                    raise ValueError(f"delivery {d.position} was not received by this consumer")
                if not (lease.live and usable and lease.state is state):
                    lost.append(d)
                    continue
                lease.live = False
                lease.sub.unacked -= 1
                pop(lease.tag, None)
                leases.append(lease)
        return state, leases, lost

    @staticmethod
    def _lost(lost: list[Delivery]) -> None:
        if lost:
            raise LeaseLostError(
                f"{len(lost)} deliveries lost their lease (first: {lost[0].position}); "
                "they were or will be delivered to another member",
                positions=[d.position for d in lost],
            )

    def _after_stop(self, state: _State, then: Callable[[Any], None]) -> None:
        """Cancel the consumers ``_take`` stopped, then call ``then(impl)`` to settle (I/O thread).

        The cancel goes out before the settling frames, so the credit they free is not refilled.
        """
        with self._cond:
            stop, self._stopping = self._stopping, []
        impl = state.chan.impl
        if impl.is_open:
            for sub in stop:
                _cancel(state, sub.tag)
        then(impl)

    def ack(self, deliveries: Delivery | Iterable[Delivery]) -> None:
        """Ack deliveries (runs of them in one ``basic.ack multiple`` frame)."""
        state, leases, lost = self._take(deliveries)
        if state is not None and leases:
            tags = [lease.tag for lease in leases]
            state.chan.loop.soon(lambda: self._after_stop(state, lambda impl: state.acks.settle(impl, tags)))
        self._lost(lost)

    def nack(
        self, deliveries: Delivery | Iterable[Delivery], *, requeue: bool = True, reason: str = ""
    ) -> None:
        """Requeue deliveries (count + 1), or dead-letter them with ``reason``."""
        items = as_deliveries(deliveries)
        state, leases, lost = self._take(items)
        if state is not None and leases:
            with io.map_errors(self._b.config.url):
                if requeue:
                    self._requeue(state, leases)
                else:
                    self._dead_letter(state, leases, items, reason)
        self._lost(lost)

    def _requeue(self, state: _State, leases: list[_Lease]) -> None:
        def go(f: Any) -> None:
            self._after_stop(
                state, lambda _impl: self._give_back(state, leases, lambda _e: io.resolve(f, None))
            )

        fut = state.chan.loop.run(go)
        try:
            io.wait(fut, self._b.config.timeout_s, "a requeue")
        except Exception:
            if not state.chan.closed:  # closed: RabbitMQ requeued them itself
                raise

    def _dead_letter(self, state: _State, leases: list[_Lease], items: list[Delivery], reason: str) -> None:
        valid = {id(lease) for lease in leases}
        copies = [dead_letter_copy(d, reason) for d in items if id(d.receipt) in valid]
        tags = [lease.tag for lease in leases]
        try:
            self._b._topology.ensure_dead_letters(self.dead_letter_topic)
            self._b.publish_many(self.dead_letter_topic, copies)
        except BaseException:
            state.chan.loop.soon(
                lambda: self._after_stop(state, lambda impl: state.acks.settle(impl, tags, requeue=True))
            )
            raise
        state.chan.loop.soon(lambda: self._after_stop(state, lambda impl: state.acks.settle(impl, tags)))

    def close(self) -> None:
        """Leave the group: unacked deliveries go back to the queue (count + 1). Idempotent."""
        if self._closed:
            return
        with self._cond:
            self._closed = True
            state = self._state
            if state is not None:
                self._stopping.extend(state.subs.values())
                state.subs = {}
            self._cond.notify_all()
        if state is not None and not state.chan.closed:
            # settle what ack/nack queued behind cancel-oks before the channel goes (a qos
            # round trip answers after every earlier one)
            def barrier(f: Any) -> None:
                def then(impl: Any) -> None:
                    if impl.is_open:
                        impl.basic_qos(prefetch_count=1, callback=lambda _frame: io.resolve(f, None))
                    else:
                        io.resolve(f, None)

                self._after_stop(state, then)

            try:
                io.wait(state.chan.loop.run(barrier), self._b.config.timeout_s, "a consumer close")
            except Exception:  # the channel or connection is going away anyway
                pass
        with self._cond:
            self._drop_all()
            self._state = None
        if state is not None:
            state.chan.close()


def _cancel(state: _State, tag: str) -> None:
    """``basic.cancel`` that keeps delivering to the consumer after ``cancel-ok`` (I/O thread).

    RabbitMQ can send deliveries after ``cancel-ok`` (they were already on their way), and
    pika's own ``basic_cancel`` rejects those before the ok (marking them redelivered) and drops
    them after it (leaving them unacked). Here the consumer's callback stays registered, so they
    reach the buffer and the next receive; the tick forgets it after ``_FORGET_S``. Uses pika's
    ``_rpc`` and ``_consumers`` (pika 1.3-1.4), the calls ``basic_cancel`` makes.
    """
    impl = state.chan.impl
    if impl.is_open:
        impl._rpc(
            pika.spec.Basic.Cancel(consumer_tag=tag),
            _noop,
            [(pika.spec.Basic.CancelOk, {"consumer_tag": tag})],
        )
        state.cancelled[tag] = time.monotonic()


def describe_queues(broker: RabbitMQBroker, topic: str, meta: TopicMeta) -> TopicInfo:
    """Queue model: each group's ready count per partition (lag); depth = the largest backlog."""
    counts = {
        g: [_ready(broker, queue_name(topic, p, g)) for p in range(meta.partitions)] for g in meta.groups
    }
    parts = tuple(
        PartitionInfo(p, 0, 0, max((c[p] for c in counts.values()), default=0))
        for p in range(meta.partitions)
    )
    groups = tuple(GroupInfo(g, {}, dict(enumerate(counts[g])), -1) for g in sorted(counts))
    return TopicInfo(topic, parts, groups, {"queue_type": meta.queue_type})


def _ready(broker: RabbitMQBroker, queue: str) -> int:
    """Ready messages in ``queue`` (0 if it is gone); unacked ones are not counted by AMQP."""

    def count(chan: Chan) -> int:
        return int(chan.sync("counting", chan.impl.queue_declare, queue, passive=True).method.message_count)

    try:
        return broker._admin("counting messages", count)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return 0
        raise


def _noop(*_: Any) -> None:
    pass
