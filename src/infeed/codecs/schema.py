"""``Schema`` and ``Field``: what every record of a topic must look like, and the casts to get there."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from infeed.codecs._ndarray import DTYPE_CODES, MAX_NDIM
from infeed.codecs.batch import RecordBatch
from infeed.errors import SchemaError

__all__ = ["FIELD_DTYPES", "Field", "Schema"]

#: The dtypes a field may have: the wire allowlist, plus "str" (shape () only).
FIELD_DTYPES: tuple[str, ...] = (*DTYPE_CODES, "str")

# Source kinds a target kind accepts without a lossy kind change (float -> int is lossy).
_ACCEPTS = {"b": "b", "i": "biu", "u": "biu", "f": "biuf", "O": ""}
_SPEC_KEYS = frozenset({"dtype", "shape", "allow_nan"})


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a record.

    Args:
        dtype: a name from ``FIELD_DTYPES`` (``"float32"``, ``"int64"``, ``"str"``, ...).
        shape: the shape of one record's value; ``()`` for a scalar.
        allow_nan: accept NaN and infinity in a float field (otherwise they are a ``SchemaError``).

    Raises:
        ValueError: naming the bad dtype or shape.
        TypeError: ``allow_nan`` is not a bool.
    """

    dtype: str
    shape: tuple[int, ...] = ()
    allow_nan: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in FIELD_DTYPES:
            raise ValueError(f"Field dtype must be one of {', '.join(FIELD_DTYPES)}; got {self.dtype!r}")
        shape = self.shape
        if not isinstance(shape, (tuple, list)) or any(type(d) is not int or d < 0 for d in shape):
            raise ValueError(f"Field shape must be a tuple of ints >= 0, got {shape!r}")
        if len(shape) > MAX_NDIM:
            raise ValueError(f"Field shape has {len(shape)} dimensions, at most {MAX_NDIM} are allowed")
        if self.dtype == "str" and shape:
            raise ValueError(f"a str Field has shape (), got {shape!r}")
        if type(self.allow_nan) is not bool:
            raise TypeError(f"Field allow_nan must be a bool, got {self.allow_nan!r}")
        object.__setattr__(self, "shape", tuple(shape))

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The numpy dtype values are cast to (little-endian; ``object`` for str)."""
        return np.dtype(object) if self.dtype == "str" else np.dtype(self.dtype).newbyteorder("<")

    def __str__(self) -> str:
        return f"{self.dtype} {self.shape}"


class Schema:
    """Field name -> ``Field``; validates records and record batches and casts them to the field dtypes.

    A value may be a list, a Python scalar or an array of any byte order; it is cast to the field's
    dtype when that loses no kind (bool -> int -> float, never float -> int) and stays in range.
    Every failure is a ``SchemaError`` naming the field, what was expected and what came.

    Args:
        fields: field name -> Field, in column order.

    Raises:
        TypeError: a name is not a str or a value is not a Field.
        ValueError: ``fields`` is empty or a name is empty.
    """

    __slots__ = ("_fields", "_names", "_plan")

    def __init__(self, fields: Mapping[str, Field]) -> None:
        if not isinstance(fields, Mapping):
            raise TypeError(
                f"Schema fields must be a mapping of name to Field, got {type(fields).__qualname__}"
            )
        if not fields:
            raise ValueError("a Schema needs at least one field")
        for name, field in fields.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"Schema field names must be non-empty str, got {name!r}")
            if not isinstance(field, Field):
                raise TypeError(f"Schema field {name!r} must be a Field, got {type(field).__qualname__}")
        self._fields: Mapping[str, Field] = MappingProxyType(dict(fields))
        self._names = frozenset(fields)
        self._plan = [(name, field, field.numpy_dtype) for name, field in fields.items()]

    @property
    def fields(self) -> Mapping[str, Field]:
        """Field name -> Field (read-only)."""
        return self._fields

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schema) and dict(self._fields) == dict(other._fields)

    def __repr__(self) -> str:
        return f"Schema({dict(self._fields)!r})"

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]]) -> Schema:
        """Build a schema from ``{"x": {"dtype": "float32", "shape": [784]}, ...}``.

        ``shape`` defaults to ``[]`` and ``allow_nan`` to false.

        Raises:
            ValueError: naming the field whose spec is wrong.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a schema is a map of field name to spec, got {type(data).__qualname__}")
        fields = {}
        for name, spec in data.items():
            if not isinstance(spec, Mapping) or "dtype" not in spec or not _SPEC_KEYS.issuperset(spec):
                raise ValueError(
                    f"field {name!r}: expected a map with 'dtype' and optionally 'shape' and 'allow_nan', "
                    f"got {spec!r}"
                )
            shape = spec.get("shape", ())
            if not isinstance(shape, (list, tuple)):
                raise ValueError(f"field {name!r}: shape must be a list of ints, got {shape!r}")
            try:
                fields[name] = Field(spec["dtype"], tuple(shape), spec.get("allow_nan", False))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"field {name!r}: {exc}") from exc
        return cls(fields)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Schema:
        """Read a schema from a JSON file holding what :meth:`from_dict` takes.

        Raises:
            OSError: the file cannot be read.
            ValueError: naming the file, when it is not valid JSON or not a valid schema.
        """
        file = Path(path)
        try:
            return cls.from_dict(json.loads(file.read_text(encoding="utf-8")))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError included
            raise ValueError(f"schema file {file}: {exc}") from exc

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Return the JSON-safe form that :meth:`from_dict` reads back."""
        return {
            name: {"dtype": f.dtype, "shape": list(f.shape), "allow_nan": f.allow_nan}
            for name, f in self._fields.items()
        }

    def validate(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Check one record and return its values as arrays of the field dtypes and shapes.

        Values already of the right dtype and shape are returned without a copy; a str field gives
        a str, so the result encodes with every codec.

        Raises:
            SchemaError: a field is missing, unexpected, of a lossy kind, out of range, of the wrong
                shape, or NaN/infinity where not allowed.
        """
        self._check_names(record, "")
        out: dict[str, Any] = {}
        for name, f, dt in self._plan:
            value = _coerce(name, f, dt, record[name], ())
            out[name] = value[()] if f.dtype == "str" else value
        return out

    def validate_batch(self, batch: RecordBatch) -> RecordBatch:
        """Check every column of ``batch`` and return a batch cast to the field dtypes (views if already so).

        Raises:
            TypeError: ``batch`` is not a RecordBatch.
            SchemaError: as for :meth:`validate`; NaN errors name the record index.
        """
        if not isinstance(batch, RecordBatch):
            raise TypeError(f"validate_batch() needs a RecordBatch, got {type(batch).__qualname__}")
        self._check_names(batch.columns, "")
        n = len(batch)
        columns = {name: _coerce(name, f, dt, batch.columns[name], (n,)) for name, f, dt in self._plan}
        return RecordBatch(columns, length=n)

    def find_invalid(self, batch: RecordBatch) -> dict[int, str]:
        """Return ``{record index: reason}`` for each record of ``batch`` that fails validation.

        Meant for dead-lettering single bad records of a batch; empty when the batch is valid.
        """
        try:
            self.validate_batch(batch)
        except SchemaError:
            pass
        else:
            return {}
        bad = {}
        for i in range(len(batch)):
            try:
                self.validate(batch.record(i))
            except SchemaError as exc:
                bad[i] = str(exc)
        return bad

    def split(self, batch: RecordBatch) -> tuple[RecordBatch, dict[int, str]]:
        """Return the valid records of ``batch`` (validated) and ``{index: reason}`` for the others.

        Raises:
            TypeError: ``batch`` is not a RecordBatch.
        """
        if len(batch) == 0:
            return self.batch_from_records(()), {}
        try:
            return self.validate_batch(batch), {}  # the common case: one pass over the columns
        except SchemaError:
            pass
        bad = self.find_invalid(batch)
        good = [i for i in range(len(batch)) if i not in bad]
        if not good:
            return self.batch_from_records(()), bad
        return self.validate_batch(batch.take(good)), bad

    def batch_from_records(self, records: Iterable[Mapping[str, Any]]) -> RecordBatch:
        """Validate records and write them straight into preallocated columns.

        Raises:
            SchemaError: naming the record index and field, as for :meth:`validate`.
        """
        rows = records if isinstance(records, Sequence) else list(records)
        n = len(rows)
        columns = {name: np.empty((n, *f.shape), dt) for name, f, dt in self._plan}
        for i, rec in enumerate(rows):
            self._check_names(rec, f"record {i}: ")
            for name, f, dt in self._plan:
                value = rec[name]
                try:
                    if dt.kind == "O":
                        columns[name][i] = _coerce_str(name, value, ())[()]
                    elif (
                        isinstance(value, (np.ndarray, np.generic))
                        and value.dtype == dt
                        and value.shape == f.shape
                    ):
                        columns[name][i] = value  # the common case: already right, one copy into the column
                    else:
                        columns[name][i] = _coerce(name, f, dt, value, (), check_nan=False)
                except SchemaError as exc:
                    raise SchemaError(f"record {i}: {exc}") from None
        for name, f, dt in self._plan:
            if dt.kind == "f" and not f.allow_nan:
                _check_finite(name, columns[name], (n,))
        return RecordBatch(columns, length=n)

    def _check_names(self, record: Any, where: str) -> None:
        if not isinstance(record, Mapping):
            raise SchemaError(
                f"{where}expected a record (a map of field name to value), got {type(record).__qualname__}"
            )
        if record.keys() == self._names:
            return
        for name, f in self._fields.items():
            if name not in record:
                raise SchemaError(f"{where}missing field {name!r} (expected {f})")
        extra = [k for k in record if k not in self._names]
        raise SchemaError(f"{where}unexpected field {extra[0]!r}; the schema has {', '.join(self._fields)}")


