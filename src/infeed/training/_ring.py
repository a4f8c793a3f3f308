"""The feed process's shared ring of decoded chunks, and the frames on its pipes.

The ring is an anonymous memory file (``memfd``) both processes map: it has no name, so nothing is
left behind however either process ends. The feed process writes each chunk's arrays into one
contiguous region, then sends a frame naming where they are; the training process reads them as
views and, once their records are copied out, stores the ring position it is done with in the
ring's header. Positions are counted in bytes since the start and never wrap, so "free" is plain
arithmetic: ``capacity - (written - consumed)``. A chunk too big for the whole ring travels inside
its frame instead.

A frame is ``>II`` (JSON length, raw length), a JSON object (any int fits: offsets may exceed 64
bits), then that many raw bytes. No pickle crosses the pipe.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from infeed.training._chunks import Chunk

__all__ = [
    "HEADER_BYTES",
    "RingReader",
    "RingWriter",
    "create_ring",
    "decode_chunk",
    "encode_chunk",
    "map_ring",
    "read_frame",
    "write_frame",
]

#: Bytes before the data: the consumed position (int64) the training process writes.
HEADER_BYTES = 64
#: Every array starts on a multiple of this.
_ALIGN = 64
#: Largest JSON part of a frame (a chunk's header is a few hundred bytes; a big-offset list more).
_MAX_JSON = 64 * 1024 * 1024
#: How long the writer sleeps between looks at the consumed position while the ring is full.
_FULL_POLL_S = 0.0005
_FRAME = struct.Struct(">II")

_Array = np.ndarray[Any, Any]


def create_ring(capacity_bytes: int) -> tuple[int, mmap.mmap]:
    """Create a ring of ``capacity_bytes`` data bytes; return its file descriptor and mapping.

    Raises:
        ValueError: ``capacity_bytes`` is not positive.
    """
    if capacity_bytes <= 0:
        raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
    fd = os.memfd_create("infeed-feed")
    try:
        os.ftruncate(fd, HEADER_BYTES + capacity_bytes)
        return fd, map_ring(fd)
    except BaseException:
        os.close(fd)
        raise


def map_ring(fd: int) -> mmap.mmap:
    """Map the ring behind ``fd`` with every page in place at once.

    Otherwise each page costs a fault (and, the first time, zeroing) when first written in the
    feed process and again when first read here: ~1-2 µs per record over the first pass.
    """
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, os.fstat(fd).st_size, flags=flags)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class RingWriter:
    """The feed process's side: reserves room behind what the training process still reads."""

    def __init__(self, mapping: mmap.mmap) -> None:
        self.capacity = len(mapping) - HEADER_BYTES
        if self.capacity <= 0:
            raise ValueError(f"a ring needs more than {HEADER_BYTES} bytes, got {len(mapping)}")
        self._mapping = mapping
        self._consumed: _Array = np.frombuffer(mapping, np.int64, 1, 0)
        self._written = 0

    def reserve(self, nbytes: int, stop: Callable[[], bool]) -> int | None:
        """Return the start of ``nbytes`` contiguous free bytes, waiting while the ring is full.

        Returns None when ``nbytes`` can never fit, or ``stop()`` turned true while waiting (ask
        ``stop()`` again to tell the two apart).
        """
        if nbytes > self.capacity:
            return None
        phys = self._written % self.capacity
        start = self._written + (self.capacity - phys if phys + nbytes > self.capacity else 0)
        while True:
            consumed = int(self._consumed[0])
            if consumed == self._written or start + nbytes - consumed <= self.capacity:
                break  # empty, or the region ends before the oldest byte still read lies again
            if stop():
                return None
            time.sleep(_FULL_POLL_S)
        self._written = start + nbytes
        return start

    def view(self, start: int, nbytes: int) -> _Array:
        """Writable bytes ``start .. start + nbytes`` of a reserved region."""
        return np.frombuffer(self._mapping, np.uint8, nbytes, HEADER_BYTES + start % self.capacity)


class RingReader:
    """The training process's side: views of chunks, and the release of what was read."""

    def __init__(self, mapping: mmap.mmap) -> None:
        self.capacity = len(mapping) - HEADER_BYTES
        self._mapping = mapping
        self._consumed: _Array = np.frombuffer(mapping, np.int64, 1, 0)

    def view(self, start: int, dtype: str, shape: tuple[int, ...]) -> _Array:
        """An array of ``dtype`` and ``shape`` at ring position ``start``.

        Writable, as ``torch.from_numpy`` wants when a batch is lent as a view (``_lend``): only
        the lent batch's own rows can be changed that way, and nothing reads them here after.
        """
        count = int(np.prod(shape, dtype=np.int64))
        array = np.frombuffer(self._mapping, np.dtype(dtype), count, HEADER_BYTES + start % self.capacity)
        return array.reshape(shape)

    def release(self, end: int) -> None:
        """Everything before ring position ``end`` has been read and may be overwritten."""
        self._consumed[0] = end


