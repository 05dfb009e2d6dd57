"""The eager UNet's TFLOP/s on one device with its tensors in NCHW (what sdcore runs) and in
channels_last (NHWC, the layout tensor-core convolutions work in), with the job's exact kernels.

A probe for where eager GPU time goes (bench/GPU_RESULTS.md): if channels_last is clearly faster,
it is worth making a pipeline option. Random SD 1.5 weights, 512x512 float16, batch 8 guided
(16 rows). Run through `GPU_CHECK=bench/gpu_unet_layouts.py bash bench/gpu_check.sh .whl`; CPU
smoke run: `python bench/gpu_unet_layouts.py --device cpu --model tiny --size 64 --batch 1`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # not installed on the GPU machine

from gpu_check import Report, unet_gflop, unet_inputs, unet_tflops  # noqa: E402 - needs the paths above

from sdcore.config import ModelConfig  # noqa: E402
from sdcore.kernels import exact_kernels  # noqa: E402
from sdcore.weights import assemble, random_parts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "bench" / "GPU_RESULTS.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    exact_kernels(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config = ModelConfig.sd15() if args.model == "sd15" else ModelConfig.tiny()
    pipe = assemble(config, random_parts(config, seed=0), source="random", device=device, dtype=dtype)
    gflop = unet_gflop(pipe, args.batch, args.size)
    x, t, context = unet_inputs(pipe, args.batch, size=args.size)
    with torch.inference_mode():
        nchw_out = pipe.unet(x, t, context)
        rates = {"NCHW": unet_tflops(pipe, args.batch, args.size, gflop)}
        pipe.unet.to(memory_format=torch.channels_last)
        nhwc_out = pipe.unet(x.contiguous(memory_format=torch.channels_last), t, context)
        rates["channels_last"] = unet_tflops(pipe, args.batch, args.size, gflop)
    gap = (nchw_out.float() - nhwc_out.float()).abs().max().item()
    Report(args.out).add(
        f"- eager UNet layouts ({args.model}, {args.size}x{args.size} {dtype}, batch {args.batch} guided, exact "
        f"kernels, {device.type}): "
        + ", ".join(f"{name} {rate:.3g} TFLOP/s" for name, rate in rates.items())
        + f"; outputs differ by at most {gap:.3g}"
    )


if __name__ == "__main__":
    main()
