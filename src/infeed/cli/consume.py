"""``infeed consume``: records of a topic as JSON lines, read in a consumer group."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

import typer

from infeed.cli._shared import BrokerOption, err, plural, state

if TYPE_CHECKING:
    from infeed.brokers import Consumer
    from infeed.codecs import CodecRegistry, RecordBatch
    from infeed.types import Delivery, Position

__all__ = ["consume"]

#: Longest single wait for messages, so that --timeout-s and Ctrl-C are noticed promptly.
_POLL_S = 1.0
#: Most messages fetched per receive.
_FETCH = 100


def consume(
    ctx: typer.Context,
    topic: Annotated[str, typer.Option("--topic", "-t", help="Topic to read.")],
    group: Annotated[str, typer.Option("--group", "-g", help="Consumer group to read in.")],
    start: Annotated[
        str,
        typer.Option(
            "--from",
            metavar="earliest|latest|POSITION",
            help="Where a group without state starts (earliest or latest; a group that has state "
            "resumes), or TOPIC:PARTITION:OFFSET[:RECORD] to move the group there.",
        ),
    ] = "earliest",
    max_records: Annotated[
        int | None, typer.Option("--max", min=1, help="Stop after this many records.")
    ] = None,
    timeout_s: Annotated[
        float | None,
        typer.Option(
            "--timeout-s", min=0, help="Stop when nothing arrives for this many seconds.  [default: wait]"
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE.jsonl", help="Write here, not to stdout.")
    ] = None,
    no_ack: Annotated[
        bool, typer.Option("--no-ack", help="Leave the messages unacked: the group gets them again.")
    ] = False,
    commit: Annotated[
        bool, typer.Option("--commit", help="Commit the group's position past what was written.")
    ] = False,
    broker: BrokerOption = None,
) -> None:
    """Print a topic's records as JSON lines (arrays as lists, with a _position field).

    _position is TOPIC:PARTITION:OFFSET[:RECORD], RECORD counting inside a record batch; pass it to
    --from to read again from that record. A message cut by --max is given back whole, not acked.
    """
    from infeed.codecs import default_registry
    from infeed.errors import TopicNotFoundError
    from infeed.types import Position

    seek_to: Position | None = None
    if start not in ("earliest", "latest"):
        try:
            seek_to = Position.parse(start)
        except ValueError as exc:
            raise typer.BadParameter(f"{exc}, or earliest or latest", param_hint="--from") from None
        if seek_to.topic != topic:
            raise typer.BadParameter(f"position {start!r} is not on topic {topic!r}", param_hint="--from")
    run = _Run(registry=default_registry(), ack=not no_ack, commit=commit, limit=max_records, skip=seek_to)
    with state(ctx).connect(broker) as broker_:
        try:
            broker_.describe_topic(topic)
        except TopicNotFoundError:
            raise TopicNotFoundError(
                f"no topic {topic!r}; create it with: infeed topics create {topic}, or produce to it"
            ) from None
        with broker_.subscribe(
            topic, group=group, start="latest" if start == "latest" else "earliest"
        ) as consumer:
            if seek_to is not None:
                consumer.seek(Position(topic, seek_to.partition, seek_to.offset))
            if output is None:
                run.loop(consumer, sys.stdout, timeout_s)
            else:
                with open(output, "w", encoding="utf-8") as sink:
                    run.loop(consumer, sink, timeout_s)
    done = f"{plural(run.records, 'record')} ({plural(run.messages, 'message')}) of {topic} in group {group}"
    notes = [f"acked {run.acked:,}" if run.ack else "not acked"]
    if run.committed:
        notes.append("committed " + ", ".join(str(p) for p in run.committed))
    if run.dead_lettered:
        notes.append(f"dead-lettered {run.dead_lettered}")
    if output is not None:
        notes.append(f"written to {output}")
    err().print(f"consumed {done}; {'; '.join(notes)}", soft_wrap=True, markup=False)
    if run.cut is not None:
        err().print(f"stopped inside a message: resume with --from {run.cut}", soft_wrap=True, markup=False)


@dataclass
class _Run:
    registry: CodecRegistry
    ack: bool
    commit: bool
    limit: int | None
    skip: Position | None
    records: int = 0
    messages: int = 0
    acked: int = 0
    dead_lettered: int = 0
    cut: Position | None = None
    committed: list[Position] = field(default_factory=list)

    def loop(self, consumer: Consumer, sink: TextIO, timeout_s: float | None) -> None:
        idle_since = time.monotonic()
        while self.limit is None or self.records < self.limit:
            wait = _POLL_S
            if timeout_s is not None:
                wait = min(wait, max(0.0, timeout_s - (time.monotonic() - idle_since)))
            fetch = _FETCH if self.limit is None else min(_FETCH, self.limit - self.records)
            deliveries = consumer.receive(max_messages=fetch, timeout_s=wait)
            if deliveries:
                self.handle(consumer, deliveries, sink)
                idle_since = time.monotonic()
            elif timeout_s is not None and time.monotonic() - idle_since >= timeout_s:
                return

    def handle(self, consumer: Consumer, deliveries: list[Delivery], sink: TextIO) -> None:
        """Write what fits under the limit, then ack and commit it; give the rest back."""
        from infeed.codecs import decode_message
        from infeed.errors import DecodeError

        done: list[Delivery] = []
        poison: list[tuple[Delivery, str]] = []
        back: list[Delivery] = []
        for d in deliveries:
            if self.limit is not None and self.records >= self.limit:
                back.append(d)
                continue
            try:
                batch = decode_message(d.payload, d.headers, self.registry)
            except DecodeError as exc:
                err().print(f"{d.position}: cannot decode: {exc}", soft_wrap=True, markup=False)
                poison.append((d, str(exc)))
                continue
            first = min(self._first_record(d), len(batch))
            room = (
                len(batch) - first
                if self.limit is None
                else min(len(batch) - first, self.limit - self.records)
            )
            for line in _record_lines(batch, d.position, first, first + room):
                sink.write(line + "\n")
            self.records += room
            if first + room < len(batch):
                self.cut = _at(d.position, first + room)
                back.append(d)
            else:
                done.append(d)
        sink.flush()
        self.messages += len(done)
        if self.ack:
            for d, reason in poison:
                consumer.nack(d, requeue=False, reason=f"undecodable: {reason}")
                self.dead_lettered += 1
            if done:
                consumer.ack(done)
                self.acked += len(done)
            if back:
                consumer.nack(back, requeue=True)
        if self.commit:
            self._commit(consumer, done + [d for d, _ in poison], back)

    def _first_record(self, d: Delivery) -> int:
        skip = self.skip
        if skip is not None and (skip.partition, skip.offset) == (d.position.partition, d.position.offset):
            self.skip = None
            return skip.record
        return 0

    def _commit(self, consumer: Consumer, handled: list[Delivery], back: list[Delivery]) -> None:
        """Commit per partition past the handled messages, but not past one given back."""
        from infeed.types import Position

        ends: dict[int, int] = {}
        for d in handled:
            ends[d.partition] = max(ends.get(d.partition, 0), d.position.offset + 1)
        for d in back:
            if d.partition in ends:
                ends[d.partition] = min(ends[d.partition], d.position.offset)
        positions = [Position(consumer.topic, p, offset) for p, offset in sorted(ends.items())]
        if positions:
            consumer.commit(positions)
            kept = {p.partition: p for p in self.committed}
            kept.update({p.partition: p for p in positions})
            self.committed = [kept[p] for p in sorted(kept)]


def _at(position: Position, record: int) -> Position:
    from infeed.types import Position

    return Position(position.topic, position.partition, position.offset, record)


def _record_lines(
    batch: RecordBatch, position: Position, start: int = 0, stop: int | None = None
) -> Iterator[str]:
    """Records ``start:stop`` of a decoded message as JSON lines, arrays as lists, with ``_position``."""
    columns = {name: column.tolist() for name, column in batch.columns.items()}
    for i in range(start, len(batch) if stop is None else stop):
        record = {name: values[i] for name, values in columns.items()}
        record["_position"] = str(_at(position, i))
        yield json.dumps(record, ensure_ascii=False)
