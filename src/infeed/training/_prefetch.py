"""The prefetch thread: receive, decode, validate and cut chunks ahead of the training step.

One daemon thread owns the broker consumer (a consumer is used from one thread at a time): it
receives (acked on receipt, ``Consumer.receive_acked``, where the broker can seek: the checkpoint
is the truth there), lets ``StreamConsumer`` decode and dead-letter poison, and puts chunks into a
queue bounded in bytes, so the step never waits while data is available and memory stays flat.
Other work on the consumer (commit, ack after a checkpoint, lag) is handed to the thread with
:meth:`Prefetcher.call`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from infeed.brokers.base import Consumer, as_deliveries, dead_letter_copy
from infeed.codecs import RECORDS_HEADER
from infeed.codecs.msgpack import MsgpackCodec
from infeed.errors import LeaseLostError
from infeed.streams import Received, StreamConsumer
from infeed.training._chunks import (
    Chunk,
    build_chunks,
    decode_batches,
    decode_singles,
    merge_runs,
    offsets_array,
    single_chunk,
)
from infeed.training._singles import SingleDecoder
from infeed.types import Delivery, Position

__all__ = [
    "ByteQueue",
    "EpochEnd",
    "EpochPlan",
    "Failed",
    "Idle",
    "Item",
    "Prefetcher",
    "Sink",
    "StreamEnd",
    "TapConsumer",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EpochEnd:
    """Every record of the current epoch has been put before this marker."""


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The last epoch ended: nothing follows."""


@dataclass(frozen=True, slots=True)
class Idle:
    """Nothing arrived for ``idle_timeout_s``; the thread stopped (the stream may go on later)."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The thread failed; the dataset re-raises ``error`` in the training thread."""

    error: BaseException


Item = Chunk | EpochEnd | StreamEnd | Idle | Failed


@dataclass(slots=True)
class EpochPlan:
    """Where epochs start and end per partition (offsets), and how many are left (this one included)."""

    start: dict[int, int]
    end: dict[int, int]
    remaining: int


class Sink(Protocol):
    """Where the prefetch thread puts what it read: a :class:`ByteQueue`, or a feed process's pipe."""

    def put(self, item: Item, nbytes: int, *, wake: Callable[[], bool]) -> bool:
        """Pass ``item`` on, waiting while there is no room; give up (False) once ``wake()`` is true."""
        ...

    def notify(self) -> None:
        """Wake a waiting ``put`` so it re-checks its ``wake`` condition."""
        ...


