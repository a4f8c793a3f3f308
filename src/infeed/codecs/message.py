"""Encode a record or record batch into a message (payload + headers) and decode it back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from infeed.codecs.base import CODEC_HEADER, DEFAULT_CODEC, RECORDS_HEADER, BytesLike, Codec
from infeed.codecs.batch import RecordBatch
from infeed.codecs.registry import CodecRegistry
from infeed.errors import DecodeError

__all__ = ["decode_message", "encode_message"]


def encode_message(
    codec: Codec, record_or_batch: Mapping[str, Any] | RecordBatch
) -> tuple[bytes, dict[str, str]]:
    """Encode one record or a record batch; return the payload and the headers to publish with it.

    The headers name the codec (except the default, msgpack); a batch also gets
    ``x-infeed-records`` (its record count).

    Raises:
        TypeError: ``record_or_batch`` is neither a mapping nor a RecordBatch.
        EncodeError: naming the field that cannot be encoded.
    """
    # The default codec goes unnamed: a header costs every backend per-message work (measured in
    # the broker benchmark), and a message without one decodes as msgpack.
    headers = {} if codec.name == DEFAULT_CODEC else {CODEC_HEADER: codec.name}
    if isinstance(record_or_batch, RecordBatch):
        payload = codec.encode_batch(record_or_batch)
        headers[RECORDS_HEADER] = str(len(record_or_batch))
        return payload, headers
    if isinstance(record_or_batch, Mapping):
        return codec.encode(record_or_batch), headers
    raise TypeError(f"expected a record (mapping) or RecordBatch, got {type(record_or_batch).__qualname__}")


def decode_message(payload: BytesLike, headers: Mapping[str, str], registry: CodecRegistry) -> RecordBatch:
    """Decode a message into a batch; a single-record message is a batch of one.

    The codec is the one the ``x-infeed-codec`` header names (msgpack when absent). A single record's
    values must be columnar (numbers, arrays of an allowlisted dtype, or str).

    Raises:
        DecodeError: unknown codec, a record count header that is not a count or does not match,
            or a payload the codec cannot decode.
    """
    name = headers.get(CODEC_HEADER, DEFAULT_CODEC)
    if name not in registry:
        raise DecodeError(
            f"unknown codec {name!r} in header {CODEC_HEADER}; this registry has {', '.join(registry.names)}"
        )
    codec = registry.get(name)
    count = headers.get(RECORDS_HEADER)
    if count is not None:
        if not (count.isascii() and count.isdigit()):
            raise DecodeError(f"header {RECORDS_HEADER} must be a record count, got {count!r}")
        batch = codec.decode_batch(payload)
        if len(batch) != int(count):
            raise DecodeError(f"header {RECORDS_HEADER} says {count} records, the payload holds {len(batch)}")
        return batch
    record = codec.decode(payload)
    try:
        return RecordBatch.from_records([record])
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{name} record does not fit a record batch: {exc}") from exc
