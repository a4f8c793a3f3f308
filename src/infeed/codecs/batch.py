"""``RecordBatch``: many records stored column by column, the way training data should travel."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from infeed.codecs._ndarray import DTYPE_CODES, allowed_dtype

if TYPE_CHECKING:
    from infeed.codecs.schema import Schema

__all__ = ["RecordBatch"]

_KINDS = ", ".join(DTYPE_CODES)


class RecordBatch:
    """Records stored as columns: one numpy array per field, each with the same leading length.

    A column is either

    * a numeric column: an ndarray (ndim >= 1) of an allowlisted dtype (bool, int8..int64,
      uint8..uint64, float16, float32, float64); row ``i`` is ``column[i]``; or
    * a str column: a 1-D ``object`` ndarray whose items are all ``str`` (a ``<U`` array is
      accepted and converted, because numpy's fixed-width strings drop trailing NUL characters).
      On the wire it is a list of str.

    Decoded batches hold read-only arrays that view the message (zero-copy); ``slice`` returns views.

    Args:
        columns: field name -> column.
        length: the number of records; needed only for a batch without columns.

    Raises:
        TypeError: a name is not a str or a column is not an ndarray.
        ValueError: naming the column whose dtype, dimensions or length is wrong.
    """

    __slots__ = ("_columns", "_length")

    def __init__(self, columns: Mapping[str, np.ndarray[Any, Any]], *, length: int | None = None) -> None:
        if not isinstance(columns, Mapping):
            raise TypeError(f"RecordBatch columns must be a mapping, got {type(columns).__qualname__}")
        if length is not None and (type(length) is not int or length < 0):
            raise ValueError(f"RecordBatch length must be an int >= 0, got {length!r}")
        checked: dict[str, np.ndarray[Any, Any]] = {}
        first = ""
        for name, column in columns.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"RecordBatch column names must be non-empty str, got {name!r}")
            column = checked[name] = _check_column(name, column)
            if length is None:
                length, first = len(column), name
            elif len(column) != length:
                source = f"column {first!r} has" if first else "length="
                raise ValueError(
                    f"column {name!r} has {len(column)} rows but {source} {length}; "
                    "every column needs one row per record"
                )
        self._columns: Mapping[str, np.ndarray[Any, Any]] = MappingProxyType(checked)
        self._length = length or 0

    @property
    def columns(self) -> Mapping[str, np.ndarray[Any, Any]]:
        """Field name -> column (read-only mapping)."""
        return self._columns

    @property
    def field_names(self) -> tuple[str, ...]:
        """The field names, in column order."""
        return tuple(self._columns)

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        cols = ", ".join(f"{k} {_describe(v)}" for k, v in self._columns.items())
        return f"RecordBatch({self._length} records: {cols})"

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], schema: Schema | None = None) -> RecordBatch:
        """Stack records into columns.

        Without a schema, each field's values are stacked with numpy (Python ints become int64,
        floats float64); all str values make a str column. With a schema this is
        ``schema.batch_from_records(records)``, which also validates and casts.

        Args:
            records: maps with the same field names.
            schema: optional schema to validate against.

        Returns:
            The batch; a batch of no records has no columns.

        Raises:
            ValueError: records disagree on their fields, or a field's values do not stack.
            TypeError: a record is not a mapping.
            SchemaError: with a schema, a record does not match it.
        """
        if schema is not None:
            return schema.batch_from_records(records)
        rows = records if isinstance(records, Sequence) else list(records)
        if not rows:
            return cls({})
        names: Iterable[str] = ()
        for i, rec in enumerate(rows):
            if not isinstance(rec, Mapping):
                raise TypeError(f"record {i} is a {type(rec).__qualname__}, not a mapping")
            if i == 0:
                names = rec.keys()
            elif rec.keys() != names:
                raise ValueError(f"record {i} has fields {sorted(rec)}, record 0 has {sorted(names)}")
        return cls({name: _stack(name, [rec[name] for rec in rows]) for name in names}, length=len(rows))

    def record(self, i: int) -> dict[str, Any]:
        """Return record ``i`` (negative counts from the end).

        Numeric 1-D columns give numpy scalars, others a (read-only when decoded) view of the row.

        Raises:
            IndexError: ``i`` is out of range.
        """
        if not -self._length <= i < self._length:
            raise IndexError(f"record {i} is out of range for a batch of {self._length}")
        return {name: column[i] for name, column in self._columns.items()}

    def slice(self, start: int, stop: int | None = None) -> RecordBatch:
        """Return records ``start:stop`` (Python slice rules) as a batch of views, without copying."""
        begin, end, _ = builtins.slice(start, stop).indices(self._length)
        end = max(begin, end)
        return RecordBatch({k: v[begin:end] for k, v in self._columns.items()}, length=end - begin)

    def take(self, indices: Sequence[int] | np.ndarray[Any, Any]) -> RecordBatch:
        """Return the records at ``indices``, in that order (a copy).

        Raises:
            TypeError: ``indices`` are not integers.
            IndexError: an index is out of range.
        """
        idx = np.asarray(indices)
        if idx.size == 0:
            idx = idx.astype(np.intp)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise TypeError(f"take() needs a 1-D sequence of ints, got dtype {idx.dtype} ndim {idx.ndim}")
        if idx.size and (idx.max() >= self._length or idx.min() < -self._length):
            raise IndexError(f"take() index out of range for a batch of {self._length}")
        return RecordBatch({k: v[idx] for k, v in self._columns.items()}, length=len(idx))

    @classmethod
    def concat(cls, batches: Iterable[RecordBatch]) -> RecordBatch:
        """Join batches end to end (a copy; a single batch is returned as is).

        Raises:
            ValueError: the batches have different fields, or a column's dtype or row shape differs.
        """
        parts = list(batches)
        if not parts:
            return cls({})
        if len(parts) == 1:
            return parts[0]
        names = parts[0].field_names
        for j, part in enumerate(parts[1:], 1):
            if set(part.field_names) != set(names):
                raise ValueError(
                    f"batch {j} has fields {sorted(part.field_names)}, batch 0 has {sorted(names)}"
                )
        columns = {}
        for name in names:
            cols = [part.columns[name] for part in parts]
            for col in cols[1:]:
                if not _same_dtype(col.dtype, cols[0].dtype) or col.shape[1:] != cols[0].shape[1:]:
                    raise ValueError(
                        f"column {name!r} is {_describe(cols[0])} in batch 0 but {_describe(col)} in another"
                    )
            columns[name] = np.concatenate(cols)
        return cls(columns, length=sum(len(part) for part in parts))


def _describe(column: np.ndarray[Any, Any]) -> str:
    dtype = "str" if column.dtype.kind == "O" else column.dtype.name
    return f"{dtype} {column.shape[1:]}"


def _same_dtype(a: np.dtype[Any], b: np.dtype[Any]) -> bool:
    return a == b or (a.kind != "O" and a.newbyteorder("<") == b.newbyteorder("<"))


def _check_column(name: str, column: Any) -> np.ndarray[Any, Any]:
    if not isinstance(column, np.ndarray):
        raise TypeError(f"column {name!r} must be a numpy array, got {type(column).__qualname__}")
    if column.ndim == 0:
        raise ValueError(f"column {name!r} is 0-d; a column has one row per record (shape (N, ...))")
    kind = column.dtype.kind
    if kind in "UO":
        if column.ndim != 1:
            raise ValueError(f"str column {name!r} must be 1-D, got shape {column.shape}")
        if kind == "U":
            return column.astype(object)
        for item in column:
            if not isinstance(item, str):
                raise ValueError(
                    f"column {name!r} holds a {type(item).__qualname__}; an object column may only hold str"
                )
        return column
    if allowed_dtype(column.dtype) is None:
        raise ValueError(f"column {name!r} has dtype {column.dtype}; allowed: {_KINDS}, or str")
    return column


def _stack(name: str, values: list[Any]) -> np.ndarray[Any, Any]:
    if len(values) == 1 and isinstance(values[0], (np.ndarray, np.generic)):
        return np.asarray(values[0])[np.newaxis]  # a batch of one (a single-record message): a view
    strs = sum(isinstance(v, str) for v in values)
    if strs == len(values):
        column = np.empty(len(values), dtype=object)
        column[:] = values
        return column
    if strs:
        raise ValueError(f"field {name!r} mixes str and other values across records")
    try:
        if all(isinstance(v, (np.ndarray, np.generic)) for v in values):
            return np.stack(values)
        return np.asarray(values)
    except ValueError as exc:
        raise ValueError(f"field {name!r}: the records' values do not stack into one array ({exc})") from exc
