"""``JsonCodec``: plain UTF-8 JSON, for producers and consumers that are not infeed.

Arrays become nested lists and numpy scalars plain numbers, so dtypes are lost: decoding gives
lists, ints and floats, and a ``Schema`` turns them back into arrays of the right dtype. NaN and
infinity have no JSON form: encoding them is an ``EncodeError`` naming the field, and the ``NaN`` /
``Infinity`` tokens some writers emit are a ``DecodeError``. bytes cannot be encoded. A record batch
is ``{"n": N, "columns": {field: nested list of N rows}}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from infeed.codecs._encoding import MAX_DEPTH, Unsupported
from infeed.codecs._envelope import batch_from_map
from infeed.codecs._ndarray import allowed_dtype
from infeed.codecs.base import BytesLike
from infeed.codecs.batch import RecordBatch
from infeed.errors import DecodeError, EncodeError

__all__ = ["JsonCodec"]


class JsonCodec:
    """Plain JSON; see the module docstring for what survives a round trip."""

    name = "json"

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Encode one record as a JSON object.

        Raises:
            TypeError: ``record`` is not a mapping.
            EncodeError: naming the field that holds NaN/inf, bytes or another unsupported value.
        """
        if not isinstance(record, Mapping):
            raise TypeError(f"a record is a mapping of str to value, got {type(record).__qualname__}")
        try:
            return _dumps(_to_json(record, 0))
        except Unsupported as exc:
            raise exc.to_encode_error(self.name) from None

    def decode(self, data: BytesLike) -> dict[str, Any]:
        """Decode one JSON object (arrays come back as lists).

        Raises:
            DecodeError: ``data`` is not one UTF-8 JSON object.
        """
        obj = _loads(data)
        if type(obj) is not dict:
            raise DecodeError(f"a JSON record is an object, got a {type(obj).__qualname__}")
        return obj

    def encode_batch(self, batch: RecordBatch) -> bytes:
        """Encode a record batch as ``{"n": N, "columns": {...}}``.

        Raises:
            TypeError: ``batch`` is not a RecordBatch.
            EncodeError: naming the column that holds NaN or infinity.
        """
        if not isinstance(batch, RecordBatch):
            raise TypeError(f"encode_batch() needs a RecordBatch, got {type(batch).__qualname__}")
        columns = {}
        try:
            for name, column in batch.columns.items():
                try:
                    columns[name] = column.tolist() if column.dtype.kind == "O" else _to_json(column, 0)
                except Unsupported as exc:
                    exc.path.append(name)
                    raise
            return _dumps({"n": len(batch), "columns": columns})
        except Unsupported as exc:
            raise exc.to_encode_error(self.name) from None

    def decode_batch(self, data: BytesLike) -> RecordBatch:
        """Decode a record batch; list columns become float64/int64/bool arrays or str columns.

        Raises:
            DecodeError: ``data`` is not a valid JSON record batch.
        """
        return batch_from_map(_loads(data), self.name)


def _dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EncodeError(f"json cannot encode a str that is not valid unicode: {exc.reason}") from exc


def _reject_constant(token: str) -> Any:
    raise DecodeError(f"{token} is not valid JSON (infeed does not accept NaN or infinity)")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise DecodeError("a JSON object has the same key twice")
    return out


def _loads(data: BytesLike) -> Any:
    raw = data if isinstance(data, (bytes, bytearray)) else bytes(data)
    try:
        return json.loads(raw, parse_constant=_reject_constant, object_pairs_hook=_unique)
    except DecodeError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DecodeError(f"not valid JSON: {exc}") from exc


def _to_json(value: Any, depth: int) -> Any:
    t = type(value)
    if t is str or t is int or t is bool or value is None:
        return value
    if t is float:
        return _finite(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise Unsupported("bytes have no JSON form (use the msgpack codec, or base64 them into a str)")
    if isinstance(value, (np.ndarray, np.generic)):
        if isinstance(value, np.ma.MaskedArray):
            raise Unsupported("masked arrays are not supported; fill them first (arr.filled(value))")
        arr = np.asarray(value)
        if allowed_dtype(arr.dtype) is None:
            raise Unsupported(f"dtype {arr.dtype} is not allowed")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
            raise Unsupported(f"NaN or infinity at index {where} has no JSON form")
        return arr.tolist()
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _finite(float(value))
    if isinstance(value, (Mapping, list, tuple)):
        if depth >= MAX_DEPTH:
            raise Unsupported(f"maps and lists nest deeper than {MAX_DEPTH} levels (a cycle?)")
        return _map(value, depth) if isinstance(value, Mapping) else _list(value, depth)
    raise Unsupported(f"values of type {t.__qualname__} are not supported")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise Unsupported(f"{value} has no JSON form")
    return value


def _map(value: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise Unsupported(f"map key {key!r} is a {type(key).__qualname__}; keys must be str")
        try:
            out[key] = _to_json(item, depth + 1)
        except Unsupported as exc:
            exc.path.append(key)
            raise
    return out


def _list(value: list[Any] | tuple[Any, ...], depth: int) -> list[Any]:
    out = []
    for i, item in enumerate(value):
        try:
            out.append(_to_json(item, depth + 1))
        except Unsupported as exc:
            exc.path.append(i)
            raise
    return out
