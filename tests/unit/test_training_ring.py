"""The feed process's shared ring and frames: wrap-around, waiting for room, big chunks, big offsets."""

from __future__ import annotations

import io
import mmap
import os
import threading

import numpy as np
import pytest

from infeed.training._chunks import Chunk, merge_runs
from infeed.training._ring import (
    RingReader,
    RingWriter,
    create_ring,
    decode_chunk,
    encode_chunk,
    read_frame,
    write_frame,
)


def mapped(capacity: int) -> mmap.mmap:
    fd, mapping = create_ring(capacity)
    os.close(fd)  # the mapping stays
    return mapping


def chunk(first: int, n: int, *, big: bool = False) -> Chunk:
    x = np.arange(first, first + n, dtype=np.float32).repeat(4).reshape(n, 4)
    offsets = [(1 << 80) + i if big else i for i in range(first + 1, first + n + 1)]
    return Chunk(
        partition=3,
        columns={"x": x, "id": np.arange(first, first + n, dtype=np.int64)},
        next_offset=np.array(offsets, dtype=object if big else np.int64),
        next_record=np.zeros(n, np.int64),
        nbytes=x.nbytes,
    )


def roundtrip(c: Chunk, writer: RingWriter, reader: RingReader) -> Chunk:
    encoded = encode_chunk(c, writer, lambda: False)
    assert encoded is not None
    buffer = io.BytesIO()
    write_frame(buffer, *encoded)
    buffer.seek(0)
    got = read_frame(buffer)
    assert got is not None and read_frame(buffer) is None
    return decode_chunk(got[0], got[1], reader)


def same(a: Chunk, b: Chunk) -> bool:
    return (
        a.partition == b.partition
        and all(np.array_equal(a.columns[k], b.columns[k]) for k in a.columns)
        and list(a.next_offset) == list(b.next_offset)
        and list(a.next_record) == list(b.next_record)
    )


def test_chunks_wrap_around_the_ring_and_read_back_exactly() -> None:
    mapping = mapped(4096)
    writer, reader = RingWriter(mapping), RingReader(mapping)
    for first in range(0, 600, 30):  # ~1.2 KiB a chunk: wraps many times
        sent = chunk(first, 30)
        got = roundtrip(sent, writer, reader)
        assert same(sent, got) and got.ring_end is not None
        assert got.columns["x"].flags.writeable  # a lent batch becomes a tensor as a view (_lend)
        reader.release(got.ring_end)


def test_the_writer_waits_for_room_until_the_reader_releases() -> None:
    mapping = mapped(2048)
    writer, reader = RingWriter(mapping), RingReader(mapping)
    first = roundtrip(chunk(0, 30), writer, reader)
    assert writer.reserve(1500, lambda: True) is None  # full, and told to stop: gives up
    got: list[int | None] = []
    waiting = threading.Thread(target=lambda: got.append(writer.reserve(1500, lambda: False)))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # no room until the first chunk is released
    assert first.ring_end is not None
    reader.release(first.ring_end)
    waiting.join(10)
    assert got and got[0] is not None


def test_a_chunk_bigger_than_the_ring_travels_in_its_frame() -> None:
    mapping = mapped(256)
    sent = chunk(0, 40)
    got = roundtrip(sent, RingWriter(mapping), RingReader(mapping))
    assert same(sent, got) and got.ring_end is None


def test_offsets_beyond_64_bits_stay_exact() -> None:
    mapping = mapped(4096)
    sent = chunk(5, 10, big=True)
    got = roundtrip(sent, RingWriter(mapping), RingReader(mapping))
    assert same(sent, got) and got.next_offset.dtype == object


def test_broken_frames_and_bad_sizes_are_refused() -> None:
    buffer = io.BytesIO(b"\x00\x00\x00\x02\x00\x00\x00\x00[]")
    with pytest.raises(ValueError, match="JSON object"):
        read_frame(buffer)
    with pytest.raises(ValueError, match="capacity_bytes"):
        create_ring(0)
    assert read_frame(io.BytesIO(b"\x00\x00")) is None  # a stream cut short is its end


def test_merge_runs_joins_consecutive_chunks_of_a_partition_in_order() -> None:
    a, b, c = chunk(0, 3), chunk(3, 2), chunk(5, 4)
    other = Chunk(
        partition=9,
        columns=c.columns,
        next_offset=c.next_offset,
        next_record=c.next_record,
        nbytes=c.nbytes,
    )
    merged = merge_runs([a, b, other, c])
    assert [m.partition for m in merged] == [3, 9, 3]
    assert merged[0].columns["id"].tolist() == [0, 1, 2, 3, 4] and merged[0].nbytes == a.nbytes + b.nbytes
    assert merged[0].next_offset.tolist() == [1, 2, 3, 4, 5] and len(merged[0].next_record) == 5
    assert merged[1] is other and merged[2] is c
    big = merge_runs([chunk(0, 2), chunk(2, 2, big=True)])  # offsets beyond int64 stay exact
    assert len(big) == 1 and big[0].next_offset.tolist() == [1, 2, (1 << 80) + 3, (1 << 80) + 4]
