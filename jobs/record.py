"""The record: one per manifest row, `ok` or `error`, holding everything needed to remake its image.

`Record`'s fields are the record schema: each field's type names its Arrow type (`Int32`,
`String | None`, ...), and `RECORD_SCHEMA` (the Parquet columns of `records/SHARD.parquet` and of
partial files) is read off the dataclass, so the two cannot drift. Column names, order and types
are those of every output written so far; a partial file with other columns is not resumed
(`Output.read_partials`), so change them only knowingly.

A worker makes its records with one `RecordBuilder` (the fields that are the same for every row
of the worker: model, device, versions, sampler) and its `build` method; a record is then only
completed, never edited in place: `generated` adds the generate() outcome, `with_image` the facts
of the committed image, each returning a new record.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import pyarrow as pa

from sdcore import rules

from .manifest import RowRequest
from .redact import redact_text
from .storage import redact_uri

# A field's type names its Parquet column's Arrow type.
Int64 = Annotated[int, pa.int64()]
Int32 = Annotated[int, pa.int32()]
Float64 = Annotated[float, pa.float64()]
Bool = Annotated[bool, pa.bool_()]
String = Annotated[str, pa.string()]
Timestamp = Annotated[datetime, pa.timestamp("ms", tz="UTC")]


@dataclass(frozen=True, kw_only=True)
class Record:
    """One manifest row's record. Field order is column order; a field without a default is set
    in every record the builder makes (`| None` there: the value itself may be null)."""

    row: Int64  # manifest row index: the record's key
    id: String | None  # None only in an "id is missing" error record
    shard: String
    status: String  # ok | error
    error: String | None = None
    prompt: String | None = None
    negative: String | None = None
    seed: Int64 | None = None
    mode: String  # txt2img | img2img
    strength: Float64 | None = None
    init_image: String | None = None  # as written in the manifest
    init_image_uri: String | None = None  # resolved (redacted) URI that was read
    init_image_sha256: String | None = None
    sampler: String
    karras: Bool
    steps: Int32
    guidance_scale: Float64
    width: Int32
    height: Int32
    model_weights: String  # redacted URI the weights were loaded from
    model_fingerprint: String  # sha256 of the weights (sdcore canonical order)
    dtype: String
    device: String  # cpu | cuda | ...
    device_name: String
    threads: Int32 | None  # torch intra-op threads on CPU (CPU results depend on it)
    batch_invariant: Bool  # false: the image may differ from a lone remake by float noise
    torch_version: String | None
    sdcore_version: String | None
    sdgen_version: String
    image_path: String | None = None  # relative to the output root
    image_uri: String | None = None
    image_sha256: String | None = None  # of the committed file's bytes
    image_format: String | None = None
    attempt: Int32
    worker: String
    started_at: Timestamp
    time_load_s: Float64 | None = None  # reading the init image
    time_generate_s: Float64 | None = None  # this row's share of its batch's generate()
    time_write_s: Float64 | None = None  # encoding and committing the image
    # The UNet forwards that made the image (see sdcore.pipeline.Placement): `batch_rows` rows
    # per forward, this row in `batch_slot`. Rebuilding that shape with the row in that slot
    # remakes its bits. Null in records written before fixed-shape batching.
    batch_rows: Int32 | None = None
    batch_slot: Int32 | None = None
    # The worker's CUDA_VISIBLE_DEVICES as it saw it (Ray sets it to the one GPU it gives each GPU
    # worker): with `worker` and `device`, which GPU of which node made the image. None when unset
    # or empty (CPU workers).
    cuda_visible_devices: String | None = None
    # The row's label columns (manifest columns the runner does not use) as a JSON object in
    # manifest column order; null when the manifest has none. Added last: earlier columns keep
    # their order.
    labels: String | None = None
    # Kernel choices that decide the last bits (sdcore.kernels), as a JSON object: "compile" (none
    # | default | reduce-overhead: torch.compile, with CUDA graphs), "conv" (winograd-f2x3 |
    # direct: how the 3x3 convolutions ran; absent before the Winograd path: direct) and, on
    # CUDA, the cuDNN and determinism settings. Null in records written before it (eager,
    # default settings).
    kernels: String | None = None
    # The VAE decode that made the image (sdcore.pipeline.Placement): `decode_rows` latents per
    # decode, this row's in `decode_slot`. Null in records written before batched decodes (each
    # image decoded alone, as decode_rows 1).
    decode_rows: Int32 | None = None
    decode_slot: Int32 | None = None
    # img2img: how the init image file became pixels (jobs.init_images.INIT_DECODING). Null in
    # txt2img records and in records written before it (decoding 1).
    init_decoding: Int32 | None = None
    # How the image's parameters were embedded (jobs.writer.IMAGE_METADATA). Null in records
    # written before it (1).
    image_metadata: Int32 | None = None
    # Tokens CLIP's 77-token context cut from the end of the prompt and of the negative prompt
    # (beyond 75; sdcore.tokenizer.dropped_tokens, the pipeline's tokenizer): 0 when the text fit,
    # and the negative's 0 when the row is not guided (guidance_scale <= 1: it is not encoded).
    # Null in error records of rows never given to the pipeline and in records written before it.
    prompt_tokens_dropped: Int32 | None = None
    negative_tokens_dropped: Int32 | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Record:
        """A record read back from Parquet (`table.to_pylist()` rows); missing columns are null."""
        return cls(**{name: values.get(name) for name in RECORD_FIELDS})

    def as_dict(self) -> dict[str, Any]:
        """Column name -> value, in column order (the form `records_table` and Output take)."""
        return {name: getattr(self, name) for name in RECORD_FIELDS}

    def generated(self, seconds: float, error: str | None = None, placement: Any = None) -> Record:
        """This record after its generate() call: the row's share of the call's time, the
        failure, if the row has no image, and where the row sat in its forwards (a
        `sdcore.pipeline.Placement`, when it has an image)."""
        placed = {}
        if placement is not None:
            placed = {"batch_rows": placement.rows, "batch_slot": placement.slot}
            placed.update(decode_rows=placement.decode_rows, decode_slot=placement.decode_slot)
        return dataclasses.replace(self, time_generate_s=seconds, status=_status(error), error=error, **placed)

    def with_image(self, image: StoredImage) -> Record:
        """This record with the facts of its committed image."""
        return dataclasses.replace(
            self,
            image_path=image.path,
            image_uri=image.uri,
            image_sha256=image.sha256,
            image_format=image.format,
            time_write_s=image.seconds,
            image_metadata=image.metadata,
        )


def _arrow_type(hint: Any) -> pa.DataType:
    """The Arrow type in a field's annotation: `Int32` -> int32, `String | None` -> string."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    (arrow_type,) = hint.__metadata__
    return arrow_type


