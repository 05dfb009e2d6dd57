"""Where a batch's time goes, sdcore vs diffusers, on one CUDA device (same random weights).

A companion of `bench/gpu_check.py` (same set-up, same wheels; run it through
`bash bench/gpu_check.sh .whl` with `GPU_CHECK=bench/gpu_profile.py`). For one batch at
512x512 float16, DDIM, guidance 7.5 it times, for both libraries: the whole batch, the UNet
forwards alone (the same inputs for both), the VAE decode (sdcore row by row, as the pipeline
does it, and batched), and prints torch.profiler's busiest kernels of one whole batch each, and
how much of the batch's wall time the GPU was busy. Results are printed and appended to `--out`.
"""

from __future__ import annotations

import argparse
import time

import torch
from gpu_check import (
    Report,
    deterministic,
    diffusers_run,
    median_seconds,
    sdcore_run,
    timed,
    unet_inputs,
)
from side_by_side import reference_pipeline
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from sdcore.config import ModelConfig
from sdcore.kernels import exact_kernels
from sdcore.weights import assemble, random_parts


def busiest(report: Report, device, what: str, run) -> None:
    """torch.profiler over one call of `run`: wall time, summed kernel time, the top kernels."""
    run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = timed(device, run)
    events = prof.key_averages()
    if device.type == "cuda":  # the kernels' own entries (an op's entry counts its kernels again)
        key = "self_device_time_total"
        busy_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    else:
        key = "self_cpu_time_total"
        busy_us = sum(e.self_cpu_time_total for e in events)
    report.add(
        f"\n### {what}: {wall * 1e3:.0f} ms wall under the profiler, kernels {busy_us / 1e3:.0f} ms "
        f"({100 * busy_us / 1e6 / wall:.0f}% busy)\n",
        "```",
        events.table(sort_by=key, row_limit=14, max_name_column_width=60),
        "```",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="gpu_profile.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    exact_kernels(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config = ModelConfig.sd15() if args.model == "sd15" else ModelConfig.tiny()
    parts = random_parts(config, seed=0)
    ours = assemble(config, parts, source="random", device=device, dtype=dtype)
    ref = reference_pipeline(config, parts).to(device=device, dtype=dtype)
    del parts
    report = Report(args.out)
    batch, size, steps = args.batch, args.size, args.steps
    report.add(f"\n## {time.strftime('%H:%M')} — batch {batch}, {size}x{size}, {dtype}, DDIM {steps}\n")

    x, t, context = unet_inputs(ours, batch, size)
    latents = torch.randn(batch, 4, size // 8, size // 8, device=device, dtype=dtype)
    with torch.inference_mode():
        parts_ms = {}
        for exact, kernels in ((True, "exact kernels"), (False, "default kernels")):
            with deterministic(exact):
                parts_ms[f"sdcore batch ({kernels})"] = median_seconds(device, sdcore_run(ours, batch, size, steps))
                parts_ms[f"sdcore UNet x{steps} ({kernels})"] = median_seconds(
                    device, lambda: [ours.unet(x, t, context) for _ in range(steps)]
                )
                parts_ms[f"sdcore VAE decode, row by row ({kernels})"] = median_seconds(
                    device, lambda: [ours.vae.decode(latents[i : i + 1]) for i in range(batch)]
                )
        with deterministic(False):
            batched = median_seconds(device, lambda: ours.vae.decode(latents))
            parts_ms["sdcore VAE decode, batched (default kernels)"] = batched
            parts_ms["diffusers batch"] = median_seconds(device, diffusers_run(ref, batch, size, steps))
            parts_ms[f"diffusers UNet x{steps}"] = median_seconds(
                device, lambda: [ref.unet(x, t, encoder_hidden_states=context).sample for _ in range(steps)]
            )
            parts_ms["diffusers VAE decode, batched"] = median_seconds(device, lambda: ref.vae.decode(latents).sample)
        report.add("| part | ms |", "|---|---|", *(f"| {k} | {1e3 * v:.1f} |" for k, v in parts_ms.items()))
        with deterministic(True):
            busiest(report, device, "sdcore batch, exact kernels", sdcore_run(ours, batch, size, steps))
        with deterministic(False):
            busiest(report, device, "diffusers batch", diffusers_run(ref, batch, size, steps))


if __name__ == "__main__":
    main()
