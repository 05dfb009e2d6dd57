"""A small, exactly specified world of captioned shape scenes, for training and judging a tiny SD.

Why a synthetic world: the prompt adherence of a model trained on web images can only be judged
by people or by another big model. Here every training image is drawn from a caption we wrote,
so the truth is known, and a deterministic detector (`detect.py`) can read the attributes back
out of a generated image.

The world (all geometry is a fraction of the image side, so any `size` renders the same scene):

- one shape per image: circle, square, triangle (upright, apex on top), star (five points, one up);
  every shape exactly fills its square bounding box, no rotation;
- six colours, chosen far apart in RGB: red, orange, yellow, green, blue, purple;
- two sizes: small (box side 0.18 of the image) and large (0.30), each scaled by up to +-5%;
- nine positions on a 3x3 grid: "top left", "top", "top right", "left", "center", "right",
  "bottom left", "bottom", "bottom right". The box centre sits at 0.22 / 0.5 / 0.78 of the
  side (well inside the grid's thirds), jittered by up to +-0.025, so even a large shape stays
  2 px (at 64x64) clear of the border;
- three backgrounds, disjoint from the shape colours: white, gray, black.

Held-out split: a (shape, colour, position) combination is held out of training when
`(shape_index + colour_index + position_index) % 9 == 0`. For every (shape, colour) exactly one of
the nine positions is held out, so 24 of the 216 combinations (11%) are held out, and every pair
of attributes (shape+colour, shape+position, colour+position) still appears in training: held-out
prompts test composition, not unseen words. Size and background are free in both splits.

Everything is seeded: item `i` of `dataset(n, seed, split)` depends only on `(seed, split, i)`,
so datasets are reproducible byte for byte (for given numpy and Pillow versions: numpy's PCG64
streams and Pillow's integer drawing and box filter are stable, but not promised forever) and
can be read in any order by any number of workers.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")

# RGB, 0-255. Pairwise distances >= 95, and >= 115 from every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 125, 0),
    "yellow": (250, 220, 20),
    "green": (30, 170, 40),
    "blue": (30, 70, 220),
    "purple": (150, 40, 200),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}

# Side of the shape's bounding box as a fraction of the image side, before the jitter (a scale
# factor drawn uniformly from 1 +- SIZE_JITTER).
SIZES: dict[str, float] = {"small": 0.18, "large": 0.30}
SIZE_JITTER = 0.05

# Row-major 3x3 grid: index = 3 * row + col.
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# Where the shape centre sits along one axis for grid column/row 0, 1, 2.
_GRID_CENTRES = (0.22, 0.5, 0.78)
POSITION_JITTER = 0.025

# How a position reads in a sentence: "a red circle <phrase> on a white background".
_POSITION_PHRASES = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}

# Caption templates. Fields: size, colour, shape, where (phrase), position (bare), background.
TEMPLATES = (
    "a {size} {colour} {shape} {where} on a {background} background",
    "a {background} background with a {size} {colour} {shape} {where}",
    "{size} {colour} {shape}, {position}, {background} background",
)

STAR_INNER = 0.382  # inner / outer radius of the star
SUPERSAMPLE = 4  # render at 4x and box-filter down: exact, deterministic anti-aliasing


@dataclass(frozen=True)
class Scene:
    """One image: the captioned attributes plus the uncaptioned jitter that varies the pixels."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    dx: float = 0.0  # centre offset, fraction of the image side (+ is right)
    dy: float = 0.0  # (+ is down)
    scale: float = 1.0  # multiplies SIZES[size]

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in allowed:
                raise ValueError(f"Scene.{name} {value!r} not one of {sorted(allowed)}")

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template].format(
            size=self.size,
            colour=self.colour,
            shape=self.shape,
            where=_POSITION_PHRASES[self.position],
            position=self.position,
            background=self.background,
        )

    def attributes(self) -> dict[str, str]:
        """The captioned fields only (what a prompt asks for)."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
            "background": self.background,
        }

    def box(self) -> tuple[float, float, float]:
        """(centre x, centre y, side) of the shape's box, as fractions of the image side."""
        index = POSITIONS.index(self.position)
        row, col = divmod(index, 3)
        return (
            _GRID_CENTRES[col] + self.dx,
            _GRID_CENTRES[row] + self.dy,
            SIZES[self.size] * self.scale,
        )


# ---------------------------------------------------------------- held-out split


def is_held_out(scene: Scene) -> bool:
    """True when the scene's (shape, colour, position) combination is never shown in training."""
    return _held_out(scene.shape, scene.colour, scene.position)


def _held_out(shape: str, colour: str, position: str) -> bool:
    s = SHAPES.index(shape)
    c = list(COLOURS).index(colour)
    p = POSITIONS.index(position)
    return (s + c + p) % 9 == 0


