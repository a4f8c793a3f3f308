"""The ``Codec`` protocol and the message headers that name a codec and count records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from infeed.codecs.batch import RecordBatch

__all__ = ["CODEC_HEADER", "DEFAULT_CODEC", "RECORDS_HEADER", "BytesLike", "Codec"]

#: Header that carries the codec name of a message.
CODEC_HEADER = "x-infeed-codec"
#: Header present on record-batch messages only; its value is the record count.
RECORDS_HEADER = "x-infeed-records"
#: Codec assumed for a message without a codec header.
DEFAULT_CODEC = "msgpack"

#: What a decoder accepts: brokers hand out bytes, some a memoryview of a larger buffer.
BytesLike = bytes | bytearray | memoryview


@runtime_checkable
class Codec(Protocol):
    """Turns records and record batches into bytes and back.

    A record is a map from field name (str) to value. Decoders raise ``DecodeError`` (and nothing
    else) for any malformed input; encoders raise ``EncodeError`` naming the field they cannot encode.
    """

    @property
    def name(self) -> str:
        """The codec's name, as written in the ``x-infeed-codec`` header."""
        ...

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Encode one record."""
        ...

    def decode(self, data: BytesLike) -> dict[str, Any]:
        """Decode one record."""
        ...

    def encode_batch(self, batch: RecordBatch) -> bytes:
        """Encode a record batch."""
        ...

    def decode_batch(self, data: BytesLike) -> RecordBatch:
        """Decode a record batch."""
        ...
