"""Manifests as text: CSV, TSV and JSONL read into the same Arrow table a Parquet manifest gives.

`load_manifest` (and so `sdgen run`) reads these formats by file extension, and `sdgen
make-manifest` converts them to Parquet. The columns the runner knows are read cell by cell
with their own types: ids, prompts and paths stay strings (an id `007` keeps its zeros), and a
seed is read as the exact integer written, never through a float (a float64 column holds
integers exactly only up to 2**53: a seed of 7550895919379764811 would become
7550895919379765248). A cell that cannot be read as its column's type is a problem of its row
alone (`read_manifest_table`), not of the column. Every other column is a label, typed as the
file says (CSV: inferred per column). Lines may end in \\n, \\r\\n or \\r; a file in UTF-16 with
its byte-order mark is decoded; UTF-32 or UTF-16 without the mark is refused (ValueError, which
`make-manifest` and `load_manifest` report naming the file).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .exit_codes import one_line

TEXT_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
STRING_COLUMNS = ("id", "prompt", "negative", "init_image", "sampler")
INTEGER_COLUMNS = ("seed", "steps", "width", "height")
FLOAT_COLUMNS = ("strength", "guidance_scale")
BOOLEAN_COLUMNS = ("karras",)
TYPED_COLUMNS = {
    **{c: pa.string() for c in STRING_COLUMNS},
    **{c: pa.int64() for c in INTEGER_COLUMNS},
    **{c: pa.float64() for c in FLOAT_COLUMNS},
    **{c: pa.bool_() for c in BOOLEAN_COLUMNS},
}
EXACT_FLOAT_INTEGERS = 2**53  # a float64 holds every integer up to this one exactly, and no further
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")

# row -> column -> why its cell could not be read
CellProblems = dict[int, dict[str, str]]


# Integers a float32 / float16 holds exactly (beyond these, the value stored is a neighbour's).
EXACT_NARROW_INTEGERS = {pa.float32(): 2**24, pa.float16(): 2**11}


def _narrow_floats(table: pa.Table) -> tuple[pa.Table, CellProblems]:
    """A Parquet manifest's float32/float16 columns the runner reads as numbers. `strength` and
    `guidance_scale` become the decimal the writer meant: 0.7 stored as float32 is
    0.699999988..., with which `int(10 * strength)` runs 6 img2img steps instead of 7 (and
    diffusers, computing in float32, runs 7). An integer column's (`seed`) value beyond the
    type's exact integers is its row's problem: the value stored may not be the one written."""
    problems: CellProblems = {}
    for column in (*FLOAT_COLUMNS, *INTEGER_COLUMNS):
        if column not in table.column_names or table.schema.field(column).type not in EXACT_NARROW_INTEGERS:
            continue
        kind = table.schema.field(column).type
        narrow = np.float32 if kind == pa.float32() else np.float16
        values = table.column(column).to_pylist()
        if column in FLOAT_COLUMNS:
            # numpy prints the shortest decimal that reads back as the same narrow float
            values = [None if v is None else float(str(narrow(v))) for v in values]
        else:
            for row, value in enumerate(values):
                if value is not None and math.isfinite(value) and abs(value) > EXACT_NARROW_INTEGERS[kind]:
                    problems.setdefault(row, {})[column] = (
                        f"{value:.0f} is stored as {narrow.__name__}, which holds integers exactly only up to "
                        f"{EXACT_NARROW_INTEGERS[kind]}; store it as an integer"
                    )
                    values[row] = None
        index = table.column_names.index(column)
        table = table.set_column(index, column, pa.array(values, pa.float64()))
    return table, problems


def manifest_format(uri: str) -> str:
    """`parquet`, `csv`, `tsv` or `jsonl`, from the name (anything else is read as Parquet). The
    whole name counts: a `?` in it is part of a file name or an S3 key, not a query."""
    name = uri.lower()
    for suffix, kind in TEXT_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return "parquet"


def read_manifest_table(data: bytes, uri: str) -> tuple[pa.Table, CellProblems]:
    """The table in `data` (a file named `uri`) and, for a text file, the cells of the known
    columns that could not be read as their type (those cells are null in the table). Raises
    pa.ArrowException / OSError / ValueError when the file cannot be read at all."""
    kind = manifest_format(uri)
    if kind == "parquet":
        if data[:4] != b"PAR1":  # Parquet files start (and end) with it
            raise ValueError(
                f"not a Parquet file (a manifest is read by its extension: .parquet, "
                f"{', '.join(TEXT_SUFFIXES)}; anything else as Parquet)"
            )
        return _narrow_floats(pq.read_table(pa.BufferReader(data)))
    if kind in ("csv", "tsv"):
        table = _read_csv(data, "\t" if kind == "tsv" else ",")
        repeated = sorted({n for n in table.column_names if table.column_names.count(n) > 1})
        if repeated:
            raise ValueError(f"column {repeated[0]!r} appears more than once")
        problems: CellProblems = {}
        columns = {}
        for index, name in enumerate(table.column_names):  # text read as bytes: checked cell by cell
            if name in TYPED_COLUMNS:
                columns[name] = _utf8(name, table.column(name), problems)
            elif pa.types.is_binary(table.schema.field(index).type):  # a label Arrow could not read as text
                table = table.set_column(index, name, pa.array(_utf8(name, table.column(name), problems), pa.string()))
    else:
        problems = {}
        table, columns = _read_jsonl(data, problems)
    for name, values in columns.items():
        typed = _typed_column(name, values, problems)
        table = table.set_column(table.column_names.index(name), name, typed)
    return table, problems


def read_table_bytes(data: bytes, uri: str) -> pa.Table:
    """The table in `data`, refusing a text file with a cell its column's type cannot hold
    (ValueError naming the row, column and value): what `make-manifest` converts. Raises
    pa.ArrowException / OSError / ValueError."""
    table, problems = read_manifest_table(data, uri)
    if problems:
        row = min(problems)
        column, problem = next(iter(problems[row].items()))
        more = sum(len(p) for p in problems.values()) - 1
        raise ValueError(f"row {row}, column {column!r}: {problem}" + (f" (and {more} more cell(s))" if more else ""))
    return table


SAVE_AS = "save it as UTF-8 text with \\n or \\r\\n line ends"
_LINE_END = re.compile(rb"\r\n|\r|\n")


def _first_line(data: bytes) -> bytes:
    end = _LINE_END.search(data)
    return data if end is None else data[: end.start()]


def _as_utf8(data: bytes) -> bytes:
    """A text manifest's bytes as UTF-8: UTF-16 with its byte-order mark (what spreadsheets
    write as "Unicode text") is decoded; UTF-32, or UTF-16 without a mark (NUL bytes in the
    first line), is refused (ValueError saying what to do). Anything else is left as it is: a
    cell that is not UTF-8 is its own row's problem."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        raise ValueError(f"the file is UTF-32; {SAVE_AS}")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16").encode("utf-8")
        except UnicodeError:
            raise ValueError(f"the file starts as UTF-16 but does not decode as UTF-16; {SAVE_AS}") from None
    if b"\x00" in _first_line(data[:65536]):
        raise ValueError(f"the first line holds NUL bytes (UTF-16 without a byte-order mark?); {SAVE_AS}")
    return data