HELD_OUT_COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(
    (s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS if _held_out(s, c, p)
)

# ---------------------------------------------------------------- sampling


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """Draw a scene from `split` ("train", "heldout" or "all"), uniform over its combinations."""
    if split == "heldout":
        shape, colour, position = HELD_OUT_COMBINATIONS[rng.integers(len(HELD_OUT_COMBINATIONS))]
    elif split in ("train", "all"):
        while True:  # rejection: 89% of draws are accepted for "train"
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            position = POSITIONS[rng.integers(len(POSITIONS))]
            if split == "all" or not _held_out(shape, colour, position):
                break
    else:
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    size = list(SIZES)[rng.integers(len(SIZES))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    scale = rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    return Scene(shape, colour, size, position, background, float(dx), float(dy), float(scale))


# ---------------------------------------------------------------- rendering


def shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]]:
    """Outline of `shape` filling the axis-aligned square box of `side` centred at (cx, cy).
    Circles and squares are returned as the box's two corners (for `ImageDraw.ellipse` /
    `rectangle`)."""
    x0, y0 = cx - side / 2, cy - side / 2
    x1, y1 = cx + side / 2, cy + side / 2
    if shape in ("circle", "square"):
        return [(x0, y0), (x1, y1)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "star":
        # Regular five-pointed star (inner/outer radius 0.382, the pentagram's), point up,
        # then stretched to fill the box exactly.
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER)
        px, py = radii * np.cos(angles), radii * np.sin(angles)
        px = (px - px.min()) / (px.max() - px.min())
        py = (py - py.min()) / (py.max() - py.min())
        return [(x0 + side * float(u), y0 + side * float(v)) for u, v in zip(px, py)]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill) -> None:
    """Draw `shape` on `draw` in PIL pixel coordinates (no anti-aliasing: the caller
    supersamples)."""
    points = shape_polygon(shape, cx, cy, side)
    if shape == "circle":
        draw.ellipse(points, fill=fill)
    elif shape == "square":
        draw.rectangle(points, fill=fill)
    else:
        draw.polygon(points, fill=fill)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw `scene` as a `size`x`size` RGB image, anti-aliased by 4x supersampling."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    cx, cy, side = scene.box()
    # Pixel (i, j) covers [i, i+1): scale fractions to the big canvas; ImageDraw fills the
    # pixels whose centres lie inside, so shift by -0.5 to keep the shape centred.
    draw_shape(ImageDraw.Draw(image), scene.shape, cx * big - 0.5, cy * big - 0.5, side * big, COLOURS[scene.colour])
    return image.resize((size, size), Image.Resampling.BOX)


# ---------------------------------------------------------------- captions back to attributes

_SYNONYMS = {
    "grey": "gray",
    "centre": "center",
    "middle": "center",
    "big": "large",
    "tiny": "small",
    "rectangle": "square",
    "ball": "circle",
    "upper": "top",
    "lower": "bottom",
}
_NEGATIONS = ("not", "no", "without", "non")  # the word after one is not asked for


def parse_caption(text: str) -> dict[str, str | None]:
    """Read the attributes a prompt asks for: keys shape, colour, size, position, background.

    Tolerant of word order and of our templates' phrasing; an attribute the prompt does not
    name is None (and is then not scored). Colours are only read outside "<x> background" (any
    colour word: "a blue background" names no shape colour, even where the world has no blue
    backgrounds), a word after "not"/"no"/"without" is not read, and full-width letters are
    read as letters (NFKC, as CLIP's text cleaning does)."""
    words = [_SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", unicodedata.normalize("NFKC", text).lower())]
    words = [w for i, w in enumerate(words) if not (i and words[i - 1] in _NEGATIONS)]
    text = " ".join(words)

    background = None
    match = re.search(r"\b([a-z]+) background\b", text)
    if match:
        background = match.group(1) if match.group(1) in BACKGROUNDS else None
        text = text[: match.start()] + text[match.end() :]  # its colour word is not the shape's
    words = text.split()

    def first(options) -> str | None:
        return next((w for w in words if w in options), None)

    vertical = first(("top", "bottom"))
    horizontal = first(("left", "right"))
    if vertical and horizontal:
        position = f"{vertical} {horizontal}"
    else:
        position = vertical or horizontal or ("center" if "center" in words else None)

    shape = first(SHAPES)
    if shape is None:  # plurals ("two stars") still name the shape
        shape = first({s + "s": s for s in SHAPES})
        shape = shape[:-1] if shape else None
    return {
        "shape": shape,
        "colour": first(COLOURS),
        "size": first(SIZES),
        "position": position,
        "background": background,
    }


# ---------------------------------------------------------------- datasets

_SPLIT_CODES = {"train": 0, "heldout": 1, "all": 2}


def to_tensor(image: Image.Image):
    """PIL RGB -> float32 tensor (3, H, W) in [-1, 1], the VAE's input range."""
    import torch  # lazy: rendering, parsing and detection do not need torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1).contiguous()  # (3, H, W)


class ShapesDataset:
    """A map-style dataset (works with `torch.utils.data.DataLoader`) of `(image, caption)`.

    Item `i` is drawn from `np.random.default_rng([seed, split_code, i])`, so it is the same
    whatever the dataset length, the access order or the number of loader workers."""

    def __init__(self, n: int, seed: int = 0, split: str = "train", size: int = 64, tensors: bool = True):
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, not {split!r}")
        self.n, self.seed, self.split, self.size, self.tensors = n, seed, split, size, tensors

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> tuple[Scene, str]:
        """Item `i`'s scene and caption, without rendering."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], i])
        scene = sample_scene(rng, self.split)
        return scene, scene.caption(int(rng.integers(len(TEMPLATES))))

    def __getitem__(self, i: int):
        scene, caption = self.scene(i)
        image = render(scene, self.size)
        return (to_tensor(image) if self.tensors else image), caption

    def __iter__(self) -> Iterator:
        return (self[i] for i in range(self.n))


def dataset(n: int, seed: int = 0, split: str = "train", size: int = 64, tensors: bool = True) -> ShapesDataset:
    """`n` reproducible `(image, caption)` pairs; image is a (3, size, size) float32 tensor in
    [-1, 1] (or a PIL image with `tensors=False`)."""
    return ShapesDataset(n, seed, split, size, tensors)
