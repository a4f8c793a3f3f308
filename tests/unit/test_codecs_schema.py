"""Schema and Field: validation, casts, and errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from infeed.codecs import FIELD_DTYPES, Field, JsonCodec, RecordBatch, Schema
from infeed.codecs.msgpack import MsgpackCodec
from infeed.errors import DecodeError, SchemaError

SETTINGS = settings(max_examples=40, deadline=None, database=None)
SAMPLE = Schema.from_dict({"x": {"dtype": "float32", "shape": [784]}, "y": {"dtype": "int64", "shape": []}})


def sample(i: int = 0) -> dict[str, Any]:
    return {"x": np.full(784, i, dtype=np.float32), "y": np.int64(i)}


# --- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dtype": "float128"}, ValueError, "Field dtype must be one of .*got 'float128'"),
        ({"dtype": "object"}, ValueError, "got 'object'"),
        (
            {"dtype": "float32", "shape": (-1,)},
            ValueError,
            r"shape must be a tuple of ints >= 0, got \(-1,\)",
        ),
        ({"dtype": "float32", "shape": (2.0,)}, ValueError, "shape must be a tuple of ints"),
        ({"dtype": "float32", "shape": "784"}, ValueError, "shape must be a tuple"),
        ({"dtype": "float32", "shape": (1,) * 33}, ValueError, "33 dimensions"),
        ({"dtype": "str", "shape": (2,)}, ValueError, "a str Field has shape"),
        ({"dtype": "float32", "allow_nan": 1}, TypeError, "allow_nan must be a bool"),
    ],
)
def test_field_rejects_bad_values_naming_them(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Field(**kwargs)


def test_field_properties() -> None:
    assert Field("float32", [784]).shape == (784,)  # type: ignore[arg-type]
    assert Field("float32").numpy_dtype == np.dtype("<f4")
    assert Field("str").numpy_dtype == np.dtype(object)
    assert str(Field("int64", (2, 3))) == "int64 (2, 3)"
    assert set(FIELD_DTYPES) >= {"bool", "uint64", "float16", "str"}


def test_schema_constructor_checks() -> None:
    with pytest.raises(ValueError, match="at least one field"):
        Schema({})
    with pytest.raises(TypeError, match="field 'x' must be a Field, got dict"):
        Schema({"x": {"dtype": "float32"}})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-empty str"):
        Schema({"": Field("int8")})
    with pytest.raises(TypeError, match="mapping"):
        Schema([Field("int8")])  # type: ignore[arg-type]


def test_from_dict_to_dict_and_load_round_trip(tmp_path: Path) -> None:
    spec: dict[str, dict[str, Any]] = {
        "x": {"dtype": "float32", "shape": [784], "allow_nan": True},
        "y": {"dtype": "int64", "shape": []},
    }
    schema = Schema.from_dict(spec)
    assert schema.fields["x"] == Field("float32", (784,), allow_nan=True)
    assert Schema.from_dict(schema.to_dict()) == schema
    assert schema.to_dict()["y"] == {"dtype": "int64", "shape": [], "allow_nan": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(spec))
    assert Schema.load(path) == schema
    assert Schema.load(str(path)) == schema
    assert schema != SAMPLE
    assert "float32" in repr(schema)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"x": {"shape": [1]}}, "field 'x': expected a map with 'dtype'"),
        ({"x": {"dtype": "float32", "shap": [1]}}, "field 'x': expected a map"),
        ({"x": "float32"}, "field 'x': expected a map"),
        ({"x": {"dtype": "float32", "shape": 3}}, "field 'x': shape must be a list"),
        ({"x": {"dtype": "complex64"}}, "field 'x': Field dtype must be one of"),
        ({"x": {"dtype": "float32", "allow_nan": "yes"}}, "field 'x': Field allow_nan"),
    ],
)
def test_from_dict_errors_name_the_field(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Schema.from_dict(spec)


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"schema file .*bad\.json: Expecting"):
        Schema.load(path)
    path.write_text('{"x": {"dtype": "nope"}}')
    with pytest.raises(ValueError, match=r"bad\.json: field 'x'"):
        Schema.load(path)
    with pytest.raises(OSError):
        Schema.load(tmp_path / "missing.json")


# --- validate one record ---------------------------------------------------------------------


def test_validate_converts_lists_and_scalars() -> None:
    out = SAMPLE.validate({"x": [0.5] * 784, "y": 3})
    assert out["x"].dtype == np.float32
    assert out["x"].shape == (784,)
    assert out["y"].dtype == np.int64
    assert out["y"].shape == ()
    assert out["y"] == 3


def test_validate_keeps_arrays_that_already_match_without_copying() -> None:
    record = sample(1)
    assert np.shares_memory(SAMPLE.validate(record)["x"], record["x"])


def test_validate_casts_big_endian_and_safe_kinds() -> None:
    schema = Schema({"f": Field("float32", (2,)), "i": Field("int16", (2,)), "u": Field("uint8")})
    out = schema.validate({"f": np.array([1, 2], dtype=">i8"), "i": np.array([True, False]), "u": 255})
    assert out["f"].dtype == np.dtype("<f4")
    assert out["i"].tolist() == [1, 0]
    assert out["u"].dtype == np.uint8


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"x": [0.0] * 784, "y": 1.5}, r"field 'y': expected int64, got float64 \(a lossy kind change"),
        ({"x": [0] * 784, "y": "1"}, r"field 'y': expected int64, got str$"),
        ({"x": [0.0] * 783, "y": 1}, r"field 'x': expected shape \(784,\), got \(783,\)"),
        ({"x": [[0.0]] * 784, "y": 1}, r"field 'x': expected shape \(784,\), got \(784, 1\)"),
        ({"x": [0.0] * 784}, r"missing field 'y' \(expected int64 \(\)\)"),
        ({"x": [0.0] * 784, "y": 1, "z": 2}, r"unexpected field 'z'; the schema has x, y"),
        ({"x": [0.0] * 783 + [float("nan")], "y": 1}, r"field 'x': nan at index \(783,\) \(NaN and infinity"),
        ({"x": [float("inf")] + [0.0] * 783, "y": 1}, r"field 'x': inf at index \(0,\)"),
        (
            {"x": [[0.0], [1.0, 2.0]], "y": 1},
            r"field 'x': expected float32 \(784,\), got a value that is not",
        ),
        ({"x": {"a": 1}, "y": 1}, r"field 'x': expected float32, got dict"),
        ({"x": [0.0] * 784, "y": 2**64}, r"field 'y': expected int64, got int"),
        (
            {"x": [0.0] * 784, "y": np.uint64(2**63)},
            r"field 'y': value 9223372036854775808 is out of the int64",
        ),
    ],
)
def test_validate_errors_name_field_expected_and_got(record: dict[str, Any], match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        SAMPLE.validate(record)


def test_schema_error_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        SAMPLE.validate([])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        (Field("int8"), 128, "value 128 is out of the int8 range"),
        (Field("uint16", (2,)), [1, -1], "value -1 is out of the uint16 range"),
        (Field("float16"), 1e5, r"value 100000.0 at index \(\) is out of the float16 range"),
        (
            Field("float16", (2,), allow_nan=True),
            [1.0, 1e300],
            r"value 1e\+300 at index \(1,\) is out of the float16",
        ),
        (Field("float32"), np.int64(2**62), None),
        (Field("bool"), 1, "expected bool, got int64"),
        (Field("int64"), np.float32(1.0), "expected int64, got float32"),
        (Field("str"), 1, "expected str, got int"),
    ],
)
def test_range_and_kind_checks(field: Field, value: Any, match: str | None) -> None:
    schema = Schema({"v": field})
    if match is None:
        assert schema.validate({"v": value})["v"].dtype == field.numpy_dtype
        return
    with pytest.raises(SchemaError, match=f"field 'v': {match}"):
        schema.validate({"v": value})


def test_allow_nan_accepts_nan_and_infinity() -> None:
    schema = Schema({"v": Field("float64", (3,), allow_nan=True)})
    out = schema.validate({"v": [np.nan, np.inf, -np.inf]})["v"]
    assert np.isnan(out[0])


def test_str_fields() -> None:
    schema = Schema({"id": Field("str"), "y": Field("int8")})
    out = schema.validate({"id": "abc", "y": 1})
    assert out["id"] == "abc"
    assert MsgpackCodec().decode(MsgpackCodec().encode(out))["id"] == "abc"
    batch = schema.batch_from_records([{"id": "a", "y": 1}, {"id": "b", "y": 2}])
    assert list(batch.columns["id"]) == ["a", "b"]
    assert schema.validate_batch(batch).columns["id"] is batch.columns["id"]
    with pytest.raises(SchemaError, match="field 'id': expected a str column, got int8"):
        schema.validate_batch(RecordBatch({"id": np.zeros(2, np.int8), "y": np.zeros(2, np.int8)}))
    with pytest.raises(SchemaError, match="record 1: field 'id': expected str, got int"):
        schema.batch_from_records([{"id": "a", "y": 1}, {"id": 5, "y": 2}])


# --- batches ---------------------------------------------------------------------------------


def test_validate_batch_casts_json_columns_and_keeps_matching_ones() -> None:
    json_codec = JsonCodec()
    batch = RecordBatch.from_records([sample(i) for i in range(4)])
    decoded = json_codec.decode_batch(json_codec.encode_batch(batch))
    assert decoded.columns["x"].dtype == np.float64
    valid = SAMPLE.validate_batch(decoded)
    assert valid.columns["x"].dtype == np.float32
    np.testing.assert_array_equal(valid.columns["x"], batch.columns["x"])
    assert SAMPLE.validate_batch(batch).columns["x"] is batch.columns["x"]
    with pytest.raises(TypeError, match="RecordBatch"):
        SAMPLE.validate_batch({"x": 1})  # type: ignore[arg-type]


def test_an_empty_json_batch_gets_the_schema_shapes() -> None:
    empty = JsonCodec().decode_batch(b'{"n": 0, "columns": {"x": [], "y": []}}')
    valid = SAMPLE.validate_batch(empty)
    assert valid.columns["x"].shape == (0, 784)
    assert valid.columns["x"].dtype == np.float32


def test_batch_errors_name_the_field_and_record() -> None:
    batch = RecordBatch.from_records([sample(i) for i in range(4)])
    x = batch.columns["x"].copy()
    x[2, 5] = np.nan
    with pytest.raises(SchemaError, match=r"record 2: field 'x': nan at index \(5,\)"):
        SAMPLE.validate_batch(RecordBatch({"x": x, "y": batch.columns["y"]}))
    with pytest.raises(SchemaError, match=r"field 'y': expected int64, got float64"):
        SAMPLE.validate_batch(RecordBatch({"x": batch.columns["x"], "y": np.zeros(4)}))
    with pytest.raises(SchemaError, match=r"field 'x': expected shape \(4, 784\), got \(4, 783\)"):
        SAMPLE.validate_batch(RecordBatch({"x": x[:, 1:], "y": batch.columns["y"]}))
    with pytest.raises(SchemaError, match="missing field 'y'"):
        SAMPLE.validate_batch(RecordBatch({"x": x}))


def test_find_invalid_and_split_single_out_bad_records() -> None:
    records = [sample(i) for i in range(6)]
    records[1]["x"] = records[1]["x"].copy()
    records[1]["x"][0] = np.inf
    records[4]["y"] = np.int64(2**40)
    schema = Schema({"x": Field("float32", (784,)), "y": Field("int32")})
    batch = RecordBatch.from_records(records)
    bad = schema.find_invalid(batch)
    assert set(bad) == {1, 4}
    assert "field 'x': inf at index (0,)" in bad[1]
    assert "field 'y': value 1099511627776 is out of the int32 range" in bad[4]

    good, reasons = schema.split(batch)
    assert reasons == bad
    assert len(good) == 4
    assert good.columns["y"].tolist() == [0, 2, 3, 5]
    assert good.columns["y"].dtype == np.int32

    assert schema.find_invalid(batch.take([0, 2])) == {}
    assert len(schema.split(batch.take([0, 2]))[0]) == 2
    everything_bad = schema.split(batch.take([1, 4]))
    assert len(everything_bad[0]) == 0
    assert everything_bad[0].columns["x"].shape == (0, 784)
    wrong = RecordBatch({"x": batch.columns["x"]})
    assert set(schema.find_invalid(wrong)) == set(range(6))
    assert len(schema.split(RecordBatch({}))[0]) == 0


def test_batch_from_records_errors_name_the_record() -> None:
    records = [sample(i) for i in range(3)]
    with pytest.raises(SchemaError, match=r"record 1: missing field 'y'"):
        SAMPLE.batch_from_records([records[0], {"x": records[1]["x"]}])
    with pytest.raises(SchemaError, match=r"record 2: field 'y': expected int64, got float64"):
        SAMPLE.batch_from_records([*records[:2], {"x": records[2]["x"], "y": 2.5}])
    nan = {"x": np.full(784, np.nan, dtype=np.float32), "y": 1}
    with pytest.raises(SchemaError, match=r"record 3: field 'x': nan at index \(0,\)"):
        SAMPLE.batch_from_records([*records, nan])
    with pytest.raises(SchemaError, match=r"record 0: expected a record"):
        SAMPLE.batch_from_records([[1, 2]])  # type: ignore[list-item]


@st.composite
def schema_and_records(draw: st.DrawFn) -> tuple[Schema, list[dict[str, Any]]]:
    fields = {}
    for i in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from([d for d in FIELD_DTYPES if d != "str"]))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3))
        fields[f"f{i}"] = Field(dtype, shape)
    schema = Schema(fields)
    n = draw(st.integers(0, 4))
    elements = {"allow_nan": False, "allow_infinity": False}
    records = [
        {
            name: draw(
                hnp.arrays(f.numpy_dtype, f.shape, elements=elements if f.dtype.startswith("float") else None)
            )
            for name, f in fields.items()
        }
        for _ in range(n)
    ]
    return schema, records


@SETTINGS
@given(schema_and_records())
def test_batch_from_records_matches_stacking_then_validating(
    case: tuple[Schema, list[dict[str, Any]]],
) -> None:
    schema, records = case
    fast = schema.batch_from_records(records)
    assert len(fast) == len(records)
    if records:
        slow = schema.validate_batch(RecordBatch.from_records(records))
        for name in schema.fields:
            assert fast.columns[name].dtype == slow.columns[name].dtype
            assert fast.columns[name].tobytes() == slow.columns[name].tobytes()
    assert schema.find_invalid(fast) == {}
