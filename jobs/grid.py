"""`sdgen grid OUTPUT OUT.png --rows FIELD --cols FIELD`: a sweep's images as one labelled grid.

The sweep itself is a template (`sdgen make-manifest`) whose `settings:` lists multiply a few
prompts into rows — every setting tried on the same seeds. After the job, `grid` lays out the ok
images with one record field or label per axis (e.g. `--rows prompt --cols sampler`), the values
written along the top and left edges. Where several rows fall in one cell (other seeds or other
settings), the first manifest row is shown, or the one picked with `--where FIELD=VALUE`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .output import Output
from .storage import write_uri


def _value(record: dict[str, Any], field: str) -> Any:
    if field in record and field != "labels":
        return record[field]
    labels = json.loads(record["labels"]) if record.get("labels") else {}
    if field not in labels:
        raise KeyError(field)
    return labels[field]


def _label(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def make_grid(
    uri: str, rows: str, cols: str, where: dict[str, str] | None = None, cell: int = 128
) -> tuple[bytes, list[Any], list[Any]]:
    """PNG bytes of the grid, and the row and column values in order of first appearance."""
    output = Output(uri)
    tables = output.read_all_records(output.committed_shards())
    records = sorted((r for t in tables.values() for r in t.to_pylist()), key=lambda r: r["row"])
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    row_values: dict[str, Any] = {}
    col_values: dict[str, Any] = {}
    for record in records:
        if record["status"] != "ok":
            continue
        try:
            if where and any(str(_value(record, k)) != v for k, v in where.items()):
                continue
            r, c = _value(record, rows), _value(record, cols)
        except KeyError as exc:
            raise ValueError(f"no record field or label {exc.args[0]!r}") from None
        row_values.setdefault(str(r), r)
        col_values.setdefault(str(c), c)
        cells.setdefault((str(r), str(c)), record)
    if not cells:
        raise ValueError("no ok rows match")
    font = ImageFont.load_default()
    left = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(_label(v), font=font) for v in row_values) + 12
    top = 24
    grid = Image.new("RGB", (int(left) + cell * len(col_values), top + cell * len(row_values)), "white")
    draw = ImageDraw.Draw(grid)
    for j, value in enumerate(col_values.values()):
        draw.text((int(left) + j * cell + 4, 6), _label(value), fill="black", font=font)
    for i, (rkey, value) in enumerate(row_values.items()):
        draw.text((4, top + i * cell + cell // 2 - 6), _label(value), fill="black", font=font)
        for j, ckey in enumerate(col_values):
            record = cells.get((rkey, ckey))
            if record is None:
                continue
            image = Image.open(io.BytesIO(output.storage.read(record["image_path"]))).convert("RGB")
            if max(image.size) > cell:
                image.thumbnail((cell, cell))
            elif max(image.size) < cell:
                scale = cell // max(image.size)
                image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
            grid.paste(image, (int(left) + j * cell, top + i * cell))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue(), list(row_values.values()), list(col_values.values())


def main(argv: list[str] | None = None, prog: str = "sdgen grid") -> int:
    """Exit status: 0 written, 2 nothing to lay out (no output, no matching rows, unknown field)."""
    parser = argparse.ArgumentParser(prog=prog, description="Lay out a sweep's images as a labelled grid.")
    parser.add_argument("output", help="the job's output folder or s3:// prefix")
    parser.add_argument("out", help="the PNG to write (local path or s3://)")
    parser.add_argument("--rows", default="prompt", help="record field or label along the rows (default: prompt)")
    parser.add_argument("--cols", default="sampler", help="record field or label along the columns (default: sampler)")
    parser.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE", help="keep matching rows only")
    parser.add_argument("--cell", type=int, default=128, help="cell size in pixels (default 128)")
    args = parser.parse_args(argv)
    try:
        where = dict(w.split("=", 1) for w in args.where)
        data, rows, cols = make_grid(args.output, args.rows, args.cols, where, args.cell)
        write_uri(args.out, data)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(rows)} {args.rows} x {len(cols)} {args.cols}")
    return 0


__all__ = ["make_grid"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
