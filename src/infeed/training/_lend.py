"""Batches lent as views of the feed process's ring, and the order in which the ring gets them back.

With a feed process, records arrive in a shared ring (``_ring``). Copying a batch out of it costs
the training process a ``memcpy`` per column and batch, and puts the copy in the step's caches.
Instead, a batch that lies whole inside one chunk can be *lent*: its columns are views of the ring.
A chunk's region of the ring is released, in ring order, once its records have all been read *and*
every array lent from it has been freed (a ``weakref.finalize`` on each lent view: numpy views and
tensors made from them keep it alive). So the feed process never overwrites data someone can still
see; at worst it waits for room.

Held for long, lent batches would stop the feed: the dataset lends only while the ring held back
by lent arrays stays under a quarter of it, copies otherwise, and names the cause when a wait for
data finds more than half the ring held back (see ``QueueDataset.iter_lent``).
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

__all__ = ["Lender"]


class _Region:
    __slots__ = ("end", "lent", "read")

    def __init__(self, end: int) -> None:
        self.end = end  # the ring position just past this chunk's bytes
        self.lent = 0  # arrays lent from it and still alive
        self.read = False  # all its records have been taken


class Lender:
    """Releases ring regions in order, each once read and no longer lent.

    Args:
        release: tells the ring that everything before a position may be overwritten.
        capacity: the ring's size in bytes.
    """

    def __init__(self, release: Callable[[int], None], capacity: int) -> None:
        self.capacity = capacity
        self._release = release
        # Re-entrant: a garbage collection inside a locked section may run a finalizer here.
        self._lock = threading.RLock()
        self._regions: deque[_Region] = deque()
        self._released = 0  # ring position released so far
        self._read_end = 0  # end of the newest region read whole
        #: Batches lent so far.
        self.lent_batches = 0

    def _region(self, end: int) -> _Region:
        # Chunks are read in ring order: lends and reads concern the newest region, or a new one.
        regions = self._regions
        if not regions or regions[-1].end != end:
            regions.append(_Region(end))
        return regions[-1]

    def may_lend(self, end: int | None) -> bool:
        """Whether to lend from the chunk that ends at ``end`` (None: it is not in the ring).

        Only while lent arrays hold back at most a quarter of the ring.
        """
        return end is not None and self.held_back() <= self.capacity // 4

    def check_held_back(self) -> None:
        """Name the cause when lent arrays still referenced keep the feed from reading ahead.

        Raises:
            RuntimeError: they hold back more than half the ring (after a garbage collection).
        """
        if self.held_back() <= self.capacity // 2:
            return
        gc.collect()  # lent arrays in reference cycles come back now
        held = self.held_back()
        if held > self.capacity // 2:
            raise RuntimeError(
                f"batches handed out earlier are still referenced and hold {held:,} of the feed's "
                f"{self.capacity:,} ring bytes (prefetch_bytes), so it cannot read ahead: keep "
                "copies (tensor.clone()) of what you keep past a step"
            )

    def lend(self, end: int | None, arrays: Iterable[np.ndarray[Any, Any]]) -> None:
        """Record that ``arrays`` (one batch) are views into the region that ends at ring position ``end``."""
        if end is None:
            raise ValueError("only arrays in the ring can be lent")
        with self._lock:
            region = self._region(end)
            self.lent_batches += 1
            for array in arrays:
                region.lent += 1
                weakref.finalize(array, self._returned, region)

    def read(self, end: int) -> None:
        """Every record of the region that ends at ``end`` has been taken (lent or copied)."""
        with self._lock:
            self._region(end).read = True
            self._read_end = max(self._read_end, end)
            self._advance()

    def held_back(self) -> int:
        """Bytes of regions read whole that lent arrays still keep from the feed process."""
        with self._lock:
            return max(0, self._read_end - self._released)

    def _returned(self, region: _Region) -> None:
        with self._lock:
            region.lent -= 1
            self._advance()

    def _advance(self) -> None:
        regions = self._regions
        while regions and regions[0].read and regions[0].lent == 0:
            region = regions.popleft()
            self._released = region.end
            self._release(region.end)
