"""JsonCodec: plain JSON for producers that are not infeed."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infeed.codecs import JsonCodec, RecordBatch
from infeed.errors import DecodeError, EncodeError

SETTINGS = settings(max_examples=60, deadline=None, database=None)
CODEC = JsonCodec()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
records = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


@SETTINGS
@given(records)
def test_plain_values_round_trip(record: dict[str, Any]) -> None:
    payload = CODEC.encode(record)
    assert CODEC.decode(payload) == record
    assert json.loads(payload) == record


def test_arrays_become_lists_and_numpy_scalars_numbers() -> None:
    payload = CODEC.encode(
        {
            "x": np.arange(6, dtype=np.float32).reshape(2, 3),
            "y": np.int64(3),
            "b": np.bool_(True),
            "s": np.str_("é"),
        }
    )
    assert payload == '{"x":[[0.0,1.0,2.0],[3.0,4.0,5.0]],"y":3,"b":true,"s":"é"}'.encode()
    decoded = CODEC.decode(payload)
    assert decoded["x"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert type(decoded["y"]) is int


def test_float32_values_survive_the_float64_text_form() -> None:
    x = np.random.default_rng(1).random(50, dtype=np.float32)
    back = np.asarray(CODEC.decode(CODEC.encode({"x": x}))["x"], dtype=np.float32)
    assert back.tobytes() == x.tobytes()


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"a": math.nan}, r"field 'a': nan has no JSON form"),
        ({"a": [1.0, math.inf]}, r"field 'a\[1\]': inf has no JSON form"),
        ({"x": np.array([[0.0, 1.0], [np.nan, 2.0]])}, r"field 'x': NaN or infinity at index \(1, 0\)"),
        ({"s": np.float32("-inf")}, r"field 's': NaN or infinity"),
        ({"m": {"b": b"raw"}}, r"field 'm\.b': bytes have no JSON form"),
        ({"a": {1, 2}}, r"field 'a': values of type set"),
        ({"m": {1: 2}}, r"field 'm': map key 1"),
        (
            {"t": np.array(["2024"], dtype="datetime64[Y]")},
            r"field 't': dtype datetime64\[Y\] is not allowed",
        ),
        ({"o": np.array([None], dtype=object)}, r"field 'o': dtype object is not allowed"),
        ({"m": np.ma.masked_array([1.0], mask=[True])}, r"field 'm': masked arrays are not supported"),
    ],
)
def test_values_without_a_json_form_raise_encode_error_naming_the_field(
    record: dict[str, Any], match: str
) -> None:
    with pytest.raises(EncodeError, match=match):
        CODEC.encode(record)


def test_nan_in_a_batch_names_the_column_and_index() -> None:
    batch = RecordBatch({"x": np.array([[1.0, 2.0], [3.0, np.nan]], dtype=np.float32)})
    with pytest.raises(EncodeError, match=r"field 'x': NaN or infinity at index \(1, 1\)"):
        CODEC.encode_batch(batch)


def test_cycles_and_bad_unicode_raise_encode_error() -> None:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    with pytest.raises(EncodeError, match="nest deeper"):
        CODEC.encode(cyclic)
    with pytest.raises(EncodeError, match="unicode"):
        CODEC.encode({"s": "\ud800"})
    with pytest.raises(TypeError, match="mapping"):
        CODEC.encode("text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"a": Infinity}', "Infinity is not valid JSON"),
        (b'{"a": [-Infinity]}', "-Infinity is not valid JSON"),
        (b"[1, 2]", "a JSON record is an object, got a list"),
        (b'"text"', "got a str"),
        (b'{"a": 1, "a": 2}', "same key twice"),
        (b'{"a": 1} x', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b'{"a": "\xc3"}', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid JSON"),
        (b'{"a": ' + b"1" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_malformed_json_raises_decode_error(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        CODEC.decode(data)


def test_every_truncation_raises_decode_error() -> None:
    payload = CODEC.encode({"x": [1.5, -2.0], "s": "é", "n": None, "m": {"k": [True]}})
    for end in range(len(payload)):
        with pytest.raises(DecodeError):
            CODEC.decode(payload[:end])


@SETTINGS
@given(
    st.binary(max_size=100)
    | st.text(alphabet='{}[]",:0123456789.eE-+ natrufls\\', max_size=60).map(str.encode)
)
def test_random_input_decodes_to_a_record_or_raises_decode_error(data: bytes) -> None:
    for decoder in (CODEC.decode, CODEC.decode_batch):
        try:
            decoder(data)
        except DecodeError:
            pass


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_decode_takes_any_bytes_like(wrap: Any) -> None:
    assert CODEC.decode(wrap(b'{"a": [1]}')) == {"a": [1]}