class ByteQueue:
    """A FIFO bounded by the bytes it holds: one item is always let in, however large."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._items: deque[tuple[Item, int]] = deque()
        self._bytes = 0
        self._cond = threading.Condition()

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def put(self, item: Item, nbytes: int, *, wake: Callable[[], bool]) -> bool:
        """Add ``item``, waiting while the queue is full; give up (False) once ``wake()`` is true."""
        with self._cond:
            while self._items and self._bytes + nbytes > self.capacity_bytes:
                if wake():
                    return False
                self._cond.wait(0.05)
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cond.notify_all()
            return True

    def get(self, timeout_s: float) -> Item | None:
        """Take the oldest item, waiting up to ``timeout_s``; None if none came."""
        with self._cond:
            if not self._items and not self._cond.wait_for(lambda: bool(self._items), timeout_s):
                return None
            item, nbytes = self._items.popleft()
            self._bytes -= nbytes
            self._cond.notify_all()
            return item

    def notify(self) -> None:
        """Wake a waiting ``put`` so it re-checks its ``wake`` condition."""
        with self._cond:
            self._cond.notify_all()

    def clear(self) -> None:
        """Drop everything held."""
        with self._cond:
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()


class TapConsumer(Consumer):
    """Passes every call to ``inner``; ``receive`` can hand out deliveries received already.

    The prefetcher receives raw deliveries itself (it needs the offsets of messages that
    ``StreamConsumer`` dead-letters and hides, to know where an epoch ends; and one-record messages
    take a faster path), then lets ``StreamConsumer`` decode and dead-letter them through this tap.
    """

    def __init__(self, inner: Consumer) -> None:
        super().__init__(inner.broker, inner.topic, inner.group, inner.dead_letter_topic)
        self.inner = inner
        self._injected: list[Delivery] | None = None
        #: Receive with ``receive_acked``: deliveries come acked, and poison is dead-lettered as a
        #: copy (``nack`` of an acked delivery would find no lease).
        self.acked_on_receipt = False

    def inject(self, deliveries: list[Delivery]) -> None:
        """Make the next ``receive`` return ``deliveries`` (already received) without asking ``inner``."""
        self._injected = deliveries

    def receive(self, *, max_messages: int = 100, timeout_s: float = 1.0) -> list[Delivery]:
        """Return the injected deliveries, or receive from ``inner``."""
        if self._injected is not None:
            out, self._injected = self._injected, None
            return out
        if self.acked_on_receipt:
            return self.inner.receive_acked(max_messages=max_messages, timeout_s=timeout_s)
        return self.inner.receive(max_messages=max_messages, timeout_s=timeout_s)

    def ack(self, deliveries: Delivery | Iterable[Delivery]) -> None:
        """Ack through ``inner``."""
        self.inner.ack(deliveries)

    def nack(
        self, deliveries: Delivery | Iterable[Delivery], *, requeue: bool = True, reason: str = ""
    ) -> None:
        """Nack through ``inner``; once acked on receipt, dead-letter copies (requeue is refused)."""
        if not self.acked_on_receipt:
            self.inner.nack(deliveries, requeue=requeue, reason=reason)
            return
        if requeue:
            raise ValueError("deliveries acked on receipt cannot be requeued")
        dead = [dead_letter_copy(d, reason) for d in as_deliveries(deliveries)]
        self.inner.broker.publish_many(self.dead_letter_topic, dead)

    def commit(self, positions: Position | Iterable[Position]) -> None:
        """Commit through ``inner``."""
        self.inner.commit(positions)

    def seek(self, positions: Position | Iterable[Position]) -> None:
        """Seek through ``inner``."""
        self.inner.seek(positions)

    def committed(self) -> dict[int, Position]:
        """Committed positions of ``inner``."""
        return self.inner.committed()

    def close(self) -> None:
        """Close ``inner``."""
        self.inner.close()


@dataclass
class _Command:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


class Prefetcher:
    """The thread that reads ahead; see the module docstring.

    Args:
        stream: decodes and dead-letters; its consumer must be a :class:`TapConsumer`.
        fields: the schema's field names.
        resume: per partition, the position to resume at (records before it are dropped; brokers
            with seek only).
        ack_on_receipt: ack each message as it arrives (brokers with seek) instead of handing the
            deliveries on to be acked after a checkpoint.
        plan: epochs to replay (None: an endless stream).
        capacity_bytes: bound of the queue of decoded chunks.
        max_messages: most messages per receive call.
        target_records: records a receive call aims at (fewer, larger messages are fetched fewer
            at a time, so that the thread works in small bursts beside the training step).
        poll_s: receive timeout (the longest a command waits while nothing arrives).
        idle_timeout_s: stop with :class:`Idle` after this long without a message (None: never).
        sink: where items go (default: :attr:`queue`, which the training thread reads).
        merge: join the chunks of one receive call per partition (see ``_chunks.merge_runs``).
    """

    def __init__(
        self,
        stream: StreamConsumer,
        *,
        fields: Sequence[str],
        resume: Mapping[int, Position],
        ack_on_receipt: bool,
        plan: EpochPlan | None,
        capacity_bytes: int,
        max_messages: int,
        target_records: int,
        poll_s: float,
        idle_timeout_s: float | None,
        sink: Sink | None = None,
        merge: bool = False,
    ) -> None:
        if not isinstance(stream.consumer, TapConsumer):
            raise TypeError("the prefetcher's StreamConsumer must wrap a TapConsumer")
        self._stream = stream
        self._tap: TapConsumer = stream.consumer
        self._fields = tuple(fields)
        self._resume = dict(resume)
        self._last: dict[int, int] = {}  # partition -> last offset passed on
        self._ack_on_receipt = ack_on_receipt
        self._tap.acked_on_receipt = ack_on_receipt
        self._plan = plan
        self._max_messages = max_messages
        self._target_records = target_records
        self._per_receive = max_messages
        self._poll_s = poll_s
        self._idle_timeout_s = idle_timeout_s
        self.queue = ByteQueue(capacity_bytes)
        self._sink: Sink = self.queue if sink is None else sink
        self._merge = merge
        self._commands: deque[_Command] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done: dict[int, bool] = {}
        registry = stream.registry
        self._singles = (
            SingleDecoder(stream.schema)
            if stream.schema is not None
            and MsgpackCodec.name in registry
            and isinstance(registry.get(MsgpackCodec.name), MsgpackCodec)
            else None
        )
        #: Calls of :meth:`ack_later` that found a lease lost.
        self.lost_acks = 0

    # -- the training thread's side -------------------------------------------------------------

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._run, name="infeed-prefetch", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the thread that owns the consumer (directly when that thread has ended)."""
        if not self.is_alive():
            return fn()
        command = _Command(fn)
        self._commands.append(command)
        self._sink.notify()
        while True:
            try:
                result: T = command.future.result(timeout=0.1)
            except TimeoutError:
                if not self.is_alive():
                    self._run_commands()  # the thread ended before it ran the command
                continue
            return result

    def ack_later(self, deliveries: list[Delivery]) -> None:
        """Ack ``deliveries`` on the thread; do not wait.

        For brokers without seek, which have no exact resume: messages are acked once all their
        records have been handed out. A lease lost meanwhile means the message comes again and is
        handed out again (at least once).
        """

        def work() -> None:
            if deliveries:
                try:
                    self._tap.ack(deliveries)
                except LeaseLostError:
                    self.lost_acks += 1

        self._commands.append(_Command(work))
        self._sink.notify()
        if not self.is_alive():  # the thread ended, or ends before it looks again
            self._run_commands()

    def stop(self) -> None:
        """Stop the thread and wait for it (pending commands run first)."""
        self._stop.set()
        self._sink.notify()
        if self._thread is not None:
            self._thread.join()
        self._run_commands()

    # -- the thread -----------------------------------------------------------------------------

    def _run_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            try:
                command.future.set_result(command.fn())
            except BaseException as exc:
                command.future.set_exception(exc)

    def _wake(self) -> bool:
        self._run_commands()
        return self._stop.is_set()

    def _put(self, item: Item, nbytes: int = 0) -> bool:
        return self._sink.put(item, nbytes, wake=self._wake)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            self._put(Failed(exc))
        finally:
            self._run_commands()

    def _reset_epoch(self) -> None:
        plan = self._plan
        if plan is None:
            return
        resume = {p: pos.offset for p, pos in self._resume.items()}
        self._done = {p: resume.get(p, start) >= plan.end[p] for p, start in plan.start.items()}

    def _loop(self) -> None:
        self._reset_epoch()
        idle_since = time.monotonic()
        while not self._stop.is_set():
            self._run_commands()
            plan = self._plan
            if plan is not None and all(self._done.values()):
                if not self._put(EpochEnd()):
                    return
                plan.remaining -= 1
                if plan.remaining <= 0:
                    self._put(StreamEnd())
                    return
                topic = self._tap.topic
                self._resume = {p: Position(topic, p, off) for p, off in plan.start.items()}
                self._last.clear()
                self._tap.seek(list(self._resume.values()))
                self._reset_epoch()
                continue
            raw = self._tap.receive(max_messages=self._per_receive, timeout_s=self._poll_s)
            if not raw:
                if self._idle_timeout_s is not None and time.monotonic() - idle_since >= self._idle_timeout_s:
                    self._put(Idle())
                    return
                continue
            idle_since = time.monotonic()
            self._mark_epoch_end(raw)
            chunks = self._single_chunks(raw)
            if chunks is None:
                self._size_receives(raw)
                chunks = self._chunks(raw)
            else:
                self._per_receive = max(1, min(self._max_messages, self._target_records))
            if self._merge and len(chunks) > 1:
                chunks = merge_runs(chunks)
            for chunk in chunks:
                if not self._put(chunk, chunk.nbytes):
                    return

    def _size_receives(self, raw: list[Delivery]) -> None:
        records = 0
        for d in raw:
            count = d.headers.get(RECORDS_HEADER, "1")
            records += int(count) if count.isdigit() else 1
        per_message = max(1.0, records / len(raw))
        self._per_receive = max(1, min(self._max_messages, math.ceil(self._target_records / per_message)))

    def _mark_epoch_end(self, raw: list[Delivery]) -> None:
        plan = self._plan
        if plan is not None:
            for d in raw:
                if d.position.offset + 1 >= plan.end.get(d.position.partition, 0):
                    self._done[d.position.partition] = True

    def _admit(self, delivery: Delivery, covered: list[Delivery]) -> int | None:
        """Return how many leading records of ``delivery`` to skip, or None to drop it."""
        if not self._ack_on_receipt:
            # Offsets order a partition only on brokers that can seek (logs; they ack on
            # receipt). A queue's name its deliveries (RabbitMQ: publish stamps) and come in the
            # queue's order (priorities, several producers' clocks), so comparing them would drop
            # fresh messages: every delivery is handed out (at least once), a copy redelivered
            # after a lost lease included.
            return 0
        pos = delivery.position
        p = pos.partition
        resume = self._resume.get(p)
        if resume is not None and pos.offset < resume.offset:
            covered.append(delivery)  # before the checkpoint: trained already
            return None
        if pos.offset <= self._last.get(p, -1):
            return None  # read in this run already (acked on receipt: nothing to settle)
        if self._plan is not None and pos.offset >= self._plan.end.get(p, 0):
            return None  # past the epoch's end: read again in the next epoch
        self._last[p] = pos.offset
        return resume.record if resume is not None and pos.offset == resume.offset else 0

    def _admit_all(self, partition: int, offsets: np.ndarray[Any, Any]) -> bool:
        """Whether :meth:`_admit` would keep every one of these one-record messages, whole.

        True for the usual run of fresh messages in order (and then it records them as read); False
        sends the caller through :meth:`_admit` one message at a time.
        """
        if not self._ack_on_receipt:
            return True  # a queue: see _admit
        first, last = int(offsets[0]), int(offsets[-1])
        if len(offsets) > 1 and not bool((offsets[1:] > offsets[:-1]).all()):
            return False
        if first <= self._last.get(partition, -1):
            return False
        resume = self._resume.get(partition)
        if resume is not None and (first < resume.offset or (first == resume.offset and resume.record)):
            return False
        if self._plan is not None and last >= self._plan.end.get(partition, 0):
            return False
        self._last[partition] = last
        return True

    def _settle(self, covered: list[Delivery]) -> None:
        """Ack what a checkpoint covers already (acked on receipt: done)."""
        if covered and not self._ack_on_receipt:
            self._tap.ack(covered)

    def _single_chunks(self, raw: list[Delivery]) -> list[Chunk] | None:
        """Chunks of one-record messages that all decode and validate, one per partition.

        None sends the call down the general path (which dead-letters poison).
        """
        stream = self._stream
        assert stream.schema is not None
        decoded = self._singles.decode(raw) if self._singles is not None else None
        if decoded is None:
            decoded = decode_singles(raw, stream.registry, stream.schema)
        if decoded is None:
            return None
        covered: list[Delivery] = []
        out: list[Chunk] = []
        for deliveries, batch in decoded:
            offsets = offsets_array([d.position.offset for d in deliveries])
            if self._admit_all(deliveries[0].position.partition, offsets):
                keep: Sequence[int] = range(len(deliveries))
            else:
                keep = [i for i, d in enumerate(deliveries) if self._admit(d, covered) == 0]
                offsets = offsets[list(keep)]
            chunk = single_chunk(
                deliveries, batch, keep, offsets=offsets, keep_deliveries=not self._ack_on_receipt
            )
            out.append(chunk)
        self._settle(covered)
        return [c for c in out if len(c)]

    def _chunks(self, raw: list[Delivery]) -> list[Chunk]:
        """Chunks of any messages; poison goes through ``StreamConsumer``, which dead-letters it."""
        stream = self._stream
        assert stream.schema is not None
        received = decode_batches(raw, stream.registry, stream.schema)
        if received is None:  # some poison: let StreamConsumer sort it out and dead-letter it
            self._tap.inject(raw)
            received = stream.receive(max_messages=len(raw), timeout_s=0.0)
        covered: list[Delivery] = []
        by_partition: dict[int, list[tuple[Received, int]]] = {}
        for item in received:
            skip = self._admit(item.delivery, covered)
            if skip is not None:
                by_partition.setdefault(item.delivery.position.partition, []).append((item, skip))
        self._settle(covered)
        out: list[Chunk] = []
        for items in by_partition.values():
            out += build_chunks(items, self._fields, keep_deliveries=not self._ack_on_receipt)
        return out
