"""The consumer side of ``pulsar://``: leases, their expiry, delivery counts, seek.

One Pulsar consumer per assigned partition (``NAME-partition-I``), all on the subscription named
after the group, opened at the first ``receive`` or ``seek`` (a member that has not received yet
holds no prefetched messages, so they go to members that read). A waiting ``receive`` blocks in
pulsar-client: ``receive(timeout)`` with one partition, ``receive_async`` on each with several.

Leases are kept here, not in the broker: Pulsar's own ack timeout cannot go below 10 s, and it
accepts a late ack from any member without a word (it acks whatever delivery the message has
now). Each delivery gets a lease token; the reaper thread of the broker object
(``_pulsar_leases.py``) negatively acknowledges a delivery whose ``ack_timeout_s`` passed and
forgets its token, so the late ack raises ``LeaseLostError`` instead of reaching the broker. A
consumer whose connection dropped loses its leases too (the broker gave them to other members).
A member idle for ``ack_timeout_s`` with no leases closes its Pulsar consumers ("parks") so the
messages prefetched into it go to members that read; the next ``receive`` opens them again.

``delivery_count`` is 1 + the larger of Pulsar's redelivery count and how often this broker
object delivered the message before. Pulsar counts nacks and expiries, but not redeliveries after
a consumer closed or crashed (apache/pulsar#8722), and forgets its counts when a subscription has
no consumer left; the process-local memory covers the first case within one process.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pulsar
import pulsar.exceptions as px

from infeed.brokers._pulsar_admin import COMMITTED_PROPERTY
from infeed.brokers._pulsar_wire import BATCH_BITS, _map_errors, decode_key, unpack
from infeed.brokers.base import (
    Consumer,
    Message,
    as_deliveries,
    as_positions,
    dead_letter_copy,
    dead_letter_headers,
)
from infeed.errors import (
    BrokerConnectionError,
    ConsumerClosedError,
    LeaseLostError,
    UnsupportedOperationError,
)
from infeed.types import Delivery, Position, trusted_delivery, trusted_position

if TYPE_CHECKING:
    from infeed.brokers.pulsar import PulsarBroker

__all__ = ["_PulsarConsumer"]

#: Longest a waiting receive blocks in the client before it looks at the connection again.
_POLL_S = 0.5
#: How often the reaper looks at the connection of consumers that hold leases.
_CHECK_S = 0.5
#: A member parks only this long after its last negative ack (so the nack reaches the broker).
_PARK_AFTER_NACK_S = 0.5
_tokens = itertools.count(1)
_log = logging.getLogger("infeed.brokers.pulsar")


@dataclass(slots=True)
class _Lease:
    token: int
    part: _Part
    raw: Any  # the pulsar-client consumer that received it
    offset: int
    msg: Any
    count: int


@dataclass(slots=True, eq=False)
class _Part:
    index: int
    name: str  # persistent://tenant/namespace/TOPIC-partition-I
    wrapper: Any = None  # pulsar.Consumer
    raw: Any = None  # its _pulsar.Consumer (the fast path)
    pending: Any = None  # a message that receive_async handed over
    waiting: bool = False  # a receive_async is outstanding
    skip_below: int | None = None  # after a seek inside a batch: drop (and ack) what is before it
    down_since: float | None = None


class _PulsarConsumer(Consumer):
    def __init__(
        self,
        broker: PulsarBroker,
        topic: str,
        group: str,
        partitions: list[int],
        count: int,
        dlq: str | None,
    ) -> None:
        super().__init__(broker, topic, group, dlq)
        self._b = broker
        self._cfg = broker.config
        self._count = count
        self._parts = [_Part(p, broker._partition_name(topic, p)) for p in partitions]
        self._by_index = {part.index: part for part in self._parts}
        self._leases: dict[int, _Lease] = {}
        self._deadlines: collections.deque[tuple[float, list[int]]] = collections.deque()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._closed = False
        self._receiving = False
        self._last_active = time.monotonic()
        self._last_nack = -1e9
        self._next = 0
        self._where = broker._where
        broker._reaper.register(self)

    # -- connection -----------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise ConsumerClosedError(f"consumer of group {self.group!r} on {self.topic!r} is closed")
        self._b._check_open()

    def _open(self) -> None:
        """Open the Pulsar consumers that are not open (first use, or after parking)."""
        with self._lock:
            for part in self._parts:
                if part.raw is None:
                    part.wrapper = self._b._open_consumer(part.name, self.group)
                    part.raw = part.wrapper._consumer
                    part.pending, part.waiting = None, False

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """Open the Pulsar consumers and keep the reaper from parking them meanwhile."""
        with self._lock:
            self._receiving = True
        try:
            self._open()
            yield
        finally:
            with self._lock:
                self._receiving = False
                self._last_active = time.monotonic()

    def _connection_check(self) -> None:
        """Drop the leases of disconnected partitions; reopen or raise as an outage goes on.

        pulsar-client reconnects a consumer by itself, but after a broker restart it can stay
        stuck ("Consumer that failed is already present on the connection"): a partition down
        for ``operation_timeout_s`` gets a fresh consumer (opened by the next ``receive``).
        """
        now = time.monotonic()
        for part in self._parts:
            if part.raw is not None and part.raw.is_connected():
                part.down_since = None
                continue
            if part.down_since is None and part.raw is None:
                continue  # parked, or not opened yet
            self._lose_part(part)
            if part.down_since is None:
                part.down_since = now
            down = now - part.down_since
            if down > self._b._retry.budget_s:
                raise BrokerConnectionError(
                    f"{self._b.config.service_url} unreachable for {down:.1f}s "
                    f"(past the reconnect budget of {self._b._retry.budget_s:.1f}s) "
                    f"while consuming {part.name}"
                )
            if part.raw is not None and down > self._cfg.operation_timeout_s:
                _log.warning("%s: disconnected for %.1fs; subscribing afresh", part.name, down)
                with self._lock:
                    self._close_part(part)

    def _lose_part(self, part: _Part, *, remember: bool = True) -> None:
        self._drop_leases(lambda lease: lease.part is part, remember=remember)

    def _drop_leases(self, which: Callable[[_Lease], bool], *, remember: bool = True) -> None:
        with self._lock:
            dropped = [self._leases.pop(t) for t in [t for t, x in self._leases.items() if which(x)]]
        if remember:
            self._remember(dropped)

    def _remember(self, leases: Iterable[_Lease]) -> None:
        topic, group = self.topic, self.group
        self._b._counts.remember(((topic, group, x.part.index, x.offset), x.count) for x in leases)

    # -- receive ------------------------------------------------------------------------------

    def receive(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        if max_messages <= 0:
            raise ValueError(f"max_messages must be > 0, got {max_messages}")
        self._check()
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._busy():
            while True:
                with _map_errors(self._where):
                    out, over = self._poll(max_messages)
                if over:
                    self._dead_letter_over_limit(out, over)
                if out:
                    return out
                self._connection_check()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                with _map_errors(self._where):
                    self._wait(min(remaining, _POLL_S))
                self._check()

    def _poll(self, limit: int) -> tuple[list[Delivery], list[tuple[Delivery, Any, Any]]]:
        """Take what the partitions' consumers hold, round-robin, without blocking.

        Returns the deliveries to hand out, and those past ``max_deliveries`` (with the raw
        consumer and message of each) to dead-letter.
        """
        out: list[Delivery] = []
        over: list[tuple[Delivery, Any, Any]] = []
        leases: list[_Lease] = []
        topic, group, counts = self.topic, self.group, self._b._counts
        max_deliveries = self._cfg.max_deliveries
        n = len(self._parts)
        for k in range(n):
            part = self._parts[(self._next + k) % n]
            raw, index = part.raw, part.index
            if part.waiting or raw is None:
                continue
            while len(out) < limit:
                msg = part.pending
                if msg is not None:
                    part.pending = None
                else:
                    try:
                        msg = raw.receive(0)
                    except px.Timeout:
                        break
                mid = msg.message_id()
                batch = mid.batch_index()
                offset = mid.ledger_id() << 64 | mid.entry_id() << BATCH_BITS | (batch if batch > 0 else 0)
                if part.skip_below is not None:
                    if offset < part.skip_below:
                        raw.acknowledge(msg)  # before the position a seek asked for: done, as Pulsar's seek
                        continue
                    part.skip_below = None
                headers = msg.properties()
                partition_key = msg.partition_key()
                key = decode_key(partition_key, headers) if partition_key or headers else None
                count = msg.redelivery_count() + 1
                if counts:
                    count = counts.count((topic, group, index, offset), count - 1)
                if max_deliveries and count > max_deliveries:
                    position = Position(topic, index, offset)
                    timestamp = msg.publish_timestamp() / 1000.0
                    over.append(
                        (Delivery(msg.data(), key, headers, position, count - 1, timestamp), raw, msg)
                    )
                    continue
                lease = _Lease(next(_tokens), part, raw, offset, msg, count)
                leases.append(lease)
                out.append(
                    trusted_delivery(
                        msg.data(),
                        key,
                        headers,
                        trusted_position(topic, index, offset),
                        count,
                        msg.publish_timestamp() / 1000.0,
                        lease.token,
                    )
                )
        self._next = (self._next + 1) % n
        if leases:
            with self._lock:
                for lease in leases:
                    self._leases[lease.token] = lease
                self._deadlines.append(
                    (time.monotonic() + self._cfg.ack_timeout_s, [x.token for x in leases])
                )
            self._b._reaper.poke()
        return out, over

    def _dead_letter_over_limit(self, out: list[Delivery], over: list[tuple[Delivery, Any, Any]]) -> None:
        """Dead-letter messages past ``max_deliveries``, then ack them (Pulsar's DeadLetterPolicy).

        If the dead-letter topic cannot be written, they and ``out`` are given back and the
        error is raised: nothing is dropped.
        """
        limit = self._cfg.max_deliveries
        copies = [
            Message(
                d.payload,
                d.key,
                dead_letter_headers(d, f"delivered {d.delivery_count} times (max_deliveries={limit})"),
            )
            for d, _, _ in over
        ]
        try:
            self._b.publish_many(self.dead_letter_topic, copies)
        except BaseException:
            with _map_errors(self._where):
                for _, raw, msg in over:
                    raw.negative_acknowledge(msg)
            self._last_nack = time.monotonic()
            self._b._counts.remember(
                ((self.topic, self.group, d.partition, d.position.offset), d.delivery_count)
                for d, _, _ in over
            )
            if out:
                self.nack(out)
            raise
        with _map_errors(self._where):
            for _, raw, msg in over:
                raw.acknowledge(msg)

    def _wait(self, timeout_s: float) -> None:
        """Block until a message may be there (or ``timeout_s``), without taking it out of order."""
        parts = [p for p in self._parts if p.raw is not None]
        if len(parts) == 1 and not parts[0].waiting and parts[0].pending is None:
            part = parts[0]
            try:
                part.pending = part.raw.receive(max(1, int(timeout_s * 1000)))
            except px.Timeout:
                pass
            return
        self._wake.clear()
        for part in parts:
            if not part.waiting and part.pending is None:
                part.waiting = True
                part.raw.receive_async(self._callback(part, part.raw))
        if any(p.pending is not None or not p.waiting for p in parts):
            return
        self._wake.wait(timeout_s)

    def _callback(self, part: _Part, raw: Any) -> Any:
        def done(result: Any, msg: Any) -> None:
            if part.raw is raw:
                if result == pulsar.Result.Ok:
                    part.pending = msg
                part.waiting = False
            self._wake.set()

        return done

    # -- settle -------------------------------------------------------------------------------

    def _take(self, deliveries: Delivery | Iterable[Delivery]) -> tuple[list[_Lease], list[Delivery]]:
        """Remove and return the live leases of ``deliveries``, and the deliveries whose lease is lost."""
        items = as_deliveries(deliveries)
        for topic in {d.position.topic for d in items} - {self.topic}:
            raise ValueError(f"delivery from topic {topic!r} given to a {self.topic!r} consumer")
        self._check()
        for part in self._parts:
            if part.raw is not None and not part.raw.is_connected():
                self._lose_part(part)  # the broker already gave its messages to other members
        live: list[_Lease] = []
        lost: list[Delivery] = []
        with self._lock:
            for d in items:
                lease = self._leases.pop(d.receipt, None) if type(d.receipt) is int else None
                if lease is None or lease.offset != d.position.offset or lease.part.index != d.partition:
                    if lease is not None:
                        self._leases[lease.token] = lease
                    lost.append(d)
                    continue
                live.append(lease)
        return live, lost

    def ack(self, deliveries: Delivery | Iterable[Delivery]) -> None:
        live, lost = self._take(deliveries)
        with _map_errors(self._where):
            for lease in live:
                lease.raw.acknowledge(lease.msg)
        _raise_lost(lost)

    def ack_cumulative(self, delivery: Delivery) -> None:
        """Ack ``delivery`` and every earlier one of its partition in one request.

        Only for ``subscription_type=failover`` (Pulsar refuses cumulative acks on shared
        subscriptions, where members hold interleaved messages).

        Raises:
            UnsupportedOperationError: on a shared or key_shared subscription.
            LeaseLostError: if the lease of ``delivery`` passed to another member.
        """
        if self._cfg.subscription_type != "failover":
            raise UnsupportedOperationError(
                f"cumulative acks need subscription_type=failover, not {self._cfg.subscription_type}"
            )
        live, lost = self._take(delivery)
        _raise_lost(lost)
        (lease,) = live
        self._drop_leases(lambda x: x.part is lease.part and x.offset < lease.offset)
        with _map_errors(self._where):
            lease.raw.acknowledge_cumulative(lease.msg)

    def nack(
        self, deliveries: Delivery | Iterable[Delivery], *, requeue: bool = True, reason: str = ""
    ) -> None:
        live, lost = self._take(deliveries)
        if requeue:
            self._remember(live)
            with _map_errors(self._where):
                for lease in live:
                    lease.raw.negative_acknowledge(lease.msg)
            self._last_nack = time.monotonic()
        elif live:
            by_token = {d.receipt: d for d in as_deliveries(deliveries)}
            copies = [dead_letter_copy(d, reason) for d in (by_token[x.token] for x in live)]
            try:
                self._b.publish_many(self.dead_letter_topic, copies)
            except BaseException:
                self._remember(live)
                for lease in live:  # not dead-lettered: give them back rather than lose them
                    lease.raw.negative_acknowledge(lease.msg)
                raise
            with _map_errors(self._where):
                for lease in live:
                    lease.raw.acknowledge(lease.msg)
        _raise_lost(lost)

    # -- reaper -------------------------------------------------------------------------------

    def next_due(self, now: float) -> float:
        """When the reaper should look at this consumer next."""
        if self._closed:
            return now + 60.0
        due = now + 60.0
        if self._deadlines:
            due = min(self._deadlines[0][0], now + _CHECK_S)
        if not self._leases and not self._receiving and any(p.raw is not None for p in self._parts):
            due = min(
                due, max(self._last_active + self._cfg.ack_timeout_s, self._last_nack + _PARK_AFTER_NACK_S)
            )
        return due

    def reap(self) -> None:
        """Expire leases past their deadline; park the member if it is idle."""
        now = time.monotonic()
        expired: list[_Lease] = []
        with self._lock:
            if self._closed:
                return
            while self._deadlines and self._deadlines[0][0] <= now:
                for token in self._deadlines.popleft()[1]:
                    lease = self._leases.pop(token, None)
                    if lease is not None:
                        expired.append(lease)
            self._remember(expired)
            for lease in expired:
                try:
                    lease.raw.negative_acknowledge(lease.msg)
                except px.PulsarException:
                    pass  # closed meanwhile: closing gave the message back already
                self._last_nack = now
            if self._leases and self._deadlines:
                for part in self._parts:  # a dropped connection took the leases with it
                    if part.raw is not None and not part.raw.is_connected():
                        self._lose_part(part)
            idle = now - self._last_active >= self._cfg.ack_timeout_s
            if (
                idle
                and not self._leases
                and not self._receiving
                and now - self._last_nack >= _PARK_AFTER_NACK_S
            ):
                self._park()

    def _park(self) -> None:
        for part in self._parts:
            self._close_part(part)

    @staticmethod
    def _close_part(part: _Part) -> None:
        wrapper = part.wrapper
        part.wrapper = part.raw = part.pending = None
        part.waiting = False
        if wrapper is not None:
            try:
                wrapper.close()
            except px.PulsarException:
                pass  # unreachable: the broker releases the consumer when the connection goes

    # -- positions ----------------------------------------------------------------------------

    def _positions(self, positions: Any) -> dict[int, Position]:
        items = as_positions(positions)
        self._check()
        by_partition: dict[int, Position] = {}
        for pos in items:
            if pos.topic != self.topic:
                raise ValueError(f"position {pos} is not on topic {self.topic!r}")
            if not 0 <= pos.partition < self._count:
                raise ValueError(f"position {pos}: no partition {pos.partition}")
            high = self._b._high(self.topic, pos.partition)
            if pos.offset > high:
                raise ValueError(
                    f"position {pos} is past the end of partition {pos.partition} (next offset {high})"
                )
            by_partition[pos.partition] = pos
        return by_partition

    def commit(self, positions: Position | Iterable[Position]) -> None:
        admin = self._b._admin
        for partition, pos in self._positions(positions).items():
            name = self._b._partition_short(self.topic, partition)
            admin.set_properties(name, self.group, {COMMITTED_PROPERTY: str(pos.offset)})

    def committed(self) -> dict[int, Position]:
        self._check()
        out: dict[int, Position] = {}
        for partition in range(self._count):
            props = self._b._admin.properties(self._b._partition_short(self.topic, partition), self.group)
            if COMMITTED_PROPERTY in props:
                out[partition] = Position(self.topic, partition, int(props[COMMITTED_PROPERTY]))
        return out

    def seek(self, positions: Position | Iterable[Position]) -> None:
        targets = self._positions(positions)
        with self._busy():
            for partition, pos in targets.items():
                self._seek(partition, pos.offset)

    def _seek(self, partition: int, offset: int) -> None:
        ledger, entry, batch = unpack(offset)
        short = self._b._partition_short(self.topic, partition)
        skip = None
        if batch > 0:  # inside an entry: is it a batch with a message at that index?
            if self._b._admin.batch_size(short, ledger, entry) > batch:
                skip = offset
            else:
                entry += 1
        part = self._by_index.get(partition)
        if part is None:  # not read by this member: move the group through the admin API
            self._b._admin.reset_cursor(short, self.group, ledger, entry)
            return
        self._lose_part(part, remember=False)
        target = pulsar.MessageId(partition=-1, ledger_id=ledger, entry_id=entry)._msg_id
        with _map_errors(self._where):
            part.raw.seek(target)  # inclusive: the consumers are opened with start_message_id_inclusive
        part.pending, part.skip_below = None, skip
        self._b._counts.forget_from(self.topic, self.group, partition, offset)

    # -- close --------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._remember(self._leases.values())
            self._leases.clear()
            self._deadlines.clear()
            self._park()


def _raise_lost(lost: list[Delivery]) -> None:
    if lost:
        raise LeaseLostError(
            f"{len(lost)} deliveries lost their lease (first: {lost[0].position}); "
            "they were or will be delivered to another member",
            positions=[d.position for d in lost],
        )
