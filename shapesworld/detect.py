"""Read a shape scene's attributes back out of an image, with plain geometry and colour rules.

Why deterministic rules and not a trained classifier: the evaluator must be trustworthy before
any model exists, give the same answer everywhere, and be easy to audit when a number looks
wrong. The world of `world.py` is simple enough for that. The detector fits the world's own
picture model, "background + one palette-coloured shape, maybe blurred", to the image:

1. background = per-channel median of the outermost ring of pixels (shapes never touch it),
   named by the nearest background colour;
2. blob = pixels far from the background: a loose mask (RGB distance > MIN_CONTRAST) gives the
   shape's contrast (90th-percentile distance in its largest connected blob); the blob is then
   the largest connected set of pixels above half that contrast, so speckle elsewhere is
   ignored. No blob of at least MIN_AREA -> every field "none";
3. colour = the palette colour p that best explains the blob's core pixels (>= 3/4 contrast) as
   a mix `bg + a * (p - bg)` with a in [0.4, 1]: a blurred small red shape on white is pink, and
   that still reads as red, not orange;
4. coverage = each pixel near the blob projected onto `p - bg` (0 = background, 1 = shape). Its
   sum (the shape's area in pixels) and its centroid survive blur, which only moves mass around;
5. shape = analysis by synthesis: for each of the four shapes, the square box with that area and
   centroid is rendered with the world's renderer (sharp, and blurred by 0.75 and 1.5 px at
   64x64) and compared with the coverage by soft IoU; the best shape wins;
6. size and position follow from the winning box: "large" when its side exceeds LARGE_SIDE of the
   image, position = the 3x3 grid cell holding its centre.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZE_JITTER,
    SIZES,
    SUPERSAMPLE,
    draw_shape,
)

NONE = "none"
MIN_CONTRAST = 48.0  # RGB distance (0-255 scale) below which a pixel is background
MIN_AREA = 0.002  # a blob smaller than this fraction of the image is not a shape
# Box side (fraction of the image) separating small from large: midway between the largest
# small shape and the smallest large one.
LARGE_SIDE = (SIZES["small"] * (1 + SIZE_JITTER) + SIZES["large"] * (1 - SIZE_JITTER)) / 2
TEMPLATE_BLURS = (0.0, 0.6, 1.2, 1.8)  # Gaussian sigmas tried, in pixels of a 64x64 image
NEAR = 3  # pixels (at 64x64) around the blob that count towards its coverage

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (6, 3)
_BACKGROUND_PALETTE = np.array(list(BACKGROUNDS.values()), dtype=np.float32)  # (3, 3)


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    shape_score: float = 0.0  # soft IoU of the winning template, 0..1
    side: float = 0.0  # fitted box side, fraction of the image

    def attributes(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if isinstance(v, str)}


def detect(image) -> Detection:
    """Detect the shape in `image` (PIL or uint8 (H, W, 3)); with several, the largest blob is
    read. The fields other than background are "none" when no shape stands out."""
    rgb = _as_array(image)  # (H, W, 3)
    height, width, _ = rgb.shape
    scale = height / 64  # the constants above are in pixels of a 64x64 image
    ring = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (border px, 3)
    bg = np.median(ring, axis=0)  # (3,)
    background = _nearest(bg, _BACKGROUND_PALETTE, BACKGROUNDS)

    # Masks and colour come from a 3x3 median-filtered copy, so pixel noise does not join up
    # into blobs; coverage below uses the raw pixels, whose noise averages out in its sums.
    smooth = np.asarray(_to_pil(rgb).filter(ImageFilter.MedianFilter(3)), dtype=np.float32)
    distance = np.linalg.norm(smooth - bg, axis=2)  # (H, W)
    loose = _largest_component(distance > MIN_CONTRAST)
    nothing = Detection(NONE, NONE, NONE, NONE, background)
    if loose.sum() < MIN_AREA * height * width:
        return nothing
    contrast = float(np.percentile(distance[loose], 90))
    blob = _largest_component(distance > max(MIN_CONTRAST, contrast / 2))
    if blob.sum() < MIN_AREA * height * width:
        return nothing

    core = blob & (distance >= 0.75 * contrast)
    colour_name, fg = _explain_colour(np.median(smooth[core if core.any() else blob], axis=0), bg)

    # Coverage in shape units; not clipped below 0 so that noise averages out in the sums.
    direction = fg - bg  # (3,)
    near = _dilate(blob, max(1, round(NEAR * scale)))
    coverage = np.clip((rgb - bg) @ direction / max(direction @ direction, 1.0), -1.0, 2.0)
    coverage = coverage * near  # (H, W)
    mass = float(coverage.sum())
    if mass <= 0:
        return nothing
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    cy, cx = float((coverage * ys).sum() / mass), float((coverage * xs).sum() / mass)

    target = np.clip(coverage, 0.0, 1.0)
    best = None
    for shape in SHAPES:
        fill, centroid_dy = _geometry(shape)
        side = (mass / fill) ** 0.5
        box_cy = cy - centroid_dy * side  # the box centre sits above a triangle's centroid
        sharp = _template(shape, cx, box_cy, side, (height, width))
        for sigma in TEMPLATE_BLURS:
            template = _blur(sharp, sigma * scale)
            iou = float(np.minimum(template, target).sum() / max(np.maximum(template, target).sum(), 1e-6))
            if best is None or iou > best[0]:
                best = (iou, shape, side, box_cy)
    iou, shape, side, box_cy = best

    row = min(max(int(box_cy / height * 3), 0), 2)
    col = min(max(int(cx / width * 3), 0), 2)
    size = "large" if side > LARGE_SIDE * height else "small"
    return Detection(shape, colour_name, size, POSITIONS[3 * row + col], background, iou, side / height)


# ---------------------------------------------------------------- helpers


def _to_pil(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))


def _as_array(image) -> np.ndarray:
    """PIL image or uint8 (H, W, 3) array -> float32 (H, W, 3) in [0, 255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise TypeError(f"detect() wants a PIL image or a uint8 (H, W, 3) array, got {array.dtype} {array.shape}")
    return array.astype(np.float32)


def _nearest(rgb: np.ndarray, palette: np.ndarray, names) -> str:
    return list(names)[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]


def _explain_colour(observed: np.ndarray, bg: np.ndarray) -> tuple[str, np.ndarray]:
    """The palette colour p (name, RGB) for which `bg + a * (p - bg)`, a in [0.4, 1], comes
    closest to the observed colour."""
    best = None
    for name, p in zip(COLOURS, _PALETTE):
        direction = p - bg
        a = float(np.clip((observed - bg) @ direction / max(direction @ direction, 1.0), 0.4, 1.0))
        residual = float(np.linalg.norm(observed - (bg + a * direction)))
        if best is None or residual < best[0]:
            best = (residual, name, p)
    return best[1], best[2]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected blob of a boolean (H, W) mask (empty mask -> empty)."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        blob, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation by a (2 * steps + 1) square."""
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        mask = grown.copy()
        mask[:, 1:] |= grown[:, :-1]
        mask[:, :-1] |= grown[:, 1:]
    return mask


@cache
def _geometry(shape: str) -> tuple[float, float]:
    """(area / box area, centroid's offset below the box centre / side), measured on a render."""
    n = 512
    canvas = Image.new("L", (n, n), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, n / 2 - 0.5, n / 2 - 0.5, n, 255)
    coverage = np.asarray(canvas, dtype=np.float64) / 255.0  # (n, n)
    ys = np.arange(n)[:, None] + 0.5
    return float(coverage.mean()), float((coverage * ys).sum() / coverage.sum() / n - 0.5)


def _template(shape: str, cx: float, cy: float, side: float, hw) -> np.ndarray:
    """Coverage in [0, 1], (H, W), of `shape` in the square box of `side` centred at (cx, cy)
    (pixel units, pixel i spanning [i, i + 1)), anti-aliased like `world.render`."""
    height, width = hw
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, cx * SUPERSAMPLE - 0.5, cy * SUPERSAMPLE - 0.5, side * SUPERSAMPLE, 255)
    small = canvas.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _blur(coverage: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return coverage
    image = Image.fromarray(np.round(coverage * 255).astype(np.uint8))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32) / 255.0
