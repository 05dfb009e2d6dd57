#!/usr/bin/env python
"""(Re)create the example manifest and its init images, deterministically.

    python manifests/make_example.py            # writes manifests/example.parquet, manifests/init/*.png

The manifest has txt2img rows and img2img rows; the img2img rows name their init images relative
to the manifest's folder (`init/...`), so the manifest and its images can be copied together
(e.g. to S3 for manifests/example-s3.yaml). Same pyarrow and Pillow versions, same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent

COLORS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (235, 200, 40)}
SHAPES = ("circle", "square", "triangle")


def shape_image(shape: str, color: str, size: int = 64) -> Image.Image:
    """A colored shape on a white background (the init images)."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    lo, hi = size // 4, 3 * size // 4
    if shape == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=COLORS[color])
    elif shape == "square":
        draw.rectangle((lo, lo, hi, hi), fill=COLORS[color])
    else:
        draw.polygon([(size // 2, lo), (hi, hi), (lo, hi)], fill=COLORS[color])
    return image


def gradient_image(size: int = 64) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // (size - 1), y * 255 // (size - 1), np.full_like(x, 128)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def example_rows() -> list[dict]:
    rows = []
    txt = [
        ("red-circle", "a large red circle in the center on a white background", 1),
        ("green-square", "a small green square at the top left on a white background", 2),
        ("blue-triangle", "a large blue triangle at the bottom right on a gray background", 3),
        ("yellow-circle", "a small yellow circle on the right on a black background", 4),
        ("red-square", "a large red square at the top on a white background", 5),
        ("blue-circle", "a small blue circle at the bottom left on a gray background", 6),
        ("green-triangle", "a large green triangle on the left on a black background", 7),
        ("yellow-square", "a small yellow square at the bottom on a white background", 8),
    ]
    for rid, prompt, seed in txt:
        rows.append(
            {"id": rid, "prompt": prompt, "negative": "blurry", "seed": seed, "strength": None, "init_image": None}
        )
    img = [
        (
            "red-circle-to-blue",
            "a large blue circle in the center on a white background",
            11,
            0.6,
            "init/red-circle.png",
        ),
        (
            "green-square-to-yellow",
            "a large yellow square in the center on a white background",
            12,
            0.75,
            "init/green-square.png",
        ),
        (
            "blue-triangle-to-red",
            "a large red triangle in the center on a white background",
            13,
            0.5,
            "init/blue-triangle.png",
        ),
        (
            "gradient-to-circle",
            "a large green circle in the center on a white background",
            14,
            0.9,
            "init/gradient.png",
        ),
    ]
    for rid, prompt, seed, strength, init in img:
        rows.append(
            {"id": rid, "prompt": prompt, "negative": "", "seed": seed, "strength": strength, "init_image": init}
        )
    return rows


SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("negative", pa.string()),
        ("seed", pa.int64()),
        ("strength", pa.float64()),
        ("init_image", pa.string()),
    ]
)


def write_example(folder: Path = HERE) -> Path:
    init = folder / "init"
    init.mkdir(parents=True, exist_ok=True)
    shape_image("circle", "red").save(init / "red-circle.png")
    shape_image("square", "green").save(init / "green-square.png")
    shape_image("triangle", "blue").save(init / "blue-triangle.png")
    gradient_image().save(init / "gradient.png")
    path = folder / "example.parquet"
    pq.write_table(pa.Table.from_pylist(example_rows(), schema=SCHEMA), path)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=str(HERE), help="where to write (default: manifests/)")
    args = parser.parse_args()
    print(write_example(Path(args.folder)))
