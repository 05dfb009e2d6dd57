"""Provenance: the record schema, the PNG "parameters" text, software versions.

One record per manifest row, `ok` or `error`, holding everything needed to regenerate its image
(SPEC.md, "Outputs"). Records of one shard are written as one Parquet file with RECORD_SCHEMA.
"""

from __future__ import annotations

import platform
import sys
from typing import Any, Iterable, Mapping

import pyarrow as pa

from . import __version__

RECORD_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),  # manifest row index: the record's key
        ("id", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),
        ("prompt", pa.string()),
        ("negative", pa.string()),
        ("seed", pa.int64()),
        ("mode", pa.string()),  # txt2img | img2img
        ("strength", pa.float64()),
        ("init_image", pa.string()),  # as written in the manifest
        ("init_image_uri", pa.string()),  # resolved (redacted) URI that was read
        ("init_image_sha256", pa.string()),
        ("sampler", pa.string()),
        ("karras", pa.bool_()),
        ("steps", pa.int32()),
        ("guidance_scale", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("model_weights", pa.string()),  # redacted URI the weights were loaded from
        ("model_fingerprint", pa.string()),  # sha256 of the weights (sdcore canonical order)
        ("dtype", pa.string()),
        ("device", pa.string()),  # cpu | cuda | ...
        ("device_name", pa.string()),
        ("threads", pa.int32()),  # torch intra-op threads on CPU (CPU results depend on it)
        ("batch_invariant", pa.bool_()),  # false: the image may differ from a lone remake by float noise
        ("torch_version", pa.string()),
        ("sdcore_version", pa.string()),
        ("sdgen_version", pa.string()),
        ("image_path", pa.string()),  # relative to the output root
        ("image_uri", pa.string()),
        ("image_sha256", pa.string()),  # of the committed file's bytes
        ("image_format", pa.string()),
        ("attempt", pa.int32()),
        ("worker", pa.string()),
        ("started_at", pa.timestamp("ms", tz="UTC")),
        ("time_load_s", pa.float64()),  # reading the init image
        ("time_generate_s", pa.float64()),  # this row's share of its batch's generate()
        ("time_write_s", pa.float64()),  # encoding and committing the image
    ]
)
RECORD_FIELDS = tuple(RECORD_SCHEMA.names)

SAMPLER_LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M"}
FORMAT_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def records_table(records: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Records (dicts; missing fields are null) -> a table with RECORD_SCHEMA, sorted by row."""
    rows = sorted(records, key=lambda r: r["row"])
    columns = {name: [r.get(name) for r in rows] for name in RECORD_FIELDS}
    return pa.table({name: pa.array(columns[name], type=RECORD_SCHEMA.field(name).type) for name in RECORD_FIELDS}, schema=RECORD_SCHEMA)


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
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def a1111_parameters(record: Mapping[str, Any]) -> str:
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
    sampler = SAMPLER_LABELS.get(record["sampler"], record["sampler"])
    if record.get("karras"):
        sampler += " Karras"
    fields = [
        ("Steps", str(record["steps"])),
        ("Sampler", sampler),
        ("CFG scale", _number(record["guidance_scale"])),
        ("Seed", str(record["seed"])),
        ("Size", f"{record['width']}x{record['height']}"),
        ("Model hash", record["model_fingerprint"][:10]),
        ("Model", model_name(record["model_weights"])),
    ]
    if record.get("mode") == "img2img":
        fields.append(("Denoising strength", _number(record["strength"])))
    lines = [record["prompt"]]
    if record.get("negative"):
        lines.append(f"Negative prompt: {record['negative']}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


def software_versions() -> dict[str, str]:
    """Versions of everything that can change an image or a record, for job.json."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform(), "sdgen": __version__}
    for module in ("torch", "sdcore", "numpy", "PIL", "pyarrow", "ray", "boto3"):
        try:
            mod = __import__(module)
            versions["pillow" if module == "PIL" else module] = str(getattr(mod, "__version__", "unknown"))
        except Exception:  # noqa: BLE001 - an absent optional module is just not listed
            continue
    return versions
