"""``Batcher``: requests from the priority topics into batches, expired ones set apart.

A batch starts with the first request that arrives and closes when it is full (``max_batch_size``
rows, or what ``batch_size_fn`` counts) or ``max_wait_s`` after it started. Higher priority topics
are read first; inside a batch requests are ordered by priority, then earliest deadline. Requests
received beyond a full batch are held for the next one. A request whose deadline has passed (or
is closer than ``min_time_left_s``) is set apart to be answered ``DEADLINE_EXCEEDED``: it never
reaches the model. ``run_model`` calls the model once for a batch and checks its outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from infeed.brokers.base import Consumer
from infeed.inference.protocol import InvalidRequestError, Request, decode_request
from infeed.types import Delivery

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_WAIT_S",
    "DEFAULT_POLL_S",
    "Batch",
    "BatchConfig",
    "Batcher",
    "Pending",
    "run_model",
]

#: Rows (or ``batch_size_fn`` units) per model call, at most.
DEFAULT_MAX_BATCH_SIZE = 32
#: How long a batch waits for more requests after its first one.
DEFAULT_MAX_WAIT_S = 0.005
#: Longest single blocking receive while waiting, so lower priority topics are polled too.
DEFAULT_POLL_S = 0.02


@dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """How requests are batched.

    Attributes:
        max_batch_size: rows (or ``batch_size_fn`` units) per model call; a single larger
            request still runs, alone.
        max_wait_s: how long a batch waits for more requests after its first one.
        min_time_left_s: a request with less time than this before its deadline counts as expired.
        batch_size_fn: a request's size (default: its rows).
    """

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    min_time_left_s: float = 0.0
    batch_size_fn: Callable[[Request], int] | None = None

    def __post_init__(self) -> None:
        if type(self.max_batch_size) is not int or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not self.max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s!r}")
        if not self.min_time_left_s >= 0:
            raise ValueError(f"min_time_left_s must be >= 0, got {self.min_time_left_s!r}")

    def size(self, request: Request) -> int:
        """Return ``request``'s size in batch units."""
        if self.batch_size_fn is None:
            return request.rows
        n = self.batch_size_fn(request)
        if type(n) is not int or n < 1:
            raise ValueError(f"batch_size_fn must return an int >= 1, got {n!r}")
        return n


@dataclass(frozen=True, slots=True)
class Pending:
    """A received request and the delivery that carried it."""

    delivery: Delivery
    request: Request

    @property
    def sort_key(self) -> tuple[int, float]:
        """Priority, then deadline."""
        return (self.request.priority, self.request.deadline)


@dataclass
class Batch:
    """What one ``next_batch`` call gathered.

    Attributes:
        ready: requests to compute, by priority then deadline.
        expired: requests past their deadline, never to be computed.
        invalid: deliveries that are not valid requests, with the reason.
    """

    ready: list[Pending] = field(default_factory=list)
    expired: list[Pending] = field(default_factory=list)
    invalid: list[tuple[Delivery, InvalidRequestError]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.ready or self.expired or self.invalid)


