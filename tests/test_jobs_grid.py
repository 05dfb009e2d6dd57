"""jobs/grid.py on a hand-made output: `--where` as typed on a command line, `labels.NAME` for a
label named like a record field, and a font that draws accented labels."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from jobs.grid import label_font, main, make_grid, matches
from jobs.output import Output


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
