"""Collation: records copied from read-only message views into fresh arrays, then into tensors.

Decoded columns are read-only views of the payload (zero-copy); ``torch.from_numpy`` refuses to
share them without a warning. So each batch is one ``memcpy`` per column and source chunk into a
preallocated, writable array, which the tensor then owns.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import torch

from infeed.codecs import Schema

__all__ = ["Columns", "to_tensors"]

_Array = np.ndarray[Any, Any]


class Columns:
    """Preallocated columns of ``capacity`` rows for a schema, filled from the front.

    Args:
        schema: field dtypes and shapes (str fields are refused: they cannot become tensors).
        capacity: rows to allocate.

    Raises:
        ValueError: the schema has a str field, or ``capacity`` is negative.
    """

    __slots__ = ("arrays", "capacity", "count")

    def __init__(self, schema: Schema, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        for name, spec in schema.fields.items():
            if spec.dtype == "str":
                raise ValueError(f"field {name!r} is a str field; only numeric fields can become tensors")
        self.capacity = capacity
        self.count = 0
        self.arrays: dict[str, _Array] = {
            name: np.empty((capacity, *spec.shape), spec.numpy_dtype) for name, spec in schema.fields.items()
        }

    @property
    def space(self) -> int:
        """Rows still free."""
        return self.capacity - self.count

    def append(
        self, columns: Mapping[str, _Array], start: int, stop: int, skip: Collection[str] = ()
    ) -> None:
        """Copy rows ``start:stop`` of ``columns`` behind the rows held.

        Fields in ``skip`` are left unset: the caller hands their rows out some other way.
        """
        n = stop - start
        if n > self.space:
            raise ValueError(f"cannot append {n} rows to columns with {self.space} free")
        end = self.count + n
        for name, array in self.arrays.items():
            if name not in skip:
                array[self.count : end] = columns[name][start:stop]
        self.count = end

    def load(self, columns: Mapping[str, _Array]) -> None:
        """Replace the rows held by ``columns`` (from a saved state).

        Raises:
            ValueError: a field is missing or extra, or the rows do not fit.
        """
        if set(columns) != set(self.arrays):
            raise ValueError(f"saved fields {sorted(columns)} differ from the schema's {sorted(self.arrays)}")
        counts = {len(c) for c in columns.values()}
        n = counts.pop() if len(counts) == 1 else -1
        if n < 0 or n > self.capacity:
            raise ValueError(f"saved columns have {sorted(counts)} rows; want one count <= {self.capacity}")
        self.count = 0
        self.append(columns, 0, n)

    def view(self) -> dict[str, _Array]:
        """The rows held (views)."""
        return {name: array[: self.count] for name, array in self.arrays.items()}


def to_tensors(columns: Mapping[str, _Array]) -> dict[str, torch.Tensor]:
    """Wrap writable, contiguous arrays as tensors without copying."""
    return {name: torch.from_numpy(array) for name, array in columns.items()}
