"""GPU check: sdcore vs diffusers on one CUDA device, with the same random SD 1.5 weights.

Run by `bench/gpu_check.sh` on a machine with a CUDA torch and no network (see that script).
At 512x512 float16, SDPA attention, DDIM, guidance 7.5, it measures:

- images/s at batch 1 / 8 / 16 of sdcore in fixed-shape batches and decodes (what a job's CUDA
  worker runs) with
  the job's exact kernels (deterministic algorithms, `sdcore.exact_kernels`), of sdcore with
  torch's default kernels, and of diffusers (eager, torch's defaults, as its users run it), with
  each one's peak memory;
- the UNet's achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode) against a measured
  float16 matmul peak;
- that fixed-shape batches reproduce exactly on CUDA: a row remade alone in its recorded slots
  of the UNet forwards and the VAE decode (filler rows around it) gives the same pixels, for the
  first and last slot of a full batch and every row of a padded one;
- while time is left (`--budget-s`), the same with the UNet replayed from CUDA graphs or compiled
  (`--compile`, in order: the eager kernels in graphs, the compiled ones in graphs, plain
  torch.compile): the first call's time, images/s, reproduce, and whether the bits are the
  eager UNet's.

Every result is printed and appended to `--out` (markdown) as soon as it is measured, and a
failing part is reported without stopping the rest: a device lease is short. On a CPU it runs
too (`--device cpu --model tiny --size 64 --batches 1,2 --steps 2 --compile default`), which is
how it is smoke-tested without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # not installed on the GPU machine

from side_by_side import reference_pipeline  # noqa: E402 - needs the paths above
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import sdcore.devices  # noqa: E402
from sdcore import GenerationRequest  # noqa: E402
from sdcore.config import ModelConfig  # noqa: E402
from sdcore.kernels import compile_unet, exact_kernels  # noqa: E402
from sdcore.weights import assemble, random_parts  # noqa: E402

PROMPTS = ["a lighthouse at dusk", "a red circle", "a bowl of fruit", "a city street in the rain"]
GUIDANCE = 7.5
TIMED_RUNS = 3  # after one warm-up; the median is reported
COMPILE_NEEDS_S = 180  # a compiled mode is only started with this much of the budget left
PAIRED_ROUNDS = 5  # rounds of diffusers / sdcore eager / sdcore compiled, one batch each, interleaved


class Report:
    """Lines printed and appended to the results file at once, so that a run cut short keeps
    what it measured."""

    def __init__(self, path: str):
        self.path = path

    def add(self, *lines: str) -> None:
        print("\n".join(lines), flush=True)
        with open(self.path, "a") as handle:
            handle.write("\n".join(lines) + "\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, run) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def deterministic(on: bool):
    """Deterministic algorithms on (the job's exact kernels) or off (torch's default) inside."""
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=True)
        torch.backends.cudnn.deterministic = before[1]


def peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def median_seconds(device: torch.device, run) -> float:
    """Seconds of `run`: one warm-up (allocator, kernel choice), then the median of TIMED_RUNS."""
    run()
    return statistics.median(timed(device, run) for _ in range(TIMED_RUNS))


def images_per_s(device: torch.device, run, images: int) -> tuple[float, float]:
    """(images/s, peak GiB) of `run` (median_seconds; the warm-up does the same work)."""
    reset_peak_memory(device)
    return images / median_seconds(device, run), peak_memory_gib(device)


def requests_for(batch: int, first_seed: int = 0) -> list[GenerationRequest]:
    return [GenerationRequest(PROMPTS[i % len(PROMPTS)], seed=first_seed + i) for i in range(batch)]


def sdcore_run(ours, batch: int, size: int, steps: int):
    requests = requests_for(batch)
    settings = dict(sampler="ddim", steps=steps, guidance_scale=GUIDANCE, width=size, height=size)
    # decode_batch: what a job's CUDA worker runs (execution.decode_batch auto)
    return lambda: ours.generate(requests, fixed_batch=batch, decode_batch=batch, **settings)


def diffusers_run(ref, batch: int, size: int, steps: int):
    requests = requests_for(batch)
    return lambda: ref(
        [r.prompt for r in requests],
        num_inference_steps=steps,
        width=size,
        height=size,
        guidance_scale=GUIDANCE,
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
    )


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    repeats = 10
    seconds = timed(device, lambda: [a @ b for _ in range(repeats)])
    return 2 * n**3 * repeats / seconds / 1e12


def unet_inputs(pipe, batch: int, size: int):
    """A guided forward's inputs: 2*batch rows, per-row timesteps, as the pipeline sends them."""
    latent = size // 8
    rows = 2 * batch
    generator = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(rows, 4, latent, latent, generator=generator).to(pipe.device, pipe.dtype)
    t = torch.linspace(900, 100, rows).round().to(pipe.device)
    width = pipe.config.unet.cross_attention_dim
    context = torch.randn(rows, 77, width, generator=generator).to(pipe.device, pipe.dtype)
    return x, t, context


