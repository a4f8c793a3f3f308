"""encode_message / decode_message, their headers, and the codec registry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

import infeed.codecs
from infeed.codecs import (
    CODEC_HEADER,
    RECORDS_HEADER,
    BytesLike,
    Codec,
    CodecRegistry,
    JsonCodec,
    MsgpackCodec,
    RecordBatch,
    decode_message,
    default_registry,
    encode_message,
)
from infeed.errors import DecodeError


def sample_batch(n: int) -> RecordBatch:
    return RecordBatch({"x": np.arange(n * 4, dtype=np.float32).reshape(n, 4), "y": np.arange(n)})


def test_a_msgpack_record_message_has_no_headers_and_decodes_as_a_batch_of_one() -> None:
    payload, headers = encode_message(MsgpackCodec(), {"x": np.ones(4, dtype=np.float32), "y": np.int64(2)})
    assert headers == {}  # msgpack is the default: no per-message header to carry
    batch = decode_message(payload, headers, default_registry())
    assert len(batch) == 1
    assert batch.columns["x"].shape == (1, 4)
    assert batch.columns["x"].dtype == np.float32
    assert batch.record(0)["y"] == 2


@pytest.mark.parametrize("codec", [MsgpackCodec(), JsonCodec()], ids=["msgpack", "json"])
def test_a_batch_message_carries_its_record_count(codec: Codec) -> None:
    payload, headers = encode_message(codec, sample_batch(5))
    named = {} if codec.name == "msgpack" else {CODEC_HEADER: codec.name}
    assert headers == {**named, RECORDS_HEADER: "5"}
    batch = decode_message(payload, headers, default_registry())
    assert len(batch) == 5
    np.testing.assert_array_equal(batch.columns["x"], sample_batch(5).columns["x"])


def test_a_message_without_a_codec_header_is_msgpack() -> None:
    payload, _ = encode_message(MsgpackCodec(), {"y": 1})
    assert decode_message(payload, {}, default_registry()).record(0) == {"y": 1}
    payload, headers = encode_message(MsgpackCodec(), sample_batch(2))
    assert len(decode_message(payload, {RECORDS_HEADER: headers[RECORDS_HEADER]}, default_registry())) == 2


def test_a_json_record_decodes_to_default_dtypes() -> None:
    payload, headers = encode_message(JsonCodec(), {"x": [1.5, 2.5], "y": 3, "id": "r1"})
    batch = decode_message(payload, headers, default_registry())
    assert batch.columns["x"].dtype == np.float64
    assert batch.columns["y"].dtype == np.int64
    assert list(batch.columns["id"]) == ["r1"]


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        (
            {CODEC_HEADER: "protobuf"},
            "unknown codec 'protobuf' in header x-infeed-codec; this registry has msgpack, json",
        ),
        ({CODEC_HEADER: "msgpack", RECORDS_HEADER: "two"}, "must be a record count, got 'two'"),
        ({CODEC_HEADER: "msgpack", RECORDS_HEADER: "-2"}, "must be a record count"),
        ({CODEC_HEADER: "msgpack", RECORDS_HEADER: "3"}, "says 3 records, the payload holds 2"),
    ],
)
def test_bad_headers_raise_decode_error(headers: dict[str, str], match: str) -> None:
    payload, _ = encode_message(MsgpackCodec(), sample_batch(2))
    with pytest.raises(DecodeError, match=match):
        decode_message(payload, headers, default_registry())


def test_a_batch_message_without_its_count_header_is_read_as_one_record() -> None:
    payload, _ = encode_message(MsgpackCodec(), sample_batch(2))
    with pytest.raises(DecodeError, match="does not fit a record batch"):
        decode_message(payload, {CODEC_HEADER: "msgpack"}, default_registry())


def test_a_record_that_is_not_columnar_raises_decode_error() -> None:
    payload, headers = encode_message(MsgpackCodec(), {"meta": {"a": 1}})
    with pytest.raises(DecodeError, match="column 'meta'"):
        decode_message(payload, headers, default_registry())


def test_garbage_payload_raises_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_message(b"\xc1", {}, default_registry())
    with pytest.raises(DecodeError):
        decode_message(b"{", {CODEC_HEADER: "json", RECORDS_HEADER: "1"}, default_registry())


def test_encode_message_needs_a_record_or_batch() -> None:
    with pytest.raises(TypeError, match="got list"):
        encode_message(MsgpackCodec(), [1, 2])  # type: ignore[arg-type]


class UpperCodec:
    """A third-party codec: JSON whose field names are upper-cased on the wire."""

    name = "upper"

    def __init__(self) -> None:
        self._json = JsonCodec()

    def encode(self, record: Mapping[str, Any]) -> bytes:
        return self._json.encode({k.upper(): v for k, v in record.items()})

    def decode(self, data: BytesLike) -> dict[str, Any]:
        return {k.lower(): v for k, v in self._json.decode(data).items()}

    def encode_batch(self, batch: RecordBatch) -> bytes:
        return self._json.encode_batch(batch)

    def decode_batch(self, data: BytesLike) -> RecordBatch:
        return self._json.decode_batch(data)


def test_registry_registers_gets_and_rejects() -> None:
    registry = CodecRegistry()
    assert registry.names == ()
    registry.register(UpperCodec())
    assert "upper" in registry
    payload, headers = encode_message(registry.get("upper"), {"a": 1})
    assert decode_message(payload, headers, registry).record(0) == {"a": 1}
    with pytest.raises(ValueError, match="'upper' is already registered"):
        registry.register(UpperCodec())
    replacement = UpperCodec()
    registry.register(replacement, replace=True)
    assert registry.get("upper") is replacement
    with pytest.raises(KeyError, match="no codec 'nope'; registered: upper"):
        registry.get("nope")
    with pytest.raises(TypeError, match="does not implement the Codec protocol"):
        registry.register(object())  # type: ignore[arg-type]
    bad = UpperCodec()
    for name in ("", "two words", "é", "\n"):
        bad.name = name
        with pytest.raises(ValueError, match="codec name"):
            registry.register(bad)
    assert "upper" in repr(registry)


def test_default_registry_is_fresh_each_time() -> None:
    first, second = default_registry(), default_registry()
    assert first.names == ("msgpack", "json")
    first.register(UpperCodec())
    assert "upper" not in second
    assert isinstance(first.get("msgpack"), Codec)
    assert isinstance(first.get("json"), Codec)


def test_public_surface() -> None:
    for name in infeed.codecs.__all__:
        assert getattr(infeed.codecs, name) is not None
    assert infeed.codecs.NDARRAY_EXT == 1
    assert infeed.codecs.DEFAULT_CODEC == "msgpack"
