"""The stream model of ``amqp://`` (``queue_type=stream``): a topic is one RabbitMQ stream.

Positions are the broker's own stream offsets (``x-stream-offset``), so replay and seek are exact.
RabbitMQ does not share one stream among competing AMQP 0-9-1 consumers, so a group has one
active process at a time: the one that holds the exclusive queue ``TOPIC:lock:GROUP`` (RabbitMQ
deletes it when that connection dies). Inside that process every member of the group shares one
reader and one set of leases (like ``memory://``); other processes wait, consuming from
``TOPIC:wait:GROUP`` so the holder can see them, and the holder hands the group over after
``hold_s`` once its deliveries are settled or expired (``_rabbitmq_group_lock``). Group state
(``_rabbitmq_state``) is written before each batch is handed out (so a crash redelivers with the
right count), and on commit, seek, hand-over and close; acks in between are kept in memory, so
after a crash the group resumes from the last write (at-least-once). ``receive_acked`` leases
nothing and writes the state at most every ``RECEIVE_ACKED_STORE_S`` (with a later receive): a
write per batch costs more than reading a batch of large messages.
"""

from __future__ import annotations

import collections
import functools
import itertools
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from infeed.brokers import _rabbitmq_io as io
from infeed.brokers import _rabbitmq_recovery as recovery
from infeed.brokers import _rabbitmq_wire as wire
from infeed.brokers._rabbitmq_group_lock import GroupLock, declare_wait_queue
from infeed.brokers._rabbitmq_io import Chan
from infeed.brokers._rabbitmq_queue import _Acks
from infeed.brokers._rabbitmq_registry import TopicMeta
from infeed.brokers._rabbitmq_state import (
    H_MARKER,
    GroupState,
    create_state,
    describe_stream,
    end_offset,
    read_state,
)
from infeed.brokers.base import (
    Consumer,
    StartFrom,
    as_deliveries,
    as_positions,
    dead_letter_copy,
)
from infeed.errors import BrokerTimeoutError, ConsumerClosedError, LeaseLostError
from infeed.types import Capability, Delivery, Position, TopicInfo, trusted_delivery, trusted_position

if TYPE_CHECKING:
    from infeed.brokers.rabbitmq import RabbitMQBroker

STREAM_CAPS = frozenset(
    {
        Capability.REPLAY,
        Capability.SEEK,
        Capability.PER_MESSAGE_ACK,
        Capability.OFFSET_COMMIT,
        Capability.DEAD_LETTER,
        Capability.REDELIVERY,
        Capability.CRASH_DELIVERY_COUNT,
        Capability.MULTI_PROCESS,
    }
)
_PREFETCH = 1000
#: ``receive_acked`` writes the group's state at most this often (and at commit, seek and release).
RECEIVE_ACKED_STORE_S = 1.0


@dataclass(slots=True)
class _Rec:
    offset: int
    payload: bytes
    key: bytes | None
    headers: dict[str, str]
    timestamp: float
    tag: int


class _Lease:
    __slots__ = ("count", "deadline", "owner", "rec")

    def __init__(self, owner: StreamConsumer, rec: _Rec, count: int, deadline: float) -> None:
        self.owner, self.rec, self.count, self.deadline = owner, rec, count, deadline


def subscribe(
    broker: RabbitMQBroker, topic: str, meta: TopicMeta, group: str, start: StartFrom, dlq: str | None
) -> StreamConsumer:
    """Join ``group``: record it, create its state (at ``start``) if new, share the in-process group."""
    if group not in meta.groups:
        broker._registry.append([{"op": "group", "name": topic, "group": group}])
        meta.groups.add(group)
    create_state(
        broker, topic, group, lambda: GroupState(0 if start == "earliest" else end_offset(broker, topic))
    )
    declare_wait_queue(broker, topic, group)
    with broker._stream_lock:
        shared = broker._stream_groups.get((topic, group))
        if shared is None:
            shared = broker._stream_groups[(topic, group)] = StreamGroup(broker, topic, group)
        shared.members += 1
    return StreamConsumer(broker, topic, group, shared, dlq)