class Batcher:
    """Gathers batches from one consumer per priority level.

    Args:
        consumers: one per priority level, highest priority first (not owned).
        config: batching settings.
        clock: wall-clock time for deadlines (``time.time``; injectable for tests).
    """

    def __init__(
        self,
        consumers: Sequence[Consumer],
        config: BatchConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not consumers:
            raise ValueError("a Batcher needs at least one consumer")
        self.consumers = list(consumers)
        self.config = config or BatchConfig()
        self._clock = clock
        self._held: list[Pending] = []

    def next_batch(self, timeout_s: float = 1.0) -> Batch:
        """Wait up to ``timeout_s`` for a first request, then gather a batch.

        Returns an empty ``Batch`` when nothing arrived in time.
        """
        batch = Batch()
        pending = self._held
        self._held = []
        end = time.monotonic() + timeout_s
        while not (pending or batch):
            self._poll(batch, pending, block_s=min(DEFAULT_POLL_S, max(0.0, end - time.monotonic())))
            if time.monotonic() >= end:
                break
        if pending:
            close_at = time.monotonic() + self.config.max_wait_s
            while self._size(pending) < self.config.max_batch_size:
                left = close_at - time.monotonic()
                if left <= 0:
                    break
                self._poll(batch, pending, block_s=min(DEFAULT_POLL_S, left))
        pending.sort(key=lambda p: p.sort_key)
        fits, size = 0, 0
        for p in pending:
            size += self.config.size(p.request)
            if fits and size > self.config.max_batch_size:
                break
            fits += 1
        self._held = pending[fits:]
        batch.ready, late = self.split_expired(pending[:fits])
        batch.expired += late
        return batch

    def split_expired(self, pending: Sequence[Pending]) -> tuple[list[Pending], list[Pending]]:
        """Split requests into (still in time, expired) at this moment."""
        cutoff = self._clock() + self.config.min_time_left_s
        ready = [p for p in pending if p.request.deadline > cutoff]
        expired = [p for p in pending if p.request.deadline <= cutoff]
        return ready, expired

    def take_held(self) -> list[Pending]:
        """Return (and forget) requests held for the next batch, e.g. to give them back on close."""
        held, self._held = self._held, []
        return held

    def _size(self, pending: Sequence[Pending]) -> int:
        return sum(self.config.size(p.request) for p in pending)

    def _poll(self, batch: Batch, pending: list[Pending], *, block_s: float) -> int:
        """Receive from every level, highest first; block on the top level only if all were empty."""
        got = 0
        room = max(1, self.config.max_batch_size - self._size(pending))
        for consumer in self.consumers:
            got += self._take(consumer.receive(max_messages=room, timeout_s=0.0), batch, pending)
        if not got and block_s > 0:
            got += self._take(self.consumers[0].receive(max_messages=room, timeout_s=block_s), batch, pending)
        return got

    def _take(self, deliveries: list[Delivery], batch: Batch, pending: list[Pending]) -> int:
        cutoff = self._clock() + self.config.min_time_left_s
        for delivery in deliveries:
            try:
                p = Pending(delivery, decode_request(delivery.payload))
            except InvalidRequestError as exc:
                batch.invalid.append((delivery, exc))
                continue
            # Expired on arrival: set apart at once, so it takes no room in the batch.
            (pending if p.request.deadline > cutoff else batch.expired).append(p)
        return len(deliveries)


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"model output {name!r} must be a tensor or array, got {type(value).__name__}")


def run_model(model: Callable[..., Any], requests: Sequence[Request]) -> list[dict[str, np.ndarray]]:
    """Call ``model`` once on the requests' inputs stacked by rows; split its outputs back.

    A model with one input is called as ``model(x)``; with several, ``model(**inputs)``. It
    returns a tensor (the output ``"output"``) or a mapping of name to tensor, each with one row
    per input row.

    Raises:
        ValueError: the requests' inputs do not stack (names, trailing shapes, dtypes), or the
            model returned a different number of rows than it was given.
        TypeError: the model returned something other than tensors.
        Exception: whatever the model raises.
    """
    names = list(requests[0].inputs)
    for r in requests:
        if list(r.inputs) != names:
            raise ValueError(f"request {r.request_id} has inputs {list(r.inputs)}, the batch has {names}")
    rows = [r.rows for r in requests]
    total = sum(rows)
    stacked = {n: torch.from_numpy(np.concatenate([r.inputs[n] for r in requests])) for n in names}
    result = model(stacked[names[0]]) if len(names) == 1 else model(**stacked)
    outputs: Mapping[str, Any] = result if isinstance(result, Mapping) else {"output": result}
    arrays = {str(k): _as_numpy(v, str(k)) for k, v in outputs.items()}
    if not arrays:
        raise ValueError("the model returned no outputs")
    for name, array in arrays.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ValueError(f"model output {name!r} has shape {array.shape}; {total} rows were given")
    out: list[dict[str, np.ndarray]] = []
    start = 0
    for n in rows:
        out.append({name: array[start : start + n] for name, array in arrays.items()})
        start += n
    return out
