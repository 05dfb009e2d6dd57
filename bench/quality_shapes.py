"""Prompt adherence of `builtin:shapes` on held-out prompts; writes bench/QUALITY.md.

What is measured (the targets of the "built-in model that draws what it is told" issue):

- held-out prompts: captions of (shape, colour, position) combinations never seen in training
  (`shapesworld.world`, split "heldout"), one seed per prompt, 64x64;
- every sampler (ddpm 50, ddim 25, euler_a 25, dpmpp_2m 15) at guidance 5.0 and 7.5; "the
  chosen guidance" is the one where the four do best on average; DDIM 25 at 1.0 (no guidance)
  shows whether guidance matters;
- img2img recolouring: a rendered red circle as the init image, the prompt asks for a blue
  circle (same size, position and background), strength 0.7, DDIM 25: how often the result is
  blue, and how often it is still a circle; and the same for any shape from any colour to any
  other colour.

Every image is judged by the deterministic detector of `shapesworld.evaluate`.

    .venv/bin/python bench/quality_shapes.py                 # ~15 min on 2 CPU cores
    .venv/bin/python bench/quality_shapes.py --n 40 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WEIGHTS = "builtin:shapes"
PROMPT_SEED = 2024  # held-out prompt list; disjoint from anything training drew
TARGETS = {"colour": 0.90, "shape": 0.80, "position": 0.80}
IMG2IMG_TARGET = 0.80
IMG2IMG_GUIDANCE = (5.0, 7.5, 10.0)  # recolouring is measured at each (and the chosen one)
SAMPLER_TOLERANCE = 0.05
GUIDANCES = (5.0, 7.5)  # the range; every sampler is measured at both

_pipe = None


def _worker_init(weights: str) -> None:
    import torch

    from sdcore.weights import load_pipeline

    torch.set_num_threads(1)
    global _pipe
    _pipe = load_pipeline(weights)


def _generate(task: tuple) -> list[np.ndarray]:
    """One chunk of rows under one setting -> uint8 (H, W, 3) arrays."""
    rows, kwargs = task
    images = _pipe.generate(rows, width=64, height=64, **kwargs)
    return [np.asarray(im) for im in images]


def heldout_prompts(n: int) -> list[str]:
    from shapesworld.world import dataset

    data = dataset(n, seed=PROMPT_SEED, split="heldout", tensors=False)
    return [data.scene(i)[1] for i in range(n)]


def recolour_rows(n: int, any_colours: bool = False) -> list[dict]:
    from shapesworld.evaluate import recolour_rows as rows

    return rows(n, seed=PROMPT_SEED + (2 if any_colours else 1), any_colours=any_colours)


def run_setting(pool, rows: list[dict], chunks: int, **kwargs) -> list[np.ndarray]:
    size = max(1, -(-len(rows) // chunks))
    tasks = [(rows[i : i + size], kwargs) for i in range(0, len(rows), size)]
    return [image for chunk in pool.map(_generate, tasks) for image in chunk]


def contact_sheet(pipe, path: Path, *, n: int = 16, columns: int = 4, guidance: float = 7.5, scale: int = 3) -> None:
    """A grid of held-out samples (DDIM 25), each prompt written under its image."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    prompts = heldout_prompts(n)
    images = pipe.generate(
        [{"prompt": p, "seed": i} for i, p in enumerate(prompts)],
        sampler="ddim",
        steps=25,
        guidance_scale=guidance,
        width=64,
        height=64,
    )
    side, text_h, pad = 64 * scale, 46, 6
    rows = -(-n // columns)
    sheet = Image.new("RGB", (columns * (side + pad) + pad, rows * (side + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        x = pad + (i % columns) * (side + pad)
        y = pad + (i // columns) * (side + text_h + pad)
        sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y))
        draw.multiline_text((x, y + side + 2), "\n".join(textwrap.wrap(prompt, 30)), fill="black", font=font, spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The defaults are the recorded QUALITY.md's, so the plain command remakes it.
    parser.add_argument("--n", type=int, default=240, help="held-out prompts per setting")
    parser.add_argument("--n-img2img", type=int, default=90)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--weights", default=WEIGHTS)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "QUALITY.md")
    parser.add_argument(
        "--sheet", type=Path, metavar="PNG", help="only draw a contact sheet of held-out samples to PNG"
    )
    args = parser.parse_args(argv)
    if args.sheet:
        import torch

        from sdcore.weights import load_pipeline

        torch.set_num_threads(args.workers)
        contact_sheet(load_pipeline(args.weights), args.sheet)
        return 0

    from sdcore.weights import load_pipeline
    from shapesworld.evaluate import adherence

    began = time.time()
    pipe = load_pipeline(args.weights)
    prompts = heldout_prompts(args.n)
    rows = [{"prompt": p, "seed": i} for i, p in enumerate(prompts)]
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.workers, initializer=_worker_init, initargs=(args.weights,)) as pool:

        def measure(name: str, rows_: list[dict], **kwargs) -> dict:
            start = time.time()
            images = run_setting(pool, rows_, args.workers * 2, **kwargs)
            timings[name] = time.time() - start
            result = adherence(zip(images, [r["prompt"] for r in rows_]))
            results[name] = result
            print(
                f"{name}: colour {pct(result['colour'])} shape {pct(result['shape'])} "
                f"position {pct(result['position'])} all {pct(result['all'])} "
                f"({timings[name]:.0f}s)",
                flush=True,
            )
            return result

        samplers = {"ddim": 25, "ddpm": 50, "euler_a": 25, "dpmpp_2m": 15}
        for g in GUIDANCES:
            for sampler, steps in samplers.items():
                measure(f"{sampler}{steps} g{g}", rows, sampler=sampler, steps=steps, guidance_scale=g)
            # SD users' usual DPM++ 2M: with Karras sigmas (not a target row)
            measure(f"dpmpp_2m15 karras g{g}", rows, sampler="dpmpp_2m", steps=15, karras=True, guidance_scale=g)
        measure("ddim25 g1.0", rows, sampler="ddim", steps=25, guidance_scale=1.0)
        # the chosen guidance: where the four samplers do best on average
        chosen = max(GUIDANCES, key=lambda g: sum(results[f"{s}{n} g{g}"]["all"] or 0.0 for s, n in samplers.items()))
        recolour = recolour_rows(args.n_img2img)
        for g in sorted({1.0, chosen, *IMG2IMG_GUIDANCE}):
            measure(f"img2img red->blue circle g{g}", recolour, sampler="ddim", steps=25, guidance_scale=g)
        recolour_any = recolour_rows(args.n_img2img, any_colours=True)
        for g in sorted({chosen, 7.5}):
            measure(f"img2img any recolour g{g}", recolour_any, sampler="ddim", steps=25, guidance_scale=g)

    elapsed = time.time() - began
    report = write_report(args, pipe, results, timings, chosen, samplers, elapsed)
    print(report)
    if not args.no_write:
        args.out.write_text(report + kept_section(args.out))
        (args.out.with_suffix(".json")).write_text(
            json.dumps({"chosen_guidance": chosen, "n": args.n, "results": results}, indent=1) + "\n"
        )
    return 0


def kept_section(path: Path, heading: str = "## Training experiments") -> str:
    """The hand-written section `heading` of the report at `path` (to its end or the next
    heading), with a blank line before it: a rewrite of the report keeps it."""
    text = path.read_text() if path.exists() else ""
    start = text.find("\n" + heading + "\n")
    if start < 0:
        return ""
    end = text.find("\n## ", start + 1)
    return "\n" + text[start + 1 : end + 1 if end >= 0 else len(text)]


def write_report(args, pipe, results, timings, chosen, samplers, elapsed) -> str:
    def commit() -> str:
        try:
            return subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True, capture_output=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    best_name = f"ddim25 g{chosen}"
    best = results[best_name]
    lines = [
        "# Prompt adherence of `builtin:shapes`",
        "",
        f"Measured by `bench/quality_shapes.py --n {args.n} --n-img2img {args.n_img2img}` on "
        f"{datetime.date.today().isoformat()} "
        f"(commit {commit()}, weights fingerprint `{pipe.fingerprint[:16]}`), CPU float32, "
        f"{elapsed / 60:.0f} min.",
        "",
        f"{args.n} held-out prompts (shape/colour/position combinations never seen in "
        "training, `shapesworld.world` split `heldout`, prompt seed "
        f'{PROMPT_SEED}), one image each (seed = row index), 64x64, negative prompt "". '
        "Judged by the deterministic detector `shapesworld.detect` "
        '(via `shapesworld.evaluate.adherence`). "all" = colour, shape and position right '
        "together.",
        "",
        "| setting | colour | shape | position | size | background | all | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name.startswith("img2img"):
            continue
        lines.append(
            f"| {name} | {pct(r['colour'])} | {pct(r['shape'])} | "
            f"{pct(r['position'])} | {pct(r['size'])} | {pct(r['background'])} | "
            f"{pct(r['all'])} | {timings[name]:.0f} |"
        )
    img2img = {n: r for n, r in results.items() if n.startswith("img2img")}
    lines += [
        "",
        f"img2img recolouring ({args.n_img2img} rows each), strength 0.7, DDIM 25. "
        '"red->blue circle": init = a rendered red circle (random size, position, '
        'background), prompt = the same circle in blue. "any recolour": a random shape in a '
        "random colour, prompt = the same shape in another random colour.",
        "",
        "| setting | new colour | shape kept | position kept | all three | s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in img2img.items():
        lines.append(
            f"| {name} | {pct(r['colour'])} | {pct(r['shape'])} | "
            f"{pct(r['position'])} | {pct(r['all'])} | {timings[name]:.0f} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]

    def row(label: str, value: float, ok: bool) -> None:
        lines.append(f"| {label} | {pct(value)} | {'yes' if ok else '**no**'} |")

    for attribute, target in TARGETS.items():
        row(f"{attribute} >= {target:.0%} (DDIM 25, guidance {chosen})", best[attribute], best[attribute] >= target)
    g1 = results["ddim25 g1.0"]
    row(
        f"guidance matters: all at g1.0 clearly (10 points) below g{chosen} ({pct(best['all'])})",
        g1["all"],
        g1["all"] + 0.10 <= best["all"],
    )
    i2i_g1 = results["img2img red->blue circle g1.0"]["colour"]
    i2i_chosen = results[f"img2img red->blue circle g{chosen}"]["colour"]
    row(
        f"guidance matters in img2img: red->blue new colour at g1.0 clearly below g{chosen} ({pct(i2i_chosen)})",
        i2i_g1,
        i2i_g1 + 0.10 <= i2i_chosen,
    )
    lagging = []  # sampler rows more than 5 points behind the best at their guidance
    for g in GUIDANCES:
        names = [f"{s}{n} g{g}" for s, n in samplers.items()]
        best_at_g = max(results[n]["all"] for n in names)
        for name in names:
            value = results[name]["all"]
            ok = value >= best_at_g - SAMPLER_TOLERANCE
            row(f"{name}: all within 5 points of the best sampler at g{g} ({pct(best_at_g)})", value, ok)
            if not ok:
                lagging.append(f"{name} ({pct(value)}, colour {pct(results[name]['colour'])})")
    for name, r in img2img.items():
        if name.endswith(" g1.0"):
            continue  # measured to show what guidance does, not held to the target
        row(f"{name}: new colour >= {IMG2IMG_TARGET:.0%}", r["colour"], r["colour"] >= IMG2IMG_TARGET)
        row(f"{name}: shape kept >= {IMG2IMG_TARGET:.0%}", r["shape"], r["shape"] >= IMG2IMG_TARGET)
    gap = best["all"] - g1["all"]
    red_blue = {n: r for n, r in img2img.items() if "red->blue" in n}
    passing = [
        n.rsplit(" ", 1)[1] for n, r in red_blue.items() if r["colour"] >= IMG2IMG_TARGET and not n.endswith(" g1.0")
    ]
    lines += [
        "",
        "## Notes",
        "",
        f'- Guidance in txt2img: without it (g1.0) "all" is {pct(g1["all"])} against '
        f"{pct(best['all'])} at g{chosen} ({-100 * gap:+.1f} points; colour {pct(g1['colour'])}, "
        f"shape {pct(g1['shape'])}, position {pct(g1['position'])}, background "
        f'{pct(g1["background"])}); "clearly lower" was set at 10 points before measuring. '
        "Where the training captions name the wrong position for a fixed share of images "
        "(`--caption-noise`, `--caption-noise-attributes position`, in `training.json`), the "
        "unguided model places objects loosely, as SD's unguided samples follow their prompts "
        "loosely, and guidance pulls the samples back to the prompt. Trained on exact captions, "
        "the previous model drew this world's prompts without help (96.7% at g1.0 vs 96.2% at "
        "g5.0). Colour and shape are not mislabelled: a model taught that colours in captions "
        "can be wrong keeps the init's colour in img2img (see Training experiments below). In "
        f"img2img recolouring, g1.0 keeps the init's colour ({pct(i2i_g1)} blue against "
        f"{pct(i2i_chosen)} at g{chosen}).",
        *(
            [
                f"- Samplers off by more than 5 points: {', '.join(lagging)}. With Karras sigmas "
                "DPM++ 2M 15 gives "
                + ", ".join(f"{pct(results[f'dpmpp_2m15 karras g{g}']['all'])} at g{g}" for g in GUIDANCES)
                + " (all); the uniform 15-step schedule at high guidance overshoots colours "
                "(e.g. orange comes out yellow)."
            ]
            if lagging
            else []
        ),
        "- img2img at strength 0.7 with DDIM 25 starts at t = 641. The model's latents have std "
        "0.6 rather than SD's 1.0 (`shapesworld/train/stages.py`, `latent_std`): with "
        "unit-variance 16x16 latents an object's colour is still plain at t = 641 and the first "
        "model kept the init's colour (red->blue 29% at g5.0, 67% at g7.5). The red->blue "
        "circle meets the 80% target at " + (", ".join(passing) if passing else "no measured guidance") + ".",
        "- Known defect: on gray backgrounds the decoder often paints a faint iridescent smudge "
        "beside the shape (see the contact sheet); it comes from the small VAE (it appears in "
        "plain reconstructions too) and is faint enough that the detector ignores it.",
    ]
    training = ROOT / "sdcore" / "builtin" / "shapes" / "training.json"
    if args.weights == WEIGHTS and training.exists():
        meta = json.loads(training.read_text())
        wall = sum(meta["wall_seconds"].values())
        lines += [
            "",
            "## The model",
            "",
            f"`builtin:shapes` (`sdcore/builtin/shapes/`, config and training record in "
            f"`training.json`): trained by `{meta['command']}` on "
            f"{meta['dataset']['n_images']} images of `shapesworld` (dataset seed "
            f"{meta['dataset']['seed']}, training split only) in {wall / 60:.0f} min on 1 "
            f"shared CPU core: VAE {meta['vae_steps']} steps (loss "
            f"{meta['vae_loss']['first']:.3f} -> {meta['vae_loss']['last50']:.3f}), UNet + text "
            f"encoder {meta['unet_steps']} steps (ε-MSE {meta['unet_loss']['first50']:.3f} -> "
            f"{meta['unet_loss']['last200']:.3f}). {meta['weights']}; images from the float16 "
            "file differ from the float32 EMA weights by at most 1/255 per pixel (16 held-out "
            "prompts, DDIM 25).",
        ]
        for key in ("training_sessions", "checkpoint_selection"):
            if key in meta:
                lines += ["", f"{key.replace('_', ' ').capitalize()}: {meta[key]}"]
        if meta["command"].startswith("python -m sdcore.train "):
            lines += [
                "",
                (
                    "`training.json` was recorded before the training code moved from "
                    "`sdcore/` to `shapesworld/`: its `sdcore.train` is today's "
                    "`shapesworld.train` (same options), and \"sdcore/train.py's "
                    'docstring" is the Training experiments section below.'
                ),
            ]
    lines += [
        "",
        "Accuracies are over one image per prompt; with n = "
        f"{args.n} the standard error of a figure near 85% is about "
        f"{100 * (0.85 * 0.15 / args.n) ** 0.5:.0f} points.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