def _got(arr: np.ndarray[Any, Any]) -> str:
    kind = arr.dtype.kind
    if kind == "U":
        return "str"
    if kind == "S":
        return "bytes"
    if kind == "O":
        return type(arr.flat[0]).__qualname__ if arr.size else "object"
    name: str = arr.dtype.name
    return name


def _coerce(
    name: str,
    field: Field,
    dtype: np.dtype[Any],
    value: Any,
    lead: tuple[int, ...],
    *,
    check_nan: bool = True,
) -> np.ndarray[Any, Any]:
    expected = lead + field.shape
    if lead == (0,) and isinstance(value, np.ndarray) and value.size == 0:
        return np.empty(expected, dtype)  # no rows: nothing to convert (JSON cannot say [] is (0, 784))
    if field.dtype == "str":
        return _coerce_str(name, value, lead)
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged lists
        raise SchemaError(
            f"field {name!r}: expected {field}, got a value that is not an array ({exc})"
        ) from exc
    if arr.dtype.kind not in _ACCEPTS[dtype.kind]:
        lossy = " (a lossy kind change: cast it before encoding)" if arr.dtype.kind in "biuf" else ""
        raise SchemaError(f"field {name!r}: expected {field.dtype}, got {_got(arr)}{lossy}")
    if arr.shape != expected:
        raise SchemaError(f"field {name!r}: expected shape {expected}, got {arr.shape}")
    if np.can_cast(arr.dtype, dtype, "safe"):
        out = arr.astype(dtype, copy=False)
    elif dtype.kind in "iu":
        if arr.size:
            info = np.iinfo(dtype)
            low, high = arr.min(), arr.max()
            if low < info.min or high > info.max:
                value = low if low < info.min else high
                raise SchemaError(f"field {name!r}: value {value} is out of the {dtype.name} range")
        out = arr.astype(dtype)
    else:  # to a narrower float: values past its range become inf, which is an error
        with np.errstate(over="ignore", invalid="ignore"):
            out = arr.astype(dtype)
        overflow = np.isinf(out) & np.isfinite(arr)
        if overflow.any():
            where = np.argwhere(overflow)[0]
            raise SchemaError(
                f"field {name!r}: value {arr[tuple(where)]} at index {tuple(int(i) for i in where)} "
                f"is out of the {dtype.name} range"
            )
    if check_nan and dtype.kind == "f" and not field.allow_nan:
        _check_finite(name, out, lead)
    return out


def _coerce_str(name: str, value: Any, lead: tuple[int, ...]) -> np.ndarray[Any, Any]:
    if lead:  # a RecordBatch column: object arrays there hold only str
        if isinstance(value, np.ndarray) and value.dtype.kind == "O" and value.shape == lead:
            return value
        got = (
            f"{_got(value)} {value.shape[1:]}" if isinstance(value, np.ndarray) else type(value).__qualname__
        )
        raise SchemaError(f"field {name!r}: expected a str column, got {got}")
    if not isinstance(value, str):
        raise SchemaError(f"field {name!r}: expected str, got {type(value).__qualname__}")
    out = np.empty((), dtype=object)
    out[()] = str(value)
    return out


def _check_finite(name: str, arr: np.ndarray[Any, Any], lead: tuple[int, ...]) -> None:
    if arr.size == 0 or np.isfinite(arr).all():
        return
    where = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
    prefix = f"record {where[0]}: " if lead else ""
    index = where[len(lead) :]
    raise SchemaError(
        f"{prefix}field {name!r}: {arr[where]} at index {index} (NaN and infinity are not allowed; "
        "set allow_nan=True on the Field to accept them)"
    )
