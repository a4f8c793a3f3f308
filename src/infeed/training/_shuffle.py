"""A seeded shuffle buffer that emits a whole batch at a time, with O(batch) copying.

The buffer holds up to ``size + batch_size`` records. Once full it emits ``batch_size`` of them,
chosen by the generator without replacement; the holes this leaves in the front are filled with
the unchosen records of the tail, so no more than one batch is moved per batch emitted. The
buffer's records and the generator's state are part of the dataset's checkpoint, so a resumed run
emits the same batches as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from infeed.codecs import Schema
from infeed.training._collate import Columns

__all__ = ["ShuffleBuffer"]

_Array = np.ndarray[Any, Any]


class ShuffleBuffer:
    """Records waiting to be drawn at random.

    Args:
        schema: the records' fields.
        size: records held back beyond one batch (the mixing window).
        batch_size: records emitted per draw.
        rng: the generator that draws (its state is saved with the buffer).
    """

    def __init__(self, schema: Schema, size: int, batch_size: int, rng: np.random.Generator) -> None:
        if size <= 0:
            raise ValueError(f"shuffle buffer size must be > 0, got {size}")
        self.columns = Columns(schema, size + batch_size)
        self.batch_size = batch_size
        self.rng = rng

    @property
    def full(self) -> bool:
        """Whether a draw may happen (the window is full)."""
        return self.columns.space == 0

    def __len__(self) -> int:
        return self.columns.count

    def draw(self, k: int) -> dict[str, _Array]:
        """Remove ``min(k, len(self))`` records chosen at random and return them as new arrays."""
        count = self.columns.count
        k = min(k, count)
        chosen = self.rng.choice(count, size=k, replace=False)
        out = {name: array[chosen] for name, array in self.columns.arrays.items()}
        tail = count - k
        mask = np.zeros(count, dtype=bool)
        mask[chosen] = True
        holes = np.flatnonzero(mask[:tail])
        movers = tail + np.flatnonzero(~mask[tail:])
        if len(holes):
            for array in self.columns.arrays.values():
                array[holes] = array[movers]
        self.columns.count = tail
        return out
