"""Prompt adherence of generated shape images: what the prompt asked for vs what `detect` sees.

Used two ways:
- `adherence(pairs)` returns per-attribute accuracies as a dict, for benchmarks and training
  curves;
- `python -m shapesworld.eval OUTPUT_OR_FOLDER_OR_IMAGE...` prints the table for images on disk.
  Each image (PNG, JPEG, WebP) carries its prompt in the A1111-style "parameters" the job runner writes
  (the prompt is everything before the "Negative prompt:" / "Steps:" lines).
  `--synthetic N` evaluates N ground-truth renders instead (the detector's own check).

An attribute is scored only on the images whose prompt names it. "all" counts an image correct
when colour, shape and position are all right (the three the issue sets targets for).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .detect import NONE, Detection, detect
from .world import dataset, parse_caption

ATTRIBUTES = ("colour", "shape", "position", "size", "background")
TARGETS = ("colour", "shape", "position")  # "all" requires these three


@dataclass(frozen=True)
class Judgement:
    """One image: what its prompt asked for, what was detected, and which attributes match."""

    name: str
    prompt: str
    wanted: dict  # attribute -> value or None (prompt does not say)
    detection: Detection
    correct: dict  # attribute -> bool, only for attributes the prompt names

    @property
    def all_correct(self) -> bool | None:
        if any(a not in self.correct for a in TARGETS):
            return None
        return all(self.correct[a] for a in TARGETS)


def judge(image, prompt: str, name: str = "") -> Judgement:
    """Compare one image (PIL, uint8 (H, W, 3) array or path) with its prompt."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    wanted = parse_caption(prompt)
    detection = detect(image)
    seen = detection.attributes()
    correct = {a: seen[a] == wanted[a] for a in ATTRIBUTES if wanted[a] is not None}
    return Judgement(name, prompt, wanted, detection, correct)


def summarize(judgements: Sequence[Judgement]) -> dict:
    """Accuracy per attribute (None where no prompt named it), with the counts behind it."""
    result: dict = {"n": len(judgements), "no_shape": sum(j.detection.shape == NONE for j in judgements)}
    counts = {}
    for attribute in ATTRIBUTES:
        scored = [j.correct[attribute] for j in judgements if attribute in j.correct]
        counts[attribute] = [sum(scored), len(scored)]
        result[attribute] = sum(scored) / len(scored) if scored else None
    scored = [j.all_correct for j in judgements if j.all_correct is not None]
    counts["all"] = [sum(scored), len(scored)]
    result["all"] = sum(scored) / len(scored) if scored else None
    result["counts"] = counts
    return result


def adherence(pairs: Iterable[tuple]) -> dict:
    """Per-attribute accuracy of `(image, prompt)` pairs: keys colour, shape, position, size,
    background, all (fractions in [0, 1], or None), n, no_shape (images with nothing detected)
    and counts ({attribute: [correct, scored]})."""
    return summarize([judge(image, prompt) for image, prompt in pairs])


