"""What a generation request may ask for: one home for each rule, importable without torch.

The job spec check (`jobs/spec.py`), the manifest row check (`jobs/manifest.py`) and the
pipeline (`sdcore/pipeline.py`, `sdcore/samplers.py`) all take their limits from here, so a
value the runner accepts is a value the pipeline accepts, and the other way round. Importing this
module imports nothing heavy: validating a job spec or a million-row manifest never loads torch.

Each `*_problem` function returns None for a good value, else a short description of what is
wrong ("expected an integer in 1..999, got 0") for the caller to prefix with where the value came
from (a spec key, a manifest column, a request index).
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any

SAMPLERS = ("ddpm", "ddim", "euler_a", "dpmpp_2m")
# diffusers' EulerAncestralDiscreteScheduler has no Karras sigmas; DDPM/DDIM have none either.
KARRAS_SAMPLERS = ("dpmpp_2m",)

# The SD 1.x training schedule has 1000 timesteps. "Leading" spacing with steps_offset 1 runs
# off the end of that table at 1000 steps (DDPM/DDIM index alphas_cumprod[1000]), so the largest
# usable step count is 999.
NUM_TRAIN_TIMESTEPS = 1000
STEPS_OFFSET = 1
MAX_STEPS = NUM_TRAIN_TIMESTEPS - STEPS_OFFSET

# How the 3x3 convolutions run (sdcore/kernels.py, sdcore/winograd.py): Winograd F(2x2, 3x3)
# where it applies (the default), or the direct convolution everywhere.
CONV_ALGORITHMS = ("winograd-f2x3", "direct")
DEFAULT_CONV_ALGORITHM = "winograd-f2x3"

# Seeds are stored as int64 (manifest column, record field, Parquet), so that is the range
# everywhere, the library included: 0 .. 2**63 - 1.
MAX_SEED = 2**63 - 1

# Width and height are multiples of the VAE's downsampling factor (8 for SD 1.x checkpoints;
# a model with another factor passes its own `multiple`), up to MAX_SIZE pixels a side.
SIZE_MULTIPLE = 8
MAX_SIZE = 8192


def is_integer(value: Any) -> bool:
    """An integer: a Python or numpy integer, or a 0-dim torch tensor of an integer dtype
    (`torch.tensor(4)`), as `_is_number` takes a 0-dim torch float; never a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):  # int and numpy's integer types
        return True
    return _is_torch_scalar(value) and not value.is_floating_point()


def is_boolean(value: Any) -> bool:
    """A boolean: a Python bool, a numpy bool (`np.bool_`, what a numpy array or pandas column
    gives) or a 0-dim torch bool tensor. `bool(value)` is then its plain value."""
    if isinstance(value, bool):
        return True
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.bool_):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.bool


def _is_number(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)) or _is_torch_scalar(value)


def _is_torch_scalar(value: Any) -> bool:
    """A 0-dim torch tensor of a real dtype (`torch.tensor(0.7)`), which the library API takes
    as a number. torch is not imported for this: a tensor exists only once its caller did."""
    torch = sys.modules.get("torch")
    return (
        torch is not None
        and isinstance(value, torch.Tensor)
        and value.dim() == 0
        and value.dtype != torch.bool
        and not value.is_complex()
    )


def sampler_problem(name: Any) -> str | None:
    """A sampler name sdcore can run."""
    if not isinstance(name, str) or name not in SAMPLERS:
        return f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}"
    return None


def karras_problem(karras: Any, sampler: str) -> str | None:
    """The Karras-sigmas flag, for a known sampler name."""
    if not is_boolean(karras):
        return f"expected true or false, got {karras!r}"
    if karras and sampler not in KARRAS_SAMPLERS:
        return f"karras sigmas apply only to {', '.join(KARRAS_SAMPLERS)}, not {sampler}"
    return None


def steps_problem(steps: Any) -> str | None:
    if not is_integer(steps) or not 1 <= int(steps) <= MAX_STEPS:
        return f"expected an integer in 1..{MAX_STEPS}, got {steps!r}"
    return None


def seed_problem(seed: Any) -> str | None:
    if not is_integer(seed):
        return f"expected an integer, got {type(seed).__name__} {seed!r}"
    if not 0 <= int(seed) <= MAX_SEED:
        return f"{int(seed)} outside 0..2**63-1"
    return None


