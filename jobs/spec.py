"""The job spec: a YAML file, loaded with `yaml.safe_load`, validated before any work starts.

Every problem is reported at once, each naming its key (`sampler.steps: expected an integer in
1..999, got 0`). Defaults are filled in and local paths made absolute, so `JobSpec.to_dict()` is
the *resolved* spec that goes into `job.json`.

Which keys decide the outputs (`JobSpec.identity()`, compared when an output is resumed) and which
do not (names, locations, worker count, batch size) is documented in README.md, "Resume".
"""

from __future__ import annotations

import os
import reprlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from sdcore import rules  # the limits shared with the manifest check and the pipeline (no torch)

from .redact import redact_text
from .storage import is_s3, redact_uri

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
FORMATS = ("png", "jpeg", "webp")


class SpecError(ValueError):
    """The job spec is invalid; the message lists every problem, one per line."""


@dataclass(frozen=True)
class ModelSpec:
    weights: str
    dtype: str = "auto"


@dataclass(frozen=True)
class SamplerSpec:
    name: str = "ddim"
    steps: int = 25
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    karras: bool = False


@dataclass(frozen=True)
class ExecutionSpec:
    workers: int | str = "auto"  # "auto": one per GPU, or 1 on a CPU-only cluster
    batch_size: int = 8
    shard_size: int = 1000
    device: str = "auto"  # auto: cuda when the cluster has GPUs, else cpu
    max_attempts: int = 3  # tries per shard before it is reported failed (a rerun retries it)
    # torch threads per CPU worker. CPU float results depend on the thread count, so it is one
    # number for every worker of a job (never cores / workers). auto: the CPUs of the largest node.
    cpu_threads: int | str = "auto"
    # false (default): every UNet forward runs batch_size rows (a short batch is padded), and a
    # row's bits depend only on its own inputs and its slot, which its record keeps: reproduce
    # is identical at full batched speed. true: one row's guidance pair per forward, images the
    # same whatever the batch size too (slower). See sdcore/pipeline.py.
    batch_invariant: bool = False
    # true: a local `output` is on storage every node mounts (NFS, EFS...); without it a local
    # output is refused on a cluster whose workers run on other nodes (jobs/cluster.py).
    shared_output: bool = False
    # torch.compile the UNet (sdcore/kernels.py): false (default; measured slower at SD 1.5 size
    # on CPU) | true; it changes the images' last bits, repeatably. cuda_graphs: replay the
    # UNet's forwards from CUDA graphs: the eager kernels (the same bits as eager, measured on an
    # H200) without launching them one by one, or the compiled ones with compile: true. auto
    # (default): on CUDA workers | true (CUDA workers only) | false. Records keep the mode and
    # reproduce runs the same way (`compile_mode`).
    compile: bool = False
    cuda_graphs: bool | str = "auto"
    # How CPU float32 workers run the 3x3 convolutions of 256+ channels (sdcore/winograd.py):
    # winograd-f2x3 (default; faster at SD 1.5 size, keeps a transformed copy of those filters,
    # 16/9 of their size: +4 GB at SD 1.5) | direct. Recorded; reproduce does the same.
    conv: str = rules.DEFAULT_CONV_ALGORITHM
    # Finished latents per VAE decode, at that one shape (the last one of a shard padded); each
    # image's decode slot is recorded, so reproduce stays identical. auto (default): batch_size
    # on CUDA workers (one 512x512 decode leaves a GPU mostly idle: 2x the decode throughput
    # measured on an H200), 1 on CPU workers (batching is no faster there) and with
    # batch_invariant. An integer >= 1 sets it for every worker.
    decode_batch: int | str = "auto"

    def compile_mode(self, device: str) -> str:
        """sdcore.kernels.compile_unet's mode for these settings on a `device` worker."""
        return compile_mode(self.compile, self.cuda_graphs, device)


def compile_mode(compile: bool, cuda_graphs: bool | str, device: str) -> str:
    """sdcore.kernels.compile_unet's mode: CUDA graphs where asked for (auto: on CUDA workers),
    the compiled kernels in them with `compile`."""
    graphs = cuda_graphs is True or (cuda_graphs == "auto" and device == "cuda")
    if graphs:
        return "reduce-overhead" if compile else "cuda-graphs"
    return "default" if compile else "none"


@dataclass(frozen=True)
class ImageSpec:
    format: str = "png"
    quality: int = 95  # jpeg/webp only


