"""Manifests as text: CSV, TSV and JSONL read into the same Arrow table a Parquet manifest gives.

`load_manifest` (and so `sdgen run`) reads these formats by file extension, and `sdgen
make-manifest` converts them to Parquet. The columns the runner knows are read with their own
types (ids, prompts and paths stay strings: an id `007` keeps its zeros); every other column is
a label, typed as the file says (CSV: inferred per column).
"""

from __future__ import annotations

import csv
import io

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

TEXT_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
STRING_COLUMNS = ("id", "prompt", "negative", "init_image", "sampler")


def manifest_format(uri: str) -> str:
    """`parquet`, `csv`, `tsv` or `jsonl`, from the name (anything else is read as Parquet)."""
    name = uri.lower().split("?")[0]
    for suffix, kind in TEXT_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return "parquet"


def read_table_bytes(data: bytes, uri: str) -> pa.Table:
    """The table in `data` (a file named `uri`). Raises pa.ArrowException / OSError / ValueError."""
    kind = manifest_format(uri)
    if kind == "parquet":
        return pq.read_table(pa.BufferReader(data))
    if kind in ("csv", "tsv"):
        first = data.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace").rstrip("\r")
        header = next(csv.reader([first], delimiter="\t" if kind == "tsv" else ","), [])
        types = {c: pa.string() for c in STRING_COLUMNS if c in header}
        return pacsv.read_csv(
            io.BytesIO(data),
            parse_options=pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ","),
            convert_options=pacsv.ConvertOptions(
                column_types=types,
                strings_can_be_null=True,  # an empty cell is a missing value, as in a spreadsheet
                quoted_strings_can_be_null=False,
            ),
        )
    if not data.strip():
        raise ValueError("empty file")
    table = pajson.read_json(io.BytesIO(data))
    for name in STRING_COLUMNS:
        if name in table.column_names and pa.types.is_integer(table.schema.field(name).type):
            index = table.column_names.index(name)
            table = table.set_column(index, name, table.column(name).cast(pa.string()))
    return table


__all__ = ["manifest_format", "read_table_bytes"]
