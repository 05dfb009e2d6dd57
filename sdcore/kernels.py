"""Kernel choices that decide an image's last bits, besides its inputs, its slot and the threads.

`exact_kernels(device)` makes the choices repeatable: on CUDA it turns cuDNN's autotuner off
(`cudnn.benchmark` picks the fastest algorithm per run, which can differ run to run), asks for
deterministic algorithms, keeps float32 matmuls and convolutions out of TF32, and fixes cuBLAS's
workspace (`CUBLAS_WORKSPACE_CONFIG`, read when CUDA starts: call this before the first CUDA
work). On CPU there is nothing to set: oneDNN picks algorithms by shape, and the thread count is
set by the caller. It returns what it set, for the record.

`compile_unet(pipe, mode)` optionally compiles the UNet with `torch.compile` ("default"), or with
CUDA graphs as well ("reduce-overhead", CUDA only: the fixed-shape forwards are what make graphs
possible). A compiled UNet gives other bits than the eager one (fused kernels), repeatably, so
the mode is recorded and a remake compiles the same way. Measured on the project's 2-core CPU
(bench/RESULTS.md): at SD 1.5 size compile is slower (0.83x), on the tiny model faster; it stays
off unless asked for.
"""

from __future__ import annotations

import os
from typing import Any

import torch

COMPILE_MODES = ("none", "default", "reduce-overhead")


def exact_kernels(device: str | torch.device) -> dict[str, Any]:
    """Make kernel choices repeatable on `device`; returns the settings (JSON-ready)."""
    if torch.device(device).type != "cuda":
        return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # warn_only: an operation with no deterministic CUDA kernel warns instead of failing the job
    torch.use_deterministic_algorithms(True, warn_only=True)
    return {
        "deterministic_algorithms": True,
        "cudnn_benchmark": False,
        "cudnn_deterministic": True,
        "tf32": False,
        "cublas_workspace_config": os.environ["CUBLAS_WORKSPACE_CONFIG"],
    }


def compile_unet(pipe: Any, mode: str) -> None:
    """Compile `pipe.unet` in `mode` (one of COMPILE_MODES; "none" leaves it eager)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode: expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "none":
        return
    if mode == "reduce-overhead" and pipe.device.type != "cuda":
        raise ValueError("CUDA graphs (compile mode reduce-overhead) need a CUDA device")
    # dynamic=False: every forward of a job has one of at most two shapes (guided or not)
    pipe.unet = torch.compile(pipe.unet, mode=mode, dynamic=False)
    pipe.compile_mode = mode


__all__ = ["COMPILE_MODES", "compile_unet", "exact_kernels"]
