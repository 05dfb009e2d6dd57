"""Provenance: the PNG "parameters" text, software versions.

One record per manifest row, `ok` or `error`, holding everything needed to regenerate its image
(SPEC.md, "Outputs"): the record type and its schema live in `record.py`. This module holds what
is written beside the pixels: the A1111 "parameters" text every image carries, and the software
versions that go into job.json and the records.
"""

from __future__ import annotations

import platform
import sys

from . import __version__
from .record import Record

SAMPLER_LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M"}
FORMAT_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def _number(value: float) -> str:
    return format(float(value), "g")


def _quote(value: str) -> str:
    """A1111 quotes a value that holds a comma, colon or quote."""
    if any(ch in value for ch in ',:"\n'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return value


def model_name(weights: str) -> str:
    """A short model name for the parameters text: `builtin:tiny` -> tiny, `.../v1-5.safetensors`
    -> v1-5, a diffusers folder -> its folder name."""
    name = weights.split(":", 1)[1] if weights.startswith("builtin:") else weights.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        name = name.removesuffix(suffix)
    return name


def a1111_parameters(record: Record) -> str:
    """The AUTOMATIC1111 "parameters" text for a record, which A1111's PNG Info, ComfyUI, Civitai
    and most SD tools read back:

        prompt
        Negative prompt: negative
        Steps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 512x512, Model hash: 0123456789,
        Model: v1-5, Denoising strength: 0.6

    (the last line is one line). Only values that decide the pixels go in, so the bytes of an
    image do not depend on which worker, batch or shard made it. `Model hash` is the first 10 hex
    digits of sdcore's weights fingerprint (A1111's own hash is of the file, which sdcore does not
    have for built-in or re-laid-out weights).
    """
    sampler = SAMPLER_LABELS.get(record.sampler, record.sampler)
    if record.karras:
        sampler += " Karras"
    fields = [
        ("Steps", str(record.steps)),
        ("Sampler", sampler),
        ("CFG scale", _number(record.guidance_scale)),
        ("Seed", str(record.seed)),
        ("Size", f"{record.width}x{record.height}"),
        ("Model hash", record.model_fingerprint[:10]),
        ("Model", model_name(record.model_weights)),
    ]
    if record.mode == "img2img":
        fields.append(("Denoising strength", _number(record.strength)))
    lines = [record.prompt]
    if record.negative:
        lines.append(f"Negative prompt: {record.negative}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


def software_versions() -> dict[str, str]:
    """Versions of everything that can change an image or a record, for job.json."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform(), "sdgen": __version__}
    for module in ("torch", "sdcore", "numpy", "PIL", "pyarrow", "ray", "boto3"):
        try:
            mod = __import__(module)
            versions["pillow" if module == "PIL" else module] = str(getattr(mod, "__version__", "unknown"))
        except Exception:  # noqa: BLE001, S112 - an absent optional module is just not listed
            continue
    return versions


__all__ = [
    "FORMAT_EXTENSIONS",
    "SAMPLER_LABELS",
    "a1111_parameters",
    "model_name",
    "software_versions",
]