def recolour_rows(n: int, seed: int, any_colours: bool = False, strength: float = 0.7, size: int = 64) -> list[dict]:
    """img2img recolouring rows: a rendered red circle as `init_image` and a prompt for the
    same circle (size, position, background) in blue; with `any_colours`, a random shape in a
    random colour and a prompt for it in another colour. Row i has seed i."""
    from .world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, render

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        scale = list(SIZES)[rng.integers(len(SIZES))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        shape, old, new = "circle", "red", "blue"
        if any_colours:
            shape = SHAPES[rng.integers(len(SHAPES))]
            old, new = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
        init = render(Scene(shape, old, scale, position, background), size)
        prompt = Scene(shape, new, scale, position, background).caption(i % 3)
        rows.append({"prompt": prompt, "seed": i, "strength": strength, "init_image": init})
    return rows


def format_table(result: dict) -> str:
    lines = [f"{'attribute':<12}{'correct':>9}{'scored':>9}{'accuracy':>10}"]
    for attribute in (*ATTRIBUTES, "all"):
        correct, scored = result["counts"][attribute]
        accuracy = f"{100 * result[attribute]:.1f}%" if scored else "-"
        label = "all three" if attribute == "all" else attribute
        lines.append(f"{label:<12}{correct:>9}{scored:>9}{accuracy:>10}")
    lines.append(f"{result['n']} images, {result['no_shape']} with no shape detected")
    return "\n".join(lines)


# ---------------------------------------------------------------- images on disk


def prompt_from_image(path: Path) -> str | None:
    """The prompt in an image's A1111 "parameters" (a PNG text chunk, or the EXIF UserComment of
    a JPEG or WebP, as sdgen writes them); None when there is none."""
    from jobs.writer import read_parameters  # the reader of what sdgen's writer embeds

    parameters = read_parameters(path.read_bytes())
    if not isinstance(parameters, str):
        return None
    lines = []
    for line in parameters.splitlines():
        if line.startswith(("Negative prompt:", "Steps:")):
            break
        lines.append(line)
    return "\n".join(lines).strip()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # the formats sdgen writes


def find_images(paths: Sequence[str]) -> list[Path]:
    """Image files named, or found (recursively, sorted) under the folders named: PNG, JPEG and
    WebP, the formats a job's `image.format` may choose."""
    found = []
    for path in map(Path, paths):
        if path.is_dir() and (path / "job.json").is_file() and (path / "images").is_dir():
            path = path / "images"  # a job's output: its images, not the report's thumbnails
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return found


def judge_files(files: Sequence[Path]) -> tuple[list[Judgement], list[Path]]:
    """Judge each image against its embedded prompt; files without one are returned apart."""
    judgements, unprompted = [], []
    for path in files:
        prompt = prompt_from_image(path)
        if prompt is None:
            unprompted.append(path)
        else:
            judgements.append(judge(path, prompt, name=str(path)))
    return judgements, unprompted


def judge_synthetic(n: int, seed: int, split: str, size: int, noise: float, blur: float) -> list[Judgement]:
    """Ground-truth renders (optionally blurred, then noised) judged against their captions."""
    rng = np.random.default_rng(seed)
    judgements = []
    for i, (image, caption) in enumerate(dataset(n, seed, split, size, tensors=False)):
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur * size / 64))
        if noise:
            pixels = np.asarray(image, dtype=np.float32)
            pixels = pixels + rng.normal(0.0, noise, pixels.shape)
            image = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
        judgements.append(judge(image, caption, name=f"{split}/{i}"))
    return judgements


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shapesworld.eval",
        description="Prompt adherence of shape-world images: colour, shape, position, size, "
        "background accuracy against each image's prompt.",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        help="job OUTPUT folders, image folders or image files (PNG, JPEG, WebP; searched "
        "recursively for images with the 'parameters' sdgen embeds)",
    )
    parser.add_argument(
        "--synthetic", type=int, metavar="N", help="instead, judge N ground-truth renders (detector self-check)"
    )
    parser.add_argument("--split", default="heldout", choices=("train", "heldout", "all"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument(
        "--noise", type=float, default=0.0, help="gaussian pixel noise sigma (0-255 scale) for --synthetic"
    )
    parser.add_argument(
        "--blur", type=float, default=0.0, help="gaussian blur sigma in pixels at 64x64 for --synthetic"
    )
    parser.add_argument(
        "--errors", type=int, default=0, metavar="K", help="also list up to K images with a wrong attribute"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    if args.synthetic is not None:
        judgements = judge_synthetic(args.synthetic, args.seed, args.split, args.size, args.noise, args.blur)
    elif args.paths:
        try:
            judgements, unprompted = judge_files(find_images(args.paths))
        except FileNotFoundError as error:
            parser.error(str(error))
        if unprompted:
            print(
                f"skipped {len(unprompted)} images without a 'parameters' prompt, e.g. {unprompted[0]}", file=sys.stderr
            )
        if not judgements:
            print("no images with a prompt found", file=sys.stderr)
            return 1
    else:
        parser.error("give image paths or --synthetic N")

    result = summarize(judgements)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    wrong = [j for j in judgements if not all(j.correct.values())]
    for j in wrong[: args.errors]:
        mistakes = ", ".join(
            f"{a}: wanted {j.wanted[a]}, saw {j.detection.attributes()[a]}" for a, ok in j.correct.items() if not ok
        )
        print(f"{j.name}: {j.prompt!r} -> {mistakes}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
