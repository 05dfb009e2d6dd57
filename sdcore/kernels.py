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

`compile_unet(pipe, mode)` optionally replays the eager UNet's own kernels from CUDA graphs
("cuda-graphs", CUDA only: `CudaGraphUNet`), compiles it with `torch.compile` ("default"), or
both ("reduce-overhead", CUDA only). The fixed-shape forwards are what make graphs possible: a
job's UNet sees one or two input shapes. A compiled UNet gives other bits than the eager one
(fused kernels), repeatably; a graph replays the eager kernels. Either way the mode is recorded
and a remake runs the same way. Measured on the project's 2-core CPU (bench/RESULTS.md): at SD
1.5 size compile is slower (0.83x), on the tiny model faster; it stays off unless asked for. On
an H200 (bench/GPU_RESULTS.md) the graphs of the eager kernels gained 2-9%, with the eager bits;
the compiled kernels in graphs about 1.5x, with their own bits and ~45 s of compiling.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from .rules import CONV_ALGORITHMS, DEFAULT_CONV_ALGORITHM

COMPILE_MODES = ("none", "cuda-graphs", "default", "reduce-overhead")
CUDA_ONLY_MODES = ("cuda-graphs", "reduce-overhead")


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
    if mode in CUDA_ONLY_MODES and pipe.device.type != "cuda":
        raise ValueError(f"CUDA graphs (compile mode {mode}) need a CUDA device, not {pipe.device.type}")
    if mode == "cuda-graphs":
        pipe.unet = CudaGraphUNet(pipe.unet)
        pipe.compile_mode = mode
        return
    for module in _convs(pipe):  # the compiled graph reads the transformed filters as they are
        if module.use_winograd:
            module.winograd_weight()
    # dynamic=False: every forward of a job has one of at most two shapes (guided or not).
    # fullgraph=True: the whole forward is one graph, or compiling fails. With a break, dynamo
    # compiles the pieces as frames of their own, each up to a recompile limit and eager past it,
    # and which piece ran which way would depend on the shapes seen before: other bits.
    pipe.unet = torch.compile(pipe.unet, mode=mode, dynamic=False, fullgraph=True)
    pipe.compile_mode = mode


class CudaGraphUNet(nn.Module):
    """The eager UNet, its kernels captured into one CUDA graph per input shape and replayed.

    A replay launches the whole forward at once instead of one kernel at a time from Python
    (2-9% faster on an H200 at batch 8, where the eager UNet is mostly bound by its kernels
    rather than by launching them; more where launches weigh more). The kernels are the eager
    ones, chosen the same way (the same shapes, the same deterministic settings). Each shape is
    captured at its first forward (a job's UNet sees at most two: guided and not), after a
    warm-up on a side stream as CUDA requires; inputs are copied into the graph's own buffers
    and the output copied out. The text context's K and V are recomputed inside the graph at
    every replay (the eager UNet's cache of them cannot live across a replay). Autograd cannot
    record through a replay, so with gradients enabled the eager UNet runs, and so it does for
    a shape whose capture fails (with a warning). Like torch.compile's wrapper, this is a module
    of its own: hooks registered on it run at every call, outside the graph (a hook on the eager
    UNet would run once, at capture). Other attributes (config, forget_context...) and the state
    dict are the eager UNet's.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self._orig_mod = unet  # the name torch.compile uses, so _convs finds the modules alike
        self._graphs: dict[tuple, tuple] = {}  # input shapes -> (input buffers, output, graph)
        # One memory pool for every shape's graph: they never run at once, and what each keeps
        # between replays (its output) stays referenced here, so no other graph reuses it.
        self._pool = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (_orig_mod)
        except AttributeError:
            return getattr(self._modules["_orig_mod"], name)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        return self._orig_mod.state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self._orig_mod(x, t, context)
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in (x, t, context))
        if key not in self._graphs:
            self._graphs[key] = self._capture_or_none(x, t, context)
        if self._graphs[key] is None:  # no graph for this shape: the eager kernels, the same bits
            return self._orig_mod(x, t, context)
        buffers, output, graph = self._graphs[key]
        for buffer, value in zip(buffers, (x, t, context)):
            buffer.copy_(value)
        graph.replay()
        return output.clone()  # the next replay overwrites the graph's output

    def _capture_or_none(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> tuple | None:
        """A graph for these inputs' shapes, or None (with a warning) where capturing fails: a
        job then runs that shape eagerly, at eager speed with the same bits, rather than fail."""
        try:
            return self._capture(x, t, context)
        except Exception as exc:  # noqa: BLE001 - an optimisation failing must not stop the job
            shapes = ", ".join(str(tuple(a.shape)) for a in (x, t, context))
            warnings.warn(
                f"CUDA graph capture of the UNet failed for inputs {shapes} ({type(exc).__name__}: {exc}); "
                "running that shape eagerly (the same kernels, so the same bits)",
                RuntimeWarning,
                stacklevel=3,
            )
            return None

    def _capture(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> tuple:
        # Ordinary tensors (not inference ones), so that forwards outside inference mode can
        # copy into them too.
        with torch.inference_mode(False):
            buffers = tuple(a.detach().clone() for a in (x, t, context))
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # lazy set-up (cuBLAS handles, workspaces) before capture
            for _ in range(2):
                self._orig_mod(*buffers)
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self._orig_mod(*buffers)
        self._orig_mod.forget_context()  # the warm-up's K and V: not needed, the graph makes its own
        return buffers, output, graph


__all__ = [
    "COMPILE_MODES",
    "CudaGraphUNet",
    "CONV_ALGORITHMS",
    "DEFAULT_CONV_ALGORITHM",
    "compile_unet",
    "exact_kernels",
    "set_conv_algorithm",
]