def guided(scale: float) -> bool:
    """Whether a row runs classifier-free guidance (an unconditional and a conditional half per
    forward): diffusers skips the unconditional pass at a scale <= 1."""
    return scale > 1.0


def guidance_problem(scale: Any) -> str | None:
    """Classifier-free guidance scale: any finite number >= 0 (<= 1 turns guidance off)."""
    if not _is_number(scale) or not math.isfinite(as_float(scale)) or as_float(scale) < 0:
        return f"expected a finite number >= 0, got {scale!r}"
    return None


def size_problem(value: Any, multiple: int = SIZE_MULTIPLE) -> str | None:
    """One side of the image, in pixels."""
    if not is_integer(value) or value <= 0:
        return f"expected a positive integer, got {value!r}"
    value = int(value)
    if value % multiple:
        return f"{value} is not a multiple of {multiple}"
    if value > MAX_SIZE:
        return f"{value} is larger than {MAX_SIZE}"
    return None


BUILTIN_DIR = Path(__file__).parent / "builtin"  # builtin:NAME is BUILTIN_DIR/NAME/model.safetensors
WEIGHT_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")  # single-file checkpoints


def builtin_names() -> list[str]:
    """The built-in models: `tiny` (random weights from a fixed seed) and those shipped."""
    shipped = sorted(p.name for p in BUILTIN_DIR.iterdir() if p.is_dir()) if BUILTIN_DIR.exists() else []
    return ["tiny", *shipped]


def weights_problem(weights: str) -> str | None:
    """What is wrong with a weights location on its face: an unknown built-in, an s3:// URI
    without a bucket, or a local file that is no checkpoint by its name. Whether a local path
    exists is left to whoever loads it (on a cluster, the workers' machines may hold it)."""
    if weights.startswith("builtin:"):
        name = weights.split(":", 1)[1]
        if name not in builtin_names():
            return f"unknown built-in model {name!r}; available: {', '.join(builtin_names())}"
    elif weights.startswith("s3://"):
        if not weights[len("s3://") :].split("/", 1)[0]:
            return f"{weights!r} names no bucket (s3://BUCKET/KEY)"
    elif os.path.isfile(weights) and not weights.endswith(WEIGHT_FILE_SUFFIXES):
        return (
            f"{weights}: unknown weights layout; expected builtin:NAME, a diffusers folder, "
            f"or a {'/'.join(WEIGHT_FILE_SUFFIXES)} file"
        )
    return None


def as_float(value: Any) -> float:
    """A number as a Python float: its exact value (a numpy or 0-dim torch float32 widens
    exactly), which is what diffusers computes with wherever a setting meets a tensor."""
    return float(value)


def strength_problem(strength: Any, steps: int) -> str | None:
    """img2img strength with `steps` sampler steps: in (0, 1], and leaving at least one step."""
    if not _is_number(strength):
        return f"expected a number in (0, 1], got {strength!r}"
    value = as_float(strength)
    if not 0.0 < value <= 1.0:  # also rejects NaN
        return f"{value:g} outside (0, 1]"
    if _denoised_steps(steps, strength) < 1:
        # The smallest strength with 6 significant digits that leaves a step (rounded up: 1/3
        # printed as 0.333333 would itself leave none).
        least = math.ceil(1e6 / steps) / 1e6
        return (
            f"{value:g} x {steps} steps leaves no denoising step "
            f"(int(steps * strength) = 0); use strength >= {least:.6g} or more steps"
        )
    return None


def img2img_steps(steps: int, strength: float) -> int:
    """How many of the `steps` timesteps an img2img run denoises: diffusers' rule,
    `min(int(steps * strength), steps)`. ValueError when the strength is out of range or
    leaves no step (diffusers would then build an empty batch and fail)."""
    problem = strength_problem(strength, steps)
    if problem:
        raise ValueError(f"strength {problem}")
    return min(_denoised_steps(steps, strength), steps)


def _denoised_steps(steps: int, strength: Any) -> int:
    """`int(steps * strength)` computed as diffusers computes it: in the strength's own type. A
    numpy float32 (or 0-dim torch float32 tensor) multiplies in float32, which can round up to
    the next whole step where its exact value would not: 50 x float32(0.58) is 29.0 in float32,
    28.99999917 widened, so diffusers denoises 29 steps of 50 given np.float32(0.58) and 28 given
    the Python float 0.58. (A job reads a float32 manifest column as the decimal it prints as,
    before any of this: `jobs.tabular`.)"""
    return int(steps * strength)
