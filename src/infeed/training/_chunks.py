"""``Chunk``: decoded records of one partition, each with the resume point just after it.

The prefetch thread turns deliveries into chunks; the dataset cuts batches from them. A record's
*next position* is where a consumer resumes to read the record after it: ``(offset, i + 1)`` while
valid records of the same message follow, ``(offset + 1, 0)`` after the last one. So a checkpoint
taken after any record resumes exactly behind it, however records were packed into messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from infeed.codecs import (
    CODEC_HEADER,
    DEFAULT_CODEC,
    RECORDS_HEADER,
    CodecRegistry,
    RecordBatch,
    Schema,
    decode_message,
)
from infeed.errors import CodecError
from infeed.streams import Received
from infeed.types import Delivery

__all__ = [
    "COALESCE_BELOW",
    "Chunk",
    "build_chunks",
    "decode_batches",
    "decode_singles",
    "merge_runs",
    "single_chunk",
]

#: Messages with fewer valid records than this are joined into one chunk (one copy, off the step's
#: thread), so that one-record-per-message topics are not cut record by record.
COALESCE_BELOW = 32

_Array = np.ndarray[Any, Any]


@dataclass(frozen=True, slots=True, eq=False)
class Chunk:
    """Records of one partition in stream order.

    Attributes:
        partition: the partition they came from.
        columns: field -> array of ``len(self)`` rows (read-only views of the payload when the
            chunk is one message).
        next_offset: per record, the message offset of the position after it.
        next_record: per record, the record index of the position after it.
        nbytes: payload bytes the chunk holds (what the prefetch queue counts).
        deliveries: the messages whose records end in this chunk (acked after a checkpoint on
            brokers without seek; empty elsewhere).
        delivery_ends: per delivery, the chunk index one past its last record.
        ring_end: for a chunk whose arrays live in a feed process's shared ring, the ring position
            to release once its records are copied out (None elsewhere).
    """

    partition: int
    columns: dict[str, _Array]
    next_offset: _Array
    next_record: _Array
    nbytes: int
    deliveries: tuple[Delivery, ...] = ()
    delivery_ends: tuple[int, ...] = ()
    ring_end: int | None = None

    def __len__(self) -> int:
        return len(self.next_offset)


#: Offsets at or above this do not fit int64 (Pulsar packs a message id into one offset).
_INT64_LIMIT = 2**63 - 1


def offsets_array(offsets: Sequence[int]) -> _Array:
    """Offsets as an int64 array, or an object array where one (plus one) is too big for int64."""
    if offsets and max(offsets) >= _INT64_LIMIT:
        return np.array(offsets, dtype=object)
    return np.fromiter(offsets, dtype=np.int64, count=len(offsets))


def _positions(item: Received, skip: int) -> tuple[_Array, _Array, int]:
    """Next offsets and record indices of ``item``'s records, and how many leading ones to skip."""
    n = len(item.batch)
    index = np.arange(n, dtype=np.int64) if item.indices is None else np.asarray(item.indices, np.int64)
    first = int(np.searchsorted(index, skip)) if skip else 0
    offset = item.delivery.position.offset
    next_offset = np.full(n, offset, dtype=np.int64 if offset < _INT64_LIMIT else object)
    next_record = index + 1
    if n:
        next_offset[-1], next_record[-1] = offset + 1, 0
    return next_offset, next_record, first


def build_chunks(
    items: Sequence[tuple[Received, int]], fields: Sequence[str], *, keep_deliveries: bool
) -> list[Chunk]:
    """Turn one partition's received items into chunks.

    Args:
        items: (received message, records of it to skip: those before this index in the message).
        fields: the schema's field names, in order.
        keep_deliveries: attach the deliveries (for acking after a checkpoint).

    Returns:
        Chunks in stream order; small messages are joined, big ones stay zero-copy views.
    """
    out: list[Chunk] = []
    small: list[tuple[Received, int]] = []

    def flush_small() -> None:
        if small:
            out.append(_join(small, fields, keep_deliveries))
            small.clear()

    for item, skip in items:
        if len(item.batch) < COALESCE_BELOW:
            small.append((item, skip))
            continue
        flush_small()
        out.append(_join([(item, skip)], fields, keep_deliveries))
    flush_small()
    return [c for c in out if len(c) or c.deliveries]


