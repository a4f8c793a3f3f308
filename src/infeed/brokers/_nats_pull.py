"""Pull consumers of the nats:// backend: one durable JetStream consumer per group and partition.

Runs on the backend's event loop. Instead of nats-py's ``fetch`` (one future and timer per
message, ~90 µs each) a member subscribes one inbox with a callback and sends raw pull requests
(``$JS.API.CONSUMER.MSG.NEXT``), at most one outstanding per partition: a ``no_wait`` request
for a whole batch, and, when nothing is there, a long poll for one message followed by a
``no_wait`` top-up. After a full batch the next one is asked for at once (``prefetch``), so it
travels while the caller works; what arrives between two ``receive`` calls waits in a buffer.
Acks go out without a round trip (the caller does not wait for the loop thread); naks and
terms wait for the server's confirmation, so a requeued message comes before newer ones.

Leases. nats-server (2.9.10, checked) accepts an ack or a nak for a delivery that was already
redelivered to another member: the ack subject names the stream sequence and the server does not
compare the delivery count. So a member keeps its own lease per delivery and refuses
(``LeaseLostError``) an ack or nack once ``ack_wait`` less a margin (10%, at most 1 s) has passed.
The lease starts no later than the server's clock: at the no_wait pull request that asked for the
message (the server cannot send before it got the request), or, for a long poll, when the message
reached the connection. Buffered messages older than half the ack wait are given back (nak)
instead of being handed out.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from infeed.brokers._nats_link import (
    ERR_CONSUMER_NOT_FOUND,
    ERR_STREAM_NOT_FOUND,
    RETRIABLE,
    Link,
    decode_headers,
    durable_of,
    stream_of,
    subject_of,
)
from infeed.errors import (
    ConsumerClosedError,
    LeaseLostError,
    TopicNotFoundError,
)
from infeed.types import Delivery, trusted_delivery, trusted_position

#: Extra seconds a long poll may take beyond its expiry before its consumer is looked up.
_POLL_GRACE_S = 0.5
#: Least time a receive waits for the answer to a no_wait pull (even with timeout_s=0).
_NO_WAIT_S = 0.1


@dataclass(slots=True)
class _Slot:
    partition: int
    durable: str
    next_subject: str
    ack_wait_s: float = 0.0
    #: how long this member trusts a lease: the ack wait less a margin (half, at most 1 s)
    lease_s: float = 0.0
    rid: int = 0  # outstanding pull request (0: none)
    expect: int = 0
    asked: int = 0
    deadline: float = 0.0
    #: when the outstanding request was sent, for a no_wait request (0.0 for a long poll)
    sent_at: float = 0.0
    #: the last no_wait request got a full batch (worth asking again before the caller does)
    more: bool = False
    epoch: int = -1
    suspect: bool = False


def _set_ack_wait(slot: _Slot, ack_wait_s: float) -> None:
    slot.ack_wait_s = ack_wait_s
    # The margin covers the time from the lease check to the server reading the +ACK: the server
    # accepts an ack even after it redelivered the message, so a late one goes unnoticed.
    slot.lease_s = ack_wait_s - min(0.5 * ack_wait_s, 1.0)


def consumer_config(
    durable: str, subject: str, ack_wait_s: float, max_deliver: int, max_ack_pending: int, start: int | str
) -> dict[str, Any]:
    """A durable pull consumer's config; ``start`` is 'earliest', 'latest' or a stream sequence."""
    cfg: dict[str, Any] = {
        "durable_name": durable,
        "ack_policy": "explicit",
        "ack_wait": int(ack_wait_s * 1e9),
        "max_deliver": max_deliver,
        "max_ack_pending": max_ack_pending,
        "filter_subject": subject,
        "replay_policy": "instant",
    }
    if isinstance(start, int):
        cfg.update(deliver_policy="by_start_sequence", opt_start_seq=max(1, start))
    else:
        cfg["deliver_policy"] = "all" if start == "earliest" else "new"
    return cfg


