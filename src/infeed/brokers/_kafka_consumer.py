"""The consumer of the ``kafka://`` backend: one librdkafka consumer plus a ledger per partition.

See ``kafka.py`` for how the contract maps onto Kafka and ``_kafka_ledger.py`` for the ledger.
Everything here runs on the caller's thread: librdkafka serves rebalance callbacks inside
``consume()``, so a partition can only come or go while ``receive`` (or ``subscribe``) polls.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import confluent_kafka as ck
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from infeed.brokers._kafka_ledger import Ledger, Pending, Saved, decode, encode
from infeed.brokers._kafka_wire import error_for, map_errors, retriable
from infeed.brokers.base import (
    Consumer,
    StartFrom,
    as_deliveries,
    as_positions,
    dead_letter_copy,
)
from infeed.errors import (
    BrokerError,
    BrokerTimeoutError,
    ConsumerClosedError,
    InfeedError,
    LeaseLostError,
    TopicNotFoundError,
)
from infeed.types import Delivery, Position, trusted_delivery, trusted_position

if TYPE_CHECKING:
    from infeed.brokers.kafka import KafkaBroker

__all__ = ["RECEIVE_ACKED_STORE_S", "_KafkaConsumer"]

_log = logging.getLogger("infeed.brokers.kafka")
_receipts = itertools.count(1)
#: Longest single wait inside ``receive``, so outages and lease ends are looked at in time.
_SLICE_S = 1.0
#: An ``ack`` this late after the last poll counts as lost: the member may have been evicted.
_EVICTION_MARGIN = 0.9
#: ``receive_acked`` stores its acks (asynchronously) at most this often, and at commit and close.
RECEIVE_ACKED_STORE_S = 1.0
T = TypeVar("T")


class _KafkaConsumer(Consumer):
    def __init__(
        self,
        broker: KafkaBroker,
        topic: str,
        group: str,
        dlq: str | None,
        *,
        partitions: Sequence[int] | None,
        start: StartFrom,
        n_partitions: int,
    ) -> None:
        super().__init__(broker, topic, group, dlq)
        self._b = broker
        cfg = broker.config
        self._where = f"{cfg.url} (group {group!r}, topic {topic!r})"
        self._link = broker._link
        self._lease_s = cfg.ack_timeout_s
        self._max_poll_s = cfg.max_poll_s
        self._start = start
        self._n = n_partitions
        self._manual = partitions is not None
        self._ledgers: dict[int, Ledger] = {}
        self._revoked: dict[int, Ledger] = {}
        self._orphans: list[int] = []
        self._backlog: list[Any] = []
        self._stash: list[InfeedError] = []
        #: when the ledgers were last written (``receive_acked`` writes its acks lazily)
        self._stored_at = time.monotonic()
        self._joined = False
        self._closed = False
        self._evicted = False
        self._polled_at = time.monotonic()
        with map_errors(cfg.url, "creating a consumer"):
            self._c = ck.Consumer(broker._consumer_conf(group))
        # A consumer dropped without close() must still leave its group at once: otherwise every
        # rebalance of the group waits for it until session_timeout_s. The client's callbacks
        # hold this object weakly, so dropping it finalizes it.
        self._finalizer = weakref.finalize(self, _close_client, self._c, self._where)
        try:
            if partitions is None:
                with map_errors(self._where, "subscribe"):
                    self._c.subscribe(
                        [topic],
                        on_assign=_weak(self, _KafkaConsumer._on_assign),
                        on_revoke=_weak(self, _KafkaConsumer._on_revoke),
                        on_lost=_weak(self, _KafkaConsumer._on_lost),
                    )
                self._join(time.monotonic() + cfg.join_s)
            else:
                tps = self._take_over(list(partitions))
                with map_errors(self._where, "assign"):
                    self._c.assign(tps)
                self._joined = True
        except BaseException:
            self._finalizer()
            raise

    # -- group membership ---------------------------------------------------------------------

    def _join(self, deadline: float) -> None:
        """Poll until the group has given this member its partitions (maybe none)."""
        while not self._joined:
            self._raise_stashed()
            self._link.check()
            if time.monotonic() > deadline:
                if self._link.down:
                    raise self._link.gone()
                raise BrokerTimeoutError(
                    f"{self._where}: no partition assignment within {self._b.config.join_s:.0f} s; "
                    "another member may be stuck (it is evicted after max_poll_interval_s)"
                )
            self._backlog.extend(self._consume(100, 0.05))
        self._raise_stashed()

    def _on_assign(self, consumer: Any, parts: list[TopicPartition]) -> None:
        self._n = max([self._n, *(tp.partition + 1 for tp in parts)])  # partitions may be added
        try:
            tps = self._take_over([tp.partition for tp in parts])
        except InfeedError as exc:
            self._stash.append(exc)
            self._orphans = [tp.partition for tp in parts]
            tps = []
        finally:
            self._revoked.clear()
            self._joined = True
        consumer.assign(tps)

    def _on_revoke(self, consumer: Any, parts: list[TopicPartition]) -> None:
        gone = [self._ledgers.pop(tp.partition) for tp in parts if tp.partition in self._ledgers]
        self._backlog.clear()
        self._orphans.clear()
        if gone and not self._evicted and self._persist(gone, sync=True, strict=False):
            self._revoked = {led.partition: led for led in gone}

    def _on_lost(self, consumer: Any, parts: list[TopicPartition]) -> None:
        for tp in parts:
            self._ledgers.pop(tp.partition, None)
        self._backlog.clear()
        self._orphans.clear()

    def _take_over(self, partitions: list[int]) -> list[TopicPartition]:
        """Read the group's stored ledgers of ``partitions``; return where to fetch from."""
        if not partitions:
            return []
        asked = [TopicPartition(self.topic, p) for p in partitions]
        got = self._retry("reading committed offsets", lambda t: self._c.committed(asked, timeout=t))
        stored: dict[int, tuple[int, str]] = {}
        for tp in got:
            if tp.error is not None:
                raise error_for(
                    tp.error, self._where, f"reading the committed offset of partition {tp.partition}"
                )
            if tp.offset >= 0:
                stored[tp.partition] = (tp.offset, tp.metadata or "")
        fresh = [p for p in partitions if p not in stored]
        if fresh:
            # A group with no state starts where it was asked to, fixed now by a commit.
            lows, highs = self._b._extents(self.topic, fresh)
            marks = lows if self._start == "earliest" else highs
            starts = [
                TopicPartition(self.topic, p, marks[p], metadata=encode(Saved(marks[p]))) for p in fresh
            ]
            self._commit(starts, "storing the group's start position")
            stored.update({tp.partition: (tp.offset, tp.metadata or "") for tp in starts})
        out = []
        for p in partitions:
            offset, metadata = stored[p]
            old = self._revoked.get(p)
            if old is not None and old.saved == (offset, metadata):
                ledger = old  # back to us untouched in the same rebalance: its leases stay valid
            else:
                ledger = Ledger.take_over(p, decode(offset, metadata))
                ledger.saved = (offset, metadata)
            self._ledgers[p] = ledger
            out.append(TopicPartition(self.topic, p, ledger.fetch))
        return out

    def _reassign(self) -> None:
        """Assign the fetcher again from the ledgers (after a failed takeover or seek)."""
        if self._orphans:
            orphans, self._orphans = self._orphans, []
            try:
                self._take_over(orphans)
            except InfeedError:
                self._orphans = orphans
                raise
        tps = [TopicPartition(self.topic, p, led.fetch) for p, led in sorted(self._ledgers.items())]
        with map_errors(self._where, "assign"):
            self._c.assign(tps)

    # -- receive ------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise ConsumerClosedError(f"consumer of group {self.group!r} on {self.topic!r} is closed")
        self._b._check_open()

    def _consume(self, n: int, timeout_s: float) -> list[Any]:
        with map_errors(self._where, "consume"):
            msgs: list[Any] = self._c.consume(n, timeout_s)
        self._polled_at = time.monotonic()
        return msgs

    def receive(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        return self._receive(max_messages, timeout_s, acked=False)

    def receive_acked(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        """``receive`` without leases: the ledgers advance and are stored lazily (module docstring)."""
        return self._receive(max_messages, timeout_s, acked=True)

    def _receive(self, max_messages: int, timeout_s: float, *, acked: bool) -> list[Delivery]:
        if max_messages <= 0:
            raise ValueError(f"max_messages must be > 0, got {max_messages}")
        self._check()
        now = time.monotonic()
        deadline = now + max(0.0, timeout_s)
        self._evicted = now - self._polled_at > self._max_poll_s
        while True:
            self._raise_stashed()
            if self._orphans:
                self._reassign()
            out = self._due(max_messages, now, acked=acked)
            room = max_messages - len(out)
            if room > 0:
                msgs, self._backlog = self._backlog[:room], self._backlog[room:]
                if len(msgs) < room:
                    msgs += self._consume(room - len(msgs), 0.0)
                if not msgs and not out:
                    wait = min(deadline - now, _SLICE_S, self._next_deadline() - now)
                    msgs = self._consume(1, max(0.0, wait))
                    if msgs and room > 1:
                        msgs += self._consume(room - 1, 0.0)
                out += self._accept(msgs, acked=acked)
            if out:
                self._link.up()
                if acked:
                    self._store_acked(time.monotonic())
                else:  # the new leases and counts are stored before anyone sees them
                    self._persist(self._dirty(), sync=True, strict=False)
                return out
            self._raise_stashed()
            self._probe_link()
            now = time.monotonic()
            self._store_acked(now)
            if now >= deadline:
                return []

    def _store_acked(self, now: float) -> None:
        """Store acks of ``receive_acked`` once ``RECEIVE_ACKED_STORE_S`` passed since the last store."""
        if now - self._stored_at >= RECEIVE_ACKED_STORE_S:
            dirty = self._dirty()
            if dirty:
                self._persist(dirty, sync=False, strict=False)
            self._stored_at = now

    def _next_deadline(self) -> float:
        soonest = [d for led in self._ledgers.values() if led.pending for d in (led.next_deadline(),) if d]
        return min(soonest, default=time.monotonic() + _SLICE_S)

    def _due(self, room: int, now: float, *, acked: bool) -> list[Delivery]:
        """Deliveries whose lease ran out or that were given back, handed out again."""
        out: list[Delivery] = []
        until = None if acked else now + self._lease_s
        for led in self._ledgers.values():
            if len(out) >= room:
                break
            if led.pending:
                out += led.hand_out_due(now, room - len(out), until, _receipts)
        return out

    def _accept(self, msgs: list[Any], *, acked: bool) -> list[Delivery]:
        """Turn fetched messages into deliveries, leased until ``ack_timeout_s`` from now (or acked)."""
        out: list[Delivery] = []
        if not msgs:
            return out
        until = time.monotonic() + self._lease_s
        ledgers, topic, receipts = self._ledgers, self.topic, _receipts
        not_available = ck.TIMESTAMP_NOT_AVAILABLE
        for m in msgs:
            err = m.error()
            if err is not None:
                self._message_error(err)
                continue
            partition = m.partition()
            led = ledgers.get(partition)
            if led is None:
                continue  # fetched before its partition was revoked
            offset = m.offset()
            if led.inherited or offset < led.fetch:
                count = led.accept(offset)
                if count is None:
                    continue
            else:  # the common case of Ledger.accept, inline
                led.fetch = offset + 1
                led.dirty = True
                count = 1
            raw = m.headers()
            headers = (
                {k: v.decode("utf-8", "replace") if v is not None else "" for k, v in raw} if raw else {}
            )
            kind, ms = m.timestamp()
            delivery = trusted_delivery(
                m.value() or b"",
                m.key(),
                headers,
                trusted_position(topic, partition, offset),
                count,
                ms / 1000.0 if kind != not_available else 0.0,
                next(receipts),
            )
            if not acked:
                led.pending[offset] = Pending(delivery, until)
            out.append(delivery)
        return out

    def _message_error(self, err: KafkaError) -> None:
        code = err.code()
        if code == KafkaError._PARTITION_EOF:
            return
        if code == KafkaError._MAX_POLL_EXCEEDED:
            self._evicted = True  # the revoke that follows must not write over the new owner
            return
        if err.fatal() or not retriable(err):
            exc = error_for(err, self._where, "consume")
            if isinstance(exc, TopicNotFoundError):
                exc = TopicNotFoundError(f"topic {self.topic!r} was deleted ({self._where})")
            self._stash.append(exc)
        else:
            _log.debug("kafka consumer on %s: %s", self._where, err)

    def _raise_stashed(self) -> None:
        if self._stash:
            exc, self._stash = self._stash[0], []
            raise exc

    def _probe_link(self) -> None:
        """While the broker looks gone, ask for metadata: it clears or it times out."""
        if not self._link.down:
            return
        try:
            with map_errors(self._where, "metadata"):
                self._c.list_topics(self.topic, timeout=_SLICE_S)
            self._link.up()
        except InfeedError:
            self._link.check()

    # -- writing the ledgers ------------------------------------------------------------------

    def _retry(self, doing: str, fn: Callable[[float], T]) -> T:
        return self._link.retry(f"group {self.group!r} on {self.topic!r}: {doing}", fn)

    def _commit(self, tps: list[TopicPartition], doing: str) -> None:
        """Commit synchronously; raise on any partition's error."""
        result = self._retry(doing, lambda _: self._c.commit(offsets=tps, asynchronous=False))
        for tp in result or []:
            if tp.error is not None:
                raise error_for(tp.error, self._where, doing)

    def _dirty(self) -> list[Ledger]:
        """The ledgers changed since they were last written."""
        return [led for led in self._ledgers.values() if led.dirty]

    def _persist(self, ledgers: Iterable[Ledger], *, sync: bool, strict: bool) -> bool:
        """Write ``ledgers`` into the group's commits; return whether it was written.

        Not ``strict``: a member that lost the partition writes nothing (the new owner's state
        wins); the acks since the last write are then delivered again.
        """
        items = [(led, led.snapshot()) for led in ledgers]
        if not items:
            return True
        tps = [TopicPartition(self.topic, led.partition, s.offset, metadata=encode(s)) for led, s in items]
        try:
            if sync:
                self._commit(tps, "storing acks and delivery counts")
            else:
                with map_errors(self._where, "storing acks"):
                    self._c.commit(offsets=tps, asynchronous=True)
        except LeaseLostError:
            if strict:
                raise
            _log.info("%s: a rebalance took partitions before their acks were stored", self._where)
            return False
        except InfeedError:
            if strict:
                raise
            _log.warning("%s: acks not stored; they are delivered again", self._where, exc_info=True)
            return False
        for (led, _), tp in zip(items, tps, strict=True):
            led.saved = (tp.offset, tp.metadata or "")
            led.dirty = False
        self._stored_at = time.monotonic()
        return True

    # -- settle ---------------------------------------------------------------------------------

    def _items(self, deliveries: Delivery | Iterable[Delivery]) -> list[Delivery]:
        items = as_deliveries(deliveries)
        for d in items:
            if d.topic != self.topic:
                raise ValueError(f"delivery from topic {d.topic!r} given to a {self.topic!r} consumer")
        self._check()
        return items

    def _take(self, items: list[Delivery]) -> tuple[list[Pending], list[Delivery]]:
        """Forget the leases of ``items``; return (settled, lost: no longer this member's)."""
        if time.monotonic() - self._polled_at > _EVICTION_MARGIN * self._max_poll_s:
            return [], items  # no poll for max_poll_interval_s: the group has likely moved on
        settled, lost = [], []
        ledgers = self._ledgers
        for d in items:
            led = ledgers.get(d.position.partition)
            entry = led.pending.get(d.position.offset) if led is not None else None
            if led is None or entry is None or entry.delivery.receipt != d.receipt:
                lost.append(d)
                continue
            del led.pending[d.position.offset]
            led.dirty = True
            settled.append(entry)
        return settled, lost

    def ack(self, deliveries: Delivery | Iterable[Delivery]) -> None:
        settled, lost = self._take(self._items(deliveries))
        if settled:
            self._persist(self._dirty(), sync=False, strict=False)
        _raise_lost(lost)

    def nack(
        self, deliveries: Delivery | Iterable[Delivery], *, requeue: bool = True, reason: str = ""
    ) -> None:
        items = self._items(deliveries)
        if requeue:
            settled, lost = self._take(items)
            for entry in settled:  # handed out again by the next receive, with its count + 1
                d = entry.delivery
                self._ledgers[d.position.partition].pending[d.position.offset] = Pending(d, None)
            _raise_lost(lost)
            return
        lost = self._stale(items)
        stale = {id(d) for d in lost}
        good = [d for d in items if id(d) not in stale]
        if good:
            # The copies are written (and flushed) before the originals are let go.
            dead = [dead_letter_copy(d, reason) for d in good]
            self._b.publish_many(self.dead_letter_topic, dead)
            settled, late = self._take(good)
            lost += late
            if settled:
                self._persist(self._dirty(), sync=False, strict=False)
        _raise_lost(lost)

    def _stale(self, items: list[Delivery]) -> list[Delivery]:
        """The deliveries whose lease is no longer this member's (rebalance, redelivery, seek)."""
        if time.monotonic() - self._polled_at > _EVICTION_MARGIN * self._max_poll_s:
            return list(items)
        out = []
        for d in items:
            led = self._ledgers.get(d.partition)
            entry = led.pending.get(d.position.offset) if led is not None else None
            if entry is None or entry.delivery.receipt != d.receipt:
                out.append(d)
        return out

    # -- commit and seek ----------------------------------------------------------------------

    def _owned(self, pos: Position) -> Ledger:
        if pos.topic != self.topic:
            raise ValueError(f"position {pos} is not on topic {self.topic!r}")
        if not 0 <= pos.partition < self._n:
            raise ValueError(f"position {pos}: no partition {pos.partition} (topic has {self._n})")
        led = self._ledgers.get(pos.partition)
        if led is None:
            raise LeaseLostError(
                f"partition {pos.partition} of {self.topic!r} is not assigned to this member of "
                f"group {self.group!r}; only its owner can commit or seek it"
            )
        if pos.offset > led.fetch:
            _, highs = self._b._extents(self.topic, [pos.partition])
            if pos.offset > highs[pos.partition]:
                raise ValueError(
                    f"position {pos} is past the end of partition {pos.partition} "
                    f"(next offset {highs[pos.partition]})"
                )
        return led

    def commit(self, positions: Position | Iterable[Position]) -> None:
        items = as_positions(positions)
        self._check()
        ledgers = [self._owned(pos) for pos in items]
        for led, pos in zip(ledgers, items, strict=True):
            led.commit = pos.offset
            led.dirty = True
        self._persist(dict.fromkeys(ledgers), sync=True, strict=True)

    def committed(self) -> dict[int, Position]:
        self._check()
        asked = [TopicPartition(self.topic, p) for p in range(self._n)]
        got = self._retry("reading committed offsets", lambda t: self._c.committed(asked, timeout=t))
        out: dict[int, int] = {}
        for tp in got:
            if tp.error is not None:
                raise error_for(tp.error, self._where, "reading committed offsets")
            if tp.offset >= 0:
                commit = decode(tp.offset, tp.metadata).commit
                if commit is not None:
                    out[tp.partition] = commit
        for p, led in self._ledgers.items():
            if led.commit is not None:
                out[p] = led.commit
        return {p: Position(self.topic, p, c) for p, c in sorted(out.items())}

    def seek(self, positions: Position | Iterable[Position]) -> None:
        items = as_positions(positions)
        self._check()
        ledgers = [self._owned(pos) for pos in items]
        moved = set()
        for led, pos in zip(ledgers, items, strict=True):
            led.seek(pos.offset)
            moved.add(pos.partition)
        self._backlog = [m for m in self._backlog if m.error() is not None or m.partition() not in moved]
        try:
            with map_errors(self._where, "seek"):
                for pos in items:
                    self._c.seek(TopicPartition(self.topic, pos.partition, pos.offset))
        except BrokerError:
            self._reassign()  # the fetcher of a just-assigned partition may not take a seek yet
        self._persist(dict.fromkeys(ledgers), sync=True, strict=True)

    # -- close ----------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._ledgers and time.monotonic() - self._polled_at < _EVICTION_MARGIN * self._max_poll_s:
                # Unacked deliveries are written with their counts: the next owner hands them out.
                self._persist(list(self._ledgers.values()), sync=True, strict=False)
        finally:
            self._ledgers.clear()
            self._revoked.clear()
            self._backlog.clear()
            self._finalizer()


def _weak(obj: _KafkaConsumer, method: Callable[[_KafkaConsumer, Any, list[TopicPartition]], None]) -> Any:
    """A rebalance callback that holds ``obj`` weakly (no reference cycle through the client)."""
    ref = weakref.ref(obj)

    def call(consumer: Any, parts: list[TopicPartition]) -> None:
        target = ref()
        if target is not None:
            method(target, consumer, parts)

    return call


def _close_client(client: Any, where: str) -> None:
    """Leave the group and release the client (from ``close`` or when the consumer is dropped)."""
    try:
        client.close()
    except (KafkaException, RuntimeError):
        _log.warning("%s: closing the consumer failed", where, exc_info=True)


def _raise_lost(lost: list[Delivery]) -> None:
    if lost:
        raise LeaseLostError(
            f"{len(lost)} deliveries lost their lease (first: {lost[0].position}); "
            "they were or will be delivered again",
            positions=[d.position for d in lost],
        )
