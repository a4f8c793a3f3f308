"""MsgpackCodec records: plain values, interop with the msgpack library, and malformed input."""

from __future__ import annotations

import datetime
import math
import struct
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infeed.codecs import MsgpackCodec, RecordBatch
from infeed.errors import DecodeError, EncodeError

SETTINGS = settings(max_examples=60, deadline=None, database=None)
CODEC = MsgpackCodec()

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
records = st.dictionaries(st.text(max_size=10), values, max_size=6)


def decode(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    return CODEC.decode(data)


@SETTINGS
@given(records)
def test_plain_values_round_trip(record: dict[str, Any]) -> None:
    assert decode(CODEC.encode(record)) == record


@SETTINGS
@given(records)
def test_reads_what_the_msgpack_library_writes_and_vice_versa(record: dict[str, Any]) -> None:
    assert decode(msgpack.packb(record)) == record
    assert msgpack.unpackb(CODEC.encode(record)) == record


@pytest.mark.parametrize(
    "n",
    [
        0,
        127,
        128,
        255,
        256,
        2**16 - 1,
        2**16,
        2**32 - 1,
        2**32,
        2**64 - 1,
        -1,
        -32,
        -33,
        -128,
        -129,
        -(2**15),
        -(2**15) - 1,
        -(2**31),
        -(2**31) - 1,
        -(2**63),
    ],
)
def test_int_boundaries_use_valid_encodings(n: int) -> None:
    payload = CODEC.encode({"n": n})
    assert decode(payload) == {"n": n}
    assert msgpack.unpackb(payload) == {"n": n}
    assert len(payload) == len(msgpack.packb({"n": n}))  # the smallest encoding, like the library


def test_strings_and_bytes_of_every_length_class() -> None:
    for n in (0, 31, 32, 255, 256, 65535, 65536):
        record = {
            "s": "x" * n,
            "b": b"y" * n,
            "l": list(range(n % 40)),
            "m": {str(i): i for i in range(n % 20)},
        }
        assert decode(CODEC.encode(record)) == record
        assert msgpack.unpackb(CODEC.encode(record)) == record


def test_nan_and_infinity_travel_in_msgpack() -> None:
    decoded = decode(CODEC.encode({"a": math.nan, "b": -math.inf}))
    assert math.isnan(decoded["a"])
    assert decoded["b"] == -math.inf


def test_tuples_and_mapping_subclasses_encode_as_lists_and_maps() -> None:
    class Sub(dict[str, int]):
        pass

    assert decode(CODEC.encode({"t": (1, 2), "m": Sub(a=1), "s": np.str_("hi")})) == {
        "t": [1, 2],
        "m": {"a": 1},
        "s": "hi",
    }


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"a": {1, 2}}, r"field 'a': values of type set"),
        ({"a": [1, {"b": object()}]}, r"field 'a\[1\]\.b': values of type object"),
        ({"when": datetime.datetime(2024, 1, 1)}, r"field 'when': values of type datetime"),
        ({"c": 1 + 2j}, r"field 'c': values of type complex"),
        ({"m": {1: "x"}}, r"field 'm': map key 1 is a int"),
        ({"big": 2**64}, r"field 'big': int 18446744073709551616 is over"),
        ({"small": -(2**63) - 1}, r"field 'small': int .* is under"),
        ({"s": "\ud800"}, r"field 's': str is not valid unicode"),
    ],
)
def test_unsupported_values_raise_encode_error_naming_the_field(record: dict[str, Any], match: str) -> None:
    with pytest.raises(EncodeError, match=match):
        CODEC.encode(record)


def test_cycles_and_deep_nesting_raise_encode_error() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(EncodeError, match="nest deeper than 64"):
        CODEC.encode({"a": cyclic})


def test_a_record_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match="mapping"):
        CODEC.encode([1, 2])  # type: ignore[arg-type]


def sample_messages() -> list[bytes]:
    x = np.arange(20, dtype=np.float32)
    batch = RecordBatch.from_records([{"x": x, "y": np.int64(i), "id": f"r{i}"} for i in range(3)])
    return [
        CODEC.encode({"x": x, "y": np.int64(3)}),
        CODEC.encode(
            {"s": "é" * 40, "b": b"\x00" * 300, "l": [1, -200, 2**40, 1.5, None, True], "m": {"k": {}}}
        ),
        CODEC.encode_batch(batch),
    ]


@pytest.mark.parametrize("message", sample_messages())
def test_every_truncation_raises_decode_error(message: bytes) -> None:
    for end in range(len(message)):
        with pytest.raises(DecodeError):
            decode(message[:end])
    with pytest.raises(DecodeError):
        CODEC.decode_batch(message[: len(message) - 1])


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_decode_to_a_record_or_raise_decode_error(data: bytes) -> None:
    try:
        assert isinstance(decode(data), dict)
    except DecodeError:
        pass


@SETTINGS
@given(st.sampled_from(sample_messages()), st.data())
def test_corrupted_bytes_decode_or_raise_decode_error(message: bytes, data: st.DataObject) -> None:
    corrupt = bytearray(message)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupt[data.draw(st.integers(0, len(corrupt) - 1))] = data.draw(st.integers(0, 255))
    for decoder in (CODEC.decode, CODEC.decode_batch):
        try:
            decoder(bytes(corrupt))
        except DecodeError:
            pass


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (msgpack.packb([1, 2]), "a msgpack record is a map, got a list"),
        (msgpack.packb(3), "got a int"),
        (msgpack.packb({"a": 1}) + b"\x00", "1 bytes follow"),
        (b"\x82\xa1a\x01\xa1a\x02", "appears twice"),
        (b"\x81\x01\x02", "map key 1"),
        (b"\x81\xa1a" + b"\x91" * 80 + b"\xc0", "nest deeper than 64"),
        (b"\x81\xa1a\xdd\xff\xff\xff\xff", "longer than the message"),
        (b"\xdf\xff\xff\xff\xff", "longer than the message"),
        (b"\x81\xa1a\xc1", "never used"),
        (b"\x81\xa1a\xa2\xff\xfe", "not valid UTF-8"),
        (b"\x81\xa1a\xdb\xff\xff\xff\xff", "runs past"),
        (b"\x81\xa1a\xc6\x00\x00\x01\x00", "runs past"),
        (msgpack.packb({"t": datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)}, datetime=True), "type -1"),
    ],
)
def test_malformed_messages_raise_decode_error(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode(data)


def test_float32_and_all_fixed_formats_from_other_writers_decode() -> None:
    data = b"\x83\xa1f" + struct.pack(">Bf", 0xCA, 1.5) + b"\xa1u" + b"\xcf" + bytes(8) + b"\xa1s\xd9\x01z"
    assert decode(data) == {"f": 1.5, "u": 0, "s": "z"}


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_decode_takes_any_bytes_like(wrap: Any) -> None:
    assert decode(wrap(CODEC.encode({"a": [1, "b"]}))) == {"a": [1, "b"]}


def test_decode_of_a_non_byte_memoryview_reads_its_bytes() -> None:
    payload = CODEC.encode({"a": 1})
    assert len(payload) == 4
    assert decode(memoryview(payload).cast("I")) == {"a": 1}
