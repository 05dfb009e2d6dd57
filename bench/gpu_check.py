"""GPU check: sdcore vs diffusers on one CUDA device, with the same random SD 1.5 weights.

Run by `bench/gpu_check.sh` on a machine with a CUDA torch and no network (see that script).
Measures, at 512x512 float16 with SDPA attention, eager:

- images/s of sdcore (fixed-shape batches, the job runner's default) and diffusers at batch
  1 / 8 / 16, DDIM, guidance 7.5;
- that fixed-shape batches reproduce exactly on CUDA: a row remade alone in its recorded slot
  (filler rows around it) gives the same pixels;
- the UNet's achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode) against a measured
  float16 matmul peak.

Results are printed and appended to `--out` (markdown). On a CPU it runs too (`--device cpu
--size 64 --batches 1,2 --steps 2`), which is how it is smoke-tested without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # not installed on the GPU machine

from side_by_side import reference_pipeline  # noqa: E402 - needs the paths above
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from sdcore import GenerationRequest  # noqa: E402
from sdcore.config import ModelConfig  # noqa: E402
from sdcore.weights import assemble, random_parts  # noqa: E402

PROMPTS = ["a lighthouse at dusk", "a red circle", "a bowl of fruit", "a city street in the rain"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, run) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    repeats = 10
    seconds = timed(device, lambda: [a @ b for _ in range(repeats)])
    return 2 * n**3 * repeats / seconds / 1e12


def unet_tflops(pipe, device: torch.device, batch: int, size: int) -> tuple[float, float]:
    """(achieved TFLOP/s, GFLOP per forward) of the UNet on a guided batch of `batch` rows."""
    latent = size // 8
    x = torch.randn(2 * batch, 4, latent, latent, device=device, dtype=pipe.dtype)
    t = torch.tensor(500.0, device=device)
    context = torch.randn(2 * batch, 77, 768, device=device, dtype=pipe.dtype)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            pipe.unet(x, t, context)
        flops = counter.get_total_flops()
        for _ in range(2):
            pipe.unet(x, t, context)
        repeats = 5
        seconds = timed(device, lambda: [pipe.unet(x, t, context) for _ in range(repeats)])
    return flops * repeats / seconds / 1e12, flops / 1e9


def throughput(ours, ref, device, batch: int, size: int, steps: int) -> tuple[float, float]:
    requests = [GenerationRequest(PROMPTS[i % len(PROMPTS)], seed=i) for i in range(batch)]
    settings = dict(sampler="ddim", steps=steps, guidance_scale=7.5, width=size, height=size, fixed_batch=batch)

    def run_ref():
        ref(
            [r.prompt for r in requests],
            num_inference_steps=steps,
            width=size,
            height=size,
            guidance_scale=7.5,
            generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
        )

    ours.generate(requests, **settings)  # warm-up: allocator, kernel selection
    run_ref()
    sdcore_s = timed(device, lambda: ours.generate(requests, **settings))
    diffusers_s = timed(device, run_ref)
    return batch / sdcore_s, batch / diffusers_s


def reproduces_in_slot(ours, batch: int, size: int, steps: int) -> bool:
    requests = [GenerationRequest(PROMPTS[i % len(PROMPTS)], seed=100 + i) for i in range(batch)]
    settings = dict(sampler="euler_a", steps=steps, guidance_scale=7.5, width=size, height=size)
    placed = ours.generate_placed(requests, fixed_batch=batch, **settings)
    for index in sorted({0, batch - 1}):
        image, placement = placed[index]
        again = ours.generate([requests[index]], fixed_batch=batch, slots=[placement.slot], **settings)[0]
        if not np.array_equal(np.asarray(image), np.asarray(again)):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--matmul", type=int, default=8192, help="matrix size of the peak measurement")
    parser.add_argument("--out", default=str(REPO / "bench" / "GPU_RESULTS.md"))
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.backends.cudnn.benchmark = False  # exactness: the same algorithm for the same shape
    config = ModelConfig.sd15()
    parts = random_parts(config, seed=0)
    ours = assemble(config, parts, source="random sd15", device=device, dtype=dtype)
    ref = reference_pipeline(config, parts).to(device=device, dtype=dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    lines = [
        f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} — {name}, torch {torch.__version__}, "
        f"{dtype}, {args.size}x{args.size}, DDIM {args.steps} steps, guidance 7.5, eager, SDPA\n",
        "| batch | sdcore img/s | diffusers img/s | sdcore / diffusers |",
        "|---|---|---|---|",
    ]
    for batch in [int(b) for b in args.batches.split(",")]:
        ours_ips, ref_ips = throughput(ours, ref, device, batch, args.size, args.steps)
        lines.append(f"| {batch} | {ours_ips:.3f} | {ref_ips:.3f} | {ours_ips / ref_ips:.2f} |")
        print(lines[-1], flush=True)
    largest = max(int(b) for b in args.batches.split(","))
    peak = matmul_peak_tflops(device, dtype, args.matmul)
    achieved, gflop = unet_tflops(ours, device, largest, args.size)
    exact = reproduces_in_slot(ours, min(largest, 8), args.size, 3)
    lines += [
        "",
        f"- UNet at batch {largest} (guided, {2 * largest} rows): {gflop:.0f} GFLOP per forward, "
        f"{achieved:.2f} TFLOP/s = {100 * achieved / peak:.0f}% of the measured {dtype} matmul peak "
        f"({peak:.2f} TFLOP/s, {args.matmul}^3)",
        f"- fixed-shape batch reproduces in its slot on {device.type}: {'identical' if exact else 'DIFFERENT'}",
    ]
    print("\n".join(lines[-2:]), flush=True)
    with open(args.out, "a") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
