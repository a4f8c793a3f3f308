"""Pull consumers of the nats:// backend: one durable JetStream consumer per group and partition.

Runs on the backend's event loop. Instead of nats-py's ``fetch`` (one future and timer per
message, ~90 µs each) a member sends raw pull requests (``$JS.API.CONSUMER.MSG.NEXT``), at most
one outstanding per partition: a ``no_wait`` request for a whole batch, and, when nothing is
there, a short long poll for one message followed by a ``no_wait`` top-up. After a full batch
the next one is asked for at once (``prefetch``), so it travels while the caller works; what
arrives between two ``receive`` calls waits in a buffer. An ack call returns once the server has
processed its acks (the last one per partition goes as a request); naks and terms wait for the
server's confirmation of each, so a requeued message comes before newer ones.

Leases. nats-server (2.9.10, checked) accepts an ack or a nak for a delivery that was already
redelivered to another member: the ack subject names the stream sequence and the server does not
compare the delivery count. So a member keeps its own lease per delivery and refuses
(``LeaseLostError``) an ack or nack once ``ack_wait`` less a margin (half, at most 1 s) has
passed. The server starts its ack wait when it sends the message, which is after it read the pull
request that asked for it, so a lease starts when that request was sent: never later than the
server's clock, however late the member reads the message (a loaded or paused process). A long
poll therefore waits at most a quarter of the lease. A message carries no trace of the request
it answers, so each partition asks on an inbox of its own (a *lane*) holding one request at a
time; a request given up on (no answer in time, a reconnect, a seek) keeps its lane until it
ends, and the partition asks again on a new lane, so a late answer is still timed from the
request that caused it. A buffered message older than half the ack wait is not handed out: it
is given back (nak) while its lease holds, else left to the server's redelivery.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import math
import time
from collections.abc import Awaitable, Callable

import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from infeed.brokers._nats_lanes import Lane, Slot, consumer_config, set_ack_wait
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
#: Longest long poll, as a share of the lease: a message it brings keeps the rest of its lease.
_POLL_SHARE = 0.25


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
            p: Slot(
                p, durable_of(group, p), f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{durable_of(group, p)}"
            )
            for p in partitions
        }
        #: delivered, not handed out yet: (message, lease start, its slot)
        self._buffer: collections.deque[tuple[Msg, float, Slot]] = collections.deque()
        #: ack subject -> (monotonic time its lease started, partition)
        self._leases: dict[str, tuple[float, int]] = {}
        #: lanes given up on whose request may still answer
        self._strays: set[Lane] = set()
        self._event = asyncio.Event()
        self._rids = itertools.count(1)
        self._lane_ids = itertools.count(1)
        self._inbox = ""
        self._start = "earliest"
        self.closed = False

    # -- setup -------------------------------------------------------------------------------

    async def open(self, start: str) -> None:
        self._start = start
        await asyncio.gather(*(self.ensure(slot, start) for slot in self._slots.values()))
        self._inbox = self.link.nc.new_inbox()
        for slot in self._slots.values():
            await self._new_lane(slot)
        self.link.listeners.add(self._event.set)

    async def ensure(self, slot: Slot, start: str) -> None:
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
        set_ack_wait(slot, info["config"]["ack_wait"] / 1e9)
        slot.suspect = False

    # -- lanes -------------------------------------------------------------------------------

    async def _new_lane(self, slot: Slot) -> Lane:
        lane = Lane(slot, f"{self._inbox}.{slot.partition}.{next(self._lane_ids)}")
        lane.sub = await self.link.nc.subscribe(
            lane.inbox + ".*",
            cb=functools.partial(self._on_msg, lane),
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        slot.lane = lane
        return lane

    def _give_up(self, slot: Slot, *, keep: bool = True) -> None:
        """Stop waiting for the slot's request: it keeps its lane, the next request gets a new one."""
        lane = slot.lane
        if lane is None:
            return
        slot.lane = None
        lane.keep = lane.keep and keep
        if lane.rid:
            self._strays.add(lane)
        else:
            self._drop_lane(lane)

    def _end(self, lane: Lane, more: bool) -> None:
        """The lane's request got its last answer."""
        lane.rid = 0
        if lane is lane.slot.lane:
            lane.slot.more = more
        else:
            self._strays.discard(lane)
            self._drop_lane(lane)

    def _drop_lane(self, lane: Lane) -> None:
        if lane.sub is not None and not self.closed:
            self.link.spawn(_unsubscribe_later(lane.sub, 0.0))
            lane.sub = None

    def _retire_strays(self, now: float) -> None:
        """Forget given-up requests well past their deadline: what they bring after this is dropped."""
        for lane in [x for x in self._strays if now > x.deadline + self.link.cfg.request_timeout_s]:
            self._strays.discard(lane)
            self._drop_lane(lane)

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
            # A long poll is short (a share of the lease): when one ends empty, ask again.
            await self._wait(self._polled, deadline)
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
    ) -> list[tuple[Lane, int]]:
        """Send a pull request on every idle slot (that had more); return the (lane, id) pairs sent."""
        now = time.monotonic()
        epoch = self.link.epoch
        self._retire_strays(now)
        idle = []
        for s in self._slots.values():
            lane = s.lane
            if lane is not None and lane.rid and lane.epoch == epoch and now <= lane.deadline:
                continue  # its request is still running
            if only_more and not s.more:
                continue
            if lane is not None and lane.rid:
                self._give_up(s)  # a request of a lost connection, or past its deadline
            idle.append(s)
        batch = max(1, math.ceil(max_messages / len(self._slots))) if long_s == 0 else 1
        sent: list[tuple[Lane, int]] = []
        for slot in idle:
            lane = slot.lane or await self._new_lane(slot)
            rid = next(self._rids)
            if long_s:
                expires = max(0.01, min(long_s - 0.02, slot.lease_s * _POLL_SHARE))
                body = b'{"batch":%d,"expires":%d}' % (batch, int(expires * 1e9))
                deadline = now + expires + _POLL_GRACE_S
            else:
                body = b'{"batch":%d,"no_wait":true}' % batch
                deadline = now + self.link.cfg.request_timeout_s
            # The lease of what this request brings starts now: the server cannot send before it.
            lane.rid, lane.expect, lane.asked, lane.epoch = rid, batch, batch, epoch
            lane.sent_at, lane.deadline, lane.long = time.monotonic(), deadline, bool(long_s)
            try:
                await self.link.nc.publish(slot.next_subject, body, reply=f"{lane.inbox}.{rid}")
            except RETRIABLE:
                lane.rid = 0  # the connection just dropped: receive waits for it and asks again
                break
            sent.append((lane, rid))
        return sent

    def _unanswered(self, sent: list[tuple[Lane, int]]) -> bool:
        """Give up no_wait pulls that got no answer in time (their slots turn suspect); any?"""
        late = [
            lane
            for lane, rid in sent
            if lane.rid == rid
            and lane.expect == lane.asked
            and lane is lane.slot.lane
            and self.link.connected.is_set()
        ]
        for lane in late:
            self._give_up(lane.slot)
            lane.slot.suspect = True
        return bool(late)

    def _landed(self, max_messages: float) -> bool:
        if len(self._buffer) >= max_messages or not self.link.connected.is_set():
            return True
        epoch = self.link.epoch
        return not any(
            s.lane is not None and s.lane.rid and not s.lane.long and s.lane.epoch == epoch
            for s in self._slots.values()
        )

    def _polled(self) -> bool:
        """Something arrived, the connection dropped, or no long poll is running any more."""
        if self._buffer or not self.link.connected.is_set():
            return True
        epoch = self.link.epoch
        return not any(
            s.lane is not None and s.lane.rid and s.lane.long and s.lane.epoch == epoch
            for s in self._slots.values()
        )

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
            lane = slot.lane
            if lane is not None and lane.rid and now > lane.deadline and lane.epoch == self.link.epoch:
                self._give_up(slot)
                slot.suspect = True

    async def _on_msg(self, lane: Lane, msg: Msg) -> None:
        reply = msg.reply
        slot = lane.slot
        if reply.startswith("$JS.ACK."):
            if lane.rid:
                if self.closed:
                    if time.monotonic() - lane.sent_at <= slot.lease_s:
                        await self.link.nc.publish(reply, b"-NAK")
                elif lane.keep:
                    self._buffer.append((msg, lane.sent_at, slot))
                lane.expect -= 1
                if lane.expect <= 0:  # a full batch: there may well be more
                    self._end(lane, more=not lane.long)
            # Else nothing asked for it on this lane: it cannot be timed, so it is left to the
            # server's redelivery.
        elif msg.headers and "Status" in msg.headers:
            if lane.rid == int(msg.subject.rpartition(".")[2]):
                self._end(lane, more=False)
                if msg.headers["Status"] == "409" and "Deleted" in msg.headers.get("Description", ""):
                    slot.suspect = True
        self._event.set()

    async def _take(self, limit: int) -> list[Delivery]:
        now = time.monotonic()
        out: list[Delivery] = []
        stale: list[str] = []
        while self._buffer and len(out) < limit:
            msg, start, slot = self._buffer.popleft()
            age = now - start
            if age > slot.ack_wait_s / 2:
                # Too little lease left to hand out: give it back, unless the lease may be over
                # (then the server has sent it again, and a nak would reach the new delivery).
                if age <= slot.lease_s:
                    stale.append(msg.reply)
                continue
            out.append(self._delivery(msg, start, slot.partition))
        if stale:
            await self.link.send(stale, b"-NAK")
        return out

    def _delivery(self, msg: Msg, start: float, partition: int) -> Delivery:
        reply = msg.reply
        tokens = reply.split(".")
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>, or with
        # <domain>.<account hash> after ACK (12 tokens)
        base = 2 if len(tokens) == 9 else 4
        key, headers = decode_headers(msg.headers)
        self._leases[reply] = (start, partition)
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
        """Check the leases, send the ``+ACK``s and wait until the server has processed them.

        The last ack of each partition goes as a request, which the server answers once it
        processed the acks before it: an ack that returned is not lost with the process. The
        server takes a late ack silently, so the lease margin must cover the time from the check
        to the server reading the ack; a member stalled longer than that in between (paused, or
        starved of CPU) can still see its ack counted after another member got the message. If
        sending fails after the retry bound the leases stay, and the error is raised.
        """
        _, taken, lost = self._settle(deliveries)
        if taken:
            last = {p: r for r, (_, p) in taken.items()}  # per partition
            try:
                await self.link.send(list(taken), b"+ACK", confirm=set(last.values()))
            except BaseException:
                self._leases.update(taken)
                raise
        if lost:
            raise _lost(lost)

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
                subjects = list(taken)
                await self.link.send(subjects, b"-NAK" if requeue else b"+TERM", confirm=set(subjects))
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
        # Deliveries of the old consumer are gone: their acks would land on the new one. What it
        # still sends arrives on lanes given up here, which drop it.
        self._buffer = collections.deque(m for m in self._buffer if m[2].partition != partition)
        self._leases = {r: v for r, v in self._leases.items() if v[1] != partition}
        for lane in self._strays:
            if lane.slot.partition == partition:
                lane.keep = False
        slot = self._slots.get(partition)
        if slot is not None:
            self._give_up(slot, keep=False)
            set_ack_wait(slot, cfg.ack_timeout_s)

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
            await self.link.send(back, b"-NAK", confirm=set(back))
        lanes = [*self._strays, *(s.lane for s in self._slots.values() if s.lane is not None)]
        self._strays.clear()
        waits = [lane.deadline - now for lane in lanes if lane.rid and lane.epoch == self.link.epoch]
        for lane in lanes:
            if lane.sub is not None:
                # A pull still open at the server may deliver later: keep listening (and nak) until
                # it expires.
                self.link.spawn(_unsubscribe_later(lane.sub, max(waits, default=0.0)))
                lane.sub = None

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


async def _nothing() -> None:
    return None


async def _unsubscribe_later(sub: Subscription, delay_s: float) -> None:
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    try:
        await sub.unsubscribe()
    except nats.errors.Error:
        pass  # the connection is closed or closing: the subscription is gone with it