def _read_csv(data: bytes, delimiter: str) -> pa.Table:
    """CSV/TSV with the known columns as bytes (decoded and typed cell by cell later: one cell
    that is not UTF-8 must not refuse the file), the rest inferred. Lines may end in \\n,
    \\r\\n or \\r (old Mac files), as Arrow reads them."""
    data = _as_utf8(data)
    first = _first_line(data).decode("utf-8-sig", errors="replace")
    try:
        header = next(csv.reader([first], delimiter=delimiter), [])
    except csv.Error as exc:  # not a ValueError: it would escape every caller's handling
        raise ValueError(f"the header line cannot be read ({exc}); {SAVE_AS}") from None
    return pacsv.read_csv(
        io.BytesIO(data),
        parse_options=pacsv.ParseOptions(delimiter=delimiter),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.binary() for c in TYPED_COLUMNS if c in header},
            strings_can_be_null=True,  # an empty cell is a missing value, as in a spreadsheet
            quoted_strings_can_be_null=False,
        ),
    )


def _read_jsonl(data: bytes, problems: CellProblems) -> tuple[pa.Table, dict[str, list[Any]]]:
    """JSON lines with Python's json (exact integers of any size); keys in first-seen order.
    Label columns are typed by Arrow from their values; the known columns are returned as
    Python values, typed cell by cell later. A string that is not valid UTF-8 (bytes in the
    file, or a lone surrogate escape such as "\\ud800") is null, a problem of its row."""
    if not data.strip():
        raise ValueError("empty file")
    data = _as_utf8(data)
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(data.decode("utf-8-sig", errors="surrogateescape").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}: not JSON ({exc})") from None
        if not isinstance(value, dict):
            raise ValueError(f"line {number}: expected a JSON object, got {type(value).__name__}")
        for key, cell in value.items():
            if isinstance(cell, str) and not _is_utf8(cell):
                value[key] = None
                problems.setdefault(len(rows), {})[key] = "is not valid UTF-8"
        rows.append(value)
    names = list(dict.fromkeys(k for row in rows for k in row))
    known = {name: [row.get(name) for row in rows] for name in names if name in TYPED_COLUMNS}
    arrays = []
    for name in names:
        if name in known:
            arrays.append(pa.nulls(len(rows)))  # a placeholder, replaced by the typed column
            continue
        try:
            arrays.append(pa.array([row.get(name) for row in rows]))
        except (pa.ArrowException, OverflowError) as exc:
            raise ValueError(f"column {name!r}: values of different types or too large ({exc})") from None
    return pa.table(arrays, names=names), known


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: undecodable bytes, or a "\ud800" escape
        return False
    return True