class StreamGroup(GroupLock):
    """One group in this process: its members' shared leases, and the group while held here."""

    def __init__(self, broker: RabbitMQBroker, topic: str, group: str) -> None:
        super().__init__(broker, topic, group)
        self.write_lock = threading.Lock()
        self.members = 0
        self.reader: Chan | None = None
        self.reader_acks = _Acks()
        self.last_arrival = 0.0
        self.want = 1  # wake waiting members when this many messages are ready
        self.upto = 0
        self.committed: int | None = None
        self.owed: dict[int, int] = {}
        self.ready: dict[int, tuple[int, _Rec]] = {}
        self.inflight: dict[int, _Lease] = {}
        self.buffer: collections.deque[_Rec] = collections.deque()
        self.tokens = itertools.count(1)
        #: ``receive_acked`` handed out messages the last state write does not hold yet
        self.unstored = False
        self.stored_at = 0.0

    # -- holding the group ------------------------------------------------------------------

    def _check_reader(self) -> None:
        reader = self.reader
        if reader is not None and reader.error is not None and not reader.loop.closed:
            if not recovery.is_stream_recovering(reader.error):  # _start_reader is retrying it
                raise reader.error  # e.g. 404: the stream was deleted

    def _try_acquire(self) -> bool:
        taken = self._take_lock()
        if taken is None:
            return False
        loop, chan = taken
        state = read_state(self.b, self.topic, self.group) or GroupState()
        with self.cond:
            self.gen += 1
            self.held, self.yielding, self.loop, self.lock_chan = True, False, loop, chan
            self.upto, self.owed, self.committed = state.upto, dict(state.pending), state.committed
            self.ready, self.inflight = {}, {}
            self.acquired_at = time.monotonic()
            gen = self.gen
        self._start_reader(min([*self.owed, self.upto]))
        self._stop_waiting()
        loop.soon(lambda: self._tick(gen))
        return True

    def _start_reader(self, start: int) -> None:
        """(Re)start the stream reader at ``start``, waiting for a restarted node to run the stream.

        If that fails the group is not held any more (the lock queue lives on with the connection,
        so the next try takes it again).
        """
        try:
            self.b._when_ready(f"reading stream {self.topic!r}", lambda: self._open_reader(start))
        except BaseException:
            with self.cond:
                lock_chan = self.lock_chan
                self._drop()
            if lock_chan is not None:
                lock_chan.close()
            raise

    def _open_reader(self, start: int) -> None:
        """Start the stream reader at ``start`` (a fresh channel: no stale deliveries)."""
        assert self.loop is not None
        old, self.reader = self.reader, None
        if old is not None:
            old.close()
        chan = self.loop.channel()
        with self.cond:
            self.buffer.clear()
            self.reader, self.reader_acks = chan, _Acks()
            acks = self.reader_acks

        def on_message(_impl: Any, method: Any, props: Any, body: bytes) -> None:
            self._on_record(chan, acks, method, props, body)

        chan.rpc(lambda cb: chan.impl.basic_qos(prefetch_count=_PREFETCH, callback=cb), "qos")
        chan.rpc(
            lambda cb: chan.impl.basic_consume(
                self.topic, on_message, arguments={"x-stream-offset": start}, callback=cb
            ),
            f"reading stream {self.topic!r}",
        )

    def _on_record(self, chan: Chan, acks: _Acks, method: Any, props: Any, body: bytes) -> None:
        # on the I/O thread
        tag = method.delivery_tag
        acks.delivered(tag)
        d = wire.decode(props)
        raw = props.headers or {}
        offset = -1 if d.stream_offset is None else d.stream_offset
        keep = False
        with self.cond:
            if self.reader is not chan:
                return
            if offset < 0 or H_MARKER in raw:
                pass
            elif offset in self.owed:
                self.ready[offset] = (
                    self.owed.pop(offset),
                    _Rec(offset, body, d.key, d.headers, d.stamp / 1e9, tag),
                )
                keep = True
            elif offset >= self.upto and offset not in self.inflight and offset not in self.ready:
                if not self.buffer or offset > self.buffer[-1].offset:
                    self.buffer.append(_Rec(offset, body, d.key, d.headers, d.stamp / 1e9, tag))
                    keep = True
            if keep:
                self.last_arrival = time.monotonic()
                if len(self.ready) + len(self.buffer) in (1, self.want):
                    self.cond.notify_all()
        if not keep:
            acks.settle(chan.impl, [tag])

    def _drop(self) -> None:
        """The connection that held the group is gone: so is the hold (under ``cond``)."""
        self.gen += 1
        self.held = self.yielding = False
        self.inflight, self.ready, self.owed = {}, {}, {}
        self.buffer.clear()
        self.reader = self.lock_chan = None

    def snapshot(self) -> GroupState:
        """The group's state as this process sees it (under ``cond``)."""
        pending = dict(self.owed)
        pending.update((o, count) for o, (count, _) in self.ready.items())
        pending.update((o, lease.count) for o, lease in self.inflight.items())
        return GroupState(self.upto, pending, self.committed)

    def persist_acked(self) -> None:
        """Write what ``receive_acked`` handed out, ``RECEIVE_ACKED_STORE_S`` after the last write."""
        if self.unstored and time.monotonic() - self.stored_at >= RECEIVE_ACKED_STORE_S:
            self.persist()

    def persist(self) -> None:
        """Write the state now (snapshots are taken in write order, so the newest one wins)."""
        self.unstored, self.stored_at = False, time.monotonic()
        with self.write_lock:
            with self.cond:
                if not self.held:
                    return
                item = self.snapshot().item(self.topic, self.group)
            self.b._publish_items([item])

    def release(self) -> None:
        """Hand the group back (last member closed): write the state, drop the lock."""
        with self.write_lock:
            with self.cond:
                held, lock_chan = self.held, self.lock_chan
                item = self.snapshot().item(self.topic, self.group) if held else None
                chans = [self.reader, self.waiter]
                if held:
                    self._drop()
                self.waiter = None
                self.cond.notify_all()
            try:
                if item is not None:
                    self.b._publish_items([item])
                if lock_chan is not None:
                    self._unlock(lock_chan)
            finally:
                for chan in [*chans, lock_chan]:
                    if chan is not None:
                        chan.close()

    def _hand_over(self, gen: int) -> None:
        """Release the group to a waiting process (I/O thread, asynchronously)."""
        with self.cond:
            if gen != self.gen:
                return
            item = self.snapshot().item(self.topic, self.group)
            reader, lock_chan, loop = self.reader, self.lock_chan, self.loop
            self._drop()
            self.releasing = True
        assert loop is not None
        if reader is not None and reader.impl.is_open:
            reader.impl.close()

        def finished(*_: Any) -> None:
            if lock_chan is not None and lock_chan.impl.is_open:
                lock_chan.impl.close()
            with self.cond:
                self.releasing = False
                self.next_try = time.monotonic() + 3 * self.poll_s  # let the waiting process in first
                self.cond.notify_all()

        loop.publisher.submit([item], lambda _exc, _job: self._unlock_soon(lock_chan, finished))

    def inflight_count(self) -> int:
        """How many deliveries are handed out and not settled yet (under ``cond``)."""
        return len(self.inflight)

    def expire(self, now: float) -> None:
        """Give expired leases back to the group (under ``cond``)."""
        for offset, lease in list(self.inflight.items()):
            if lease.deadline <= now:
                del self.inflight[offset]
                self.ready[offset] = (lease.count, lease.rec)
                self.cond.notify_all()

    # -- handing out ------------------------------------------------------------------------

    def take(
        self, owner: StreamConsumer, limit: int, *, acked: bool = False
    ) -> tuple[list[Delivery], list[int], bool]:
        """Lease up to ``limit`` messages (under ``cond``): deliveries, stream tags, new offsets?

        With ``acked`` nothing is leased: the messages count as acked once handed out.
        """
        now = time.monotonic()
        deadline = now + self.lease_s
        out: list[Delivery] = []
        tags: list[int] = []
        fresh = False
        for offset in sorted(self.ready)[:limit]:
            count, rec = self.ready.pop(offset)
            out.append(self._lease(owner, rec, count + 1, deadline, acked=acked))
            tags.append(rec.tag)
        while len(out) < limit and self.buffer:
            rec = self.buffer.popleft()
            tags.append(rec.tag)
            if rec.offset < self.upto:
                continue
            self.upto = rec.offset + 1
            fresh = True
            out.append(self._lease(owner, rec, 1, deadline, acked=acked))
        if acked and out:
            self.unstored = True
        return out, tags, fresh

    def _lease(
        self, owner: StreamConsumer, rec: _Rec, count: int, deadline: float, *, acked: bool
    ) -> Delivery:
        lease = _Lease(owner, rec, count, deadline)
        if not acked:  # an acked one's receipt is in no lease table: acking it again finds it lost
            self.inflight[rec.offset] = lease
        return trusted_delivery(
            rec.payload,
            rec.key,
            rec.headers,
            trusted_position(self.topic, 0, rec.offset),
            count,
            rec.timestamp,
            lease,
        )

    def settle(
        self, owner: StreamConsumer, deliveries: Iterable[Delivery]
    ) -> tuple[list[_Lease], list[Delivery]]:
        """End leases (under ``cond``); a lease that passed on (or a lost hold) is reported lost."""
        valid, lost = [], []
        for d in deliveries:
            lease = d.receipt
            if type(lease) is not _Lease or lease.owner is not owner:
                raise ValueError(f"delivery {d.position} was not received by this consumer")
            if self.inflight.get(d.position.offset) is not lease:
                lost.append(d)
                continue
            del self.inflight[d.position.offset]
            valid.append(lease)
        return valid, lost


