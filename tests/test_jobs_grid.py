"""jobs/grid.py on a hand-made output: `--where` as typed on a command line, `labels.NAME` for a
label named like a record field, a font that draws accented labels, labels on one line and as
JSON, headers within their columns, missing images, the size limit, the output format, the
default axes and shard order past 99999 shards."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from jobs.grid import GAP, LEGEND_H, _label, label_font, main, make_grid, matches
from jobs.output import Output
from jobs.reader import shard_sort_key


@pytest.fixture
def output(tmp_path):
    out = Output(str(tmp_path / "out"))
    out.write_job({"name": "g"})
    records = []
    for row, (karras, scale, status, color) in enumerate(
        [(True, 5.0, "draft", (255, 0, 0)), (False, 7.5, "final", (0, 0, 255)), (True, 7.5, "final", (0, 255, 0))]
    ):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), color).save(buffer, format="PNG")
        path = f"images/shard-00000/{row}.png"
        out.storage.write(path, buffer.getvalue())
        labels = json.dumps({"status": status, "größe": "groß" if row else "klein"})
        records.append(
            {"row": row, "id": str(row), "status": "ok", "image_path": path, "karras": karras, "guidance_scale": scale}
            | {"labels": labels, "sampler": "dpmpp_2m"}
        )
    out.commit_records("shard-00000", records)
    return tmp_path / "out"


def test_where_compares_numbers_as_numbers_and_flags_as_true_false(output):
    assert make_grid(str(output), "labels.status", "sampler", {"karras": "true"}).rows == ["draft", "final"]
    assert make_grid(str(output), "labels.status", "sampler", {"karras": "False"}).rows == ["final"]
    assert make_grid(str(output), "labels.status", "sampler", {"guidance_scale": "5"}).rows == ["draft"]
    assert make_grid(str(output), "labels.status", "sampler", {"guidance_scale": "7.50"}).rows == ["final"]
    assert matches(None, "none") and not matches(7.5, "high") and matches("ddim", "ddim") and not matches(1, "true")


def test_a_label_named_like_a_record_field_is_reached_with_labels_prefix(output, tmp_path, capsys):
    assert make_grid(str(output), "status", "sampler").rows == ["ok"]  # the record's own status
    assert make_grid(str(output), "labels.status", "sampler").rows == ["draft", "final"]
    assert make_grid(str(output), "labels.größe", "karras").cols == [True, False]
    assert main([str(output), str(tmp_path / "g.png"), "--rows", "labels.nope"]) == 2
    assert "no record field or label 'labels.nope'" in capsys.readouterr().err


def test_labels_with_accents_are_drawn_not_boxes():
    """Pillow's own font draws `ü` as the same box as a character it has no glyph for."""
    font = label_font()

    def drawn(text):
        image = Image.new("L", (40, 20), 255)
        ImageDraw.Draw(image).text((2, 2), text, font=font, fill=0)
        return np.asarray(image)

    missing = drawn("\U000f0000")  # a private-use character: no font has it
    for letter in "üßéÅñ":
        assert not np.array_equal(drawn(letter), missing), letter


def write_output(root, rows, shard_of=lambda row: "shard-00000"):
    """An output of ok rows, each a dict of record fields plus `color` (its 16 px PNG) and
    optional `labels` (a dict), in the shards `shard_of` names."""
    out = Output(str(root))
    out.write_job({"name": "g"})
    shards = {}
    for row, values in enumerate(rows):
        values = dict(values)
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), values.pop("color", (255, 0, 0))).save(buffer, format="PNG")
        path = f"images/{shard_of(row)}/{row}.png"
        out.storage.write(path, buffer.getvalue())
        labels = values.pop("labels", None)
        shards.setdefault(shard_of(row), []).append(
            {"row": row, "id": str(row), "status": "ok", "image_path": path, "sampler": "ddim", "karras": False}
            | {"labels": None if labels is None else json.dumps(labels), **values}
        )
    for shard, records in shards.items():
        out.commit_records(shard, records)
    return out


def dark(image, box):
    """How many dark (text) pixels the box (x0, y0, x1, y1) of the image holds."""
    return int((np.asarray(image.convert("L").crop(box)) < 128).sum())


def test_newlines_and_control_characters_are_drawn_on_one_line(tmp_path):
    """Pillow refuses to measure multi-line text: a prompt with a newline failed the grid."""
    write_output(tmp_path, [{"prompt": "a red circle"}, {"prompt": "a blue\nsquare", "labels": {"n": "x\ty\r\nz\x00"}}])
    grid = make_grid(str(tmp_path), "prompt", "sampler")
    assert grid.rows == ["a red circle", "a blue\nsquare"]
    assert make_grid(str(tmp_path), "sampler", "labels.n", {"id": "1"}).cols == ["x\ty\r\nz\x00"]
    assert _label("a blue\nsquare") == "a blue square" and _label("x\ty\r\nz\x00 \u2028w") == "x y z w"


def test_nested_labels_are_drawn_as_json(tmp_path):
    write_output(tmp_path, [{"labels": {"box": {"a": 1}}}, {"labels": {"box": None}}, {"labels": {"box": [True]}}])
    assert make_grid(str(tmp_path), "labels.box", "sampler").rows == [{"a": 1}, None, [True]]
    assert [_label(v) for v in ({"a": 1}, None, [True], "ü", 7.5)] == ['{"a": 1}', "null", "[true]", "ü", "7.5"]


