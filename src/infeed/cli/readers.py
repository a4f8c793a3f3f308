"""Input formats of ``infeed produce``: JSON lines, CSV, ``.npy`` and ``.npz``, each record with its place.

Every format yields :class:`Row` objects: a record (field name -> value) or the reason the input at
that place is not one, so the caller can report ``FILE:LINE: reason`` and skip or stop. ``LINE`` is
the line number in a text file and the row number (from 1) in an array file. Problems with a file
as a whole (a CSV header that does not fit the schema, a file numpy cannot load) raise
:class:`InputError` instead.

CSV: the first row is the header. Without a schema every column is one scalar field, an integer
column if every cell is an integer, else a float column if every cell is a number, else a str
column. With a schema, a scalar field reads the column of its name; a field of shape ``(n, ...)``
reads either one column of its name holding a JSON array (``"[1, 2, 3]"``) or the columns
``NAME0`` .. ``NAME{k-1}`` (or ``NAME_0`` ..), ``k`` the product of the shape, in row-major order;
every column must belong to a field.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from infeed.codecs import FIELD_DTYPES, Field, Schema

__all__ = ["FORMATS", "STDIN", "InputError", "Row", "detect_format", "infer_schema", "read_rows"]

#: The input formats, by name.
FORMATS: tuple[str, ...] = ("jsonl", "csv", "npy", "npz")
#: The file name that means standard input (JSON lines).
STDIN = "-"

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".npy": "npy",
    ".npz": "npz",
}


class InputError(ValueError):
    """The input as a whole cannot be read; the message starts with ``FILE`` or ``FILE:LINE``."""


@dataclass(frozen=True, slots=True)
class Row:
    """One record of the input, or the reason the input at this place is not one.

    Attributes:
        source: the file name (``<stdin>`` for standard input).
        line: the line number (text formats) or row number from 1 (array formats).
        record: field name -> value, when the input was read.
        error: why it could not be, otherwise.
    """

    source: str
    line: int
    record: dict[str, Any] | None = None
    error: str | None = None

    @property
    def where(self) -> str:
        """``FILE:LINE``."""
        return f"{self.source}:{self.line}"


def detect_format(path: str, fmt: str = "auto") -> str:
    """Return the format of ``path``: ``fmt`` itself unless it is ``auto``, else from the suffix.

    Raises:
        ValueError: the suffix says nothing, or standard input is asked for in a format other than
            JSON lines.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; known: auto, {', '.join(FORMATS)}")
    if path == STDIN:
        if fmt not in ("auto", "jsonl"):
            raise ValueError(f"standard input is read as JSON lines, not {fmt}; give a file instead")
        return "jsonl"
    if fmt != "auto":
        return fmt
    found = _SUFFIXES.get(Path(path).suffix.lower())
    if found is None:
        raise ValueError(
            f"cannot tell the format of {path!r} from its suffix; pass --format {'|'.join(FORMATS)}"
        )
    return found


def read_rows(path: str, fmt: str, *, schema: Schema | None = None, field: str = "x") -> Iterator[Row]:
    """Yield the rows of ``path`` (``-``: standard input) read as ``fmt``.

    Args:
        path: the file, or ``-`` for JSON lines on standard input.
        fmt: one of ``FORMATS`` (see :func:`detect_format`).
        schema: with CSV, decides which columns make which field (see the module docstring).
        field: the field name of a ``.npy`` file's rows.

    Raises:
        InputError: the file as a whole cannot be read (raised when iteration reaches it).
        OSError: the file cannot be opened.
    """
    if fmt == "jsonl":
        if path == STDIN:
            yield from _jsonl(sys.stdin.buffer, "<stdin>")
        else:
            with open(path, "rb") as stream:
                yield from _jsonl(stream, path)
    elif fmt == "csv":
        yield from _csv(path, schema)
    elif fmt == "npy":
        yield from _npy(path, field)
    elif fmt == "npz":
        yield from _npz(path)
    else:
        raise ValueError(f"unknown input format {fmt!r}; known: {', '.join(FORMATS)}")


