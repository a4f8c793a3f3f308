"""The consumer of the ``redis://`` backend (see ``redis.py`` for how leases map to streams).

One round trip per batch in steady state: ``receive`` sends the claim script and XREADGROUP in
one pipeline, and when the previous batch was full, ``ack`` sends with its settle script the
fetch of the next batch (read-ahead), so the server writes (and, with ``appendfsync always``,
fsyncs) once per batch, not twice. Read-ahead entries are leased from the moment they are
fetched: ``receive`` hands them out only while younger than half the ack timeout, and gives
them back unseen (their next delivery still counts 1) otherwise, on ``seek`` and on ``close``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

from infeed.brokers import _redis_wire as wire
from infeed.brokers.base import (
    Consumer,
    as_deliveries,
    as_positions,
    dead_letter_headers,
    partition_for_key,
)
from infeed.errors import BrokerError, ConsumerClosedError, LeaseLostError, TopicNotFoundError
from infeed.types import Delivery, Position, trusted_delivery, trusted_position

if TYPE_CHECKING:
    from infeed.brokers.redis import RedisBroker

#: Members holding nothing and idle this long are removed from a group when a member leaves.
STALE_CONSUMER_S = 3600.0
#: The member that holds entries given back by a consumer that left, until another claims them.
RELEASED_HOLDER = "infeed-released"

_log = logging.getLogger("infeed.brokers.redis")
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
#: Redis times out blocked reads at its server tick (``hz`` 10 by default): the finest BLOCK it honours.
_BLOCK_RESOLUTION_S = 0.1
#: Pause between non-blocking reads while a wait shorter than a tick runs out.
_SHORT_POLL_S = 0.001


class _RedisConsumer(Consumer):
    def __init__(
        self,
        broker: RedisBroker,
        topic: str,
        group: str,
        n: int,
        partitions: list[int],
        dlq: str | None,
    ) -> None:
        super().__init__(broker, topic, group, dlq)
        self._b = broker
        self._n = n
        self._partitions = partitions
        self._name = _member_name()
        #: every member name this object used: seek takes a new one (see seek)
        self._names = [self._name]
        self._streams = [broker._keys.stream(topic, p) for p in partitions]
        self._partition_of = {key.encode(): p for key, p in zip(self._streams, partitions, strict=True)}
        self._ack_ms = max(1, round(broker.config.ack_timeout_s * 1000))
        self._turn = 0
        #: read-ahead deliveries, fetched at ``_ahead_at`` (monotonic)
        self._ahead: list[Delivery] = []
        self._ahead_at = 0.0
        #: max_messages of the last receive when it came back full (read ahead on ack), else 0
        self._full = 0
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise ConsumerClosedError(f"consumer {self._name} of group {self.group!r} is closed")

    # -- receive ------------------------------------------------------------------------------

    def receive(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        if max_messages <= 0:
            raise ValueError(f"max_messages must be > 0, got {max_messages}")
        self._check_open()
        out = self._from_ahead(max_messages)
        if out and len(out) < max_messages:  # a smaller read-ahead: top up without waiting
            order, more = self._order(), max_messages - len(out)
            flat, fresh = self._exchange(self._fetch(order, more))
            out += self._unpack(order, flat, fresh, more, top_up=False)
        deadline = time.monotonic() + max(0.0, timeout_s)
        while not out:
            order = self._order()
            flat, fresh = self._exchange(self._fetch(order, max_messages))
            out = self._unpack(order, flat, fresh, max_messages, top_up=True)
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                break
            if remaining < _BLOCK_RESOLUTION_S:
                # Redis ends a blocked read at its next server tick, so a short BLOCK waits ~0.1 s:
                # poll instead for waits shorter than a tick (a batcher's window).
                time.sleep(min(remaining, _SHORT_POLL_S))
                continue
            # Nothing now: block for new entries, then look again for expired leases.
            out = self._read(order, max_messages, max(1, int(min(remaining, self._b.config.poll_s) * 1000)))
        self._full = max_messages if len(out) >= max_messages else 0
        return out

    def receive_acked(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        """New entries read with NOACK (never leased: no pending entry, no settle script).

        Entries claimed from expired leases, and read-ahead leased by an earlier ``ack``, are
        acked with the settle script before they are returned.
        """
        if max_messages <= 0:
            raise ValueError(f"max_messages must be > 0, got {max_messages}")
        self._check_open()
        self._full = 0  # no read-ahead: it would be leased
        out = self._from_ahead(max_messages)
        if out:
            self._ack_taken(out)
            return out
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            order = self._order()
            flat, fresh = self._exchange(self._fetch(order, max_messages, noack=True))
            out = self._fresh(fresh)  # at most COUNT per stream: never more than max_messages
            if flat:
                claimed = self._claimed(order, flat)
                room = max_messages - len(out)
                if len(claimed) > room:  # the fresh ones cannot be given back: these can
                    self._give_back(claimed[room:])
                    del claimed[room:]
                if claimed:
                    self._ack_taken(claimed)
                    out = claimed + out
            remaining = deadline - time.monotonic()
            if out or remaining <= 0:
                return out
            if remaining < _BLOCK_RESOLUTION_S:
                time.sleep(min(remaining, _SHORT_POLL_S))  # see receive
                continue
            # Block on the same streams and COUNT: a read that finds data at once answers from
            # every stream that has some, and a surplus of NOACK entries could not be given back.
            block_ms = max(1, int(min(remaining, self._b.config.poll_s) * 1000))
            streams, count = _spread(order, max_messages)
            out = self._fresh(self._command(self._xreadgroup(streams, count, block_ms=block_ms, noack=True)))
            if out:
                return out

    def _ack_taken(self, deliveries: list[Delivery]) -> None:
        """Ack leased deliveries handed out by ``receive_acked`` (a lease lost: returned all the same)."""
        try:
            self._settle("ack", deliveries, "", 0)
        except LeaseLostError:
            pass  # as Consumer.receive_acked says: another member may get them too

    def _exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        return self._b._call(lambda _: self._b._pipeline(commands))

    def _from_ahead(self, max_messages: int) -> list[Delivery]:
        if not self._ahead:
            return []
        if time.monotonic() - self._ahead_at > self._ack_ms / 2000:  # too close to expiry
            self._give_back(self._ahead)
            self._ahead = []
            return []
        out = self._ahead[:max_messages]
        del self._ahead[:max_messages]
        return out

    def _order(self) -> list[str]:
        """The streams, starting one further at each call (partitions take turns)."""
        self._turn = (self._turn + 1) % len(self._streams)
        return self._streams[self._turn :] + self._streams[: self._turn]

    def _fetch(self, order: list[str], max_messages: int, *, noack: bool = False) -> list[tuple[Any, ...]]:
        """Commands that claim expired or given-back entries, then read new ones (with NOACK)."""
        streams, count = _spread(order, max_messages)
        claim = ("@claim", order, [self.group, self._name, self._ack_ms, max_messages])
        return [claim, self._xreadgroup(streams, count, noack=noack)]

    def _xreadgroup(
        self, streams: list[str], count: int, *, block_ms: int | None = None, noack: bool = False
    ) -> tuple[Any, ...]:
        """XREADGROUP of new entries, up to ``count`` per stream."""
        cmd: tuple[Any, ...] = ("XREADGROUP", "GROUP", self.group, self._name, "COUNT", count)
        if block_ms is not None:
            cmd += ("BLOCK", block_ms)
        if noack:
            cmd += ("NOACK",)
        return (*cmd, "STREAMS", *streams, *[">"] * len(streams))

    def _command(self, cmd: tuple[Any, ...]) -> Any:
        """Run one command (retried as the broker's calls are)."""
        return self._b._call(lambda _: cast(Any, self._b._r).execute_command(*cmd))

    def _claimed(self, order: list[str], flat: list[Any]) -> list[Delivery]:
        """Deliveries of the claim script's reply (flat: key index in ``order``, id, fields, count)."""
        return [
            self._delivery(self._partition_of[order[flat[i] - 1].encode()], *flat[i + 1 : i + 4])
            for i in range(0, len(flat), 4)
        ]

    def _unpack(
        self, order: list[str], flat: list[Any], fresh: list[Any] | None, max_messages: int, *, top_up: bool
    ) -> list[Delivery]:
        out = self._claimed(order, flat)
        out += self._fresh(fresh)
        if len(out) > max_messages:  # claimed and new together: give the newest back unseen
            self._give_back(out[max_messages:])
            del out[max_messages:]
        elif top_up and fresh and len(out) < max_messages and len(order) > 1:
            # Streams that filled their share may hold more: top the batch up from them.
            _, count = _spread(order, max_messages)
            full = [key.decode() for key, entries in fresh if len(entries) == count]
            if full:
                out += self._read(full, max_messages - len(out), None)
        return out

    def _read(self, order: list[str], max_messages: int, block_ms: int | None) -> list[Delivery]:
        """XREADGROUP new entries, blocking up to ``block_ms``; a surplus is given back unseen.

        COUNT applies per stream; a blocked read is served from the one stream that got data.
        """
        out = self._fresh(self._command(self._xreadgroup(order, max_messages, block_ms=block_ms)))
        if len(out) > max_messages:
            self._give_back(out[max_messages:])
            del out[max_messages:]
        return out

    def _fresh(self, reply: list[Any] | None) -> list[Delivery]:
        """Deliveries of an XREADGROUP reply (inlined: this loop is the consumer's hot path)."""
        out: list[Delivery] = []
        append, topic, name = out.append, self.topic, self._name
        last_raw, ts = b"", 0.0
        for stream, entries in reply or ():
            partition = self._partition_of[stream]
            for entry_id, fields in entries:
                if len(fields) == 4 and fields[0] == b"t" and fields[2] == b"p":  # no key, no headers
                    payload, key, headers = fields[3], None, _NO_HEADERS
                    if fields[1] != last_raw:  # one timestamp per published batch
                        last_raw, ts = fields[1], int(fields[1]) / 1000.0
                else:
                    payload, key, headers, ts = wire.decode_fields(fields)
                    last_raw = b""
                offset = int(entry_id[2:]) if entry_id[:2] == b"0-" else wire.id_to_offset(entry_id)
                position = trusted_position(topic, partition, offset)
                append(trusted_delivery(payload, key, headers, position, 1, ts, (name, entry_id)))
        return out

    def _delivery(self, partition: int, entry_id: bytes, fields: list[bytes], count: int) -> Delivery:
        payload, key, headers, ts = wire.decode_fields(fields)
        position = Position(self.topic, partition, wire.id_to_offset(entry_id))
        return Delivery(payload, key, headers, position, count, ts, (self._name, entry_id))

    def _give_back(self, deliveries: list[Delivery]) -> None:
        """Return entries leased but never handed out: claimable now, next delivery counts 1."""
        by_stream: dict[tuple[str, str], list[Any]] = {}
        for d in deliveries:
            owner, entry_id = d.receipt
            by_stream.setdefault((self._b._keys.stream(self.topic, d.partition), owner), []).append(entry_id)

        def op(_: bool) -> None:
            pipe = self._b._r.pipeline(transaction=False)
            for (key, owner), ids in by_stream.items():
                pipe.xclaim(key, self.group, owner, 0, ids, time=1, retrycount=0, justid=True)
            pipe.execute()

        self._b._call(op)

    # -- settle -------------------------------------------------------------------------------

    def ack(self, deliveries: Delivery | Iterable[Delivery]) -> None:
        self._settle("ack", as_deliveries(deliveries), "", 0 if self._ahead else self._full)

    def nack(
        self, deliveries: Delivery | Iterable[Delivery], *, requeue: bool = True, reason: str = ""
    ) -> None:
        self._settle("requeue" if requeue else "dead", as_deliveries(deliveries), reason, 0)

    def _settle(self, mode: str, items: list[Delivery], reason: str, ahead: int) -> None:
        """Settle ``items`` (checking their leases); read ``ahead`` more in the same round trip."""
        self._check_open()
        groups: dict[tuple[int, str], list[Delivery]] = {}
        lost: list[Position] = []
        topic, n = self.topic, self._n
        for d in items:
            p = d.position.partition
            if d.position.topic != topic or not 0 <= p < n:
                raise ValueError(f"delivery {d.position} is not from topic {topic!r} (partitions 0..{n - 1})")
            receipt = d.receipt
            if isinstance(receipt, tuple) and len(receipt) == 2:  # (member name, stream id)
                key = (p, receipt[0])
                if key in groups:
                    groups[key].append(d)
                else:
                    groups[key] = [d]
            else:
                lost.append(d.position)
        commands: list[tuple[Any, ...]] = []
        sources = sorted({p for p, _ in groups})
        if groups:
            commands.append(self._settle_command(mode, groups, sources, reason))
        order = self._order()
        if ahead:
            commands += self._fetch(order, ahead)
        if commands:

            def op(retried: bool) -> list[Any]:
                if groups:
                    commands[0][2][2] = "1" if retried else "0"  # see settle.lua
                return self._b._pipeline(commands)

            replies = self._b._call(op)
            if ahead:
                self._ahead = self._unpack(order, replies[-2], replies[-1], ahead, top_up=False)
                self._ahead_at = time.monotonic()
            if groups:
                flat = replies[0]
                lost += [
                    Position(topic, sources[int(flat[i]) - 1], wire.id_to_offset(flat[i + 1]))
                    for i in range(0, len(flat), 2)
                ]
        if lost:
            raise LeaseLostError(
                f"{len(lost)} deliveries lost their lease (first: {lost[0]}); "
                "they were or will be delivered to another member",
                positions=lost,
            )

    def _settle_command(
        self, mode: str, groups: dict[tuple[int, str], list[Delivery]], sources: list[int], reason: str
    ) -> tuple[Any, ...]:
        keys = self._b._keys
        index = {p: i + 1 for i, p in enumerate(sources)}
        script_keys = [keys.topics, *(keys.stream(self.topic, p) for p in sources)]
        dlq_n = 0
        if mode == "dead":
            dlq_n = self._b._partitions(self.dead_letter_topic, create=True)
            script_keys += keys.streams(self.dead_letter_topic, dlq_n)
        target_name = RELEASED_HOLDER if mode == "requeue" else self.dead_letter_topic
        args: list[Any] = [mode, self.group, "0", len(sources), target_name, dlq_n]
        for (p, owner), ds in groups.items():
            first = min(ds, key=_offset).receipt[1]
            last = max(ds, key=_offset).receipt[1]
            ids = b" ".join([d.receipt[1] for d in ds])
            counts = [d.delivery_count for d in ds]
            counts_arg = "" if max(counts) == 1 else " ".join(map(str, counts))
            args += (index[p], owner, first, last, ids, counts_arg)
            for d in ds if mode == "dead" else ():
                fields = wire.encode_fields(d.payload, d.key, dead_letter_headers(d, reason))
                if d.key is not None:
                    target = partition_for_key(d.key, dlq_n)
                else:
                    target = next(self._b._round_robin) % dlq_n
                args += (target, len(fields) // 2, *fields)
        return ("@settle", script_keys, args)

    # -- positions ----------------------------------------------------------------------------

    def _positions(self, positions: Position | Iterable[Position]) -> list[Position]:
        self._check_open()
        out = as_positions(positions)
        for pos in out:
            if pos.topic != self.topic:
                raise ValueError(f"position {pos} is not on topic {self.topic!r}")
            if not 0 <= pos.partition < self._n:
                raise ValueError(f"position {pos}: no partition {pos.partition}")
        return out

    def _past_end(self, result: list[Any], positions: list[Position]) -> None:
        if int(result[0]):
            pos = positions[int(result[0]) - 1]
            raise ValueError(
                f"position {pos} is past the end of partition {pos.partition} "
                f"(next offset {wire.id_to_offset(result[1]) + 1})"
            )

    def commit(self, positions: Position | Iterable[Position]) -> None:
        ps = self._positions(positions)
        if not ps:
            return
        keys = self._b._keys
        args: list[Any] = [self.group]
        for pos in ps:
            args += (pos.partition, wire.id_before(pos.offset), wire.offset_to_id(pos.offset))
        script_keys = [keys.commits(self.topic), *(keys.stream(self.topic, pos.partition) for pos in ps)]
        self._past_end(self._b._run("commit", script_keys, args), ps)

    def committed(self) -> dict[int, Position]:
        self._check_open()
        fields = [f"{self.group}:{p}" for p in range(self._n)]
        key = self._b._keys.commits(self.topic)
        values = self._b._call(lambda _: cast(Any, self._b._r).hmget(key, fields))
        return {
            p: Position(self.topic, p, wire.id_to_offset(v)) for p, v in enumerate(values) if v is not None
        }

    def seek(self, positions: Position | Iterable[Position]) -> None:
        ps = self._positions(positions)
        if not ps:
            return
        if self._ahead:  # read ahead before the seek: not handed out, so not to be skipped
            self._give_back(self._ahead)
            self._ahead = []
        args: list[Any] = [self.group]
        for pos in ps:
            args += (wire.id_before(pos.offset), wire.offset_to_id(pos.offset))
        script_keys = [self._b._keys.stream(self.topic, pos.partition) for pos in ps]
        self._past_end(self._b._run("seek", script_keys, args), ps)
        # Entries at or after the positions will be delivered again with count 1, maybe to this
        # object: under a new member name, so that an ack of a delivery from before the seek
        # finds another owner and raises LeaseLostError instead of acking the new delivery.
        self._name = _member_name()
        self._names.append(self._name)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._b._closed:
            return
        try:
            if self._ahead:
                self._give_back(self._ahead)
                self._ahead = []
            for name in self._names:
                args = [self.group, name, RELEASED_HOLDER, round(STALE_CONSUMER_S * 1000)]
                self._b._run("release", self._streams, args)
        except TopicNotFoundError:
            pass  # the topic went, and its leases with it
        except BrokerError as exc:  # the leases still expire after ack_timeout_s
            _log.warning("consumer %s could not give its leases back: %s", self._name, exc)


def _offset(d: Delivery) -> int:
    return d.position.offset


def _spread(order: list[str], max_messages: int) -> tuple[list[str], int]:
    """Streams to read and COUNT for each, so that one XREADGROUP returns at most ``max_messages``."""
    streams = order[:max_messages]
    return streams, max(1, max_messages // len(streams))


def _member_name() -> str:
    """A consumer name unique to this process and object: host-pid-random."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
