"""``infeed produce``: records from a file or standard input into a topic, with progress and a summary."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from infeed.cli._shared import BrokerOption, err, fail, human_bytes, out, rate, records_progress, state

if TYPE_CHECKING:
    from rich.console import Console

    from infeed.cli.readers import Row
    from infeed.codecs import Codec, RecordBatch, Schema
    from infeed.streams import Producer

__all__ = ["MAX_REPORTED_ERRORS", "InputFormat", "OnError", "produce"]

#: Bad rows printed one by one; past this many they are only counted.
MAX_REPORTED_ERRORS = 100


class InputFormat(enum.StrEnum):
    """``--format``."""

    auto = "auto"
    jsonl = "jsonl"
    csv = "csv"
    npy = "npy"
    npz = "npz"


class OnError(enum.StrEnum):
    """``--on-error``."""

    skip = "skip"
    fail = "fail"


def produce(
    ctx: typer.Context,
    file: Annotated[str, typer.Argument(metavar="FILE", help="Input file, or - for JSON lines on stdin.")],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Topic to write to (created if missing).")],
    fmt: Annotated[
        InputFormat, typer.Option("--format", "-f", help="Input format; auto goes by the file suffix.")
    ] = InputFormat.auto,
    schema_file: Annotated[
        Path | None,
        typer.Option(
            "--schema",
            metavar="SCHEMA.json",
            help='Field specs, e.g. {"x": {"dtype": "float32", "shape": [64]}, "y": {"dtype": "int64"}}; '
            "without it the first record decides the fields.",
        ),
    ] = None,
    records_per_message: Annotated[
        int,
        typer.Option(
            min=1, help="Records per message (a column-wise record batch); 64+ suits training data."
        ),
    ] = 1,
    key: Annotated[
        str | None,
        typer.Option(metavar="FIELD", help="Partition by this scalar field (needs --records-per-message 1)."),
    ] = None,
    field: Annotated[str, typer.Option(help="Field name of a .npy file's rows.")] = "x",
    on_error: Annotated[
        OnError, typer.Option(help="Bad input: report FILE:LINE and skip it, or stop with exit code 1.")
    ] = OnError.skip,
    codec: Annotated[
        str | None,
        typer.Option(
            metavar="msgpack|json", help="Codec of the messages.  [default: $INFEED_CODEC or msgpack]"
        ),
    ] = None,
    broker: BrokerOption = None,
) -> None:
    """Write records from a file or stdin to a topic.

    Formats: JSON lines (one object per line; - reads them from stdin); CSV with a header row
    (numeric columns become numbers); .npy (one record per row, field x or --field); .npz (one
    record per row, one field per array, all of the same length).

    CSV and --schema: a scalar field reads the column of its name; a field of shape (64,) reads
    either one column of its name holding a JSON array ("[0.5, 1.0, ...]") or the columns x0..x63
    (or x_0..x_63); a multi-dimensional field reads its values in row-major order. Every column
    must belong to a field.

    Bad input (malformed JSON, a wrong dtype or shape, a CSV row with the wrong number of cells) is
    reported as FILE:LINE: reason (LINE is the row number, from 1, in .npy/.npz files).
    """
    from infeed.brokers import connect
    from infeed.cli import readers
    from infeed.codecs import Schema, default_registry
    from infeed.streams import Producer

    settings = state(ctx).settings(broker)
    fmt_name = readers.detect_format(file, fmt.value)
    registry = default_registry()
    codec_name = codec or settings.codec
    if codec_name not in registry:
        raise typer.BadParameter(f"unknown codec {codec_name!r}; known: {', '.join(registry.names)}")
    if key is not None and records_per_message != 1:
        raise typer.BadParameter(
            "--key needs --records-per-message 1: a message of many records has one key", param_hint="--key"
        )
    schema = Schema.load(schema_file) if schema_file is not None else None
    if schema is not None:
        _check_key(schema, key)
    counting = _CountingCodec(registry.get(codec_name))
    stats = _Stats(on_error=on_error, console=err())
    with connect(settings.broker) as broker_:
        producer = Producer(
            broker_, topic, codec=counting, records_per_message=records_per_message, key=_key_of(key)
        )
        rows = readers.read_rows(file, fmt_name, schema=schema, field=field)
        started = time.monotonic()
        _send_all(rows, producer, schema, key, stats)
        producer.flush()  # also under --on-error fail: what came before the bad row is sent
        stats.seconds = time.monotonic() - started
    _summary(out(), topic, producer, counting.bytes, stats)
    if stats.stopped_at is not None:
        raise fail(
            f"stopped at {stats.stopped_at} (--on-error fail); the {producer.records_sent} records "
            "before it were sent"
        )


@dataclass
class _Stats:
    on_error: OnError
    console: Console
    errors: int = 0
    seconds: float = 0.0
    stopped_at: str | None = None

    def bad(self, row: Row, reason: str) -> bool:
        """Report a bad row; return whether to go on."""
        from rich.markup import escape

        self.errors += 1
        if self.on_error is OnError.fail:
            self.console.print(f"[red]{escape(row.where)}: {escape(reason)}[/]", soft_wrap=True)
            self.stopped_at = row.where
            return False
        if self.errors <= MAX_REPORTED_ERRORS:
            self.console.print(f"[yellow]{escape(row.where)}: {escape(reason)} (skipped)[/]", soft_wrap=True)
        elif self.errors == MAX_REPORTED_ERRORS + 1:
            self.console.print(f"[yellow]more than {MAX_REPORTED_ERRORS} bad rows; counting the rest[/]")
        return True


def _send_all(
    rows: Iterable[Row], producer: Producer, schema: Schema | None, key: str | None, stats: _Stats
) -> None:
    from infeed.cli.readers import infer_schema
    from infeed.errors import SchemaError

    progress = records_progress(stats.console)
    with progress:
        task = progress.add_task(f"producing to {producer.topic}", total=None)
        pending, last = 0, time.monotonic()
        for row in rows:
            reason, values = row.error, None
            if row.record is not None:
                try:
                    if schema is None:
                        schema = infer_schema(row.record)
                        _check_key(schema, key)  # BadParameter is no ValueError: it ends the run
                    values = schema.validate(row.record)
                except (SchemaError, ValueError) as exc:
                    reason = str(exc)
            if values is None:
                if not stats.bad(row, reason or "no record"):
                    return
                continue
            producer.send(values)
            pending += 1
            now = time.monotonic()
            if pending >= 512 or now - last >= 0.2:
                progress.advance(task, pending)
                pending, last = 0, now
        progress.advance(task, pending)


def _check_key(schema: Schema, key: str | None) -> None:
    if key is None:
        return
    found = schema.fields.get(key)
    if found is None:
        raise typer.BadParameter(
            f"{key!r} is not a field of the records (fields: {', '.join(schema.fields)})", param_hint="--key"
        )
    if found.shape:
        raise typer.BadParameter(
            f"field {key!r} has shape {found.shape}; a key must be a scalar", param_hint="--key"
        )


def _key_of(key: str | None) -> Callable[[Mapping[str, Any]], str] | None:
    if key is None:
        return None

    def key_fn(record: Mapping[str, Any]) -> str:
        value = record[key]
        return str(value.item() if hasattr(value, "item") else value)

    return key_fn


class _CountingCodec:
    """A codec that counts the bytes it writes: ``Producer`` counts records and messages only."""

    def __init__(self, inner: Codec) -> None:
        self.inner = inner
        self.bytes = 0

    @property
    def name(self) -> str:
        return self.inner.name

    def encode(self, record: Mapping[str, Any]) -> bytes:
        data = self.inner.encode(record)
        self.bytes += len(data)
        return data

    def decode(self, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        return self.inner.decode(data)

    def encode_batch(self, batch: RecordBatch) -> bytes:
        data = self.inner.encode_batch(batch)
        self.bytes += len(data)
        return data

    def decode_batch(self, data: bytes | bytearray | memoryview) -> RecordBatch:
        return self.inner.decode_batch(data)


def _summary(console: Console, topic: str, producer: Producer, nbytes: int, stats: _Stats) -> None:
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("records", f"{producer.records_sent:,}")
    table.add_row("messages", f"{producer.messages_sent:,}")
    table.add_row("bytes", human_bytes(nbytes))
    table.add_row("seconds", f"{stats.seconds:.2f}")
    table.add_row("rate", f"{rate(producer.records_sent, stats.seconds)} records/s")
    table.add_row("errors", f"{stats.errors:,}")
    console.print(f"produced to topic [bold]{topic}[/]")
    console.print(table)
