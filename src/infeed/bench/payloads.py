"""The reference workloads of BENCHMARKS.md that travel through brokers: ``msg-1k`` and ``sample-784``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from infeed.codecs import MsgpackCodec, encode_message

__all__ = ["PAYLOADS", "Payload", "batched", "msg_1k", "payload", "sample_784"]

#: Seed of the bytes the workloads carry, so every run sends the same messages.
_SEED = 784

T = TypeVar("T")


@dataclass(frozen=True)
class Payload:
    """One reference message and how infeed publishes it.

    Attributes:
        name: the BENCHMARKS.md name (``msg-1k``, ``sample-784``).
        data: the message bytes (the raw clients send exactly these).
        headers: what infeed publishes beside them (the codec header of an encoded record, as
            ``Producer`` sends it); raw clients send none, so infeed's cost of carrying them
            counts against it.
        description: one line for the table and the JSON.
    """

    name: str
    data: bytes
    headers: Mapping[str, str] | None
    description: str

    def batches(self, count: int, size: int) -> list[list[bytes]]:
        """Return ``count`` copies of the payload in lists of ``size`` (one per publish call)."""
        return batched([self.data] * count, size)


def msg_1k() -> Payload:
    """Return ``msg-1k``: 1,024 opaque bytes, published without headers."""
    data = np.random.default_rng(_SEED).bytes(1024)
    return Payload("msg-1k", data, None, "1,024 opaque bytes")


def sample_784() -> Payload:
    """Return ``sample-784``: ``x`` float32 (784,) and ``y`` int64 in infeed's msgpack codec."""
    rng = np.random.default_rng(_SEED)
    record = {"x": rng.random(784, dtype=np.float32), "y": np.int64(7)}
    data, headers = encode_message(MsgpackCodec(), record)
    return Payload("sample-784", data, headers, f"x float32 (784,) + y int64, msgpack, {len(data):,} B")


#: The workloads of figure 1, by name.
PAYLOADS = {"msg-1k": msg_1k, "sample-784": sample_784}


def payload(name: str) -> Payload:
    """Build the workload called ``name``.

    Raises:
        ValueError: for a name that is not a reference workload.
    """
    try:
        return PAYLOADS[name]()
    except KeyError:
        raise ValueError(f"unknown payload {name!r}; known: {', '.join(PAYLOADS)}") from None


def batched(items: list[T], size: int) -> list[list[T]]:
    """Split ``items`` into lists of ``size`` (the last may be shorter)."""
    if size <= 0:
        raise ValueError(f"batch size must be > 0, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]
