"""Manifest values read one by one when a column cannot be read whole: a cell with invalid UTF-8
(Parquet does not validate string bytes on write) must fail its row, not its shard.

`table_rows` / `column_values` are `Table.to_pylist` / `ChunkedArray.to_pylist` that, on a
decoding error, fall back to reading value by value and put `UNDECODABLE` where a value cannot
be read; `manifest.parse_row` makes such a row an error record naming the columns.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa


class _Undecodable:
    def __repr__(self) -> str:
        return "<undecodable>"


UNDECODABLE: Any = _Undecodable()


def _value(scalar: pa.Scalar) -> Any:
    try:
        return scalar.as_py()
    except (UnicodeDecodeError, pa.ArrowException, ValueError):
        return UNDECODABLE


def column_values(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    try:
        return column.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException, ValueError):
        return [_value(scalar) for scalar in column]


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    try:
        return table.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException, ValueError):
        columns = {name: column_values(table.column(name)) for name in table.column_names}
        return [{name: values[i] for name, values in columns.items()} for i in range(table.num_rows)]


__all__ = ["UNDECODABLE", "column_values", "table_rows"]
