"""Where a dataset's reader runs, and how it is opened, started, committed and closed.

The reader is the dataset's consumer plus the prefetch thread that reads ahead of the training
step. :func:`choose_feed` puts it in a feed process (``_feed``) where the broker allows, else in
this process: a ``StreamConsumer`` here, read ahead by a ``Prefetcher`` thread. Either way it is
opened in two steps: :func:`open_reader` subscribes and seeks to where reading resumes, and
:func:`start_reader` starts reading ahead (again after an idle timeout ended an iteration);
:func:`close_reader` ends both. A feed process commits itself and acks on receipt
(``ProcessFeed.commit``); a reader here commits with :func:`commit_here`, and acks with
:func:`ack_here` where the broker cannot seek.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from infeed.brokers import Broker
from infeed.codecs import CodecRegistry, Schema
from infeed.errors import LeaseLostError
from infeed.streams import StreamConsumer
from infeed.training._feed import ProcessFeed
from infeed.training._prefetch import EpochPlan, Prefetcher
from infeed.training._start import position_at_start, subscribe_stream
from infeed.types import Capability, Delivery, Position

__all__ = [
    "Reader",
    "ReaderSpec",
    "ack_here",
    "choose_feed",
    "close_reader",
    "commit_here",
    "open_reader",
    "start_reader",
]

#: A dataset's opened reader: its consumer in this process, or the feed process holding it.
Reader = StreamConsumer | ProcessFeed


@dataclass(frozen=True, kw_only=True)
class ReaderSpec:
    """Where a reader runs, what it reads and how far ahead (the dataset's settings)."""

    #: "process" (a feed process, see :func:`choose_feed`) or "thread" (this process).
    feed: str
    #: The topic to read.
    topic: str
    #: The consumer group.
    group: str
    #: Every record is validated and cast to it.
    schema: Schema
    #: Read only these partitions (None: all).
    partitions: Sequence[int] | None
    #: Where poison goes (None: ``TOPIC.dlq``).
    dead_letter_topic: str | None
    #: Codecs the messages may use (None: the default ones; a feed process uses only those).
    codecs: CodecRegistry | None
    #: Payload bytes read ahead.
    capacity_bytes: int
    #: Messages per receive call.
    max_messages: int
    #: Records per chunk handed to the training step.
    target_records: int
    #: Receive timeout of the prefetch thread.
    poll_s: float
    #: End reading ahead after this long without a message (None: never).
    idle_timeout_s: float | None
    #: Passes over the topic (None: an endless stream).
    epochs: int | None
    #: Ack each message on receipt (the broker can seek), not after a checkpoint (a feed process
    #: always does).
    ack_on_receipt: bool


def choose_feed(broker: Broker, feed: str, codecs: CodecRegistry | None) -> str:
    """Where the reader runs: "process" where asked or allowed (``feed="auto"``), else "thread".

    Args:
        broker: the dataset's broker.
        feed: "process", "thread" or "auto" (validated by the dataset).
        codecs: the dataset's codecs (None: the default ones, which a feed process can use).

    Raises:
        ValueError: ``feed="process"`` where the broker or platform does not allow it, naming why.
    """
    refusal = _process_refusal(broker, codecs)
    if feed == "process" and refusal is not None:
        raise ValueError(f"feed='process' is not possible here: {refusal}; use feed='thread'")
    return "process" if refusal is None and feed != "thread" else "thread"


def _process_refusal(broker: Broker, codecs: CodecRegistry | None) -> str | None:
    """Why the reader cannot run in a feed process here (None: it can)."""
    for capability in (Capability.SEEK, Capability.MULTI_PROCESS):
        if not broker.supports(capability):
            return f"{type(broker).__name__} lacks {capability.name}"
    if broker.url is None:
        return "the broker object was not opened from a URL (use infeed.brokers.connect)"
    if not hasattr(os, "memfd_create"):
        return "this platform has no memfd_create (Linux has) for the shared ring"
    if codecs is not None:
        return "custom codecs cannot be handed to another process"
    return None


def open_reader(
    broker: Broker,
    spec: ReaderSpec,
    *,
    resume: Mapping[int, Position],
    plan: EpochPlan | None,
    epoch: int,
) -> tuple[Reader, dict[int, Position], EpochPlan | None]:
    """Subscribe, here or in a new feed process, and seek to where reading resumes.

    What it opened is closed again if seeking fails.

    Args:
        broker: the dataset's broker (opened from a URL where ``spec.feed`` is "process").
        spec: where the reader runs and what it reads.
        resume: per partition, the position of the next record to read (empty: the group's
            committed positions, else the start of each partition).
        plan: the epoch plan of a loaded state, if any.
        epoch: epochs completed already.

    Returns:
        The reader, the positions reading starts at and the epoch plan.

    Raises:
        BrokerError, ValueError, ...: what subscribing or seeking raised.
    """
    reader: Reader
    if spec.feed == "process":
        assert broker.url is not None
        reader = ProcessFeed(
            broker.url,
            topic=spec.topic,
            group=spec.group,
            schema=spec.schema,
            partitions=spec.partitions,
            dead_letter_topic=spec.dead_letter_topic,
            capacity_bytes=spec.capacity_bytes,
            max_messages=spec.max_messages,
            target_records=spec.target_records,
            poll_s=spec.poll_s,
            idle_timeout_s=spec.idle_timeout_s,
        )
    else:
        reader = subscribe_stream(
            broker,
            spec.topic,
            group=spec.group,
            schema=spec.schema,
            partitions=spec.partitions,
            dead_letter_topic=spec.dead_letter_topic,
            codecs=spec.codecs,
        )
    try:
        if isinstance(reader, ProcessFeed):
            positions, plan = reader.open(resume=resume, plan=plan, epochs=spec.epochs, epoch=epoch)
        else:
            positions, plan = position_at_start(
                broker,
                reader.consumer,
                spec.topic,
                partitions=spec.partitions,
                resume=resume,
                plan=plan,
                epochs=spec.epochs,
                epoch=epoch,
            )
    except BaseException:
        close_reader(reader, None)
        raise
    return reader, positions, plan


def start_reader(
    reader: Reader,
    spec: ReaderSpec,
    *,
    resume: Mapping[int, Position],
    plan: EpochPlan | None,
) -> Prefetcher | ProcessFeed:
    """Start reading ahead at ``resume`` within ``plan``: a prefetch thread here, or the feed process.

    Args:
        reader: what :func:`open_reader` returned.
        spec: what to read (as given to :func:`open_reader`).
        resume: per partition, the position of the next record to read.
        plan: the epoch plan (None: an endless stream).

    Returns:
        What the dataset takes chunks and markers from: the started ``Prefetcher``, or the feed
        process's handle.
    """
    if isinstance(reader, ProcessFeed):
        reader.run(resume=resume, plan=plan)
        return reader
    prefetch = Prefetcher(
        reader,
        fields=tuple(spec.schema.fields),
        resume=resume,
        ack_on_receipt=spec.ack_on_receipt,
        plan=plan,
        capacity_bytes=spec.capacity_bytes,
        max_messages=spec.max_messages,
        target_records=spec.target_records,
        poll_s=spec.poll_s,
        idle_timeout_s=spec.idle_timeout_s,
    )
    prefetch.start()
    return prefetch


def close_reader(reader: Reader | None, prefetch: Prefetcher | ProcessFeed | None) -> None:
    """Stop reading ahead, then leave the group: the feed process exits, or the consumer closes.

    Args:
        reader: what :func:`open_reader` returned (None: not opened).
        prefetch: what :func:`start_reader` returned (None: not started).
    """
    if prefetch is not None:
        prefetch.stop()
    if isinstance(reader, ProcessFeed):
        reader.stop()
    elif reader is not None:
        reader.close()


def commit_here(
    stream: StreamConsumer,
    prefetch: Prefetcher | None,
    positions: Mapping[int, Position],
    consumed: list[Delivery],
    *,
    topic: str,
    offset_commit: bool,
    ack_on_receipt: bool,
) -> bool:
    """Commit ``positions`` on a reader in this process and ack the messages they cover.

    The work runs on the prefetch thread while it lives (it owns the consumer). The deliveries
    that ``positions`` cover are taken out of ``consumed`` first, whatever happens next.

    Args:
        stream: the reader opened by :func:`open_reader` in this process.
        prefetch: its prefetch thread, if started.
        positions: per partition, the position everything before which is done.
        consumed: deliveries whose records have all been handed out, not acked yet.
        topic: the topic read.
        offset_commit: the broker has offset commits (commit ``positions`` there).
        ack_on_receipt: messages were acked on receipt (nothing to ack now).

    Returns:
        Whether the acks came too late (the lease was lost: the messages come again).
    """

    def covered(d: Delivery) -> bool:
        pos = positions.get(d.position.partition)
        return pos is not None and d.position.offset < pos.offset

    done = [d for d in consumed if covered(d)]
    consumed[:] = [d for d in consumed if not covered(d)]
    tap = stream.consumer

    def work() -> bool:
        if positions and offset_commit:
            tap.commit([Position(topic, p, pos.offset) for p, pos in positions.items()])
        if ack_on_receipt:
            return False
        if done:
            try:
                tap.ack(done)
            except LeaseLostError:
                return True
        return False

    return prefetch.call(work) if prefetch is not None else work()


def ack_here(stream: StreamConsumer | None, prefetch: Prefetcher | None, consumed: list[Delivery]) -> None:
    """Ack ``consumed`` (all their records handed out) on a reader in this process; do not wait.

    For brokers without seek, which have no exact resume. The acks go to the prefetch thread
    where there is one (it owns the consumer); a lease lost meanwhile means the message comes
    again and is handed out again (at least once).

    Args:
        stream: the reader opened by :func:`open_reader` in this process (None: not opened).
        prefetch: its prefetch thread, if started.
        consumed: the deliveries to ack.
    """
    if prefetch is not None:
        prefetch.ack_later(consumed)
    elif stream is not None:
        with contextlib.suppress(LeaseLostError):
            stream.consumer.ack(consumed)