def _schema() -> pa.Schema:
    hints = typing.get_type_hints(Record, include_extras=True)
    return pa.schema([(f.name, _arrow_type(hints[f.name])) for f in dataclasses.fields(Record)])


RECORD_SCHEMA = _schema()
RECORD_FIELDS = tuple(RECORD_SCHEMA.names)


def records_table(records: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Records as dicts (`Record.as_dict`; missing fields are null) -> a RECORD_SCHEMA table,
    sorted by row."""
    rows = sorted(records, key=lambda r: r["row"])
    columns = {
        name: pa.array([r.get(name) for r in rows], type=RECORD_SCHEMA.field(name).type) for name in RECORD_FIELDS
    }
    return pa.table(columns, schema=RECORD_SCHEMA)


@dataclass(frozen=True)
class StoredImage:
    """What committing one image established (`ShardWriter`): where it is and what it holds."""

    path: str  # key relative to the output root
    uri: str
    sha256: str  # of the file's bytes
    format: str  # png | jpeg | webp
    seconds: float  # encoding and writing it
    metadata: int  # how its parameters are embedded (jobs.writer.IMAGE_METADATA)


# The manifest fields of a row, as `parse_row` reads them: a `RowRequest` holds all of them, the
# `known` fields of a rejected row those that could be read.
ROW_FIELDS = (
    "row",
    "id",
    "prompt",
    "negative",
    "seed",
    "strength",
    "init_image",
    "init_image_uri",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "sampler",
    "karras",
    "labels",
)


@dataclass(frozen=True)
class RecordBuilder:
    """Makes a worker's records. It holds the fields equal for every row the worker makes (its
    model, device, software and sampler), so `build` needs only the row and what happened to it.
    `sampler` and `karras` are the spec's: a row that sets its own (manifest columns) overrides
    them."""

    sampler: str
    karras: bool
    model_weights: str  # redacted
    model_fingerprint: str
    dtype: str
    device: str
    device_name: str
    threads: int | None
    batch_invariant: bool
    batch_rows: int  # rows per UNet forward: 1 with batch_invariant, else the batch size
    torch_version: str | None
    sdcore_version: str | None
    sdgen_version: str
    worker: str
    cuda_visible_devices: str | None = None
    kernels: str | None = None  # JSON, see Record.kernels

    def build(
        self,
        row: RowRequest | Mapping[str, Any],
        *,
        shard: str,
        attempt: int,
        started_at: datetime,
        error: str | None = None,
        init_image_sha256: str | None = None,
        init_decoding: int | None = None,
        time_load_s: float | None = None,
    ) -> Record:
        """The record of one manifest row: `row` is its checked request, or for a rejected row
        the fields `parse_row` could read; `error` makes it an error record. The image and the
        generate() time are added later (`Record.with_image`, `Record.generated`). A row to be
        generated gets the tokens CLIP will cut from its texts (`tokens_dropped`)."""
        dropped = {}
        if isinstance(row, RowRequest) and error is None:
            negative = row.negative if rules.guided(row.guidance_scale) else ""
            dropped = {
                "prompt_tokens_dropped": tokens_dropped(row.prompt),
                "negative_tokens_dropped": tokens_dropped(negative),
            }
        fields = _row_fields(row)
        uri = fields["init_image_uri"]
        fields["init_image_uri"] = redact_uri(uri) if uri else uri
        if isinstance(fields.get("init_image"), str):  # as in the manifest, less any credentials in it
            fields["init_image"] = redact_uri(redact_text(fields["init_image"]))
        shared = dataclasses.asdict(self)
        for name in ("sampler", "karras"):  # per row when the row has them, else the spec's
            default = shared.pop(name)
            if fields[name] is None:
                fields[name] = default
        return Record(
            **shared,
            **fields,
            shard=shard,
            status=_status(error),
            error=error,
            mode="img2img" if uri else "txt2img",
            init_image_sha256=init_image_sha256,
            init_decoding=init_decoding,
            attempt=attempt,
            started_at=started_at,
            time_load_s=time_load_s,
            **dropped,
        )


@functools.lru_cache(maxsize=4096)
def tokens_dropped(text: str) -> int:
    """Tokens of `text` beyond CLIP's 75, as the pipeline's tokenizer cuts them. Cached: a worker
    sees the same negative (and often the same prompt) row after row, and the tokenizer (with
    torch) is imported only by the workers that make records of generated rows."""
    from sdcore.tokenizer import dropped_tokens

    return dropped_tokens([text])[0]


def _row_fields(row: RowRequest | Mapping[str, Any]) -> dict[str, Any]:
    """ROW_FIELDS of a request, or of a rejected row's readable fields (absent ones are null)."""
    if isinstance(row, RowRequest):
        return {name: getattr(row, name) for name in ROW_FIELDS}
    unknown = set(row) - set(ROW_FIELDS)
    if unknown:
        raise ValueError(f"not manifest row fields: {', '.join(sorted(unknown))}")
    return {name: row.get(name) for name in ROW_FIELDS}


def _status(error: str | None) -> str:
    return "ok" if error is None else "error"


__all__ = ["RECORD_FIELDS", "RECORD_SCHEMA", "ROW_FIELDS", "Record", "RecordBuilder", "StoredImage", "records_table"]
