"""`sdgen grid OUTPUT OUT.png --rows FIELD --cols FIELD`: a sweep's images as one labelled grid.

The sweep itself is a template (`sdgen make-manifest`) whose `settings:` lists multiply a few
prompts into rows — every setting tried on the same seeds. After the job, `grid` lays out the ok
images with one record field or label per axis (e.g. `--rows prompt --cols sampler`), the values
written along the top and left edges. Where several rows fall in one cell (other seeds, other
settings), the cell shows all of them as a small sub-grid, in manifest row order (left to right,
then top to bottom), every cell with the same sub-grid shape so that equal positions line up
(e.g. the same seed index); a legend line at the top says so. `--where FIELD=VALUE` keeps only
the matching rows, `--per-cell N` shows at most the first N of each cell.

An axis left out defaults to `prompt` (rows) and `sampler` (columns), or to no axis at all (one
row, or one column, holding every image) when the other axis is that field: `--cols prompt` alone
is each prompt's images side by side, not a prompt x prompt diagonal. Values are drawn on one
line (newlines and other control characters as spaces), nested ones as JSON, and a column header
is cut with "..." to its column's width. A grid over MAX_PIXELS is refused before any image is
read; an image missing from the output is a crossed-out cell and a warning, not a failure. OUT is
written as PNG or JPEG, as its suffix says.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .output import Output
from .reader import shard_sort_key
from .storage import write_uri

LEGEND_H = 18  # the legend line at the very top
HEADER_H = 24  # the column values under it
GAP = 6  # white space between cells (not between the images inside a cell)
# Pillow's own MAX_IMAGE_PIXELS: a larger image opens with a DecompressionBombWarning, and one
# twice as large not at all; a grid of 130 x 130 cells of 128 px was 305 megapixels and 1.3 GB.
MAX_PIXELS = 89_478_485
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # OUT's suffix -> the format written
MAX_SIDE = {"PNG": 2**31 - 1, "JPEG": 65_535}  # JPEG's header holds 16-bit sizes


@dataclass
class Grid:
    data: bytes  # the image file, in `format`
    format: str  # PNG | JPEG
    rows: list[Any]  # the row values, in order of first appearance
    cols: list[Any]  # the column values, likewise
    per_cell: int  # the most images in one cell
    sub: tuple[int, int]  # every cell's sub-grid: (columns, rows) of images
    left: int  # x of the first cell (the row labels' width)
    top: int  # y of the first cell
    cell: int  # one image's size in px
    missing: list[str] = field(default_factory=list)  # image paths not in the output (crossed-out cells)


LABEL_PREFIX = "labels."  # `labels.status`: the label, where a record field has the same name
# Fonts with Latin, Greek and Cyrillic letters, found by Pillow in the system's font folders;
# Pillow's own default font draws only ASCII (an `ü` in a label would be a box).
FONTS = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "NotoSans-Regular.ttf", "FreeSans.ttf", "Arial.ttf")


def _value(record: dict[str, Any], name: str | None) -> Any:
    """A record field, else a label; `labels.NAME` is always the label. No field (no axis): ""."""
    if name is None:
        return ""
    if name in record and name != "labels":
        return record[name]
    label = name[len(LABEL_PREFIX) :] if name.startswith(LABEL_PREFIX) else name
    labels = json.loads(record["labels"]) if record.get("labels") else {}
    if label not in labels:
        raise KeyError(name)
    return labels[label]


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
    """A value as one line of at most 40 characters. Text is kept as it is, anything else is JSON
    (`{"a": 1}`, `null`, `true`: how labels are written, not Python's repr); control characters
    (a newline in a prompt) become spaces, since Pillow refuses to measure multi-line text."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
    text = " ".join(text.split())  # runs of whitespace, U+2028 line separators included, as one space
    return text if len(text) <= 40 else text[:37] + "..."


def _shorten(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    """`text`, cut with "..." to at most `width` px: a column header within its column, not over
    the next one (empty when not even "..." fits)."""
    if draw.textlength(text, font=font) <= width:
        return text
    shortest, longest = 0, len(text)  # binary search for the longest prefix that fits with "..."
    while shortest < longest:
        middle = (shortest + longest + 1) // 2
        if draw.textlength(text[:middle].rstrip() + "...", font=font) <= width:
            shortest = middle
        else:
            longest = middle - 1
    cut = text[:shortest].rstrip() + "..."
    return cut if draw.textlength(cut, font=font) <= width else ""


def out_format(out: str) -> str:
    """The image format OUT's suffix names (PNG, JPEG); ValueError for any other suffix, rather
    than PNG bytes under a .jpg name."""
    name = out.rstrip("/").rsplit("/", 1)[-1]
    suffix = name[name.rfind(".") :].lower() if "." in name else ""
    if suffix not in FORMATS:
        raise ValueError(f"{out}: expected a name ending in {', '.join(FORMATS)} (the format written)")
    return FORMATS[suffix]


def _mark_missing(draw: ImageDraw.ImageDraw, x: int, y: int, cell: int) -> None:
    """A missing image's place: grey, crossed out in red."""
    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(230, 230, 230))
    draw.line((x, y, x + cell - 1, y + cell - 1), fill=(200, 0, 0), width=2)
    draw.line((x, y + cell - 1, x + cell - 1, y), fill=(200, 0, 0), width=2)


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
    rows: str | None,
    cols: str | None,
    where: dict[str, str] | None = None,
    cell: int = 128,
    per_cell: int | None = None,
    format: str = "PNG",
) -> Grid:
    """The grid as image bytes (`format`: PNG or JPEG), with its layout. `rows` or `cols` None:
    no such axis, one row (column) holding every image."""
    if cell < 8:
        raise ValueError(f"--cell: expected at least 8 px, got {cell}")
    if per_cell is not None and per_cell < 1:
        raise ValueError(f"--per-cell: expected at least 1, got {per_cell}")
    output = Output(uri)
    if output.read_job() is None:
        raise ValueError(f"{output.uri}: no job.json here (not an sdgen output)")
    fields = (rows, cols, *(where or {}))
    columns = ["row", "status", "image_path", "labels"] + [f for f in fields if f is not None and f != "labels"]
    cells: dict[tuple[str, str], list[str]] = {}  # (row value, column value) -> image paths, by manifest row
    row_values: dict[str, Any] = {}
    col_values: dict[str, Any] = {}
    for shard in sorted(output.committed_shards(), key=shard_sort_key):  # manifest row order
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
    legend = "rows: " + (_label(rows) if rows is not None else "none (one row)")
    legend += ", columns: " + (_label(cols) if cols is not None else "none (one column)")
    if most > 1:
        legend += (
            f"; up to {most} images per cell ({sub_cols}x{sub_rows}), in manifest row order: "
            "left to right, then top to bottom"
        )
    size = (
        max(left + (width + GAP) * len(col_values), int(measure.textlength(legend, font=font)) + 8),  # legend not cut
        top + (height + GAP) * len(row_values),
    )
    # Checked before any image is read: a grid too large to open is refused, not written.
    if size[0] * size[1] > MAX_PIXELS or max(size) > MAX_SIDE[format]:
        limit = (
            f"{size[0] * size[1] / 1e6:.0f} megapixels, over the limit of {MAX_PIXELS / 1e6:.0f}"
            if size[0] * size[1] > MAX_PIXELS
            else f"over {format}'s limit of {MAX_SIDE[format]} px a side"
        )
        raise ValueError(
            f"the grid would be {size[0]}x{size[1]} px ({limit}) for {len(row_values)} rows x {len(col_values)} "
            f"columns: keep fewer with --where FIELD=VALUE or --per-cell N, or use a smaller --cell (now {cell})"
        )
    grid = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), legend, fill="black", font=font)
    for j, value in enumerate(col_values.values()):
        header = _shorten(draw, _label(value), font, width - 4)  # within its column, which starts at +2
        draw.text((left + j * (width + GAP) + 2, LEGEND_H + 6), header, fill="black", font=font)
    missing = []
    for i, (rkey, value) in enumerate(row_values.items()):
        y0 = top + i * (height + GAP)
        draw.text((4, y0 + height // 2 - 6), _label(value), fill="black", font=font)
        for j, ckey in enumerate(col_values):
            x0 = left + j * (width + GAP)
            for k, path in enumerate(cells.get((rkey, ckey), [])):
                x, y = x0 + (k % sub_cols) * cell, y0 + (k // sub_cols) * cell
                try:
                    data = output.storage.read(path)
                except FileNotFoundError:  # deleted since its record was written: one cell, not the grid
                    missing.append(path)
                    _mark_missing(draw, x, y, cell)
                    continue
                grid.paste(_fit(Image.open(io.BytesIO(data)).convert("RGB"), cell), (x, y))
    buffer = io.BytesIO()
    grid.save(buffer, format=format)
    return Grid(
        buffer.getvalue(), format, list(row_values.values()), list(col_values.values()), most, (sub_cols, sub_rows),
        left, top, cell, missing,
    )  # fmt: skip


def main(argv: list[str] | None = None, prog: str = "sdgen grid") -> int:
    """Exit status: 0 written (missing images as a warning), 2 nothing to lay out (no output, no
    matching rows, unknown field) or refused (an OUT suffix other than .png/.jpg/.jpeg, a grid over
    MAX_PIXELS)."""
    from .exit_codes import TABLE

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Lay out a sweep's images as a labelled grid.",
        epilog=TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", help="the job's output folder or s3:// prefix")
    parser.add_argument("out", help="the image to write, .png or .jpg (local path or s3://)")
    parser.add_argument(
        "--rows",
        help="record field or label along the rows (default: prompt; none, one row, when --cols is prompt); "
        "labels.NAME: the label named like a field",
    )
    parser.add_argument(
        "--cols",
        help="record field or label along the columns (default: sampler; none, one column, when --rows is sampler)",
    )
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
        # An axis not given is the usual one, unless the other axis is that field: no diagonal.
        rows = args.rows if args.rows is not None else (None if args.cols == "prompt" else "prompt")
        cols = args.cols if args.cols is not None else (None if rows == "sampler" else "sampler")
        grid = make_grid(args.output, rows, cols, where, args.cell, args.per_cell, out_format(args.out))
        write_uri(args.out, grid.data)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if grid.missing:
        shown = ", ".join(grid.missing[:10]) + (f" and {len(grid.missing) - 10} more" if len(grid.missing) > 10 else "")
        print(f"warning: {len(grid.missing)} image(s) missing, drawn crossed out: {shown}", file=sys.stderr)
    cells = f"; up to {grid.per_cell} images per cell ({grid.sub[0]}x{grid.sub[1]})" if grid.per_cell > 1 else ""
    print(f"wrote {args.out}: {len(grid.rows)} {rows or 'row'} x {len(grid.cols)} {cols or 'column'}{cells}")
    return 0


__all__ = ["Grid", "make_grid", "out_format", "sub_grid"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
