"""jobs/provenance.py: the record schema and the A1111 "parameters" text."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pyarrow as pa

from jobs.provenance import a1111_parameters, model_name, software_versions
from jobs.record import RECORD_FIELDS, RECORD_SCHEMA, RecordBuilder, records_table

BUILDER = RecordBuilder(
    sampler="dpmpp_2m",
    karras=True,
    model_weights="s3://b/models/v1-5.safetensors",
    model_fingerprint="0123456789abcdef" * 4,
    dtype="float16",
    device="cuda",
    device_name="NVIDIA A10G",
    threads=None,
    batch_invariant=True,
    batch_rows=1,
    torch_version="2.13.0",
    sdcore_version="0.1.0",
    sdgen_version="0.1.0",
    worker="gpu-1",
)
ROW = {
    "row": 3,
    "id": "cat",
    "prompt": "a cat, sitting",
    "negative": "blurry",
    "seed": 42,
    "steps": 25,
    "guidance_scale": 7.0,
    "width": 512,
    "height": 768,
}
RECORD = BUILDER.build(ROW, shard="shard-00000", attempt=1, started_at=datetime.now(timezone.utc))


def test_spec_md_fields_are_all_in_the_schema():
    spec_fields = {
        "id",
        "prompt",
        "negative",
        "seed",
        "strength",
        "init_image_uri",
        "init_image_sha256",
        "sampler",
        "karras",
        "steps",
        "guidance_scale",
        "width",
        "height",
        "model_fingerprint",
        "dtype",
        "device",
        "torch_version",
        "sdcore_version",
        "image_uri",
        "image_sha256",
        "status",
        "error",
        "attempt",
        "worker",
        "time_generate_s",
    }
    assert spec_fields <= set(RECORD_FIELDS)
    assert RECORD_FIELDS[0] == "row"


def test_records_table_sorts_by_row_and_fills_nulls():
    table = records_table(
        [{"row": 2, "id": "b", "status": "ok"}, {"row": 1, "id": "a", "status": "error", "error": "x"}]
    )
    assert table.schema == RECORD_SCHEMA
    assert table.column("row").to_pylist() == [1, 2]
    assert table.column("seed").to_pylist() == [None, None]
    assert table.column("seed").type == pa.int64()


def test_a1111_parameters_txt2img():
    text = a1111_parameters(RECORD)
    assert text.split("\n") == [
        "a cat, sitting",
        "Negative prompt: blurry",
        (
            "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
            "Model hash: 0123456789, Model: v1-5"
        ),
    ]


def test_a1111_parameters_img2img_without_negative():
    builder = dataclasses.replace(BUILDER, sampler="euler_a", karras=False, model_weights="builtin:tiny")
    img2img = {
        **ROW,
        "negative": "",
        "strength": 0.6,
        "guidance_scale": 7.5,
        "init_image": "a.png",
        "init_image_uri": "/m/a.png",
    }
    record = builder.build(img2img, shard="shard-00000", attempt=1, started_at=datetime.now(timezone.utc))
    lines = a1111_parameters(record).split("\n")
    assert len(lines) == 2
    assert lines[1] == (
        "Steps: 25, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x768, "
        "Model hash: 0123456789, Model: tiny, Denoising strength: 0.6"
    )


def test_model_name():
    assert model_name("builtin:shapes") == "shapes"
    assert model_name("/models/sd-v1-5/") == "sd-v1-5"
    assert model_name("s3://b/m/v1-5-pruned.ckpt") == "v1-5-pruned"


def test_software_versions_name_the_libraries():
    versions = software_versions()
    assert {"python", "sdgen", "torch", "sdcore", "pyarrow"} <= set(versions)
