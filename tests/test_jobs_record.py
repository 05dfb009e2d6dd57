"""jobs/record.py: the record type is the schema; one builder makes every record."""

from __future__ import annotations

import dataclasses
import typing
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from jobs.manifest import RowRequest
from jobs.record import RECORD_FIELDS, RECORD_SCHEMA, ROW_FIELDS, Record, RecordBuilder, StoredImage, records_table

# The columns of every output written so far: a partial file resumes only with exactly these.
COLUMNS = [
    ("row", pa.int64()),
    ("id", pa.string()),
    ("shard", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("prompt", pa.string()),
    ("negative", pa.string()),
    ("seed", pa.int64()),
    ("mode", pa.string()),
    ("strength", pa.float64()),
    ("init_image", pa.string()),
    ("init_image_uri", pa.string()),
    ("init_image_sha256", pa.string()),
    ("sampler", pa.string()),
    ("karras", pa.bool_()),
    ("steps", pa.int32()),
    ("guidance_scale", pa.float64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("model_weights", pa.string()),
    ("model_fingerprint", pa.string()),
    ("dtype", pa.string()),
    ("device", pa.string()),
    ("device_name", pa.string()),
    ("threads", pa.int32()),
    ("batch_invariant", pa.bool_()),
    ("torch_version", pa.string()),
    ("sdcore_version", pa.string()),
    ("sdgen_version", pa.string()),
    ("image_path", pa.string()),
    ("image_uri", pa.string()),
    ("image_sha256", pa.string()),
    ("image_format", pa.string()),
    ("attempt", pa.int32()),
    ("worker", pa.string()),
    ("started_at", pa.timestamp("ms", tz="UTC")),
    ("time_load_s", pa.float64()),
    ("time_generate_s", pa.float64()),
    ("time_write_s", pa.float64()),
    ("batch_rows", pa.int32()),
    ("batch_slot", pa.int32()),
    ("cuda_visible_devices", pa.string()),  # which GPU made the image
    ("labels", pa.string()),  # added by the labels issue, last: earlier columns keep their order
    ("kernels", pa.string()),  # kernel choices (compile mode, CUDA determinism)
    ("decode_rows", pa.int32()),  # the VAE decode's shape and this row's slot in it: added last
    ("decode_slot", pa.int32()),
    ("init_decoding", pa.int32()),  # how an img2img row's init image was decoded (EXIF, 16-bit)
    ("image_metadata", pa.int32()),  # how the image's parameters were embedded (EXIF types)
    ("prompt_tokens_dropped", pa.int32()),  # tokens CLIP cut from the prompt / negative: added last
    ("negative_tokens_dropped", pa.int32()),
]

# Python type of a field -> the Arrow types its column may have.
ARROW_KINDS = {
    int: (pa.int64(), pa.int32()),
    str: (pa.string(),),
    float: (pa.float64(),),
    bool: (pa.bool_(),),
    datetime: (pa.timestamp("ms", tz="UTC"),),
}

BUILDER = RecordBuilder(
    sampler="ddim",
    karras=False,
    model_weights="s3://bucket/models/v1-5.safetensors",
    model_fingerprint="ab" * 32,
    dtype="float32",
    device="cpu",
    device_name="x86_64",
    threads=2,
    batch_invariant=True,
    batch_rows=1,
    torch_version="2.13.0",
    sdcore_version="0.1.0",
    sdgen_version="0.1.0",
    worker="host:1",
)
STARTED = datetime(2024, 11, 1, 12, 0, 0, 123000, tzinfo=timezone.utc)
REQUEST = RowRequest(
    row=7,
    id="cat",
    name="cat",
    prompt="a cat",
    negative="blurry",
    seed=42,
    strength=0.6,
    init_image="init/a.png",
    init_image_uri="s3://user:secret@bucket/init/a.png?X-Amz-Signature=abc",
    steps=20,
    guidance_scale=7.5,
    width=64,
    height=64,
)


def test_the_schema_is_the_columns_of_existing_outputs():
    assert RECORD_SCHEMA.equals(pa.schema(COLUMNS), check_metadata=True)
    assert RECORD_FIELDS == tuple(name for name, _ in COLUMNS)


def test_the_schema_is_the_dataclass_fields_in_order_with_matching_types():
    fields = dataclasses.fields(Record)
    hints = typing.get_type_hints(Record)
    assert [f.name for f in fields] == RECORD_SCHEMA.names
    for f in fields:
        python_types = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)]
        assert len(python_types) == 1, f.name
        assert RECORD_SCHEMA.field(f.name).type in ARROW_KINDS[python_types[0]], f.name


def test_builder_fields_are_record_fields_and_rows_fill_the_rest():
    worker_fields = [f.name for f in dataclasses.fields(RecordBuilder)]
    assert set(worker_fields) <= set(RECORD_FIELDS) and set(ROW_FIELDS) <= set(RECORD_FIELDS)
    # sampler and karras: the spec's in the builder, a row's own (manifest columns) override them.
    assert set(worker_fields) & set(ROW_FIELDS) == {"sampler", "karras"}
    assert set(ROW_FIELDS) <= {f.name for f in dataclasses.fields(RowRequest)}


