"""``QueueDataset``: a torch ``IterableDataset`` of collated batches from a topic, resumable exactly.

Batches hold exactly ``batch_size`` records (the last one of a finished stream may hold fewer),
cut from the record stream whatever the packing of records into messages and whenever they
arrived. A prefetch thread (``_prefetch``) receives and decodes ahead into a queue bounded in
bytes; where the broker allows, it runs in a feed process of its own (``_feed``), on another core
than the training step, handing over records through shared memory.

``state_dict()`` holds, per partition, the position of the next record to read (message offset +
record index), the records held back (a partial batch, or the shuffle buffer), the shuffle
generator and the epoch bounds; a dataset loaded from it yields the same batches as one
that never stopped (single partition; several partitions interleave in arrival order).

Acks: on brokers that can seek (logs), each message is acked on receipt and the checkpoint plus a
seek on restore is the truth. Brokers without seek (queues) have no exact resume (``state_dict``
refuses, naming ``SEEK``); a message is acked once all its records have been handed out, and
every delivery is handed out, in the queue's order (at least once: a message whose lease ran out
before that ack comes again and is handed out again).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from infeed.brokers import Broker, connect
from infeed.codecs import CodecRegistry, Schema
from infeed.streams import StreamConsumer
from infeed.training._chunks import Chunk
from infeed.training._collate import Columns, to_tensors
from infeed.training._feed import ProcessFeed
from infeed.training._lend import Lender
from infeed.training._prefetch import EpochEnd, EpochPlan, Failed, Idle, Prefetcher, StreamEnd
from infeed.training._reader import (
    ReaderSpec,
    ack_here,
    choose_feed,
    close_reader,
    commit_here,
    open_reader,
    start_reader,
)
from infeed.training._shuffle import ShuffleBuffer
from infeed.training.state import STATE_FORMAT, check_meta, decode_positions, encode_positions
from infeed.types import Capability, Delivery, Position

__all__ = [
    "DEFAULT_FEED",
    "DEFAULT_MAX_MESSAGES",
    "DEFAULT_POLL_S",
    "DEFAULT_PREFETCH_BYTES",
    "QueueDataset",
]

#: Decoded bytes the prefetch thread may hold ahead of the training step.
DEFAULT_PREFETCH_BYTES = 64 * 1024 * 1024
#: Messages per receive call of the prefetch thread.
DEFAULT_MAX_MESSAGES = 256
#: Receive timeout of the prefetch thread: the longest a commit waits while nothing arrives.
DEFAULT_POLL_S = 0.05
#: Where the prefetch thread runs: "process" where the broker allows (see ``QueueDataset``), else
#: "thread".
DEFAULT_FEED = "auto"
_FEEDS = ("auto", "process", "thread")

_Array = np.ndarray[Any, Any]


class QueueDataset(IterableDataset[dict[str, torch.Tensor]]):
    """Collated tensor batches (field name -> tensor) from one topic, with exact resume.

    Use it as a context manager (or call :meth:`close`), and iterate it in the training process:
    it runs its own prefetch thread, so wrap it as ``DataLoader(ds, batch_size=None)`` if at all.

    The prefetch thread runs in a feed process (a child of this one, which exits with it) when the
    broker was opened from a URL, can seek, may be shared by several processes, and the default
    codecs are used; otherwise in this process.

    Args:
        broker: a broker URL, or a broker object (not closed by the dataset).
        topic: the topic to read.
        group: the consumer group.
        schema: every record is validated and cast to it; failing records are dead-lettered.
        batch_size: records per batch.
        epochs: passes over the topic as it stands when the first one starts (needs a broker with
            ``REPLAY`` and ``SEEK``); ``None`` reads an endless stream.
        shuffle_buffer: records held back to shuffle among (0: stream order).
        seed: seed of the shuffle generator.
        drop_last: never yield a batch of fewer than ``batch_size`` records.
        partitions: read only these partitions (default all).
        prefetch_bytes: payload bytes the prefetch thread may hold ahead.
        max_messages: messages per receive call.
        poll_s: receive timeout of the prefetch thread.
        idle_timeout_s: end an iteration after this long without a message (None: wait forever).
        dead_letter_topic: where poison goes (default ``TOPIC.dlq``).
        codecs: codecs the messages may use (default msgpack + json).
        feed: where the prefetch thread runs: "process", "thread", or "auto" (a process where the
            broker allows it).

    Raises:
        ValueError: a bad size or count, a str field in the schema, ``epochs`` on a broker that
            cannot replay, or ``feed="process"`` where the broker does not allow it.
    """

    def __init__(
        self,
        broker: str | Broker,
        topic: str,
        *,
        group: str,
        schema: Schema,
        batch_size: int,
        epochs: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        partitions: Sequence[int] | None = None,
        prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        poll_s: float = DEFAULT_POLL_S,
        idle_timeout_s: float | None = None,
        dead_letter_topic: str | None = None,
        codecs: CodecRegistry | None = None,
        feed: str = DEFAULT_FEED,
    ) -> None:
        if feed not in _FEEDS:
            raise ValueError(f"feed must be one of {', '.join(_FEEDS)}; got {feed!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if epochs is not None and epochs <= 0:
            raise ValueError(f"epochs must be > 0 or None, got {epochs}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if max_messages <= 0 or not poll_s > 0:
            raise ValueError(f"max_messages and poll_s must be > 0, got {max_messages} and {poll_s}")
        if idle_timeout_s is not None and not idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be > 0 or None, got {idle_timeout_s}")
        self._owns_broker = isinstance(broker, str)
        self.broker: Broker = connect(broker) if isinstance(broker, str) else broker
        try:
            #: Where the prefetch thread runs: "process" or "thread".
            self.feed = choose_feed(self.broker, feed, codecs)
            if epochs is not None and not (
                self.broker.supports(Capability.REPLAY) and self.broker.supports(Capability.SEEK)
            ):
                raise ValueError(
                    f"epochs={epochs} needs a broker that can replay and seek; "
                    f"{type(self.broker).__name__} cannot: use epochs=None (an endless stream)"
                )
        except ValueError:
            if self._owns_broker:
                self.broker.close()
            raise
        self.topic = topic
        self.group = group
        self.schema = schema
        self.batch_size = batch_size
        self.epochs = epochs
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.drop_last = drop_last
        self.partitions = None if partitions is None else list(partitions)
        self.prefetch_bytes = prefetch_bytes
        self.max_messages = max_messages
        self.poll_s = poll_s
        self.idle_timeout_s = idle_timeout_s
        self.dead_letter_topic = dead_letter_topic
        self.codecs = codecs
        #: Acks on receipt (the broker can seek) rather than after a checkpoint.
        self.ack_on_receipt = self.broker.supports(Capability.SEEK)
        self._rng = np.random.default_rng(seed)
        self._held = self._new_held()
        self._shuffle = (
            ShuffleBuffer(schema, shuffle_buffer, batch_size, self._rng) if shuffle_buffer else None
        )
        if self._shuffle is not None:
            self._held = self._shuffle.columns
        self._next: dict[int, Position] = {}
        self._plan: EpochPlan | None = None
        self._epoch = 0
        self._finished = False
        #: Records read from the stream into this dataset (held back ones included).
        self.records = 0
        #: Batches yielded.
        self.batches = 0
        self._dead_lettered_before = 0
        #: Acks after a checkpoint that came too late (the messages come again).
        self.lost_acks = 0
        self._stream: StreamConsumer | None = None
        self._remote: ProcessFeed | None = None
        self._lender: Lender | None = None  # with a feed process: batches lent from its ring
        self._lent: dict[str, _Array] = {}  # columns of the batch being filled that are ring views
        self._prefetch: Prefetcher | ProcessFeed | None = None
        self._pending: deque[Chunk] = deque()
        self._cursor = 0
        self._dcursor = 0
        self._consumed: list[Delivery] = []
        self._closed = False
        self._idled = False

    # -- lifecycle ------------------------------------------------------------------------------

    def _new_held(self) -> Columns:
        return Columns(self.schema, self.batch_size)

    def open(self) -> None:
        """Join the group, seek to the resume positions and start the prefetch thread (idempotent).

        Without a loaded state, reading resumes at the group's committed positions, else at the
        start of each partition.
        """
        if self._closed:
            raise ValueError("this QueueDataset is closed")
        spec = ReaderSpec(
            feed=self.feed,
            topic=self.topic,
            group=self.group,
            schema=self.schema,
            partitions=self.partitions,
            dead_letter_topic=self.dead_letter_topic,
            codecs=self.codecs,
            capacity_bytes=self.prefetch_bytes,
            max_messages=self.max_messages,
            target_records=4 * self.batch_size,
            poll_s=self.poll_s,
            idle_timeout_s=self.idle_timeout_s,
            epochs=self.epochs,
            ack_on_receipt=self.ack_on_receipt,
        )
        reader = self._remote if self._remote is not None else self._stream
        if reader is None:
            reader, self._next, self._plan = open_reader(
                self.broker, spec, resume=self._next, plan=self._plan, epoch=self._epoch
            )
            if isinstance(reader, ProcessFeed):
                self._remote = reader
                self._lender = Lender(reader.release, reader.capacity_bytes)
            else:
                self._stream = reader
        if self._finished or self._prefetch is not None:
            return  # a prefetcher that ended still holds what it read (up to the end of the last epoch)
        self._idled = False
        if self._plan is not None:
            self._plan.remaining = (self.epochs or 0) - self._epoch
        self._prefetch = start_reader(reader, spec, resume=self._next, plan=self._plan)

    def close(self) -> None:
        """Stop the prefetch thread and leave the group (idempotent)."""
        if self._closed:
            return
        self._closed = True
        close_reader(self._remote if self._remote is not None else self._stream, self._prefetch)
        if self._owns_broker:
            self.broker.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches until the last epoch ends, the stream idles out, or forever."""
        if get_worker_info() is not None:
            raise RuntimeError(
                "QueueDataset runs its own prefetch thread and must be iterated in the training "
                "process: use DataLoader(dataset, batch_size=None, num_workers=0) or iterate it directly"
            )
        return self.iter_lent(())

    def iter_lent(self, fields: Collection[str]) -> Iterator[dict[str, torch.Tensor]]:
        """Iterate as ``iter(dataset)`` does, but hand out ``fields`` without copying where possible.

        With a feed process, a batch that lies whole in what one receive brought gets those
        fields as views of the feed's shared ring instead of copies: a ``memcpy`` per batch less,
        and the step reads its inputs from where the feed process wrote them. The data stays put
        while anything references it (its ring space returns once the tensors are freed), so a
        batch is safe to use for as long as it is kept. But kept batches keep the feed from
        reading ahead: lending pauses while they hold a quarter of ``prefetch_bytes``, and
        iterating raises ``RuntimeError`` when waiting for data while they hold half of it.
        Clone what you keep past a step. The ``Trainer`` lends its input field.

        Raises:
            ValueError: a field is not in the schema.
            RuntimeError: kept batches hold more than half the feed's ring while it waits.
        """
        lend = frozenset(fields)
        unknown = sorted(lend - set(self.schema.fields))
        if unknown:
            raise ValueError(f"fields {unknown} are not in the schema ({', '.join(self.schema.fields)})")
        if get_worker_info() is not None:
            raise RuntimeError(
                "QueueDataset runs its own prefetch thread and must be iterated in the training "
                "process: use DataLoader(dataset, batch_size=None, num_workers=0) or iterate it directly"
            )
        return self._iterate(lend)

    def _iterate(self, lend: frozenset[str]) -> Iterator[dict[str, torch.Tensor]]:
        self.open()
        while True:
            batch = self._next_batch(lend=lend)
            if batch is None:
                return
            self.batches += 1
            yield to_tensors(batch)

    def poll(self, timeout_s: float) -> dict[str, torch.Tensor] | None:
        """Return the next batch if it is complete within ``timeout_s``, else None.

        Records read while waiting stay held (they are in :meth:`state_dict`) and go into a later
        batch. After None, :attr:`ended` tells whether the stream ended or idled out (the last,
        partial batch has then been returned already) or the batch is only not complete yet.
        """
        if get_worker_info() is not None:
            raise RuntimeError("QueueDataset must be polled in the training process")
        if self._prefetch is None:
            self.open()  # not while a finished prefetch thread's queue still holds records
        batch = self._next_batch(time.monotonic() + timeout_s)
        if batch is None:
            return None
        self.batches += 1
        return to_tensors(batch)

    @property
    def ended(self) -> bool:
        """Whether the last epoch ended or the stream idled out (iterating again goes on)."""
        return self._finished or self._idled

    def _next_batch(
        self, deadline: float | None = None, lend: frozenset[str] = frozenset()
    ) -> dict[str, _Array] | None:
        if not self._fill(deadline, lend if self._shuffle is None else frozenset()):
            return None
        held = self._held.count
        if held == 0 or (self._held.space > 0 and self.drop_last and held < self.batch_size):
            return None
        if not self.ack_on_receipt and self._consumed:
            # No exact resume without seek: ack what was handed out (at least once).
            consumed, self._consumed = self._consumed, []
            prefetch = self._prefetch if isinstance(self._prefetch, Prefetcher) else None
            ack_here(self._stream, prefetch, consumed)
        if self._shuffle is not None:
            return self._shuffle.draw(self.batch_size)
        batch = self._held.view()
        if self._lent:
            batch.update(self._lent)
            self._lent = {}
        if held > self.batch_size:
            # Held records merged from several ranks' states (a smaller world): cut them.
            rest = self._held
            batch = {name: array[: self.batch_size].copy() for name, array in batch.items()}
            self._held = Columns(self.schema, max(self.batch_size, held - self.batch_size))
            self._held.append(rest.view(), self.batch_size, held)
            return batch
        self._held = self._new_held()
        return batch

    def _fill(self, deadline: float | None = None, lend: frozenset[str] = frozenset()) -> bool:
        """Move records from the stream into the held columns until full or the stream stops.

        A whole batch from one ring chunk has the fields in ``lend`` lent (see :meth:`iter_lent`).
        Returns False when ``deadline`` (a ``time.monotonic()`` value) passed first.
        """
        target = self._held
        prefetch = self._prefetch
        while target.space > 0:
            if not self._pending:
                if prefetch is None or self._finished:
                    return True
                wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
                item = prefetch.queue.get(timeout_s=wait)
                if item is None:
                    if self._lender is not None:
                        self._lender.check_held_back()
                    if not prefetch.is_alive() and prefetch.queue.nbytes == 0:
                        return True  # stopped by close()
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                    continue
                if isinstance(item, Chunk):
                    self._pending.append(item)
                elif isinstance(item, EpochEnd):
                    self._epoch += 1
                    if self._plan is not None and self._epoch < (self.epochs or 0):
                        self._next = {p: Position(self.topic, p, s) for p, s in self._plan.start.items()}
                    continue
                elif isinstance(item, StreamEnd):
                    self._finished = True
                    return True
                elif isinstance(item, Idle):
                    self._prefetch = None
                    self._idled = True
                    return True
                elif isinstance(item, Failed):
                    self._prefetch = None
                    raise item.error
                continue
            chunk = self._pending[0]
            a = self._cursor
            b = min(len(chunk), a + target.space)
            if b > a:
                if (
                    lend
                    and self._lender is not None
                    and target.count == 0
                    and b - a == target.capacity == self.batch_size
                    and self._lender.may_lend(chunk.ring_end)
                ):
                    self._lent = {name: chunk.columns[name][a:b] for name in lend}
                    self._lender.lend(chunk.ring_end, self._lent.values())
                target.append(chunk.columns, a, b, skip=self._lent.keys())
                self._next[chunk.partition] = Position(
                    self.topic, chunk.partition, int(chunk.next_offset[b - 1]), int(chunk.next_record[b - 1])
                )
                self.records += b - a
            ends = chunk.delivery_ends
            while self._dcursor < len(ends) and ends[self._dcursor] <= b:
                self._consumed.append(chunk.deliveries[self._dcursor])
                self._dcursor += 1
            if b >= len(chunk):
                self._pending.popleft()
                self._cursor = self._dcursor = 0
                if chunk.ring_end is not None and self._lender is not None:
                    self._lender.read(chunk.ring_end)
            else:
                self._cursor = b
        return True

    # -- state ----------------------------------------------------------------------------------

    @property
    def positions(self) -> dict[int, Position]:
        """Per partition, the position of the next record to read.

        Everything before it went into the yielded batches or the held-back records.
        """
        return dict(self._next)

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self._epoch

    @property
    def finished(self) -> bool:
        """Whether the last epoch has ended."""
        return self._finished

    def feed_cpu_s(self) -> float:
        """CPU seconds the feed process has used so far (0.0 when the prefetch thread runs here)."""
        return self._remote.cpu_s() if self._remote is not None else 0.0

    @property
    def dead_lettered(self) -> int:
        """Messages and records sent to the dead-letter topic (counted as they are read ahead)."""
        now = self._stream.dead_lettered if self._stream is not None else 0
        if self._remote is not None:
            now += self._remote.dead_lettered
        return self._dead_lettered_before + now

    def state_dict(self) -> dict[str, Any]:
        """Return ``{"meta": JSON-safe dict, "arrays": {field: records held back}}`` (a snapshot).

        Save it with :func:`infeed.training.state.encode_state` (JSON + safetensors, no pickle).

        Raises:
            ValueError: the broker cannot seek (no exact resume point there).
        """
        self.require_seek()
        plan = self._plan
        meta: dict[str, Any] = {
            "format": STATE_FORMAT,
            "topic": self.topic,
            "group": self.group,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "seed": self.seed,
            "fields": self.schema.to_dict(),
            "positions": encode_positions(self._next),
            "epoch": self._epoch,
            "epochs": self.epochs,
            "epoch_start": None if plan is None else sorted(plan.start.items()),
            "epoch_end": None if plan is None else sorted(plan.end.items()),
            "finished": self._finished,
            "records": self.records,
            "batches": self.batches,
            "dead_lettered": self.dead_lettered,
            "rng": self._rng.bit_generator.state,
        }
        arrays = {name: array.copy() for name, array in self._held.view().items()}
        return {"meta": meta, "arrays": arrays}

    def require_seek(self) -> None:
        """Refuse exact resume (checkpoints, ``state_dict``) on a broker without ``SEEK``.

        Without seek a resume point is only a message's stamp, which need not grow with the
        queue's order (several producers, clocks), so "before the checkpoint" cannot be told from
        "not read yet": records could be lost or trained twice.

        Raises:
            ValueError: the broker lacks ``SEEK``, naming it and what to use instead.
        """
        if not self.broker.supports(Capability.SEEK):
            raise ValueError(
                "exact resume (state_dict, checkpoints) needs a broker with the SEEK capability; "
                f"{type(self.broker).__name__} lacks it here (RabbitMQ's queue model: use "
                "queue_type=stream, which can seek and commit offsets)"
            )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from a :meth:`state_dict` (before iterating).

        Raises:
            ValueError: the state is of another topic, schema or shuffle size, iteration began, or
                the broker cannot seek.
        """
        self.require_seek()
        if self._stream is not None or self._remote is not None:
            raise ValueError("load_state_dict() must come before the dataset is iterated or opened")
        meta, arrays = state["meta"], state["arrays"]
        check_meta(meta, topic=self.topic, fields=self.schema.to_dict(), shuffle_buffer=self.shuffle_buffer)
        self._next = decode_positions(meta["positions"])
        self._epoch = int(meta["epoch"])
        if self.epochs is not None and meta["epoch_start"] is not None:
            self._plan = EpochPlan(
                start={int(p): int(o) for p, o in meta["epoch_start"]},
                end={int(p): int(o) for p, o in meta["epoch_end"]},
                remaining=self.epochs - self._epoch,
            )
        self._finished = self.epochs is not None and self._epoch >= self.epochs
        if meta["finished"] and self._plan is not None and not self._finished:
            # More epochs than the run that saved this state: the next one starts from the start.
            self._next = {p: Position(self.topic, p, s) for p, s in self._plan.start.items()}
        self.records = int(meta["records"])
        self.batches = int(meta["batches"])
        self._dead_lettered_before = int(meta["dead_lettered"])
        self._rng.bit_generator.state = meta["rng"]
        rows = max((len(array) for array in arrays.values()), default=0)
        if rows > self._held.capacity:
            # A state merged from several ranks (a smaller world) can hold more than one batch.
            self._held = Columns(self.schema, rows)
            if self._shuffle is not None:
                self._shuffle.columns = self._held
        self._held.load(arrays)

    # -- broker side ----------------------------------------------------------------------------

    def commit(self, state: Mapping[str, Any]) -> None:
        """Tell the broker that everything before ``state``'s positions is done.

        Call it only once ``state`` is durable (in a checkpoint). It commits the positions (where
        the broker has offset commits) and, on brokers without seek, acks every message whose
        records the state covers.
        """
        positions = decode_positions(state["meta"]["positions"])
        if self._remote is not None:
            self._remote.commit(positions)
            return
        stream = self._stream
        if stream is None:
            return
        prefetch = self._prefetch if isinstance(self._prefetch, Prefetcher) else None
        offset_commit = self.broker.supports(Capability.OFFSET_COMMIT)
        if commit_here(
            stream,
            prefetch,
            positions,
            self._consumed,
            topic=self.topic,
            offset_commit=offset_commit,
            ack_on_receipt=self.ack_on_receipt,
        ):
            self.lost_acks += 1

    def lag(self) -> int:
        """Messages in the assigned partitions after the next position to read."""
        info = self.broker.describe_topic(self.topic)
        total = 0
        for part in info.partitions:
            if self.partitions is not None and part.partition not in self.partitions:
                continue
            pos = self._next.get(part.partition)
            total += max(0, part.high - (pos.offset if pos is not None else part.low))
        return total