class Puller:
    """The asynchronous half of one group member on one topic."""

    def __init__(
        self,
        link: Link,
        topic: str,
        group: str,
        partitions: list[int],
        dead_letter: Callable[[list[Delivery], str], Awaitable[None]],
    ) -> None:
        self.link = link
        self.topic = topic
        self.group = group
        self.stream = stream_of(topic)
        self._dead_letter = dead_letter
        self._slots = {
            p: _Slot(
                p, durable_of(group, p), f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{durable_of(group, p)}"
            )
            for p in partitions
        }
        #: delivered, not handed out yet: (message, lease start, its slot)
        self._buffer: collections.deque[tuple[Msg, float, _Slot]] = collections.deque()
        #: ack subject -> (monotonic time it arrived, partition)
        self._leases: dict[str, tuple[float, int]] = {}
        self._event = asyncio.Event()
        self._rids = itertools.count(1)
        self._inbox = ""
        self._sub: Subscription | None = None
        self._start = "earliest"
        #: a background ack send that failed, raised by the next call
        self.closed = False

    # -- setup -------------------------------------------------------------------------------

    async def open(self, start: str) -> None:
        self._start = start
        await asyncio.gather(*(self.ensure(slot, start) for slot in self._slots.values()))
        self._inbox = self.link.nc.new_inbox()
        self._sub = await self.link.nc.subscribe(
            self._inbox + ".>", cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        self.link.listeners.add(self._event.set)

    async def ensure(self, slot: _Slot, start: str) -> None:
        """Look up (or create) the slot's durable consumer; align its ack wait with ours."""
        cfg = self.link.cfg
        path = f"{self.stream}.{slot.durable}"
        try:
            info = await self.link.api(f"CONSUMER.INFO.{path}")
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == ERR_STREAM_NOT_FOUND:
                raise TopicNotFoundError(f"no topic {self.topic!r}") from exc
            want = consumer_config(
                slot.durable,
                subject_of(self.topic, slot.partition),
                cfg.ack_timeout_s,
                cfg.max_deliver,
                cfg.max_ack_pending,
                start,
            )
            try:
                info = await self.link.api(
                    f"CONSUMER.DURABLE.CREATE.{path}", {"stream_name": self.stream, "config": want}
                )
            except nats.js.errors.BadRequestError:
                # another member created it at the same moment, with its own start
                info = await self.link.api(f"CONSUMER.INFO.{path}")
        have = info["config"]
        if have.get("ack_wait") != int(cfg.ack_timeout_s * 1e9) or have.get("max_deliver") != cfg.max_deliver:
            # The last member to join sets the group's ack wait (members should agree).
            have = {**have, "ack_wait": int(cfg.ack_timeout_s * 1e9), "max_deliver": cfg.max_deliver}
            info = await self.link.api(
                f"CONSUMER.DURABLE.CREATE.{path}", {"stream_name": self.stream, "config": have}
            )
        _set_ack_wait(slot, info["config"]["ack_wait"] / 1e9)
        slot.suspect = False

    # -- receive -----------------------------------------------------------------------------

    async def receive(self, max_messages: int, timeout_s: float) -> list[Delivery]:
        self.check_open()
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            await self._ready()
            sent = await self._request(max_messages, long_s=0.0) if len(self._buffer) < max_messages else []
            # Let no_wait pulls in flight (just sent, or prefetched) land: a batch is not cut up.
            until = max(deadline, time.monotonic() + _NO_WAIT_S)
            await self._wait(functools.partial(self._landed, max_messages), until)
            if len(self._buffer) < max_messages and self._unanswered(sent):
                await self._ready()  # no answer at all: is the consumer (or topic) still there?
            out = await self._take(max_messages)
            if out:
                return await self._prefetch(out, max_messages)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out
            await self._request(1, long_s=remaining)
            await self._wait(lambda: bool(self._buffer) or not self.link.connected.is_set(), deadline)
            self._mark_suspects()
            if not self._buffer and time.monotonic() >= deadline and self.link.connected.is_set():
                return []

    async def _prefetch(self, out: list[Delivery], max_messages: int) -> list[Delivery]:
        """Ask now for the next batch of partitions that had more: it travels while the caller works."""
        if self.link.cfg.prefetch and len(self._buffer) < max_messages:
            await self._request(max_messages, long_s=0.0, only_more=True)
        return out

    async def _request(
        self, max_messages: int, *, long_s: float, only_more: bool = False
    ) -> list[tuple[_Slot, int]]:
        """Send a pull request on every idle slot (that had more); return the (slot, id) pairs sent."""
        now = time.monotonic()
        epoch = self.link.epoch
        idle = [
            s
            for s in self._slots.values()
            if (s.rid == 0 or s.epoch != epoch or now > s.deadline) and (s.more or not only_more)
        ]
        batch = max(1, math.ceil(max_messages / len(self._slots))) if long_s == 0 else 1
        sent: list[tuple[_Slot, int]] = []
        for slot in idle:
            slot.rid, slot.expect, slot.asked, slot.epoch = next(self._rids), batch, batch, epoch
            slot.sent_at = 0.0 if long_s else now
            if long_s:
                expires = max(0.001, long_s - 0.02)
                body = b'{"batch":%d,"expires":%d}' % (batch, int(expires * 1e9))
                slot.deadline = now + expires + _POLL_GRACE_S
            else:
                body = b'{"batch":%d,"no_wait":true}' % batch
                slot.deadline = now + self.link.cfg.request_timeout_s
            reply = f"{self._inbox}.{slot.partition}.{slot.rid}"
            try:
                await self.link.nc.publish(slot.next_subject, body, reply=reply)
            except RETRIABLE:
                slot.rid = 0  # the connection just dropped: receive waits for it and asks again
                break
            sent.append((slot, slot.rid))
        return sent

    def _unanswered(self, sent: list[tuple[_Slot, int]]) -> bool:
        """Mark slots whose no_wait pull got no answer in time as suspect; return whether any."""
        late = [
            slot
            for slot, rid in sent
            if slot.rid == rid and slot.expect == slot.asked and self.link.connected.is_set()
        ]
        for slot in late:
            slot.rid, slot.suspect = 0, True
        return bool(late)

    def _landed(self, max_messages: float) -> bool:
        if len(self._buffer) >= max_messages or not self.link.connected.is_set():
            return True
        return not any(s.rid and s.sent_at and s.epoch == self.link.epoch for s in self._slots.values())

    async def _wait(self, done: Callable[[], bool], until: float) -> None:
        while not done():
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._event.clear()
            if done():
                return
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except TimeoutError:
                return

    async def _ready(self) -> None:
        """Wait (bounded) for the connection, and re-check consumers that stopped answering."""
        self.check_open()
        if not self.link.connected.is_set():
            await self.link.retrying("receive", _nothing)
        for slot in [s for s in self._slots.values() if s.suspect]:
            await self.ensure(slot, self._start)

    def _mark_suspects(self) -> None:
        now = time.monotonic()
        for slot in self._slots.values():
            if slot.rid and now > slot.deadline and slot.epoch == self.link.epoch:
                slot.rid, slot.suspect = 0, True

    async def _on_msg(self, msg: Msg) -> None:
        reply = msg.reply
        if reply.startswith("$JS.ACK."):
            if self.closed:
                await self.link.nc.publish(reply, b"-NAK")
                return
            # The lease starts when the server sent the message: no earlier than the no_wait
            # request that asked for it (a loaded client may read it much later), and for a long
            # poll (which may wait at the server) on arrival.
            slot = self._slots[_partition(msg.subject)]  # only assigned partitions are pulled
            start = time.monotonic()
            if slot.rid:
                start = slot.sent_at or start
                slot.expect -= 1
                if slot.expect <= 0:  # a full batch: there may well be more
                    slot.rid, slot.more = 0, slot.sent_at > 0
            self._buffer.append((msg, start, slot))
        elif msg.headers and "Status" in msg.headers:
            _, p, rid = msg.subject.rsplit(".", 2)
            asker = self._slots.get(int(p))
            if asker is not None and asker.rid == int(rid):
                asker.rid, asker.more = 0, False
                if msg.headers["Status"] == "409" and "Deleted" in msg.headers.get("Description", ""):
                    asker.suspect = True
        self._event.set()

    async def _take(self, limit: int) -> list[Delivery]:
        now = time.monotonic()
        out: list[Delivery] = []
        stale: list[str] = []
        while self._buffer and len(out) < limit:
            msg, arrived, slot = self._buffer.popleft()
            age = now - arrived
            if age > slot.ack_wait_s / 2:
                # Too little lease left to hand out: give it back, unless the lease may be over
                # (then the server has sent it again, and a nak would reach the new delivery).
                if age <= slot.lease_s:
                    stale.append(msg.reply)
                continue
            out.append(self._delivery(msg, arrived, slot.partition))
        if stale:
            await self.link.send(stale, b"-NAK")
        return out

    def _delivery(self, msg: Msg, arrived: float, partition: int) -> Delivery:
        reply = msg.reply
        tokens = reply.split(".")
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>, or with
        # <domain>.<account hash> after ACK (12 tokens)
        base = 2 if len(tokens) == 9 else 4
        key, headers = decode_headers(msg.headers)
        self._leases[reply] = (arrived, partition)
        return trusted_delivery(
            msg.data,
            key,
            headers,
            trusted_position(self.topic, partition, int(tokens[base + 3])),
            int(tokens[base + 2]),
            int(tokens[base + 5]) / 1e9,
            reply,  # the receipt: the ack subject, a key of this member's leases
        )

    # -- settle ------------------------------------------------------------------------------

    def _settle(
        self, deliveries: list[Delivery]
    ) -> tuple[list[Delivery], dict[str, tuple[float, int]], list[Delivery]]:
        """Take the leases of ``deliveries``: (held, their leases, lost to another member)."""
        self.check_open()
        for d in deliveries:  # all checked before any lease goes
            if d.topic != self.topic:
                raise ValueError(f"delivery from topic {d.topic!r} given to a {self.topic!r} consumer")
        now = time.monotonic()
        held: list[Delivery] = []
        taken: dict[str, tuple[float, int]] = {}
        lost: list[Delivery] = []
        for d in deliveries:
            r = d.receipt
            lease = self._leases.pop(r, None) if isinstance(r, str) else None
            slot = self._slots.get(d.partition)
            if lease is None or slot is None or now - lease[0] > slot.lease_s:
                lost.append(d)
            else:
                held.append(d)
                taken[r] = lease
        return held, taken, lost

    async def ack(self, deliveries: list[Delivery]) -> None:
        """Check the leases, send the ``+ACK``s and wait until the server has read them.

        Waiting (one PING/PONG round trip per call, not per message) keeps the time between the
        lease check and the server reading the ack short and bounded: an ack sent in the
        background could reach the server after it redelivered the message, and the server
        would accept it silently (a delivery counted twice). If sending fails after the retry
        bound the leases stay, and the error is raised.
        """
        _, taken, lost = self._settle(deliveries)
        if taken:
            try:
                await self.link.send(list(taken), b"+ACK")
                await self.link.retrying("ack", self._flush)
            except BaseException:
                self._leases.update(taken)
                raise
        if lost:
            raise _lost(lost)

    async def _flush(self) -> None:
        await self.link.nc.flush(timeout=max(1, int(self.link.cfg.request_timeout_s)))

    async def settle(self, deliveries: list[Delivery], requeue: bool, reason: str = "") -> None:
        """Requeue (``-NAK``) or dead-letter (``+TERM`` once the copy is stored); wait for it.

        Deliveries whose lease is gone raise LeaseLostError after the others are settled. If
        settling fails (no connection within the retry bound), the leases stay for a retry.
        """
        held, taken, lost = self._settle(deliveries)
        if held:
            try:
                if not requeue:
                    await self._dead_letter(held, reason)
                await self.link.send(list(taken), b"-NAK" if requeue else b"+TERM", confirm=True)
            except BaseException:
                self._leases.update(taken)
                raise
        if lost:
            raise _lost(lost)

    # -- seek --------------------------------------------------------------------------------

    async def seek(self, partition: int, offset: int) -> None:
        """Recreate the group's consumer of ``partition`` at ``offset``: moves every member."""
        self.check_open()
        cfg = self.link.cfg
        durable = durable_of(self.group, partition)
        path = f"{self.stream}.{durable}"
        want = consumer_config(
            durable,
            subject_of(self.topic, partition),
            cfg.ack_timeout_s,
            cfg.max_deliver,
            cfg.max_ack_pending,
            offset,
        )
        for attempt in range(3):
            try:
                await self.link.api(f"CONSUMER.DELETE.{path}")
            except nats.js.errors.NotFoundError as exc:
                if exc.err_code != ERR_CONSUMER_NOT_FOUND:
                    raise
            try:
                await self.link.api(
                    f"CONSUMER.DURABLE.CREATE.{path}", {"stream_name": self.stream, "config": want}
                )
                break
            except nats.js.errors.BadRequestError:
                if attempt == 2:  # a member kept re-creating it with its own start
                    raise
        # Deliveries of the old consumer are gone: their acks would land on the new one.
        self._buffer = collections.deque(m for m in self._buffer if m[2].partition != partition)
        self._leases = {r: v for r, v in self._leases.items() if v[1] != partition}
        slot = self._slots.get(partition)
        if slot is not None:
            slot.rid = 0
            _set_ack_wait(slot, cfg.ack_timeout_s)

    # -- close -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Give back what this member holds (nak), then leave once pending pulls ran out."""
        if self.closed:
            return
        if self.link.connected.is_set():  # a prefetch on its way lands first, to be given back too
            await self._wait(functools.partial(self._landed, math.inf), time.monotonic() + _NO_WAIT_S * 10)
        self.closed = True
        self.link.listeners.discard(self._event.set)
        now = time.monotonic()
        held = [(m.reply, start, slot.partition) for m, start, slot in self._buffer]
        held += [(reply, start, p) for reply, (start, p) in self._leases.items()]
        back = [reply for reply, start, p in held if now - start <= self._slots[p].lease_s]
        self._leases.clear()
        self._buffer.clear()
        if back and self.link.connected.is_set():
            await self.link.send(back, b"-NAK", confirm=True)
        waits = [s.deadline - now for s in self._slots.values() if s.rid and s.epoch == self.link.epoch]
        if self._sub is not None:
            # A pull still open at the server may deliver later: keep listening (and nak) until it expires.
            self.link.spawn(_unsubscribe_later(self._sub, max(waits, default=0.0)))
            self._sub = None

    def check_open(self) -> None:
        """Raise if closed."""
        if self.closed:
            raise ConsumerClosedError(f"consumer of group {self.group!r} on {self.topic!r} is closed")


def _lost(lost: list[Delivery]) -> LeaseLostError:
    return LeaseLostError(
        f"{len(lost)} deliveries lost their lease (first: {lost[0].position}): not settled in time, "
        "settled before, or from another consumer; they were or will be delivered to another member",
        positions=[d.position for d in lost],
    )


def _partition(subject: str) -> int:
    return int(subject.rpartition(".")[2])


async def _nothing() -> None:
    return None


async def _unsubscribe_later(sub: Subscription, delay_s: float) -> None:
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    try:
        await sub.unsubscribe()
    except nats.errors.Error:
        pass  # the connection is closed or closing: the subscription is gone with it