def _utf8(name: str, column: pa.ChunkedArray, problems: CellProblems) -> list[str | None]:
    """A CSV column read as bytes, as text: null, with its row's problem, where a cell is not
    valid UTF-8."""
    try:
        return column.cast(pa.string()).to_pylist()  # Arrow checks the UTF-8 of every cell at once
    except pa.ArrowException:
        pass
    values: list[str | None] = []
    for row, cell in enumerate(column.to_pylist()):
        try:
            values.append(None if cell is None else cell.decode("utf-8"))
        except UnicodeDecodeError:
            values.append(None)
            problems.setdefault(row, {})[name] = "is not valid UTF-8"
    return values


def _typed_column(name: str, values: list[Any], problems: CellProblems) -> pa.Array:
    """`values` (text from CSV, Python values from JSON) as the column's type; a cell that
    cannot be read is null, and its problem is noted under its row."""
    kind = TYPED_COLUMNS[name]
    if pa.types.is_string(kind) and all(v is None or isinstance(v, str) for v in values):
        return pa.array(values, pa.string())
    if all(v is None or isinstance(v, str) for v in values) and not pa.types.is_boolean(kind):
        try:  # the usual case, at Arrow's speed: every cell is plain text of the type
            text = pa.array(values, pa.string())
            return pc.cast(pc.utf8_trim_whitespace(text), kind)
        except (pa.ArrowException, ValueError):
            pass  # some cell needs a closer look: read them one by one
    numbers = (int, float) if pa.types.is_floating(kind) else (int,)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        if all(v is None or isinstance(v, numbers) and not isinstance(v, bool) for v in values):
            try:  # JSON numbers of the type: no closer look needed
                return pa.array(values, kind)
            except (pa.ArrowException, OverflowError):
                pass
    convert = {pa.string(): _as_string, pa.int64(): _as_integer, pa.float64(): _as_float, pa.bool_(): _as_boolean}[kind]
    typed = []
    for row, value in enumerate(values):
        if value is None or isinstance(value, str) and not value.strip():
            typed.append(None)
            continue
        result, problem = convert(value)
        if problem:
            problems.setdefault(row, {})[name] = f"{one_line(repr(value), 60)} {problem}"
        typed.append(result)
    return pa.array(typed, kind)


def _as_string(value: Any) -> tuple[str | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"is a {type(value).__name__}, expected text"
    return str(value), None  # a number written for an id or a prompt: its digits


def _as_integer(value: Any) -> tuple[int | None, str | None]:
    if isinstance(value, bool):
        return None, "is not an integer"
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            return None, "is not an integer"
        if abs(value) > EXACT_FLOAT_INTEGERS:
            return None, "is a float too large to hold an exact integer; write the integer's digits"
        value = int(value)
    if isinstance(value, str):
        try:
            number = Decimal(value.strip())  # exact: "12", "12.0", "1e3", "7550895919379764811"
        except InvalidOperation:
            return None, "is not an integer"
        if not number.is_finite() or number != number.to_integral_value():
            return None, "is not an integer"
        value = int(number)
    if not isinstance(value, int):
        return None, "is not an integer"
    if not -(2**63) <= value < 2**63:
        return None, "is outside the 64-bit integer range"
    return value, None


def _as_float(value: Any) -> tuple[float | None, str | None]:
    if isinstance(value, bool):
        return None, "is not a number"
    if isinstance(value, (int, float)):
        return float(value), None
    if isinstance(value, str):
        try:
            return float(value.strip()), None
        except ValueError:
            return None, "is not a number"
    return None, "is not a number"


def _as_boolean(value: Any) -> tuple[bool | None, str | None]:
    if isinstance(value, bool):
        return value, None
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE:
        return True, None
    if text in _FALSE:
        return False, None
    return None, "is not true or false"


__all__ = ["CellProblems", "manifest_format", "read_manifest_table", "read_table_bytes"]