@dataclass(frozen=True)
class JobSpec:
    name: str
    manifest: tuple[str, ...]
    output: str
    model: ModelSpec
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)
    image: ImageSpec = field(default_factory=ImageSpec)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["manifest"] = [redact_uri(m) for m in self.manifest]
        data["output"] = redact_uri(self.output)
        data["model"]["weights"] = redact_uri(self.model.weights)
        return data

    def identity(self) -> dict[str, Any]:
        """The settings that decide the images and the shard layout; a resumed output must match.

        Locations (manifest, output, weights path), the name, and the worker count and batch size
        are left out: the manifest is compared by content fingerprint and the weights by model
        fingerprint, and images do not depend on workers or batch size.
        """
        return {
            "model.dtype": self.model.dtype,
            "sampler": asdict(self.sampler),
            "execution.shard_size": self.execution.shard_size,
            "image": asdict(self.image),
        }


def _absolute(uri: str, base: Path) -> str:
    if is_s3(uri) or uri.startswith("builtin:"):
        return uri
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return str((base / os.path.expanduser(uri)).absolute())


class _Checker:
    """Reads one mapping, recording an error per bad key instead of stopping at the first."""

    def __init__(self, errors: list[str]):
        self.errors = errors

    def section(self, data: dict, key: str, allowed: set[str], required: bool = False) -> dict:
        value = data.get(key)
        if value is None:
            if required:
                self.errors.append(f"{key}: required section is missing")
            return {}
        if not isinstance(value, dict):
            self.errors.append(f"{key}: expected a mapping, got {type(value).__name__}")
            return {}
        self.unknown(value, allowed, key + ".")
        return value

    def unknown(self, data: dict, allowed: set[str], prefix: str = "") -> None:
        for key in data:
            if key not in allowed:
                hint = f" (allowed: {', '.join(sorted(allowed))})"
                self.errors.append(f"{prefix}{key}: unknown key{hint}")

    def string(self, data: dict, key: str, path: str, default: Any = None, required=False):
        value = data.get(key, default)
        if value is None:
            if required:
                self.errors.append(f"{path}: required key is missing")
            return default
        if not isinstance(value, str) or not value.strip():
            self.errors.append(f"{path}: expected a non-empty string, got {_short(value)}")
            return default
        return value

    def choice(self, data: dict, key: str, path: str, choices: tuple, default: Any):
        value = data.get(key, default)
        if value not in choices or isinstance(value, bool):
            self.errors.append(f"{path}: expected one of {', '.join(choices)}, got {_short(value)}")
            return default
        return value

    def integer(self, data: dict, key: str, path: str, default: int, lo: int, hi: int | None = None):
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            span = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
            self.errors.append(f"{path}: expected an integer {span}, got {_short(value)}")
            return default
        return value

    def boolean(self, data: dict, key: str, path: str, default: bool):
        value = data.get(key, default)
        if not isinstance(value, bool):
            self.errors.append(f"{path}: expected true or false, got {_short(value)}")
            return default
        return value

    def boolean_or_auto(self, data: dict, key: str, path: str, default: bool | str):
        value = data.get(key, default)
        if not isinstance(value, bool) and value != "auto":
            self.errors.append(f"{path}: expected true, false or auto, got {_short(value)}")
            return default
        return value

    def rule(self, data: dict, key: str, path: str, default: Any, problem: Callable[[Any], str | None]):
        """A value checked by one of sdcore.rules' `*_problem` functions."""
        value = data.get(key, default)
        if isinstance(value, (list, dict, tuple, set)):  # never repr'd whole: an alias bomb
            message = f"expected a single value, got {_short(value)}"
        else:
            message = problem(value)
        if message:
            message = message if len(message) <= 300 else message[:299] + "…"
            self.errors.append(f"{path}: {message}")
            return default
        return value


