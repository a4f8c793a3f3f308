"""The map a record batch travels as, in every codec: ``{"n": N, "columns": {name: column}}``."""

from __future__ import annotations

from typing import Any

import numpy as np

from infeed.codecs.batch import RecordBatch
from infeed.errors import DecodeError

__all__ = ["batch_from_map"]


def batch_from_map(obj: Any, codec: str) -> RecordBatch:
    """Build a batch from a decoded envelope; a column is an ndarray or a list (of str or numbers).

    Raises:
        DecodeError: the envelope or a column is malformed.
    """
    if type(obj) is not dict or obj.keys() != {"n", "columns"}:
        got = sorted(obj) if type(obj) is dict else type(obj).__qualname__
        raise DecodeError(f"a {codec} record batch is a map with keys 'n' and 'columns', got {got}")
    n, columns = obj["n"], obj["columns"]
    if type(n) is not int or n < 0:
        raise DecodeError(f"record batch 'n' must be an int >= 0, got {n!r}")
    if type(columns) is not dict:
        raise DecodeError(f"record batch 'columns' must be a map, got {type(columns).__qualname__}")
    try:
        return RecordBatch({name: _column(name, value) for name, value in columns.items()}, length=n)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"bad {codec} record batch: {exc}") from exc


def _column(name: str, value: Any) -> np.ndarray[Any, Any]:
    if isinstance(value, np.ndarray):
        return value
    if type(value) is not list:
        raise DecodeError(f"column {name!r} is a {type(value).__qualname__}; expected an array or a list")
    if value and all(type(v) is str for v in value):
        column = np.empty(len(value), dtype=object)
        column[:] = value
        return column
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged lists, ints past 64 bits
        raise DecodeError(f"column {name!r} does not form one array: {exc}") from exc
    if arr.dtype.kind not in "biuf":
        raise DecodeError(f"column {name!r} mixes types or holds values that are not numbers or str")
    if arr.dtype.kind == "f" and arr.size and np.abs(arr).max() >= 2.0**53:
        return _exact_ints(name, value, arr)
    return arr


def _exact_ints(name: str, value: list[Any], arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    # numpy promotes int64 mixed with ints past 2**63 to float64, which rounds them; keep them exact.
    items = np.array(value, dtype=object).ravel()
    if not all(type(v) is int for v in items):
        return arr  # real floats
    if min(items) >= 0 and max(items) <= 0xFFFFFFFFFFFFFFFF:
        return np.array(value, dtype=np.uint64)
    raise DecodeError(f"column {name!r} holds ints that no one 64-bit integer dtype can hold")
