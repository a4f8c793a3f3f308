"""``MsgpackCodec``: the default codec; numpy arrays travel as raw little-endian bytes.

A record is a msgpack map ``{field: value}``. Values: None, bool, int (64-bit), float, str, bytes,
lists, maps with str keys, and numpy arrays / scalars of an allowlisted dtype as extension type 1
(layout in ``infeed.codecs._ndarray``). A record batch is the map
``{"n": N, "columns": {field: column}}`` where a numeric column is one ndarray extension of shape
``(N, ...)`` and a str column is a list of N str, so decoding a batch costs one ``np.frombuffer``
per column, whatever N is. Decoded arrays are read-only views of the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from infeed.codecs import _wire
from infeed.codecs._encoding import Unsupported
from infeed.codecs._envelope import batch_from_map
from infeed.codecs.base import BytesLike
from infeed.codecs.batch import RecordBatch
from infeed.errors import DecodeError

__all__ = ["MsgpackCodec"]


class MsgpackCodec:
    """msgpack with a zero-copy numpy extension; see the module docstring for the format."""

    name = "msgpack"

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Encode one record.

        Raises:
            TypeError: ``record`` is not a mapping.
            EncodeError: naming the field whose value or dtype cannot be encoded.
        """
        if not isinstance(record, Mapping):
            raise TypeError(f"a record is a mapping of str to value, got {type(record).__qualname__}")
        try:
            return _wire.pack(record)
        except Unsupported as exc:
            raise exc.to_encode_error(self.name) from None

    def decode(self, data: BytesLike) -> dict[str, Any]:
        """Decode one record; arrays are read-only views of ``data``.

        Raises:
            DecodeError: ``data`` is not one msgpack map.
        """
        obj = _wire.unpack(data)
        if type(obj) is not dict:
            raise DecodeError(f"a msgpack record is a map, got a {type(obj).__qualname__}")
        return obj

    def encode_batch(self, batch: RecordBatch) -> bytes:
        """Encode a record batch (one array extension per numeric column).

        Raises:
            TypeError: ``batch`` is not a RecordBatch.
        """
        if not isinstance(batch, RecordBatch):
            raise TypeError(f"encode_batch() needs a RecordBatch, got {type(batch).__qualname__}")
        columns = {k: v.tolist() if v.dtype.kind == "O" else v for k, v in batch.columns.items()}
        try:
            return _wire.pack({"n": len(batch), "columns": columns})
        except Unsupported as exc:  # not expected: RecordBatch validates its columns
            raise exc.to_encode_error(self.name) from None

    def decode_batch(self, data: BytesLike) -> RecordBatch:
        """Decode a record batch; each numeric column is one read-only view of ``data``.

        Raises:
            DecodeError: ``data`` is not a valid record batch.
        """
        return batch_from_map(_wire.unpack(data), self.name)