def infer_schema(record: Mapping[str, Any]) -> Schema:
    """Return the schema a first record implies when no ``--schema`` is given.

    bool -> ``bool``, int -> ``int64``, float -> ``float64``, str -> ``str``; a (nested) list of
    numbers -> an array field of its shape (``int64``, ``float64`` or ``bool``); a numpy value keeps
    its dtype and shape.

    Raises:
        ValueError: naming the field whose value fits no field (null, nested object, ragged list,
            list of str, ...).
    """
    if not record:
        raise ValueError("the record has no fields")
    return Schema({name: _infer_field(name, value) for name, value in record.items()})


def _infer_field(name: str, value: Any) -> Field:
    if isinstance(value, str):
        return Field("str")
    if isinstance(value, np.ndarray | np.generic):
        dtype: str = value.dtype.name
        if value.dtype.kind not in "biuf" or dtype not in FIELD_DTYPES:
            raise ValueError(f"field {name!r}: dtype {value.dtype} is not one of {', '.join(FIELD_DTYPES)}")
        return Field(dtype, tuple(value.shape))
    if isinstance(value, bool):
        return Field("bool")
    if isinstance(value, int):
        return Field("int64")
    if isinstance(value, float):
        return Field("float64")
    if value is None:
        raise ValueError(f"field {name!r} is null; leave it out or give a --schema")
    if isinstance(value, dict):
        raise ValueError(f"field {name!r} is a nested object; records hold numbers, arrays and str only")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"field {name!r} is not an array (are its rows of different lengths?)") from exc
    kinds = {"b": "bool", "i": "int64", "u": "int64", "f": "float64"}
    if arr.dtype.kind not in kinds:
        raise ValueError(f"field {name!r}: a list must hold numbers or bools only")
    return Field(kinds[arr.dtype.kind], tuple(arr.shape))


# -- JSON lines ----------------------------------------------------------------------------------


