"""Kernel choices that decide an image's last bits, besides its inputs, its slot and the threads.

`exact_kernels(device)` makes the choices repeatable: on CUDA it turns cuDNN's autotuner off
(`cudnn.benchmark` picks the fastest algorithm per run, which can differ run to run), asks for
deterministic algorithms, keeps float32 matmuls and convolutions out of TF32, and fixes cuBLAS's
workspace (`CUBLAS_WORKSPACE_CONFIG`, read when CUDA starts: call this before the first CUDA
work). On CPU there is nothing to set: oneDNN picks algorithms by shape, and the thread count is
set by the caller. It returns what it set, for the record.

`set_conv_algorithm(pipe, name)` picks how the 3x3 convolutions run: "winograd-f2x3" (the
default for every pipeline; sdcore/winograd.py, on the CPU in float32, for convolutions of at
least 256 channels, the rest direct) or "direct" (`F.conv2d` everywhere, what images made
before the Winograd path were made with). The two give other last bits, so the name is recorded
and a remake sets the same one.

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

from .rules import CONV_ALGORITHMS, DEFAULT_CONV_ALGORITHM

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


def set_conv_algorithm(pipe: Any, name: str) -> str:
    """Run `pipe`'s eligible 3x3 convolutions with algorithm `name` (one of CONV_ALGORITHMS);
    returns the name that decides its bits: "direct" where no convolution can take the Winograd
    path (not CPU float32, or no layer of 256 channels), so the record says what ran."""
    from . import winograd

    if name not in CONV_ALGORITHMS:
        raise ValueError(f"conv algorithm: expected one of {', '.join(CONV_ALGORITHMS)}, got {name!r}")
    wanted = name == "winograd-f2x3" and winograd.supported(pipe.device, pipe.dtype)
    used = False
    for module in _convs(pipe):
        # The filters are transformed at the module's first Winograd forward (so a pipeline
        # switched to direct before it runs never holds them), or by compile_unet.
        module.use_winograd = wanted and winograd.eligible(module)
        module.forget_winograd_weight()
        used = used or module.use_winograd
    pipe.conv_algorithm = name if used else "direct"
    return pipe.conv_algorithm


def _convs(pipe: Any):
    """The pipeline's sdcore Conv2d modules (a compiled UNet's too)."""
    from .layers import Conv2d

    for model in (pipe.unet, pipe.vae):
        for module in getattr(model, "_orig_mod", model).modules():
            if isinstance(module, Conv2d):
                yield module


def compile_unet(pipe: Any, mode: str) -> None:
    """Compile `pipe.unet` in `mode` (one of COMPILE_MODES; "none" leaves it eager)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode: expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "none":
        return
    if mode == "reduce-overhead" and pipe.device.type != "cuda":
        raise ValueError("CUDA graphs (compile mode reduce-overhead) need a CUDA device")
    for module in _convs(pipe):  # the compiled graph reads the transformed filters as they are
        if module.use_winograd:
            module.winograd_weight()
    # dynamic=False: every forward of a job has one of at most two shapes (guided or not)
    pipe.unet = torch.compile(pipe.unet, mode=mode, dynamic=False)
    pipe.compile_mode = mode


__all__ = [
    "COMPILE_MODES",
    "CONV_ALGORITHMS",
    "DEFAULT_CONV_ALGORITHM",
    "compile_unet",
    "exact_kernels",
    "set_conv_algorithm",
]