class StreamConsumer(Consumer):
    """A member of a group in the stream model."""

    def __init__(
        self, broker: RabbitMQBroker, topic: str, group: str, shared: StreamGroup, dlq: str | None
    ) -> None:
        super().__init__(broker, topic, group, dlq)
        self._b = broker
        self._g = shared
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ConsumerClosedError(f"consumer of {self.topic!r} (group {self.group!r}) is closed")

    def _hold(self, what: str) -> None:
        if not self._g.ensure_held(time.monotonic() + self._b.config.timeout_s):
            raise BrokerTimeoutError(
                f"cannot {what}: another process holds group {self.group!r} of {self.topic!r} "
                f"for longer than {self._b.config.timeout_s}s"
            )

    def receive(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        """Wait up to ``timeout_s`` for messages and return at most ``max_messages``."""
        return self._receive(max_messages, timeout_s, acked=False)

    def receive_acked(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        """Hand out without leases; the state holding them is written lazily (module docstring)."""
        return self._receive(max_messages, timeout_s, acked=True)

    def _receive(self, max_messages: int, timeout_s: float, *, acked: bool) -> list[Delivery]:
        if max_messages <= 0:
            raise ValueError(f"max_messages must be > 0, got {max_messages}")
        self._check_open()
        deadline = time.monotonic() + max(0.0, timeout_s)
        g = self._g
        out: list[Delivery] = []
        tags: list[int] = []
        fresh, reader, acks = False, None, None
        with io.map_errors(self._b.config.url):
            linger = self._b.config.linger_s
            while g.ensure_held(deadline):
                with g.cond:
                    now = time.monotonic()
                    g.expire(now)
                    have, quiet = 0, 0.0
                    if g.held and not g.yielding:
                        have = len(g.ready) + len(g.buffer)
                        quiet = now - g.last_arrival
                        if have >= max_messages or (have and (quiet >= linger or now >= deadline)):
                            out, tags, fresh = g.take(self, max_messages, acked=acked)
                            reader, acks = g.reader, g.reader_acks
                            if out or tags:
                                break
                        g.want = max_messages
                    if now >= deadline:
                        break
                    soonest = min((lease.deadline for lease in g.inflight.values()), default=deadline)
                    if have:
                        soonest = min(soonest, now + linger - quiet)
                    g.cond.wait(max(0.0005, min(deadline, soonest) - now))
            else:
                return []
            if reader is not None and acks is not None and tags:
                reader.loop.soon(functools.partial(acks.settle, reader.impl, tags))
            if acked or not out:
                g.persist_acked()  # what receive_acked handed out: at most RECEIVE_ACKED_STORE_S apart
            elif fresh:
                g.persist()  # before the caller sees them: a crash after this redelivers with count + 1
            return out

    def ack(self, deliveries: Delivery | Iterable[Delivery]) -> None:
        """Ack deliveries (kept in memory until the group's next state write)."""
        self._check_open()
        with self._g.cond:
            _, lost = self._g.settle(self, as_deliveries(deliveries))
        _raise_lost(lost)

    def nack(
        self, deliveries: Delivery | Iterable[Delivery], *, requeue: bool = True, reason: str = ""
    ) -> None:
        """Give deliveries back to the group (count + 1), or dead-letter them with ``reason``."""
        self._check_open()
        items = as_deliveries(deliveries)
        g = self._g
        with g.cond:
            valid, lost = g.settle(self, items)
            if requeue:
                for lease in valid:
                    g.ready[lease.rec.offset] = (lease.count, lease.rec)
                g.cond.notify_all()
        if valid and not requeue:
            keep = {id(lease) for lease in valid}
            copies = [dead_letter_copy(d, reason) for d in items if id(d.receipt) in keep]
            try:
                with io.map_errors(self._b.config.url):
                    self._b.publish_many(self.dead_letter_topic, copies)
            except BaseException:
                with g.cond:  # not dead-lettered: the group keeps them
                    for lease in valid:
                        g.ready[lease.rec.offset] = (lease.count, lease.rec)
                raise
        _raise_lost(lost)

    def commit(self, positions: Position | Iterable[Position]) -> None:
        """Store the group's resume offset in its state queue (durable when this returns)."""
        self._check_open()
        (pos,) = _one_position(positions, self.topic)
        with io.map_errors(self._b.config.url):
            self._hold("commit")
            with self._g.cond:
                self._g.committed = pos.offset
            self._g.persist()

    def committed(self) -> dict[int, Position]:
        """The group's committed resume position (read from the broker unless held here)."""
        self._check_open()
        g = self._g
        with g.cond:
            if g.held:
                value = g.committed
            else:
                value = -1
        if value == -1:
            with io.map_errors(self._b.config.url):
                state = read_state(self._b, self.topic, self.group)
            value = state.committed if state is not None else None
        return {} if value is None else {0: Position(self.topic, 0, value)}

    def seek(self, positions: Position | Iterable[Position]) -> None:
        """Move the group so its next new delivery is at ``offset`` (deliveries before it stay)."""
        self._check_open()
        (pos,) = _one_position(positions, self.topic)
        g = self._g
        with io.map_errors(self._b.config.url):
            self._hold("seek")
            with g.cond:
                o = pos.offset
                g.inflight = {k: v for k, v in g.inflight.items() if k < o}
                g.ready = {k: v for k, v in g.ready.items() if k < o}
                g.owed = {k: v for k, v in g.owed.items() if k < o}
                g.upto = o
                start = min([*g.owed, o])
            g._start_reader(start)
            g.persist()
            with g.cond:
                g.cond.notify_all()

    def close(self) -> None:
        """Leave the group; its unacked deliveries go back to the group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        g = self._g
        with g.cond:
            for offset, lease in list(g.inflight.items()):
                if lease.owner is self:
                    del g.inflight[offset]
                    g.ready[offset] = (lease.count, lease.rec)
            g.cond.notify_all()
        with self._b._stream_lock:
            g.members -= 1
            last = g.members == 0
        if last:
            try:
                with io.map_errors(self._b.config.url):
                    g.release()
            except Exception:
                if not self._b._closed.is_set():
                    raise


def _one_position(positions: Position | Iterable[Position], topic: str) -> list[Position]:
    out = as_positions(positions)
    if len(out) != 1:
        raise ValueError(f"a stream topic has one partition: give one position, got {len(out)}")
    pos = out[0]
    if pos.topic != topic or pos.partition != 0:
        raise ValueError(f"position {pos} is not on partition 0 of {topic!r}")
    return out


def _raise_lost(lost: list[Delivery]) -> None:
    if lost:
        raise LeaseLostError(
            f"{len(lost)} deliveries lost their lease (first: {lost[0].position}); "
            "they were or will be delivered to another member",
            positions=[d.position for d in lost],
        )


def describe(broker: RabbitMQBroker, topic: str, meta: TopicMeta) -> TopicInfo:
    """Stream model: the extent of the stream, and each group's committed offset and lag."""
    with broker._stream_lock:
        mine = [sg for (t, _), sg in broker._stream_groups.items() if t == topic]
    states = {}
    for sg in mine:
        with sg.cond:
            if sg.held:
                states[sg.group] = sg.snapshot()
    return describe_stream(broker, topic, meta, states)