def _jsonl(stream: IO[bytes], source: str) -> Iterator[Row]:
    for number, raw in enumerate(stream, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Row(source, number, error=f"not UTF-8 text (byte {exc.start} of the line)")
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Row(source, number, error=f"invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(value, dict):
            yield Row(source, number, error=f"expected a JSON object, got {_json_kind(value)}")
            continue
        yield Row(source, number, record=value)


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


# -- CSV -----------------------------------------------------------------------------------------


class _CellError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class _Column:
    """How one field is read from a CSV row: its cell indices, how each cell parses, its shape."""

    field: str
    cells: tuple[int, ...]
    parse: str  # "int", "float", "number", "bool", "str" or "json"
    shape: tuple[int, ...] = ()

    def read(self, header: Sequence[str], row: Sequence[str]) -> Any:
        if self.parse == "json":
            text = row[self.cells[0]]
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise _CellError(f"column {header[self.cells[0]]!r}: {text!r} is not a JSON array") from exc
        values = [_parse_cell(self.parse, header[i], row[i]) for i in self.cells]
        if len(self.cells) == 1 and not self.shape:
            return values[0]
        return np.asarray(values).reshape(self.shape)


def _parse_cell(kind: str, column: str, text: str) -> Any:
    if kind == "str":
        return text
    cell = text.strip()
    if not cell:
        raise _CellError(f"column {column!r} is empty")
    if kind == "bool":
        low = cell.lower()
        if low in ("true", "1"):
            return True
        if low in ("false", "0"):
            return False
        raise _CellError(f"column {column!r}: {text!r} is not true/false/1/0")
    if kind in ("int", "number") and _is_int(cell):
        return int(cell)
    if kind in ("float", "number") and _is_float(cell):
        return float(cell)
    what = "an integer" if kind == "int" else "a number"
    raise _CellError(f"column {column!r}: {text!r} is not {what}")


def _is_int(cell: str) -> bool:
    try:
        int(cell)
    except ValueError:
        return False
    return "_" not in cell


def _is_float(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return "_" not in cell


def _csv(path: str, schema: Schema | None) -> Iterator[Row]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.reader(stream)
            header = next(reader, None)
            if header is None:
                return
            _check_header(path, header)
            plan = _schema_plan(path, header, schema) if schema else _inferred_plan(path, header)
            while True:
                line = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    return
                if not row:
                    continue
                if len(row) != len(header):
                    yield Row(
                        path, line, error=f"expected {len(header)} cells (as in the header), got {len(row)}"
                    )
                    continue
                try:
                    yield Row(path, line, record={c.field: c.read(header, row) for c in plan})
                except _CellError as exc:
                    yield Row(path, line, error=str(exc))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        raise InputError(f"{path}: not valid CSV: {exc}") from exc


def _check_header(path: str, header: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(header, 1):
        if not name.strip():
            raise InputError(f"{path}:1: header cell {i} is empty; every column needs a name")
        if name in seen:
            raise InputError(f"{path}:1: column {name!r} appears twice in the header")
        seen.add(name)


def _inferred_plan(path: str, header: list[str]) -> list[_Column]:
    """Read the file once to find each column's kind: int, else float, else str."""
    kinds = ["int"] * len(header)
    seen = [False] * len(header)
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        next(reader, None)
        for row in reader:
            if len(row) != len(header):
                continue
            for i, text in enumerate(row):
                cell = text.strip()
                if not cell or kinds[i] == "str":
                    continue
                seen[i] = True
                if kinds[i] == "int" and not _is_int(cell):
                    kinds[i] = "float"
                if kinds[i] == "float" and not _is_float(cell):
                    kinds[i] = "str"
    return [_Column(name, (i,), kinds[i] if seen[i] else "str") for i, name in enumerate(header)]


def _schema_plan(path: str, header: list[str], schema: Schema) -> list[_Column]:
    index = {name: i for i, name in enumerate(header)}
    plan: list[_Column] = []
    used: set[int] = set()
    for name, field in schema.fields.items():
        parse = "str" if field.dtype == "str" else "bool" if field.dtype == "bool" else "number"
        count = math.prod(field.shape)
        spread = None
        for sep in ("", "_"):
            names = [f"{name}{sep}{k}" for k in range(count)]
            if count and all(n in index for n in names):
                spread = names
                break
        if not field.shape and name in index:
            column = _Column(name, (index[name],), parse)
        elif field.shape and name in index:
            column = _Column(name, (index[name],), "json", field.shape)
        elif field.shape and spread is not None:
            column = _Column(name, tuple(index[n] for n in spread), parse, field.shape)
        else:
            hint = f"a column {name!r}"
            if field.shape:
                hint += f" holding a JSON array, or columns {name}0..{name}{count - 1}"
            raise InputError(f"{path}:1: no column for schema field {name!r} ({field}); expected {hint}")
        plan.append(column)
        used.update(column.cells)
    extra = [header[i] for i in range(len(header)) if i not in used]
    if extra:
        raise InputError(
            f"{path}:1: column {extra[0]!r} belongs to no schema field (fields: {', '.join(schema.fields)})"
        )
    return plan


# -- numpy files ---------------------------------------------------------------------------------


def _npy(path: str, field: str) -> Iterator[Row]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a .npy file numpy can load without pickle: {exc}") from exc
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path}: is not a .npy array file; for a .npz archive use --format npz")
    if arr.ndim == 0:
        raise InputError(f"{path}: holds a 0-d array; one record per row needs at least one dimension")
    for i in range(len(arr)):
        yield Row(path, i + 1, record={field: arr[i]})


def _npz(path: str) -> Iterator[Row]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a .npz archive numpy can load without pickle: {exc}") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: is a single array, not a .npz archive; use --format npy")
    try:
        with loaded:
            arrays = {name: loaded[name] for name in loaded.files}
    except (ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: cannot read an array of the archive: {exc}") from exc
    if not arrays:
        raise InputError(f"{path}: holds no arrays")
    lengths = {name: (len(arr) if arr.ndim else None) for name, arr in arrays.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        described = ", ".join(f"{name} {arr.shape}" for name, arr in arrays.items())
        raise InputError(
            f"{path}: arrays need the same first dimension (one row per record), got {described}"
        )
    for i in range(len(next(iter(arrays.values())))):
        yield Row(path, i + 1, record={name: arr[i] for name, arr in arrays.items()})
