"""Images/s of sdcore against diffusers, same weights, settings and seeds, on this machine.

Two cases: the tiny built-in model (64x64, many images) and the full SD 1.5 architecture with
random weights at a small size (the real cost profile). Results are appended to
bench/RESULTS.md with the machine, torch version and date.

    python bench/bench_sdcore.py [--full-steps 5] [--full-size 256] [--skip-full]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: E402

from sdcore.config import ModelConfig  # noqa: E402
from sdcore.tokenizer import get_tokenizer  # noqa: E402
from sdcore.weights import assemble, random_parts  # noqa: E402

from tests.reference import SD15_SCHEDULER_CONFIG, clip_kwargs, diffusers_models, transformers_text_state_dict  # noqa: E402

PROMPTS = ["a red circle at the top left", "a small blue star", "a large green square", "a purple triangle"]


def reference_pipeline(config: ModelConfig, parts) -> StableDiffusionPipeline:
    unet, vae, text = diffusers_models(config, device="meta")
    unet.load_state_dict(parts["unet"], assign=True)
    vae.load_state_dict(parts["vae"], assign=True)
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(**clip_kwargs(config))).eval()
    text.load_state_dict(transformers_text_state_dict(parts["text_encoder"], text))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text,
        tokenizer=get_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_case(name: str, config: ModelConfig, *, images: int, batch: int, steps: int, size: int) -> dict:
    parts = random_parts(config, seed=0)
    ours = assemble(config, parts, source=name)
    ref = reference_pipeline(config, parts)
    rows = [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i} for i in range(images)]
    settings = dict(sampler="ddim", steps=steps, guidance_scale=7.5, width=size, height=size)

    # one warm-up image each (allocator, oneDNN kernel selection)
    ours.generate(rows[:1], **settings)
    ref(PROMPTS[0], num_inference_steps=steps, width=size, height=size, generator=torch.Generator("cpu").manual_seed(0))

    results = {}
    for mode, invariant in (("sdcore", True), ("sdcore (batch_invariant=False)", False)):
        start = time.perf_counter()
        for i in range(0, images, batch):
            ours.generate(rows[i : i + batch], **settings, batch_invariant=invariant)
        results[mode] = images / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(0, images, batch):
        chunk = rows[i : i + batch]
        ref(
            [r["prompt"] for r in chunk],
            num_inference_steps=steps,
            width=size,
            height=size,
            guidance_scale=7.5,
            generator=[torch.Generator("cpu").manual_seed(r["seed"]) for r in chunk],
        )
    results["diffusers"] = images / (time.perf_counter() - start)
    return {"case": name, "images": images, "batch": batch, "steps": steps, "size": size, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-steps", type=int, default=4)
    parser.add_argument("--full-size", type=int, default=256)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch threads (use 1 when other work shares the cores: "
        "oversubscribed OpenMP threads spin and distort timings)",
    )
    parser.add_argument("--note", default="", help="free text recorded with the results")
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    rows = [time_case("builtin:tiny", ModelConfig.tiny(), images=16, batch=4, steps=20, size=64)]
    if not args.skip_full:
        rows.append(
            time_case(
                "SD 1.5 architecture (random weights)",
                ModelConfig.sd15(),
                images=2,
                batch=2,
                steps=args.full_steps,
                size=args.full_size,
            )
        )

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## {when} — {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, float32, DDIM, guidance 7.5. {args.note}\n",
        "| case | images | batch | steps | size | sdcore img/s | sdcore batched img/s | diffusers img/s "
        "| sdcore / diffusers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['images']} | {r['batch']} | {r['steps']} | {r['size']}x{r['size']} | "
            f"{r['sdcore']:.3f} | {r['sdcore (batch_invariant=False)']:.3f} | {r['diffusers']:.3f} | "
            f"{r['sdcore'] / r['diffusers']:.2f}x |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    if not out.exists():
        out.write_text("# sdcore vs diffusers throughput (bench/bench_sdcore.py)\n")
    with out.open("a") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
