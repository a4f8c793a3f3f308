"""Codecs: records and record batches to bytes and back.

``msgpack`` (the default) carries numpy arrays as raw little-endian bytes that decode zero-copy;
``json`` is for producers that are not infeed. The codec name travels in the ``x-infeed-codec``
header; record batches (many records per message, stored column by column) carry their count in
``x-infeed-records``. A ``Schema`` validates and casts what was decoded. Pickle is never used.
"""

from __future__ import annotations

from infeed.codecs._ndarray import DTYPE_CODES, NDARRAY_EXT
from infeed.codecs.base import CODEC_HEADER, DEFAULT_CODEC, RECORDS_HEADER, BytesLike, Codec
from infeed.codecs.batch import RecordBatch
from infeed.codecs.json import JsonCodec
from infeed.codecs.message import decode_message, encode_message
from infeed.codecs.msgpack import MsgpackCodec
from infeed.codecs.registry import CodecRegistry, default_registry
from infeed.codecs.schema import FIELD_DTYPES, Field, Schema

__all__ = [
    "CODEC_HEADER",
    "DEFAULT_CODEC",
    "DTYPE_CODES",
    "FIELD_DTYPES",
    "NDARRAY_EXT",
    "RECORDS_HEADER",
    "BytesLike",
    "Codec",
    "CodecRegistry",
    "Field",
    "JsonCodec",
    "MsgpackCodec",
    "RecordBatch",
    "Schema",
    "decode_message",
    "default_registry",
    "encode_message",
]