def _ring_arrays(chunk: Chunk) -> list[tuple[str, _Array]]:
    arrays = [(f"c:{name}", np.ascontiguousarray(a)) for name, a in chunk.columns.items()]
    for name, a in (("next_offset", chunk.next_offset), ("next_record", chunk.next_record)):
        if a.dtype != object:
            arrays.append((name, np.ascontiguousarray(a)))
    return arrays


def encode_chunk(
    chunk: Chunk, ring: RingWriter, stop: Callable[[], bool]
) -> tuple[dict[str, Any], bytes] | None:
    """Write ``chunk`` into the ring (or, too big for it, into raw bytes); return its frame.

    Returns None when ``stop()`` turned true while waiting for room.
    """
    arrays = _ring_arrays(chunk)
    places: list[int] = []
    total = 0
    for _, a in arrays:
        places.append(total)
        total += _aligned(a.nbytes)
    start = ring.reserve(total, stop)
    raw = b""
    if start is None:
        if total <= ring.capacity:
            return None  # stopped
        parts = bytearray(total)
        for (_, a), at in zip(arrays, places, strict=True):
            parts[at : at + a.nbytes] = a.reshape(-1).view(np.uint8).tobytes()
        raw = bytes(parts)
    else:
        region = ring.view(start, total)
        for (_, a), at in zip(arrays, places, strict=True):
            region[at : at + a.nbytes] = a.reshape(-1).view(np.uint8)
    frame: dict[str, Any] = {
        "t": "chunk",
        "partition": chunk.partition,
        "nbytes": chunk.nbytes,
        "start": start,
        "end": None if start is None else start + total,
        "arrays": [
            [name, a.dtype.str, list(a.shape), at] for (name, a), at in zip(arrays, places, strict=True)
        ],
    }
    if chunk.next_offset.dtype == object:  # offsets beyond int64 (Pulsar): exact as JSON ints
        frame["next_offset"] = [int(v) for v in chunk.next_offset]
    if chunk.next_record.dtype == object:
        frame["next_record"] = [int(v) for v in chunk.next_record]
    return frame, raw


def decode_chunk(frame: dict[str, Any], raw: bytes, ring: RingReader) -> Chunk:
    """Rebuild the chunk :func:`encode_chunk` sent, its arrays viewing the ring (or ``raw``)."""
    found: dict[str, _Array] = {}
    for name, dtype, shape, at in frame["arrays"]:
        if frame["start"] is None:
            count = int(np.prod(shape, dtype=np.int64))
            array = np.frombuffer(raw, np.dtype(dtype), count, at).reshape(shape)
        else:
            array = ring.view(frame["start"] + at, dtype, tuple(shape))
        found[name] = array
    next_offset = found.pop("next_offset", None)
    if next_offset is None:
        next_offset = np.array(frame["next_offset"], dtype=object)
    next_record = found.pop("next_record", None)
    if next_record is None:
        next_record = np.array(frame["next_record"], dtype=object)
    return Chunk(
        partition=int(frame["partition"]),
        columns={name[2:]: a for name, a in found.items()},
        next_offset=next_offset,
        next_record=next_record,
        nbytes=int(frame["nbytes"]),
        ring_end=frame["end"],
    )


def write_frame(stream: IO[bytes], obj: dict[str, Any], raw: bytes = b"") -> None:
    """Write one frame and flush it."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    stream.write(_FRAME.pack(len(body), len(raw)) + body)
    if raw:
        stream.write(raw)
    stream.flush()


def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    data = stream.read(n)
    if data is None or len(data) < n:
        return None
    return data


def read_frame(stream: IO[bytes]) -> tuple[dict[str, Any], bytes] | None:
    """Read one frame; None at the end of the stream (the other process closed it or ended).

    Raises:
        ValueError: a frame that is not one (too long, or not a JSON object).
    """
    head = _read_exactly(stream, _FRAME.size)
    if head is None:
        return None
    size, raw_size = _FRAME.unpack(head)
    if size > _MAX_JSON:
        raise ValueError(f"feed frame of {size} bytes is over the {_MAX_JSON}-byte bound")
    body = _read_exactly(stream, size)
    raw = _read_exactly(stream, raw_size) if raw_size else b""
    if body is None or raw is None:
        return None
    obj = json.loads(body)
    if not isinstance(obj, dict):
        raise ValueError(f"feed frame is not a JSON object: {body[:80]!r}")
    return obj, raw