def _join(items: Sequence[tuple[Received, int]], fields: Sequence[str], keep_deliveries: bool) -> Chunk:
    parts: list[tuple[Received, int, _Array, _Array]] = []
    ends: list[int] = []
    total = 0
    for item, skip in items:
        next_offset, next_record, first = _positions(item, skip)
        parts.append((item, first, next_offset[first:], next_record[first:]))
        total += len(next_offset) - first
        ends.append(total)
    if len(parts) == 1:
        item, first, next_offset, next_record = parts[0]
        columns = {name: item.batch.columns[name][first:] for name in fields}
    else:
        columns = {
            name: np.concatenate([item.batch.columns[name][first:] for item, first, _, _ in parts])
            for name in fields
        }
        next_offset = np.concatenate([p[2] for p in parts])
        next_record = np.concatenate([p[3] for p in parts])
    deliveries = tuple(item.delivery for item, _ in items) if keep_deliveries else ()
    return Chunk(
        partition=items[0][0].delivery.position.partition,
        columns=columns,
        next_offset=next_offset,
        next_record=next_record,
        nbytes=sum(len(item.delivery.payload) for item, _ in items),
        deliveries=deliveries,
        delivery_ends=tuple(ends) if keep_deliveries else (),
    )


def merge_runs(chunks: Sequence[Chunk]) -> list[Chunk]:
    """Join each run of consecutive chunks of one partition into one chunk (one copy per column).

    For a feed process, which copies every chunk into shared memory and sends a frame per chunk:
    fewer, larger chunks cost the training process less per record. Chunks that carry deliveries
    are left as they are.
    """
    out: list[Chunk] = []
    run: list[Chunk] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            out.append(
                Chunk(
                    partition=run[0].partition,
                    columns={name: np.concatenate([c.columns[name] for c in run]) for name in run[0].columns},
                    next_offset=np.concatenate([c.next_offset for c in run]),
                    next_record=np.concatenate([c.next_record for c in run]),
                    nbytes=sum(c.nbytes for c in run),
                )
            )
        run.clear()

    for chunk in chunks:
        if chunk.deliveries or (run and run[-1].partition != chunk.partition):
            flush()
        if chunk.deliveries:
            out.append(chunk)
        else:
            run.append(chunk)
    flush()
    return out


def decode_singles(
    raw: Sequence[Delivery], registry: CodecRegistry, schema: Schema
) -> list[tuple[list[Delivery], RecordBatch]] | None:
    """Decode one-record messages straight into one validated batch per partition.

    ``StreamConsumer`` builds and validates a batch per message (~150 µs for ``sample-784``);
    this validates each partition's records at once. Returns None unless every message holds one
    record that decodes and fits ``schema`` — then the caller takes the path that dead-letters.
    """
    by_partition: dict[int, tuple[list[Delivery], list[dict[str, Any]]]] = {}
    try:
        for d in raw:
            if RECORDS_HEADER in d.headers:
                return None
            name = d.headers.get(CODEC_HEADER, DEFAULT_CODEC)
            if name not in registry:
                return None
            deliveries, records = by_partition.setdefault(d.position.partition, ([], []))
            deliveries.append(d)
            records.append(registry.get(name).decode(d.payload))
        return [(ds, schema.batch_from_records(records)) for ds, records in by_partition.values()]
    except (CodecError, TypeError, ValueError):  # SchemaError is a CodecError
        return None


def single_chunk(
    deliveries: Sequence[Delivery],
    batch: RecordBatch,
    keep: Sequence[int],
    *,
    keep_deliveries: bool,
    offsets: _Array | None = None,
) -> Chunk:
    """A chunk of the records ``keep`` (indices) of a batch of one-record messages.

    ``offsets`` may give the kept messages' offsets (computed by the caller already).
    """
    if len(keep) == len(deliveries):
        columns = dict(batch.columns)
        kept = list(deliveries)
    else:
        columns = {name: column[list(keep)] for name, column in batch.columns.items()}
        kept = [deliveries[i] for i in keep]
    if offsets is None:
        offsets = offsets_array([d.position.offset for d in kept])
    nbytes = sum(c.nbytes for c in columns.values())
    return Chunk(
        partition=deliveries[0].position.partition,
        columns=columns,
        next_offset=offsets + 1,
        next_record=np.zeros(len(kept), dtype=np.int64),
        nbytes=nbytes,
        deliveries=tuple(kept) if keep_deliveries else (),
        delivery_ends=tuple(range(1, len(kept) + 1)) if keep_deliveries else (),
    )


def decode_batches(raw: Sequence[Delivery], registry: CodecRegistry, schema: Schema) -> list[Received] | None:
    """Decode and validate every message once; None if any is poison (to be dead-lettered).

    ``Schema.split`` (which ``StreamConsumer`` uses) validates a clean batch twice; messages are
    almost always clean, so they are validated once here and only poison takes that path.
    """
    out: list[Received] = []
    try:
        for d in raw:
            out.append(Received(d, schema.validate_batch(decode_message(d.payload, d.headers, registry))))
    except (CodecError, TypeError, ValueError):  # SchemaError and DecodeError are CodecErrors
        return None
    return out
