"""Input readers of ``infeed produce``: records, their FILE:LINE, and what counts as bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from infeed.cli.readers import InputError, Row, detect_format, infer_schema, read_rows
from infeed.codecs import Field, Schema


def rows(path: Path, fmt: str, schema: Schema | None = None, field: str = "x") -> list[Row]:
    return list(read_rows(str(path), fmt, schema=schema, field=field))


# -- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.jsonl", "jsonl"),
        ("a.NDJSON", "jsonl"),
        ("a.csv", "csv"),
        ("a.npy", "npy"),
        ("a.npz", "npz"),
        ("-", "jsonl"),
    ],
)
def test_format_from_suffix(name: str, fmt: str) -> None:
    assert detect_format(name) == fmt


def test_explicit_format_wins_and_unknown_suffix_is_named() -> None:
    assert detect_format("data.txt", "csv") == "csv"
    with pytest.raises(ValueError, match=r"data\.txt.*--format"):
        detect_format("data.txt")
    with pytest.raises(ValueError, match="standard input is read as JSON lines"):
        detect_format("-", "csv")
    with pytest.raises(ValueError, match="unknown input format"):
        detect_format("a.csv", "xml")


# -- JSON lines ----------------------------------------------------------------------------------


def test_jsonl_records_keep_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2, "v": [1.5, 2]}\n')
    got = rows(path, "jsonl")
    assert [(r.line, r.record, r.error) for r in got] == [
        (1, {"a": 1}, None),
        (3, {"a": 2, "v": [1.5, 2]}, None),
    ]
    assert got[1].where == f"{path}:3"


def test_jsonl_bad_lines_are_rows_with_reasons(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": \n[1, 2]\n\xff\xfe\n"text"\n{"a": 3}\n')
    got = rows(path, "jsonl")
    assert [r.line for r in got] == [1, 2, 3, 4, 5, 6]
    assert got[0].record == {"a": 1} and got[5].record == {"a": 3}
    assert got[1].record is None and got[1].error is not None and "invalid JSON" in got[1].error
    assert got[2].error == "expected a JSON object, got an array"
    assert got[3].error is not None and "not UTF-8" in got[3].error
    assert got[4].error == "expected a JSON object, got a string"


# -- CSV -----------------------------------------------------------------------------------------


def test_csv_without_schema_infers_each_column_from_all_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("id,score,name\n1,2,ann\n2,2.5,bob\n3,4,\n")
    got = rows(path, "csv")
    assert [r.record for r in got] == [
        {"id": 1, "score": 2.0, "name": "ann"},
        {"id": 2, "score": 2.5, "name": "bob"},
        {"id": 3, "score": 4.0, "name": ""},
    ]
    assert type(got[0].record and got[0].record["score"]) is float


def test_csv_rows_with_the_wrong_cell_count_or_an_empty_number_are_bad(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('a,b\n1,2\n3\n\n"multi\nline",4\n5,6,7\n8,\n')
    got = rows(path, "csv")
    assert [(r.line, r.error) for r in got] == [
        (2, None),
        (3, "expected 2 cells (as in the header), got 1"),
        (5, None),
        (7, "expected 2 cells (as in the header), got 3"),
        (8, "column 'b' is empty"),
    ]
    assert got[2].record == {"a": "multi\nline", "b": 4}


def test_csv_header_problems_are_input_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,a\n1,2\n")
    with pytest.raises(InputError, match=r"d\.csv:1: column 'a' appears twice"):
        rows(path, "csv")
    path.write_text("")
    assert rows(path, "csv") == []


def test_csv_with_schema_spreads_a_vector_over_numbered_columns(tmp_path: Path) -> None:
    schema = Schema({"x": Field("float32", (2, 2)), "y": Field("int64"), "ok": Field("bool")})
    path = tmp_path / "d.csv"
    path.write_text("y,x0,x1,x2,x3,ok\n7,1,2,3,4.5,true\n8,1,2,three,4,0\n9,1,2,3,4,maybe\n")
    got = rows(path, "csv", schema)
    first = got[0].record
    assert first is not None and first["y"] == 7 and first["ok"] is True
    np.testing.assert_array_equal(first["x"], [[1, 2], [3, 4.5]])
    validated = schema.validate(first)
    assert validated["x"].dtype == np.float32 and validated["x"].shape == (2, 2)
    assert got[1].error == "column 'x2': 'three' is not a number"
    assert got[2].error == "column 'ok': 'maybe' is not true/false/1/0"


def test_csv_with_schema_reads_a_json_array_cell_and_underscored_columns(tmp_path: Path) -> None:
    schema = Schema({"x": Field("float64", (3,)), "z": Field("int8", (2,)), "name": Field("str")})
    path = tmp_path / "d.csv"
    path.write_text('x,z_0,z_1,name\n"[1, 2, 3]",5,6,007\n"[1, 2",5,6,a\n')
    got = rows(path, "csv", schema)
    assert got[0].record is not None
    assert got[0].record["x"] == [1, 2, 3] and got[0].record["name"] == "007"
    np.testing.assert_array_equal(got[0].record["z"], [5, 6])
    assert got[1].error == "column 'x': '[1, 2' is not a JSON array"


def test_csv_columns_must_match_the_schema(tmp_path: Path) -> None:
    schema = Schema({"x": Field("float32", (3,)), "y": Field("int64")})
    path = tmp_path / "d.csv"
    path.write_text("x0,x1,y\n1,2,3\n")
    with pytest.raises(InputError, match=r"d\.csv:1: no column for schema field 'x'.*x0\.\.x2"):
        rows(path, "csv", schema)
    path.write_text("x0,x1,x2,y,extra\n1,2,3,4,5\n")
    with pytest.raises(InputError, match=r"d\.csv:1: column 'extra' belongs to no schema field"):
        rows(path, "csv", schema)


# -- numpy files ---------------------------------------------------------------------------------


def test_npy_rows_under_the_field_name(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=">f4").reshape(4, 3)
    np.save(tmp_path / "a.npy", arr)
    got = rows(tmp_path / "a.npy", "npy", field="pixels")
    assert [r.line for r in got] == [1, 2, 3, 4]
    assert all(r.record is not None and set(r.record) == {"pixels"} for r in got)
    np.testing.assert_array_equal(np.stack([r.record["pixels"] for r in got if r.record]), arr)


def test_npy_refuses_pickles_and_scalars(tmp_path: Path) -> None:
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="without pickle"):
        rows(tmp_path / "o.npy", "npy")
    np.save(tmp_path / "s.npy", np.float32(1))
    with pytest.raises(InputError, match="0-d"):
        rows(tmp_path / "s.npy", "npy")


def test_npz_one_field_per_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "b.npz", img=np.ones((3, 2, 2), np.uint8), label=np.array([4, 5, 6]))
    got = rows(tmp_path / "b.npz", "npz")
    assert [r.line for r in got] == [1, 2, 3]
    record = got[2].record
    assert record is not None and record["label"] == 6 and record["img"].shape == (2, 2)


def test_npz_arrays_of_different_lengths_are_an_input_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "b.npz", a=np.zeros(3), b=np.zeros(4))
    with pytest.raises(InputError, match=r"b\.npz: arrays need the same first dimension.*a \(3,\), b \(4,\)"):
        rows(tmp_path / "b.npz", "npz")
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(InputError, match="use --format npy"):
        rows(tmp_path / "a.npy", "npz")


# -- schema inference ----------------------------------------------------------------------------


def test_infer_schema_from_a_first_record() -> None:
    schema = infer_schema(
        {
            "b": True,
            "i": 3,
            "f": 0.5,
            "s": "x",
            "v": [[1, 2], [3, 4]],
            "w": [1, 2.5],
            "a": np.zeros(3, np.float16),
        }
    )
    assert schema.fields == {
        "b": Field("bool"),
        "i": Field("int64"),
        "f": Field("float64"),
        "s": Field("str"),
        "v": Field("int64", (2, 2)),
        "w": Field("float64", (2,)),
        "a": Field("float16", (3,)),
    }


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "is null"),
        ({"a": 1}, "nested object"),
        ([[1, 2], [3]], "not an array"),
        (["a", "b"], "numbers or bools only"),
        (np.zeros(2, np.complex64), "dtype complex64"),
    ],
)
def test_infer_schema_names_the_field_that_fits_no_field(value: object, reason: str) -> None:
    with pytest.raises(ValueError, match=f"field 'v'.*{reason}"):
        infer_schema({"v": value})