def test_a_rows_sampler_overrides_the_builders_and_labels_are_kept():
    request = dataclasses.replace(REQUEST, sampler="euler_a", karras=False, labels='{"color": "red"}')
    record = BUILDER.build(request, shard="shard-00001", attempt=1, started_at=STARTED)
    assert (record.sampler, record.karras, record.labels) == ("euler_a", False, '{"color": "red"}')
    rejected = BUILDER.build({"row": 3, "id": "x"}, shard="s", attempt=1, started_at=STARTED, error="bad")
    assert (rejected.sampler, rejected.karras, rejected.labels) == (BUILDER.sampler, BUILDER.karras, None)


def test_an_ok_record_from_a_request():
    record = BUILDER.build(
        REQUEST, shard="shard-00001", attempt=2, started_at=STARTED, init_image_sha256="cd" * 32, time_load_s=0.5
    )
    assert (record.status, record.error, record.mode, record.shard, record.attempt) == (
        "ok",
        None,
        "img2img",
        "shard-00001",
        2,
    )
    # Credentials never reach a record; the key is kept whole (`?` is part of an S3 key).
    assert record.init_image_uri == "s3://bucket/init/a.png?X-Amz-Signature=REDACTED"
    assert (record.prompt, record.seed, record.strength, record.steps) == ("a cat", 42, 0.6, 20)
    assert (record.model_fingerprint, record.worker, record.threads) == ("ab" * 32, "host:1", 2)
    assert record.image_path is None and record.time_generate_s is None


def test_an_error_record_from_the_fields_that_could_be_read():
    known = {
        "row": 3,
        "id": "bad",
        "negative": "",
        "steps": 20,
        "guidance_scale": 7.5,
        "width": 64,
        "height": 64,
        "init_image": None,
        "init_image_uri": None,
    }
    record = BUILDER.build(known, shard="shard-00000", attempt=1, started_at=STARTED, error="prompt is missing")
    assert (record.status, record.error, record.mode, record.prompt, record.seed) == (
        "error",
        "prompt is missing",
        "txt2img",
        None,
        None,
    )
    with pytest.raises(ValueError, match="not manifest row fields: name"):
        BUILDER.build({**known, "name": "bad"}, shard="shard-00000", attempt=1, started_at=STARTED)


def test_a_generated_rows_record_counts_the_tokens_clip_drops():
    """CLIP reads 75 tokens of a text: the record says how many more the prompt and the
    negative prompt had (cut, as diffusers cuts them), 0 when they fit."""
    long = dataclasses.replace(REQUEST, prompt="a cat " * 40, negative="blurry " * 80)  # 80 tokens each
    record = BUILDER.build(long, shard="s", attempt=1, started_at=STARTED)
    assert (record.prompt_tokens_dropped, record.negative_tokens_dropped) == (5, 5)
    assert record.generated(1.0).prompt_tokens_dropped == 5  # kept when the record is completed
    fits = BUILDER.build(REQUEST, shard="s", attempt=1, started_at=STARTED)
    assert (fits.prompt_tokens_dropped, fits.negative_tokens_dropped) == (0, 0)
    # Not guided (guidance_scale <= 1): the negative prompt is not encoded, so nothing of it is cut.
    unguided = BUILDER.build(dataclasses.replace(long, guidance_scale=1.0), shard="s", attempt=1, started_at=STARTED)
    assert (unguided.prompt_tokens_dropped, unguided.negative_tokens_dropped) == (5, 0)
    # Rows never given to the pipeline: null, as in records written before the fields.
    failed = BUILDER.build(long, shard="s", attempt=1, started_at=STARTED, error="init_image not found: x")
    rejected = BUILDER.build({"row": 3, "id": "x", "prompt": "a cat " * 40}, shard="s", attempt=1, started_at=STARTED)
    assert [failed.prompt_tokens_dropped, rejected.prompt_tokens_dropped, rejected.negative_tokens_dropped] == [
        None
    ] * 3


def test_completing_a_record_makes_a_new_one():
    record = BUILDER.build(REQUEST, shard="shard-00000", attempt=1, started_at=STARTED)
    failed = record.generated(1.5, "generation failed: ValueError: no")
    assert (failed.status, failed.error, failed.time_generate_s) == ("error", "generation failed: ValueError: no", 1.5)
    stored = StoredImage(
        path="images/shard-00000/cat.png",
        uri="/out/images/shard-00000/cat.png",
        sha256="ef" * 32,
        format="png",
        seconds=0.25,
        metadata=2,
    )
    done = record.generated(1.5).with_image(stored)
    assert (done.status, done.image_path, done.image_uri, done.image_sha256, done.image_format, done.time_write_s) == (
        "ok",
        stored.path,
        stored.uri,
        stored.sha256,
        "png",
        0.25,
    )
    assert record.status == "ok" and record.time_generate_s is None and record.image_path is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = "error"


def test_records_survive_a_parquet_round_trip():
    records = [
        BUILDER.build(REQUEST, shard="shard-00000", attempt=1, started_at=STARTED).generated(1.0),
        BUILDER.build(
            {"row": 1, "id": None}, shard="shard-00000", attempt=1, started_at=STARTED, error="id is missing"
        ),
    ]
    table = records_table(r.as_dict() for r in records)
    assert table.schema == RECORD_SCHEMA and table.column("row").to_pylist() == [1, 7]
    assert [Record.from_dict(values) for values in table.to_pylist()] == records[::-1]