def parse_spec(data: Any, *, default_name: str = "job", base_dir: str | os.PathLike | None = None) -> JobSpec:
    """A validated JobSpec from the YAML's data; SpecError listing every problem otherwise."""
    if not isinstance(data, dict):
        raise SpecError(f"spec: expected a mapping at the top level, got {type(data).__name__}")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    errors: list[str] = []
    c = _Checker(errors)
    c.unknown(data, {"name", "manifest", "output", "model", "sampler", "execution", "image"})

    name = c.string(data, "name", "name", default=default_name)

    manifest_value = data.get("manifest")
    manifests: list[str] = []
    if manifest_value is None:
        errors.append("manifest: required key is missing")
    elif isinstance(manifest_value, str) and manifest_value.strip():
        manifests = [manifest_value]
    elif (
        isinstance(manifest_value, list)
        and manifest_value
        and all(isinstance(m, str) and m.strip() for m in manifest_value)
    ):
        manifests = list(manifest_value)
    else:
        errors.append(f"manifest: expected a path/URI (or a non-empty list of them), got {_short(manifest_value)}")
    for m in manifests:
        if not (m.endswith((".parquet", ".csv", ".tsv", ".jsonl", ".ndjson")) or any(ch in m for ch in "*?[")):
            errors.append(f"manifest: {redact_uri(m)!r} is not a .parquet/.csv/.tsv/.jsonl file (or a glob of them)")

    output = c.string(data, "output", "output", required=True)

    model = c.section(data, "model", {"weights", "dtype"}, required=True)
    weights = c.string(model, "weights", "model.weights", required="model" in data)
    weights_problem = rules.weights_problem(_absolute(weights, base)) if weights else None
    if weights_problem:  # checked again where the weights load (a local path must exist there)
        errors.append(f"model.weights: {redact_text(weights_problem)}")
    dtype = c.choice(model, "dtype", "model.dtype", DTYPES, "auto")

    s = c.section(data, "sampler", {"name", "steps", "guidance_scale", "width", "height", "karras"})
    d = SamplerSpec()
    sampler = SamplerSpec(
        name=c.rule(s, "name", "sampler.name", d.name, rules.sampler_problem),
        steps=c.rule(s, "steps", "sampler.steps", d.steps, rules.steps_problem),
        guidance_scale=float(
            c.rule(s, "guidance_scale", "sampler.guidance_scale", d.guidance_scale, rules.guidance_problem)
        ),
        width=c.rule(s, "width", "sampler.width", d.width, rules.size_problem),
        height=c.rule(s, "height", "sampler.height", d.height, rules.size_problem),
        karras=c.boolean(s, "karras", "sampler.karras", d.karras),
    )
    problem = rules.karras_problem(sampler.karras, sampler.name)
    if problem:
        errors.append(f"sampler.karras: {problem}")

    e = c.section(
        data,
        "execution",
        {
            "workers",
            "batch_size",
            "shard_size",
            "device",
            "max_attempts",
            "cpu_threads",
            "batch_invariant",
            "shared_output",
            "compile",
            "cuda_graphs",
            "conv",
            "decode_batch",
        },
    )
    d = ExecutionSpec()
    auto_ints = {}
    for key in ("workers", "cpu_threads", "decode_batch"):
        value = e.get(key, "auto")
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            errors.append(f"execution.{key}: expected 'auto' or an integer >= 1, got {_short(value)}")
            value = "auto"
        auto_ints[key] = value
    workers = auto_ints["workers"]
    execution = ExecutionSpec(
        workers=workers,
        batch_size=c.integer(e, "batch_size", "execution.batch_size", d.batch_size, 1, 4096),
        shard_size=c.integer(e, "shard_size", "execution.shard_size", d.shard_size, 1),
        device=c.choice(e, "device", "execution.device", DEVICES, d.device),
        max_attempts=c.integer(e, "max_attempts", "execution.max_attempts", d.max_attempts, 1, 100),
        cpu_threads=auto_ints["cpu_threads"],
        batch_invariant=c.boolean(e, "batch_invariant", "execution.batch_invariant", d.batch_invariant),
        shared_output=c.boolean(e, "shared_output", "execution.shared_output", d.shared_output),
        compile=c.boolean(e, "compile", "execution.compile", d.compile),
        cuda_graphs=c.boolean_or_auto(e, "cuda_graphs", "execution.cuda_graphs", d.cuda_graphs),
        conv=c.choice(e, "conv", "execution.conv", rules.CONV_ALGORITHMS, d.conv),
        decode_batch=auto_ints["decode_batch"],
    )
    if execution.cuda_graphs is True and execution.device == "cpu":
        errors.append("execution.cuda_graphs: CUDA graphs need CUDA workers, but execution.device is cpu")
    if execution.batch_invariant and execution.decode_batch not in ("auto", 1):
        errors.append(
            f"execution.decode_batch: {execution.decode_batch} decodes per VAE forward contradicts "
            "batch_invariant: true (images the same whatever the batching need one decode per image)"
        )

    i = c.section(data, "image", {"format", "quality"})
    image = ImageSpec(
        format=c.choice(i, "format", "image.format", FORMATS, ImageSpec.format),
        quality=c.integer(i, "quality", "image.quality", ImageSpec.quality, 1, 100),
    )

    if errors:
        raise SpecError("invalid job spec:\n  " + "\n  ".join(errors))
    return JobSpec(
        name=name,
        manifest=tuple(_absolute(m, base) for m in manifests),
        output=_absolute(output, base).rstrip("/") if is_s3(output) else _absolute(output, base),
        model=ModelSpec(weights=_absolute(weights, base), dtype=dtype),
        sampler=sampler,
        execution=execution,
        image=image,
    )


_REPR = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def _short(value: Any) -> str:
    """`repr(value)` cut short: a YAML alias bomb expands to gigabytes when repr'd in full."""
    return _REPR.repr(value)


def load_spec(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> JobSpec:
    """Read and validate a YAML job spec. Relative paths in it are relative to `base_dir`,
    default the current directory (the repository root in the examples), as for every other
    command-line path."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read job spec {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"job spec {path} is not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from None
    return parse_spec(data, default_name=path.stem, base_dir=base_dir)