def unet_gflop(pipe, batch: int, size: int) -> float:
    x, t, context = unet_inputs(pipe, batch, size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        pipe.unet(x, t, context)
    return counter.get_total_flops() / 1e9


def unet_tflops(pipe, batch: int, size: int, gflop: float) -> float:
    x, t, context = unet_inputs(pipe, batch, size)
    with torch.inference_mode():
        for _ in range(2):
            pipe.unet(x, t, context)
        repeats = 5
        seconds = timed(pipe.device, lambda: [pipe.unet(x, t, context).clone() for _ in range(repeats)])
    return gflop * repeats / seconds / 1e3


def slot_checks(ours, batch: int, size: int, steps: int) -> tuple[int, int]:
    """(identical, checked): rows remade alone in their recorded slots, with filler rows
    around them, against the batch they were made in — the first and last slot of a full
    batch, and every row of a padded batch of 3."""
    settings = dict(sampler="euler_a", steps=steps, guidance_scale=GUIDANCE, width=size, height=size)
    identical = checked = 0
    for rows, indices in ((batch, sorted({0, batch - 1})), (min(3, batch), range(min(3, batch)))):
        requests = requests_for(rows, first_seed=100)
        placed = ours.generate_placed(requests, fixed_batch=batch, decode_batch=batch, **settings)
        for index in indices:
            image, placement = placed[index]
            slots = dict(slots=[placement.slot], decode_slots=[placement.decode_slot])
            again = ours.generate([requests[index]], fixed_batch=batch, decode_batch=batch, **slots, **settings)[0]
            identical += np.array_equal(np.asarray(image), np.asarray(again))
            checked += 1
    return identical, checked


def paired_ratios(ours, ref, eager_unet, compiled_unet, batch: int, size: int, steps: int) -> tuple[str, str]:
    """(compiled / diffusers, eager / diffusers) images/s ratios, each round timing one batch of
    the three in turn; sdcore with the job's exact kernels, diffusers with torch's defaults."""
    theirs, mine, device = diffusers_run(ref, batch, size, steps), sdcore_run(ours, batch, size, steps), ours.device
    ratios: tuple[list[float], list[float]] = ([], [])
    try:
        for _ in range(PAIRED_ROUNDS):
            with deterministic(False):
                their_s = timed(device, theirs)
            with deterministic(True):
                for unet, kept in zip((compiled_unet, eager_unet), ratios):
                    ours.unet = unet
                    kept.append(their_s / timed(device, mine))
    finally:
        ours.unet = compiled_unet

    def summary(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}x [{min(values):.2f}, {max(values):.2f}]"

    return summary(ratios[0]), summary(ratios[1])


def same_as_eager(ours, eager_unet, batch: int, size: int, steps: int) -> str:
    """Whether `ours.unet` (a compiled or graphed UNet) gives the eager UNet's bits: one forward's
    output, and a fixed-shape batch's images."""
    x, t, context = unet_inputs(ours, batch, size)
    run = sdcore_run(ours, batch, size, steps)
    mode_unet = ours.unet
    with torch.inference_mode():
        outputs, images = [], []
        for unet in (eager_unet, mode_unet):
            ours.unet = unet
            outputs.append(unet(x, t, context).float())
            images.append(np.stack([np.asarray(image) for image in run()]).astype(np.int16))
    ours.unet = mode_unet
    forward = "identical" if torch.equal(*outputs) else f"max |diff| {(outputs[0] - outputs[1]).abs().max():.3g}"
    pixels = "identical" if np.array_equal(*images) else f"max |diff| {np.abs(images[0] - images[1]).max()} levels"
    return f"UNet forward vs eager: {forward}; batch of {batch} images vs eager: {pixels}"


def attempt(report: Report, what: str, part) -> object:
    """Run one part; a failure is reported (and its traceback printed) instead of ending the run."""
    try:
        return part()
    except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others
        traceback.print_exc()
        report.add(f"- {what}: FAILED — {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15", help="random weights of this config")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--matmul", type=int, default=8192, help="matrix size of the peak measurement")
    parser.add_argument(
        "--compile", default="cuda-graphs,reduce-overhead,default", help="compile_unet modes to time, or none"
    )
    parser.add_argument("--budget-s", type=float, default=470, help="no compiled mode starts past this")
    parser.add_argument("--out", default=str(REPO / "bench" / "GPU_RESULTS.md"))
    args = parser.parse_args()
    started = time.monotonic()

    device = torch.device(args.device)
    kernels = exact_kernels(device)  # before the first CUDA work (cuBLAS's workspace setting)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    largest, compared = max(batches), (8 if 8 in batches else max(batches))
    report = Report(args.out)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    config = ModelConfig.sd15() if args.model == "sd15" else ModelConfig.tiny()
    parts = random_parts(config, seed=0)
    ours = assemble(config, parts, source=f"random {args.model}", device=device, dtype=dtype)
    ref = reference_pipeline(config, parts).to(device=device, dtype=dtype)
    del parts
    report.add(
        f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} — {name}, torch {torch.__version__}, "
        f"{args.model} random weights, {dtype}, {args.size}x{args.size}, DDIM {args.steps} steps, "
        f"guidance {GUIDANCE}, SDPA; median of {TIMED_RUNS} runs after a warm-up\n",
        f"Exact kernels (the job's): {kernels}. Models built in {time.monotonic() - started:.0f} s.\n",
        "| batch | sdcore exact img/s | sdcore default kernels img/s | diffusers img/s | "
        "sdcore exact / diffusers | peak GiB sdcore / diffusers |",
        "|---|---|---|---|---|---|",
    )
    diffusers_rate = {}
    for batch in batches:

        def row(batch=batch):
            with deterministic(True):
                exact, exact_gib = images_per_s(device, sdcore_run(ours, batch, args.size, args.steps), batch)
            with deterministic(False):
                fast, _ = images_per_s(device, sdcore_run(ours, batch, args.size, args.steps), batch)
                theirs, their_gib = images_per_s(device, diffusers_run(ref, batch, args.size, args.steps), batch)
            diffusers_rate[batch] = theirs
            report.add(
                f"| {batch} | {exact:.3f} | {fast:.3f} | {theirs:.3f} | {exact / theirs:.2f} | "
                f"{exact_gib:.2f} / {their_gib:.2f} |"
            )

        attempt(report, f"batch {batch}", row)
    report.add("")

    peak = attempt(report, "matmul peak", lambda: matmul_peak_tflops(device, dtype, args.matmul))
    gflop = {}
    for batch in sorted({compared, largest}):

        def unet_line(batch=batch):
            gflop[batch] = unet_gflop(ours, batch, args.size)
            rates = []
            for exact in (True, False):
                with deterministic(exact):
                    rates.append(unet_tflops(ours, batch, args.size, gflop[batch]))
            share = " / ".join(f"{100 * r / peak:.0f}%" for r in rates) if peak else "n/a"
            report.add(
                f"- UNet eager at batch {batch} (guided, {2 * batch} rows): {gflop[batch]:.4g} GFLOP per forward; "
                f"exact kernels {rates[0]:.3g} TFLOP/s, default kernels {rates[1]:.3g} TFLOP/s = {share} of the "
                f"measured {dtype} matmul peak ({peak or float('nan'):.3g} TFLOP/s, {args.matmul}^3)"
            )

        attempt(report, f"UNet TFLOP/s at batch {batch}", unet_line)

    def copies_line():
        run, ratios = sdcore_run(ours, compared, args.size, args.steps), []
        try:
            with deterministic(True):
                run()
                for _ in range(PAIRED_ROUNDS):
                    seconds = {}
                    for asynchronous in (False, True):
                        sdcore.devices.ASYNC_COPIES = asynchronous
                        seconds[asynchronous] = timed(device, run)
                    ratios.append(seconds[False] / seconds[True])
        finally:
            sdcore.devices.ASYNC_COPIES = True
        report.add(
            f"- copies between host and GPU (sdcore/devices.py), batch {compared}, exact kernels, {PAIRED_ROUNDS} "
            f"interleaved rounds: asynchronous / blocking images/s {statistics.median(ratios):.3f}x "
            f"[{min(ratios):.3f}, {max(ratios):.3f}]"
        )

    attempt(report, "host-GPU copies", copies_line)

    def reproduce_line(exact: bool):
        with deterministic(exact):
            identical, checked = slot_checks(ours, compared, args.size, 3)
        kind = "exact kernels (the job's)" if exact else "default kernels"
        report.add(
            f"- fixed-shape batch {compared} on {device.type}, {kind}: {identical}/{checked} rows remade in "
            f"their slots identical (euler_a, 3 steps)"
        )

    attempt(report, "reproduce (exact kernels)", lambda: reproduce_line(True))
    attempt(report, "reproduce (default kernels)", lambda: reproduce_line(False))

    modes = [] if args.compile == "none" else args.compile.split(",")
    for mode in modes:
        left = args.budget_s - (time.monotonic() - started)
        if left < COMPILE_NEEDS_S:
            report.add(f"- compiled UNet ({mode}): not run, {left:.0f} s of the budget left")
            continue

        def compiled_line(mode=mode):
            eager_unet = ours.unet
            try:
                with deterministic(True):
                    compile_unet(ours, mode)
                    run = sdcore_run(ours, compared, args.size, args.steps)
                    compile_s = timed(device, run)  # the first call compiles (and captures graphs)
                    rate, gib = images_per_s(device, run, compared)
                    tflops = unet_tflops(ours, compared, args.size, gflop[compared]) if compared in gflop else None
                    identical, checked = slot_checks(ours, compared, args.size, 3)
                    compiled_unet = ours.unet
                    versus_eager = same_as_eager(ours, eager_unet, compared, args.size, args.steps)
                    paired = paired_ratios(ours, ref, eager_unet, compiled_unet, compared, args.size, args.steps)
            finally:
                ours.unet, ours.compile_mode = eager_unet, "none"
                torch._dynamo.reset()
            theirs = diffusers_rate.get(compared)
            report.add(
                f"- compiled UNet ({mode}), exact kernels, batch {compared}: first call {compile_s:.1f} s, "
                f"{rate:.3f} img/s"
                + (f" = {rate / theirs:.2f}x diffusers eager" if theirs else "")
                + (f", UNet {tflops:.3g} TFLOP/s" if tflops else "")
                + (f" ({100 * tflops / peak:.0f}% of peak)" if tflops and peak else "")
                + f", peak {gib:.2f} GiB; {identical}/{checked} rows remade in their slots identical; "
                + versus_eager,
                f"- interleaved, {PAIRED_ROUNDS} rounds of one batch of {compared} each (the host's and the GPU's "
                f"drift cancel out): sdcore compiled ({mode}) / diffusers eager {paired[0]}; sdcore eager / "
                f"diffusers eager {paired[1]} (median, [min, max])",
            )

        attempt(report, f"compiled UNet ({mode})", compiled_line)
    report.add(f"\nTotal {time.monotonic() - started:.0f} s.")


if __name__ == "__main__":
    main()