def test_a_missing_image_is_a_crossed_out_cell_and_a_warning(tmp_path, capsys):
    out = write_output(tmp_path / "out", [{"prompt": p, "color": (0, 0, 255)} for p in ("one", "two", "three")])
    (tmp_path / "out" / "images" / "shard-00000" / "1.png").unlink()
    assert main([str(tmp_path / "out"), str(tmp_path / "g.png")]) == 0
    assert capsys.readouterr().err == "warning: 1 image(s) missing, drawn crossed out: images/shard-00000/1.png\n"
    grid = make_grid(out.uri, "prompt", "sampler", cell=16)
    assert grid.missing == ["images/shard-00000/1.png"]
    image = Image.open(io.BytesIO(grid.data)).convert("RGB")
    middle = lambda i: image.getpixel((grid.left + 8, grid.top + i * (16 + 6) + 8))  # noqa: E731 - a cell's centre
    assert middle(0) == middle(2) == (0, 0, 255) and middle(1)[0] > 150 > middle(1)[2]  # row 1: the red cross


def test_a_grid_too_large_to_open_is_refused_before_any_image_is_read(tmp_path, monkeypatch, capsys):
    from jobs import grid

    assert grid.MAX_PIXELS == Image.MAX_IMAGE_PIXELS  # Pillow's limit: larger grids open with a warning
    write_output(tmp_path / "out", [{"seed": s, "prompt": str(p)} for s in range(4) for p in range(4)])
    for image in (tmp_path / "out" / "images" / "shard-00000").iterdir():
        image.unlink()  # nothing is read: a refused grid does not get to the images
    monkeypatch.setattr(grid, "MAX_PIXELS", 100_000)  # 4 x 4 cells of 128 px are 0.3 megapixels
    assert main([str(tmp_path / "out"), str(tmp_path / "g.png"), "--rows", "seed", "--cols", "prompt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the grid would be ") and "megapixels, over the limit of" in err
    assert "for 4 rows x 4 columns: keep fewer with --where FIELD=VALUE or --per-cell N" in err and "--cell" in err
    assert not (tmp_path / "g.png").exists()
    monkeypatch.setattr(grid, "MAX_PIXELS", 400_000)
    assert main([str(tmp_path / "out"), str(tmp_path / "g.png"), "--rows", "seed", "--cols", "prompt"]) == 0


def test_column_headers_fit_their_column_and_the_canvas_holds_the_legend(tmp_path):
    long = ["a large red circle in the center on a white background", "a small blue square at the top left"]
    write_output(tmp_path, [{"prompt": p} for p in long])
    grid = make_grid(str(tmp_path), "sampler", "prompt", cell=48)
    image = Image.open(io.BytesIO(grid.data))
    band = (LEGEND_H, grid.top)  # the headers' line
    for j in range(2):
        x0 = grid.left + j * (48 + GAP)
        assert dark(image, (x0, band[0], x0 + 48, band[1])) > 20  # a header, cut with "..."
        assert dark(image, (x0 + 48, band[0], x0 + 48 + GAP, band[1])) == 0  # not into the gap (or off the edge)
    legend = "rows: sampler, columns: prompt"
    assert image.width >= ImageDraw.Draw(image).textlength(legend, font=label_font()) + 4  # one narrow column
    narrow = make_grid(str(tmp_path), "sampler", "prompt", {"id": "0"}, cell=8)
    assert Image.open(io.BytesIO(narrow.data)).width >= ImageDraw.Draw(image).textlength(legend, font=label_font())


def test_the_image_is_written_in_the_format_its_suffix_names(tmp_path, capsys):
    write_output(tmp_path / "out", [{"prompt": "a"}])
    assert main([str(tmp_path / "out"), str(tmp_path / "g.jpg")]) == 0
    assert main([str(tmp_path / "out"), str(tmp_path / "g.JPEG")]) == 0
    assert main([str(tmp_path / "out"), str(tmp_path / "g.png")]) == 0
    assert [Image.open(tmp_path / name).format for name in ("g.jpg", "g.JPEG", "g.png")] == ["JPEG", "JPEG", "PNG"]
    capsys.readouterr()
    assert main([str(tmp_path / "out"), str(tmp_path / "g.gif")]) == 2
    assert "g.gif: expected a name ending in .png, .jpg, .jpeg" in capsys.readouterr().err
    assert not (tmp_path / "g.gif").exists()


def test_an_axis_left_out_is_none_when_the_other_is_its_default_field(tmp_path, capsys):
    """`--cols prompt` alone was a prompt x prompt diagonal (rows default to prompt)."""
    write_output(tmp_path / "out", [{"prompt": p, "sampler": s} for p in ("a", "b") for s in ("ddim", "euler")])
    runs = {
        (): "2 prompt x 2 sampler",
        ("--cols", "prompt"): "1 row x 2 prompt",
        ("--rows", "sampler"): "2 sampler x 1 column",
        ("--rows", "prompt", "--cols", "prompt"): "2 prompt x 2 prompt",  # asked for: as asked
    }
    for args, shape in runs.items():
        assert main([str(tmp_path / "out"), str(tmp_path / "g.png"), *args]) == 0
        assert f": {shape}" in capsys.readouterr().out
    grid = make_grid(str(tmp_path / "out"), None, "prompt")
    assert grid.rows == [""] and grid.cols == ["a", "b"] and grid.per_cell == 2  # both samplers in each cell


def test_shards_are_read_in_shard_order_past_99999_shards(tmp_path):
    """`shard-100000` sorts between `shard-10000` and `shard-10001` as text."""
    shards = {0: "shard-10000", 1: "shard-10001", 2: "shard-100000"}
    write_output(tmp_path, [{"seed": 10000}, {"seed": 10001}, {"seed": 100000}], shard_of=shards.get)
    assert make_grid(str(tmp_path), "seed", "sampler").rows == [10000, 10001, 100000]
    assert sorted(["shard-100000", "shard-10001", "x", "shard-10000"], key=shard_sort_key) == [
        "x", "shard-10000", "shard-10001", "shard-100000",
    ]  # fmt: skip
