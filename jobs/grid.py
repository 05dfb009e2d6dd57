"""`sdgen grid OUTPUT OUT.png --rows FIELD --cols FIELD`: a sweep's images as one labelled grid.

The sweep itself is a template (`sdgen make-manifest`) whose `settings:` lists multiply a few
prompts into rows — every setting tried on the same seeds. After the job, `grid` lays out the ok
images with one record field or label per axis (e.g. `--rows prompt --cols sampler`), the values
written along the top and left edges. Where several rows fall in one cell (other seeds, other
settings), the cell shows all of them as a small sub-grid, in manifest row order (left to right,
then top to bottom), every cell with the same sub-grid shape so that equal positions line up
(e.g. the same seed index); a legend line at the top says so. `--where FIELD=VALUE` keeps only
the matching rows, `--per-cell N` shows at most the first N of each cell.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .output import Output
from .storage import write_uri

LEGEND_H = 18  # the legend line at the very top
HEADER_H = 24  # the column values under it
GAP = 6  # white space between cells (not between the images inside a cell)


@dataclass
class Grid:
    png: bytes
    rows: list[Any]  # the row values, in order of first appearance
    cols: list[Any]  # the column values, likewise
    per_cell: int  # the most images in one cell
    sub: tuple[int, int]  # every cell's sub-grid: (columns, rows) of images
    left: int  # x of the first cell (the row labels' width)
    top: int  # y of the first cell
    cell: int  # one image's size in px


LABEL_PREFIX = "labels."  # `labels.status`: the label, where a record field has the same name
# Fonts with Latin, Greek and Cyrillic letters, found by Pillow in the system's font folders;
# Pillow's own default font draws only ASCII (an `ü` in a label would be a box).
FONTS = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "NotoSans-Regular.ttf", "FreeSans.ttf", "Arial.ttf")


def _value(record: dict[str, Any], field: str) -> Any:
    """A record field, else a label; `labels.NAME` is always the label."""
    if field in record and field != "labels":
        return record[field]
    name = field[len(LABEL_PREFIX) :] if field.startswith(LABEL_PREFIX) else field
    labels = json.loads(record["labels"]) if record.get("labels") else {}
    if name not in labels:
        raise KeyError(field)
    return labels[name]


def matches(value: Any, wanted: str) -> bool:
    """`--where FIELD=VALUE`, VALUE as typed on a command line: `true`/`false` (or 1/0) for a flag,
    a number equal as a number (`5` matches 5.0), `none` for a missing value, else the text."""
    if isinstance(value, bool):
        return wanted.strip().lower() in (("true", "1", "yes") if value else ("false", "0", "no"))
    if isinstance(value, (int, float)):
        try:
            return float(wanted) == float(value)
        except ValueError:
            return False
    if value is None:
        return wanted.strip().lower() in ("", "none", "null")
    return str(value) == wanted


def label_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for name in FONTS:
        try:
            return ImageFont.truetype(name, 11)
        except OSError:
            continue
    return ImageFont.load_default()


def _label(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def sub_grid(count: int) -> tuple[int, int]:
    """(columns, rows) of a near-square sub-grid holding `count` images, wider than tall."""
    columns = math.ceil(math.sqrt(count))
    return columns, math.ceil(count / columns)


def _fit(image: Image.Image, cell: int) -> Image.Image:
    if max(image.size) > cell:
        image.thumbnail((cell, cell))
    elif max(image.size) < cell:
        scale = cell // max(image.size)
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    return image


def make_grid(
    uri: str,
    rows: str,
    cols: str,
    where: dict[str, str] | None = None,
    cell: int = 128,
    per_cell: int | None = None,
) -> Grid:
    """The grid as PNG bytes, with its layout."""
    if cell < 8:
        raise ValueError(f"--cell: expected at least 8 px, got {cell}")
    if per_cell is not None and per_cell < 1:
        raise ValueError(f"--per-cell: expected at least 1, got {per_cell}")
    output = Output(uri)
    if output.read_job() is None:
        raise ValueError(f"{output.uri}: no job.json here (not an sdgen output)")
    columns = ["row", "status", "image_path", "labels"] + [f for f in (rows, cols, *(where or {})) if f != "labels"]
    cells: dict[tuple[str, str], list[str]] = {}  # (row value, column value) -> image paths, by manifest row
    row_values: dict[str, Any] = {}
    col_values: dict[str, Any] = {}
    for shard in sorted(output.committed_shards()):
        table = output.read_records(shard)
        table = table.select([c for c in dict.fromkeys(columns) if c in table.column_names])
        for record in sorted(table.to_pylist(), key=lambda r: r["row"]):
            if record["status"] != "ok":
                continue
            try:
                if where and not all(matches(_value(record, k), v) for k, v in where.items()):
                    continue
                r, c = _value(record, rows), _value(record, cols)
            except KeyError as exc:
                raise ValueError(f"no record field or label {exc.args[0]!r}") from None
            row_values.setdefault(str(r), r)
            col_values.setdefault(str(c), c)
            found = cells.setdefault((str(r), str(c)), [])
            if per_cell is None or len(found) < per_cell:
                found.append(record["image_path"])
    if not cells:
        raise ValueError("no ok rows match")
    most = max(len(paths) for paths in cells.values())
    sub_cols, sub_rows = sub_grid(most)
    width, height = sub_cols * cell, sub_rows * cell  # one cell
    font = label_font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(max(measure.textlength(_label(v), font=font) for v in row_values)) + 12
    top = LEGEND_H + HEADER_H
    grid = Image.new("RGB", (left + (width + GAP) * len(col_values), top + (height + GAP) * len(row_values)), "white")
    draw = ImageDraw.Draw(grid)
    legend = f"rows: {_label(rows)}, columns: {_label(cols)}"
    if most > 1:
        legend += (
            f"; up to {most} images per cell ({sub_cols}x{sub_rows}), in manifest row order: "
            "left to right, then top to bottom"
        )
    draw.text((4, 3), legend, fill="black", font=font)
    for j, value in enumerate(col_values.values()):
        draw.text((left + j * (width + GAP) + 4, LEGEND_H + 6), _label(value), fill="black", font=font)
    for i, (rkey, value) in enumerate(row_values.items()):
        y0 = top + i * (height + GAP)
        draw.text((4, y0 + height // 2 - 6), _label(value), fill="black", font=font)
        for j, ckey in enumerate(col_values):
            x0 = left + j * (width + GAP)
            for k, path in enumerate(cells.get((rkey, ckey), [])):
                image = Image.open(io.BytesIO(output.storage.read(path))).convert("RGB")
                grid.paste(_fit(image, cell), (x0 + (k % sub_cols) * cell, y0 + (k // sub_cols) * cell))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return Grid(
        buffer.getvalue(), list(row_values.values()), list(col_values.values()), most, (sub_cols, sub_rows),
        left, top, cell,
    )  # fmt: skip


def main(argv: list[str] | None = None, prog: str = "sdgen grid") -> int:
    """Exit status: 0 written, 2 nothing to lay out (no output, no matching rows, unknown field)."""
    parser = argparse.ArgumentParser(prog=prog, description="Lay out a sweep's images as a labelled grid.")
    parser.add_argument("output", help="the job's output folder or s3:// prefix")
    parser.add_argument("out", help="the PNG to write (local path or s3://)")
    parser.add_argument(
        "--rows",
        default="prompt",
        help="record field or label along the rows (default: prompt); labels.NAME: the label named like a field",
    )
    parser.add_argument("--cols", default="sampler", help="record field or label along the columns (default: sampler)")
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="keep matching rows only (numbers compare as numbers, flags as true/false)",
    )
    parser.add_argument("--cell", type=int, default=128, help="one image's size in pixels (default 128)")
    parser.add_argument(
        "--per-cell", type=int, metavar="N", help="at most the first N rows of each cell (default: all of them)"
    )
    args = parser.parse_args(argv)
    try:
        bad = [w for w in args.where if "=" not in w]
        if bad:
            raise ValueError(f"--where: expected FIELD=VALUE, got {bad[0]!r}")
        where = dict(w.split("=", 1) for w in args.where)
        grid = make_grid(args.output, args.rows, args.cols, where, args.cell, args.per_cell)
        write_uri(args.out, grid.png)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cells = f"; up to {grid.per_cell} images per cell ({grid.sub[0]}x{grid.sub[1]})" if grid.per_cell > 1 else ""
    print(f"wrote {args.out}: {len(grid.rows)} {args.rows} x {len(grid.cols)} {args.cols}{cells}")
    return 0


__all__ = ["Grid", "make_grid", "sub_grid"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
