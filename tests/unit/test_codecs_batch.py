"""RecordBatch: construction, columnar operations, and round trips through both codecs."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from infeed.codecs import DTYPE_CODES, Field, JsonCodec, MsgpackCodec, RecordBatch, Schema
from infeed.errors import DecodeError

SETTINGS = settings(max_examples=40, deadline=None, database=None)
MSGPACK = MsgpackCodec()
JSON = JsonCodec()


def sample_784(n: int) -> RecordBatch:
    rng = np.random.default_rng(n)
    records = [{"x": rng.random(784, dtype=np.float32), "y": np.int64(i % 10)} for i in range(n)]
    return RecordBatch.from_records(records)


def shares(arr: np.ndarray[Any, Any], payload: bytes) -> bool:
    return bool(np.shares_memory(arr, np.frombuffer(payload, np.uint8)))


# --- construction ----------------------------------------------------------------------------


def test_constructor_checks_every_column() -> None:
    with pytest.raises(TypeError, match="mapping"):
        RecordBatch([np.zeros(2)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="column 'a' must be a numpy array, got list"):
        RecordBatch({"a": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="column 'a' is 0-d"):
        RecordBatch({"a": np.array(1)})
    with pytest.raises(ValueError, match="column 'b' has 3 rows but column 'a' has 2"):
        RecordBatch({"a": np.zeros(2), "b": np.zeros(3)})
    with pytest.raises(ValueError, match="column 'a' has 2 rows but length= 3"):
        RecordBatch({"a": np.zeros(2)}, length=3)
    with pytest.raises(ValueError, match="column 't' has dtype datetime64"):
        RecordBatch({"t": np.array(["2024-01-01"], dtype="datetime64[D]")})
    with pytest.raises(ValueError, match="column 'c' has dtype complex128"):
        RecordBatch({"c": np.zeros(2, dtype=complex)})
    with pytest.raises(ValueError, match="column 'o' holds a int"):
        RecordBatch({"o": np.array(["a", 1], dtype=object)})
    with pytest.raises(ValueError, match="str column 's' must be 1-D"):
        RecordBatch({"s": np.array([["a"]])})
    with pytest.raises(ValueError, match="length must be an int >= 0"):
        RecordBatch({}, length=-1)
    with pytest.raises(TypeError, match="non-empty str"):
        RecordBatch({1: np.zeros(1)})  # type: ignore[dict-item]


def test_fixed_width_str_columns_become_exact_object_columns() -> None:
    batch = RecordBatch({"s": np.array(["a", "bcd"])})
    assert batch.columns["s"].dtype == object
    assert batch.record(1) == {"s": "bcd"}


def test_a_batch_without_columns_keeps_its_length() -> None:
    assert len(RecordBatch({})) == 0
    batch = RecordBatch({}, length=3)
    assert len(batch) == 3
    assert len(MSGPACK.decode_batch(MSGPACK.encode_batch(batch))) == 3


def test_from_records_stacks_and_infers_dtypes() -> None:
    batch = RecordBatch.from_records(
        [{"x": [1.0, 2.0], "y": 1, "ok": True, "id": "a"}, {"x": [3.0, 4.0], "y": 2, "ok": False, "id": "b"}]
    )
    assert len(batch) == 2
    assert batch.field_names == ("x", "y", "ok", "id")
    assert batch.columns["x"].dtype == np.float64
    assert batch.columns["x"].shape == (2, 2)
    assert batch.columns["y"].dtype == np.int64
    assert batch.columns["ok"].dtype == np.bool_
    assert list(batch.columns["id"]) == ["a", "b"]
    assert "x float64 (2,)" in repr(batch)


def test_from_records_names_what_does_not_stack() -> None:
    with pytest.raises(ValueError, match=r"record 1 has fields \['x'\], record 0 has \['x', 'y'\]"):
        RecordBatch.from_records([{"x": 1, "y": 2}, {"x": 1}])
    with pytest.raises(ValueError, match="field 'x': the records' values do not stack"):
        RecordBatch.from_records([{"x": np.zeros(2)}, {"x": np.zeros(3)}])
    with pytest.raises(ValueError, match="field 'x' mixes str"):
        RecordBatch.from_records([{"x": "a"}, {"x": 1}])
    with pytest.raises(ValueError, match="column 'm' holds a dict"):
        RecordBatch.from_records([{"m": {"a": 1}}])
    with pytest.raises(TypeError, match="record 0 is a list"):
        RecordBatch.from_records([[1]])  # type: ignore[list-item]
    assert len(RecordBatch.from_records(iter([]))) == 0


def test_from_records_with_a_schema_validates() -> None:
    schema = Schema({"x": Field("float32", (2,))})
    batch = RecordBatch.from_records(({"x": [1, 2]} for _ in range(3)), schema=schema)
    assert batch.columns["x"].dtype == np.float32
    assert batch.columns["x"].shape == (3, 2)


# --- operations ------------------------------------------------------------------------------


def test_record_slice_take_and_concat() -> None:
    batch = RecordBatch({"x": np.arange(10).reshape(5, 2), "id": np.array(list("abcde"), dtype=object)})
    rec = batch.record(-1)
    np.testing.assert_array_equal(rec["x"], [8, 9])
    assert rec["id"] == "e"
    with pytest.raises(IndexError, match="record 5 is out of range for a batch of 5"):
        batch.record(5)

    part = batch.slice(1, 3)
    assert len(part) == 2
    assert np.shares_memory(part.columns["x"], batch.columns["x"])
    assert len(batch.slice(4, 2)) == 0
    assert len(batch.slice(-2)) == 2

    taken = batch.take([4, 0])
    assert list(taken.columns["id"]) == ["e", "a"]
    assert len(batch.take([])) == 0
    with pytest.raises(IndexError):
        batch.take([5])
    with pytest.raises(TypeError):
        batch.take([0.5])  # type: ignore[list-item]

    joined = RecordBatch.concat([batch.slice(0, 2), batch.slice(2)])
    np.testing.assert_array_equal(joined.columns["x"], batch.columns["x"])
    assert list(joined.columns["id"]) == list("abcde")
    assert RecordBatch.concat([batch]) is batch
    assert len(RecordBatch.concat([])) == 0


def test_concat_names_mismatches() -> None:
    a = RecordBatch({"x": np.zeros((2, 3), dtype=np.float32)})
    with pytest.raises(ValueError, match="batch 1 has fields"):
        RecordBatch.concat([a, RecordBatch({"z": np.zeros(2)})])
    with pytest.raises(ValueError, match="column 'x' is float32 \\(3,\\) in batch 0 but float64"):
        RecordBatch.concat([a, RecordBatch({"x": np.zeros((1, 3))})])
    with pytest.raises(ValueError, match="column 'x'"):
        RecordBatch.concat([a, RecordBatch({"x": np.zeros((1, 4), dtype=np.float32)})])
    big = RecordBatch({"x": np.zeros((1, 3), dtype=">f4")})
    assert len(RecordBatch.concat([a, big])) == 3


# --- wire ------------------------------------------------------------------------------------


@st.composite
def batches(draw: st.DrawFn) -> RecordBatch:
    n = draw(st.integers(0, 5))
    columns: dict[str, np.ndarray[Any, Any]] = {}
    for i in range(draw(st.integers(0, 3))):
        dtype = np.dtype(draw(st.sampled_from(list(DTYPE_CODES))))
        rows = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3))
        columns[f"c{i}"] = draw(hnp.arrays(dtype, (n, *rows)))
    if draw(st.booleans()):
        columns["id"] = np.array(
            draw(st.lists(st.text(max_size=5), min_size=n, max_size=n)) or [], dtype=object
        )
    return RecordBatch(columns, length=n)


def assert_same(decoded: RecordBatch, batch: RecordBatch, *, exact_dtype: bool = True) -> None:
    assert len(decoded) == len(batch)
    assert decoded.field_names == batch.field_names
    for name, column in batch.columns.items():
        got = decoded.columns[name]
        if column.dtype == object:
            assert list(got) == list(column)
        elif exact_dtype:
            assert got.dtype == column.dtype
            assert got.tobytes() == column.tobytes()
        else:
            np.testing.assert_array_equal(got.astype(column.dtype), column)


@SETTINGS
@given(batches())
def test_batches_round_trip_through_msgpack_one_view_per_column(batch: RecordBatch) -> None:
    payload = MSGPACK.encode_batch(batch)
    decoded = MSGPACK.decode_batch(payload)
    assert_same(decoded, batch)
    for column in decoded.columns.values():
        if column.dtype != object and column.size:
            assert shares(column, payload)
            assert not column.flags.writeable


@SETTINGS
@given(batches())
def test_batches_round_trip_through_json(batch: RecordBatch) -> None:
    assume_finite = all(
        np.isfinite(c).all() for c in batch.columns.values() if c.dtype.kind == "f" and c.size
    )
    if not assume_finite:
        return  # NaN/inf are an EncodeError in JSON: tested in test_codecs_json
    decoded = JSON.decode_batch(JSON.encode_batch(batch))
    assert len(decoded) == len(batch)
    for name, column in batch.columns.items():
        got = decoded.columns[name]
        if column.dtype == object:
            assert list(got) == list(column)
        elif len(batch) and column.size:
            np.testing.assert_array_equal(got.astype(column.dtype), column)


def test_the_sample_784_batch_decodes_as_one_zero_copy_array_per_column() -> None:
    batch = sample_784(64)
    payload = MSGPACK.encode_batch(batch)
    decoded = MSGPACK.decode_batch(payload)
    x, y = decoded.columns["x"], decoded.columns["y"]
    assert x.shape == (64, 784)
    assert x.dtype == np.float32
    assert y.shape == (64,)
    assert shares(x, payload)
    assert shares(y, payload)
    assert x.flags.aligned
    np.testing.assert_array_equal(x, batch.columns["x"])
    assert len(payload) < 64 * 784 * 4 + 1024


def test_a_batch_payload_is_a_plain_msgpack_envelope() -> None:
    batch = RecordBatch({"y": np.arange(3), "id": np.array(["a", "b", "c"], dtype=object)})
    envelope = msgpack.unpackb(MSGPACK.encode_batch(batch), ext_hook=lambda code, data: code)
    assert envelope == {"n": 3, "columns": {"y": 1, "id": ["a", "b", "c"]}}
    assert json.loads(JSON.encode_batch(batch)) == {
        "n": 3,
        "columns": {"y": [0, 1, 2], "id": ["a", "b", "c"]},
    }


@pytest.mark.parametrize("codec", [MSGPACK, JSON], ids=["msgpack", "json"])
def test_every_truncation_of_a_batch_raises_decode_error(codec: MsgpackCodec | JsonCodec) -> None:
    batch = RecordBatch(
        {"x": np.arange(8, dtype=np.float32).reshape(4, 2), "id": np.array(list("abcd"), dtype=object)}
    )
    payload = codec.encode_batch(batch)
    for end in range(len(payload)):
        with pytest.raises(DecodeError):
            codec.decode_batch(payload[:end])


@pytest.mark.parametrize(
    ("envelope", "match"),
    [
        ([1], "a map with keys 'n' and 'columns', got list"),
        ({"n": 1}, r"got \['n'\]"),
        ({"n": 1, "columns": {}, "extra": 1}, "keys 'n' and 'columns'"),
        ({"n": -1, "columns": {}}, "'n' must be an int >= 0"),
        ({"n": True, "columns": {}}, "'n' must be an int"),
        ({"n": 1, "columns": []}, "'columns' must be a map"),
        ({"n": 2, "columns": {"a": [1, 2, 3]}}, "column 'a' has 3 rows but length= 2"),
        ({"n": 1, "columns": {"a": 5}}, "column 'a' is a int"),
        ({"n": 2, "columns": {"a": [1, "x"]}}, "column 'a' mixes types"),
        ({"n": 2, "columns": {"a": [[1], [1, 2]]}}, "column 'a' does not form one array"),
        ({"n": 1, "columns": {"a": [None]}}, "column 'a' mixes types"),
    ],
)
def test_malformed_batch_envelopes_raise_decode_error(envelope: Any, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        MSGPACK.decode_batch(msgpack.packb(envelope))
    with pytest.raises(DecodeError, match=match):
        JSON.decode_batch(json.dumps(envelope).encode())


def test_json_ints_past_64_bits_raise_decode_error() -> None:
    with pytest.raises(DecodeError, match="column 'a'"):
        JSON.decode_batch(b'{"n": 1, "columns": {"a": [1180591620717411303424]}}')
    with pytest.raises(DecodeError, match="column 'a' holds ints that no one 64-bit"):
        JSON.decode_batch(b'{"n": 2, "columns": {"a": [-1, 9223372036854775809]}}')


def test_json_uint64_columns_stay_exact() -> None:
    # numpy alone would promote [0, 2**63 + 1] to float64 and round the second value.
    batch = JSON.decode_batch(b'{"n": 2, "columns": {"a": [0, 9223372036854775809], "f": [1e300, 2.5]}}')
    assert batch.columns["a"].dtype == np.uint64
    assert batch.columns["a"][1] == 2**63 + 1
    assert batch.columns["f"].dtype == np.float64


def test_zero_d_and_scalar_columns_on_the_wire_raise_decode_error() -> None:
    for column in (np.float32(1), np.array(1.0)):
        payload = MSGPACK.encode({"n": 1, "columns": {"a": column}})
        with pytest.raises(DecodeError, match="column 'a'"):
            MSGPACK.decode_batch(payload)
