"""`sdgen export OUTPUT --format webdataset|imagefolder|parquet DEST`: a job's ok rows as a dataset.

Every format holds, per ok row, the image, its caption (the prompt), its record and its labels
(the manifest's label columns, `Record.labels`):

- `webdataset`: `DEST/SHARD.tar`, one tar per job shard, members `KEY.png` (or .jpg/.webp),
  `KEY.json` (the record, with `labels` as an object) and `KEY.txt` (the prompt). KEY is the
  manifest row number, zero-padded (WebDataset splits a member's name at its first dot, so ids,
  which may hold dots, are in the JSON instead).
- `imagefolder`: `DEST/SHARD/NAME.EXT` plus one metadata file, `DEST/metadata.jsonl` (the
  default) or `DEST/metadata.parquet` (`metadata="parquet"`: typed columns, compressed), with
  `file_name`, `text` (the prompt), the labels as columns, and the record's generation fields —
  what `datasets.load_dataset("imagefolder", data_dir=DEST)` reads. `datasets` refuses a folder
  holding metadata files of two kinds, so writing one deletes the other one, if an earlier
  export left it.
- `parquet`: `DEST/SHARD.parquet`, the record columns, the labels as columns and `image`
  (the file's bytes); no file for a shard without ok rows.

Label columns keep their names unless that would lose or misread values (`label_names`): a name
that is already a column of the export (a record field, `file_name`, `text`, `image`) becomes
`label_NAME`; in an imagefolder, where `datasets` reads any column whose name ends in
`file_name` (or `file_names`) as file paths, such a label becomes `NAME_label`. A new name that
is taken too gets the prefix (suffix) again until it is free, so no two labels share a column.

The Parquet files of an export (the `parquet` format's shard files, and the imagefolder's
`metadata.parquet`) share one schema: a first pass reads every record file's `status` and
`labels` columns and unifies the labels' types over all shards (`unify_schemas`, the permissive
way: null takes the other type, int64 and float64 give float64). Integers above int64's range
make a uint64 column; beside negative integers, or in an imagefolder's metadata.parquet (which
datasets' imagefolder loader cannot read then), they are refused (`ExportError`), as is a label
that is an empty object in every row (Parquet writes no struct without fields).

DEST holds a marker, `DEST/.sdgen-export.json` (hidden: `datasets` and pyarrow skip it): the
source output, the format, and per exported shard the sha256 of the record file it was exported
from (and, for `parquet`, the schema's digest) and the byte total of the files it wrote. An
export into a non-empty DEST without a marker, or with another output's or format's, is
refused. Like a job, an export is resumable and idempotent: each file is committed whole (temp +
rename, or one S3 PUT); a rerun skips a shard the marker says came from the identical record
file and whose files are there with the byte total it recorded (a file cut short by hand is
rewritten), and rewrites the others (deleting what an earlier export of a changed output left that the new one does not
have); the marker names a shard only after its files are written (it is rewritten at most every
MARKER_EVERY_S seconds and at the end, or when the export fails). The imagefolder's metadata
file is written last. DEST is local or s3://. Shards are exported one at a time and the
imagefolder's metadata is built in a local temporary folder, so memory does not grow with the
number of rows. Every image is compared with its record's `image_sha256` as it is read; a shard
holding one changed since the run is refused before any of its files is written (`_images`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .output import DamagedRecords, Output
from .reader import shard_sort_key
from .record import RECORD_FIELDS, RECORD_SCHEMA
from .storage import S3Storage, Storage, is_s3, join_uri, open_storage, redact_uri, s3_objects, split_s3

FORMATS = ("webdataset", "imagefolder", "parquet")
METADATA_KINDS = ("jsonl", "parquet")  # imagefolder's metadata file; the first is the default
# The record fields an imagefolder's metadata carries besides file_name, text and the labels.
IMAGEFOLDER_FIELDS = (
    "id",
    "row",
    "negative",
    "seed",
    "mode",
    "strength",
    "sampler",
    "karras",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "model_fingerprint",
    "image_sha256",
    "prompt_tokens_dropped",  # the prompt's tokens past CLIP's 75, which the image never saw
    "negative_tokens_dropped",
)
# The columns of each format that are not labels (`image`: the column datasets' imagefolder adds).
COLUMNS = {
    "webdataset": (),  # the labels stay an object in KEY.json: nothing to rename
    "imagefolder": ("file_name", "text", *IMAGEFOLDER_FIELDS, "image"),
    "parquet": (*RECORD_FIELDS, "image"),
}
MARKER = ".sdgen-export.json"  # DEST's record of what it holds (hidden: datasets skips it)
MARKER_EVERY_S = 5.0  # the marker is rewritten at most this often while shards are exported


class ExportError(RuntimeError):
    """Nothing to export from there, or not to there (the message says why)."""


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def labels_of(record: dict[str, Any]) -> dict[str, Any]:
    return json.loads(record["labels"]) if record.get("labels") else {}


def _file_like(name: str) -> bool:
    """A column name that datasets' imagefolder reads as file paths (`file_name`, `*_file_name`,
    `file_names`, `*_file_names`), not as values."""
    return name.endswith(("file_name", "file_names"))


def label_names(names: Iterable[str], fmt: str) -> dict[str, str]:
    """Label name -> its column in an export of format `fmt`: the name itself, unless it is a
    column of the export (-> `label_NAME`) or, in an imagefolder, ends in `file_name(s)`
    (-> `NAME_label`). A new name that is taken (by a column or another label) gets the prefix
    (suffix) again until it is free: labels `status` and `label_status` of a parquet export
    become `label_label_status` and `label_status`."""
    names = list(dict.fromkeys(names))
    columns = set(COLUMNS[fmt])

    def fits(name: str) -> bool:
        return name not in columns and not (fmt == "imagefolder" and _file_like(name))

    used = columns | {n for n in names if fits(n)}
    renamed = {}
    for name in names:
        column = name
        if not fits(name):
            suffix = fmt == "imagefolder" and _file_like(name)
            while column in used or not fits(column):
                column = f"{column}_label" if suffix else f"label_{column}"
        used.add(column)
        renamed[name] = column
    return renamed


def label_columns(labels: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A row's labels as columns, renamed as `names` (from `label_names`) says."""
    return {names.get(k, k): v for k, v in labels.items()}


def record_json(record: dict[str, Any]) -> dict[str, Any]:
    """The record as JSON: timestamps as ISO strings, `labels` as an object."""
    data = {k: _plain(v) for k, v in record.items()}
    data["labels"] = labels_of(record)
    return data


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of (name, bytes) with fixed metadata, so the same members give the same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def unify_schemas(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for tables of `schemas`, the permissive way: a null column takes the other
    type, int64 and float64 give float64, lists and structs merge their value types."""
    return pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])


def _typed(rows: list[dict[str, Any]]) -> pa.Table:
    """The record columns keep the record schema's types (a shard whose `strength` is all null
    still has a float column); the other columns' types are inferred from `rows`."""
    table = pa.Table.from_pylist(rows)
    fields = [RECORD_SCHEMA.field(n) if n in RECORD_FIELDS else table.schema.field(n) for n in table.column_names]
    return table.cast(pa.schema(fields))


def _parquet(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, compression="zstd")
    return sink.getvalue()


class MetadataFile:
    """The imagefolder's metadata file, built shard by shard in a local temporary folder, so an
    export of millions of rows never holds its metadata in memory. Parquet: one piece per shard,
    of `schema` when given (the export's: see `plan_export`), else of the types `_typed` infers, joined
    at the end under one schema (`unify_schemas`)."""

    def __init__(self, kind: str, folder: str, schema: pa.Schema | None = None):
        self.kind, self.folder, self.schema = kind, Path(folder), schema
        self.path = self.folder / f"metadata.{kind}"
        self.pieces: list[Path] = []
        self.lines = open(self.path, "w", encoding="utf-8") if kind == "jsonl" else None  # closed in finish()

    def add(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.lines is not None:
            self.lines.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
            return
        piece = self.folder / f"piece-{len(self.pieces):08d}.parquet"
        table = _typed(rows) if self.schema is None else pa.Table.from_pylist(rows, schema=self.schema)
        pq.write_table(table, piece)
        self.pieces.append(piece)

    def finish(self) -> str:
        """The finished file's path."""
        if self.lines is not None:
            self.lines.close()
            return str(self.path)
        if not self.pieces:
            empty = self.schema or pa.schema([("file_name", pa.string()), ("text", pa.string())])
            pq.write_table(empty.empty_table(), self.path, compression="zstd")
            return str(self.path)
        schema = unify_schemas([pq.read_schema(p) for p in self.pieces])
        with pq.ParquetWriter(self.path, schema, compression="zstd") as writer:
            for piece in self.pieces:
                writer.write_table(pq.read_table(piece).cast(schema))
                piece.unlink()
        return str(self.path)


# ---------------------------------------------------------------------------------------------
# The first pass: what each shard's record file holds


def _record_file(output: Output, shard: str, columns: list[str] | None, sha256: str | None = None):
    """(the shard's record file as a table, the sha256 of its bytes), read as
    `Output.read_records` reads it. With `sha256`, a file that changed since is refused."""
    key = output.record_key(shard)
    data = output.storage.read(key)  # a storage fault is raised as such, not as damage
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ExportError(
            f"{join_uri(output.uri, key)} changed during the export (is a job writing that output?); export again"
        )
    return output.parse_records(shard, data, columns), digest


def _ok_records(output: Output, shard: str, sha256: str) -> list[dict[str, Any]]:
    table, _ = _record_file(output, shard, None, sha256)
    return [r for r in table.to_pylist() if r["status"] == "ok"]


def _images(output: Output, records: list[dict[str, Any]], pool: ThreadPoolExecutor) -> list[bytes]:
    """The records' image bytes, each compared with its record's `image_sha256` as it is read (in
    the pool's threads: the hash is cheap next to the write). An image changed since its record
    was written would make a dataset whose metadata does not describe its images, so the whole
    shard is refused before any of it is written, naming every such image, as a missing image
    is (FileNotFoundError). Records of an sdgen that did not record the hash are not checked."""

    def read(record: dict[str, Any]) -> tuple[bytes, bool]:
        data = output.storage.read(record["image_path"])
        expected = record.get("image_sha256")
        return data, expected is not None and hashlib.sha256(data).hexdigest() != expected

    read_back = list(pool.map(read, records))
    changed = [r for r, (_, differs) in zip(records, read_back) if differs]
    if changed:
        named = ", ".join(f"row {r['row']} ({join_uri(output.uri, r['image_path'])})" for r in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise ExportError(
            f"{len(changed)} image(s) differ from the image_sha256 of their records (changed after the run): "
            f"{named}{more}; put the originals back (`sdgen reproduce OUTPUT --row N --save-dir DIR` remakes "
            f"one from its record) or remake the output (`sdgen run SPEC --overwrite`), then export again"
        )
    return [data for data, _ in read_back]


def _too_big(name: str) -> ExportError:
    return ExportError(
        f"label {name!r} holds integers above 2^63-1 beside negative or non-integer values: no Parquet "
        f"integer column holds both; make it a string column in the manifest, or export as webdataset"
    )


def _label_array(name: str, values: list[Any]) -> pa.Array:
    """One label's values as Arrow infers them; integers above int64's range make uint64."""
    try:
        return pa.array(values)
    except OverflowError:
        pass
    except (TypeError, pa.ArrowException) as exc:
        raise ExportError(
            f"label {name!r} cannot be one Parquet column ({exc}); give the manifest column one type, "
            f"or export as webdataset or as imagefolder with metadata.jsonl"
        ) from None
    try:
        return pa.array(values, type=pa.uint64())
    except (OverflowError, TypeError, pa.ArrowException):
        raise _too_big(name) from None


@dataclass(frozen=True)
class ShardSurvey:
    """What the first pass learns of one shard's record file."""

    sha256: str  # of the record file's bytes
    ok: int  # ok rows
    labels: tuple[str, ...]  # the ok rows' label names, in order
    types: pa.Schema | None = None  # the ok rows' label types (exports that write Parquet)
    negative: frozenset[str] = frozenset()  # labels holding a negative integer


def survey_shard(output: Output, shard: str, typed: bool) -> ShardSurvey:
    """Reads only the `status` and `labels` columns (the whole file is hashed)."""
    table, digest = _record_file(output, shard, ["status", "labels"])
    labels = [labels_of(r) for r in table.to_pylist() if r["status"] == "ok"]
    names = tuple(dict.fromkeys(k for row in labels for k in row))
    if not typed:
        return ShardSurvey(digest, len(labels), names)
    arrays = {n: _label_array(n, [row.get(n) for row in labels]) for n in names}
    negative = frozenset(
        n for n, a in arrays.items() if pa.types.is_signed_integer(a.type) and (pc.min(a).as_py() or 0) < 0
    )
    return ShardSurvey(digest, len(labels), names, pa.schema([(n, a.type) for n, a in arrays.items()]), negative)


def _no_fields(type_: pa.DataType) -> bool:
    """Whether `type_` is, or holds, a struct without fields (a label `{}` in every row), which
    Parquet cannot write ("Cannot write struct type ... with no child field")."""
    if pa.types.is_struct(type_):
        return type_.num_fields == 0 or any(_no_fields(type_.field(i).type) for i in range(type_.num_fields))
    if pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_):
        return _no_fields(type_.value_type)
    if pa.types.is_map(type_):
        return _no_fields(type_.key_type) or _no_fields(type_.item_type)
    return False


def label_types(surveys: Iterable[ShardSurvey]) -> pa.Schema:
    """The labels' types over all shards (`unify_schemas`); a label that is uint64 in one shard
    (integers above int64's range) and int64 in another is uint64, unless one is negative."""
    surveys = [s for s in surveys if s.types is not None]
    try:
        unified = unify_schemas([s.types for s in surveys])
    except pa.ArrowException as exc:
        raise ExportError(
            f"a label has types no Parquet column unifies in different shards ({exc}); give the manifest "
            f"column one type, or export as webdataset or as imagefolder with metadata.jsonl"
        ) from None
    negative = frozenset().union(*(s.negative for s in surveys))
    fields = []
    for f in unified:
        big = any(f.name in s.types.names and s.types.field(f.name).type == pa.uint64() for s in surveys)
        if big and pa.types.is_integer(f.type):
            if f.name in negative:
                raise _too_big(f.name)
            f = f.with_type(pa.uint64())
        if _no_fields(f.type):  # unified over every shard: an object with keys in one shard is fine
            raise ExportError(
                f"label {f.name!r} is an empty object ({{}}) in every row, or holds one, and Parquet cannot write "
                f"an object without keys; drop the column from the manifest or give its objects a key, or "
                f"export as webdataset or as imagefolder with metadata.jsonl"
            )
        fields.append(f)
    return pa.schema(fields)


@dataclass(frozen=True)
class ExportPlan:
    """What every shard of one export shares."""

    surveys: dict[str, ShardSurvey]
    names: dict[str, str]  # label -> its column (`label_names`)
    schema: pa.Schema | None  # the Parquet files' schema (parquet; imagefolder with metadata.parquet)

    @property
    def schema_digest(self) -> str | None:
        return hashlib.sha256(str(self.schema).encode()).hexdigest()[:16] if self.schema is not None else None


def plan_export(output: Output, shards: list[str], fmt: str, metadata: str, threads: int) -> ExportPlan:
    typed = fmt == "parquet" or (fmt == "imagefolder" and metadata == "parquet")
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        surveys = dict(zip(shards, pool.map(lambda s: survey_shard(output, s, typed), shards)))
    names = label_names((n for s in surveys.values() for n in s.labels), fmt)
    if not typed:
        return ExportPlan(surveys, names, None)
    labels = [pa.field(names[f.name], f.type) for f in label_types(surveys.values())]
    big = [f.name for f in labels if f.type == pa.uint64()]
    if fmt == "imagefolder" and big:  # its loader turns rows into Python objects and back, inferring int64
        raise ExportError(
            f"label {big[0]!r} holds integers above 2^63-1, which datasets' imagefolder loader cannot read "
            f"(OverflowError); export as --format parquet (a uint64 column) or webdataset"
        )
    if fmt == "parquet":
        schema = pa.schema([*RECORD_SCHEMA, *labels, pa.field("image", pa.binary())])
    else:
        head = [pa.field("file_name", pa.string()), pa.field("text", pa.string())]
        schema = pa.schema([*head, *(RECORD_SCHEMA.field(n) for n in IMAGEFOLDER_FIELDS), *labels])
    return ExportPlan(surveys, names, schema)


# ---------------------------------------------------------------------------------------------
# DEST's marker


class ExportMarker:
    """`DEST/.sdgen-export.json`: the source output, the format, and per exported shard what it
    was exported from (`records_sha256`; parquet: the `schema` digest) and which files it made
    (webdataset, parquet). It names a shard only after the shard's files are written."""

    def __init__(self, target: Storage, source: str, fmt: str, shards: dict[str, dict] | None = None):
        self.target, self.source, self.fmt = target, source, fmt
        self.shards: dict[str, dict] = dict(shards or {})
        self.dirty, self.written = True, 0.0  # time.monotonic() of the last write

    @classmethod
    def open(cls, target: Storage, source: str, fmt: str) -> ExportMarker:
        """DEST's marker, or a new one for an empty DEST. ExportError when DEST holds files
        without a marker, or another output's or format's export."""
        hint = "export into an empty or new folder"
        try:
            data = target.read(MARKER)
        except FileNotFoundError:
            if _files(target):
                raise ExportError(
                    f"{target.uri} is not empty and holds no {MARKER} (not an sdgen export, or one made before "
                    f"sdgen wrote that file): refusing to mix this export with the files there; {hint}"
                ) from None
            return cls(target, source, fmt)
        try:
            found = json.loads(data)
            old_source, old_format, shards = found["source"], found["format"], found["shards"]
            if not isinstance(shards, dict):
                raise TypeError("shards")
        except (ValueError, KeyError, TypeError):
            raise ExportError(f"{redact_uri(target.url(MARKER))}: not a readable sdgen export marker; {hint}") from None
        if (old_source, old_format) == (source, fmt):
            return cls(target, source, fmt, shards)
        if shards or _files(target):
            raise ExportError(
                f"{target.uri} holds an export of {redact_uri(old_source)} as {old_format}, not of {source} as "
                f"{fmt}: refusing to mix them; {hint}"
            )
        return cls(target, source, fmt)  # only the marker of an export that wrote nothing

    def holds(self, shard: str, entry: dict[str, Any], files: Iterable[str], sizes: dict[str, int]) -> bool:
        """Whether `shard` was exported as `entry` says and its `files` are all there (`sizes`:
        file -> bytes on DEST now) with the byte total the marker recorded when they were written:
        a file cut short or replaced by hand makes the shard be written again (a marker of an sdgen
        that recorded no total: once)."""
        claimed = dict(self.shards.get(shard) or {})
        total = claimed.pop("bytes", None)
        files = list(files)
        return claimed == entry and all(f in sizes for f in files) and total == sum(sizes[f] for f in files)

    def claim(self, shard: str, entry: dict[str, Any], total: int) -> None:
        """After the shard's files are written; `total`: their bytes."""
        self.shards[shard] = {**entry, "bytes": total}
        self.dirty = True
        if time.monotonic() - self.written >= MARKER_EVERY_S:
            self.write()

    def drop(self, shard: str) -> None:
        """After the shard's files are deleted."""
        self.shards.pop(shard, None)
        self.dirty = True

    def write(self) -> None:
        document = {"version": 1, "source": self.source, "format": self.fmt, "shards": self.shards}
        self.target.write(MARKER, (json.dumps(document, indent=1, sort_keys=True) + "\n").encode())
        self.dirty, self.written = False, time.monotonic()


def _files(target: Storage) -> list[str]:
    return [k for k in target.list("") if k != MARKER]


def _sizes(target: Storage, prefix: str = "") -> dict[str, int]:
    """Every file under `prefix` of DEST -> its size in bytes (S3: from the listing itself)."""
    if isinstance(target, S3Storage):
        folder = target.url(prefix)  # s3://bucket/PREFIX/prefix, ends in "/"
        try:
            objects = s3_objects(folder)
        except FileNotFoundError:  # nothing there
            return {}
        strip = len(split_s3(target.url(""))[1])
        return {o["key"][strip:]: o["size"] for o in objects}
    return {key: os.path.getsize(target.url(key)) for key in target.list(prefix)}


# ---------------------------------------------------------------------------------------------
# The export


def export(
    output_uri: str,
    fmt: str,
    dest: str,
    *,
    metadata: str | None = None,
    log: Callable[[str], None] = print,
    threads: int = 8,
) -> dict[str, Any]:
    """Export the committed shards' ok rows of `output_uri` to `dest`; returns the counts.

    `metadata` (imagefolder only): "jsonl" (default) or "parquet", the kind of metadata file."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if metadata is not None and fmt != "imagefolder":
        raise ExportError(f"--metadata applies to --format imagefolder only, not {fmt}")
    metadata = metadata or METADATA_KINDS[0]
    if metadata not in METADATA_KINDS:
        raise ExportError(f"unknown metadata kind {metadata!r}; expected one of {', '.join(METADATA_KINDS)}")
    output = Output(output_uri)
    if output.read_job() is None:
        raise ExportError(f"{output.uri}: no job.json here (not an sdgen output)")
    shards = sorted(output.committed_shards(), key=shard_sort_key)
    target = open_storage(dest)
    source = output.uri if is_s3(output.uri) else os.path.normpath(output.uri)  # as the marker names it
    marker = ExportMarker.open(target, source, fmt)
    plan = plan_export(output, shards, fmt, metadata, threads)
    counts = {"shards": len(shards), "shards_skipped": 0, "rows": 0, "images_written": 0}
    with tempfile.TemporaryDirectory(prefix="sdgen-export-") as scratch:
        metadata_file = MetadataFile(metadata, scratch, plan.schema) if fmt == "imagefolder" else None
        try:
            marker.write()  # before any file: after a crash, a rerun finds DEST marked as this export's
            for gone in sorted(set(marker.shards) - set(shards)):  # shards the output no longer has
                files = marker.shards[gone].get("files")
                if files is None:  # imagefolder: the shard's folder
                    target.delete_tree(f"{gone}/")
                else:
                    target.delete(files)
                marker.drop(gone)
            _export_shards(output, plan, fmt, target, counts, marker, metadata_file, log, threads)
        except BaseException:
            if marker.dirty:  # name the shards that were finished, if DEST can still be written
                with contextlib.suppress(Exception):
                    marker.write()
            raise
        if marker.dirty:
            marker.write()
        if metadata_file is not None:
            name = f"metadata.{metadata}"
            target.write_file(name, metadata_file.finish())  # last: it names only images already written
            others = [f"metadata.{k}" for k in METADATA_KINDS if k != metadata and target.exists(f"metadata.{k}")]
            if others:  # datasets refuses a folder with metadata files of two kinds
                target.delete(others)
                log(f"[sdgen] export: deleted {', '.join(others)} (an earlier export's; {name} replaces it)")
    log(
        f"[sdgen] exported {counts['rows']} ok rows of {len(shards)} shard(s) as {fmt} to {target.uri} "
        f"({counts['images_written']} images written, {counts['shards_skipped']} shard file(s) already there)"
    )
    return counts


def _export_shards(
    output: Output,
    plan: ExportPlan,
    fmt: str,
    target: Storage,
    counts: dict[str, int],
    marker: ExportMarker,
    metadata_file: MetadataFile | None,
    log: Callable[[str], None],
    threads: int,
) -> None:
    """Each shard in turn: only its records and images are in memory at a time."""
    existing = {} if fmt == "imagefolder" else _sizes(target)  # imagefolder: listed shard by shard
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for shard, survey in plan.surveys.items():
            entry: dict[str, Any] = {"records_sha256": survey.sha256}
            counts["rows"] += survey.ok
            if fmt == "imagefolder":
                assert metadata_file is not None
                records = _ok_records(output, shard, survey.sha256)
                names = [f"{shard}/{r['image_path'].rsplit('/', 1)[-1]}" for r in records]
                rows = []
                for record, name in zip(records, names):
                    row = {"file_name": name, "text": record["prompt"]}
                    row.update({k: record.get(k) for k in IMAGEFOLDER_FIELDS})
                    row.update(label_columns(labels_of(record), plan.names))
                    rows.append(row)
                metadata_file.add(rows)
                present = _sizes(target, f"{shard}/")
                if marker.holds(shard, entry, names, present):
                    counts["shards_skipped"] += 1
                    continue
                images = _images(output, records, pool)  # all checked before the first is written
                for name, data in zip(names, images):  # every one: a file of that name may be another's
                    target.write(name, data)
                    counts["images_written"] += 1
                target.delete(sorted(set(present) - set(names)))  # an earlier export's, of rows not ok now
                marker.claim(shard, entry, sum(len(data) for data in images))
                log(f"[sdgen] export {shard}: {len(records)} images -> {redact_uri(target.url(shard + '/'))}")
                continue
            shard_file = f"{shard}.tar" if fmt == "webdataset" else f"{shard}.parquet"
            entry["files"] = [shard_file] if fmt == "webdataset" or survey.ok else []  # parquet: none if no rows
            if fmt == "parquet":
                entry["schema"] = plan.schema_digest
            if marker.holds(shard, entry, entry["files"], existing):
                counts["shards_skipped"] += len(entry["files"])
                continue
            if not entry["files"]:
                target.delete([shard_file] if shard_file in existing else [])  # an earlier export's
                marker.claim(shard, entry, 0)
                log(f"[sdgen] export {shard}: no ok rows, no file")
                continue
            records = _ok_records(output, shard, survey.sha256)
            images = _images(output, records, pool)
            if fmt == "webdataset":
                members: list[tuple[str, bytes]] = []
                for record, data in zip(records, images):
                    key = f"{record['row']:010d}"
                    extension = record["image_path"].rsplit(".", 1)[-1]
                    members.append((f"{key}.{extension}", data))
                    members.append((f"{key}.json", json.dumps(record_json(record), ensure_ascii=False).encode()))
                    members.append((f"{key}.txt", record["prompt"].encode()))
                shard_bytes = _tar(members)
            else:
                assert plan.schema is not None
                rows = []
                for record, data in zip(records, images):
                    row = {k: record.get(k) for k in RECORD_FIELDS}  # older outputs lack later fields
                    row.update(label_columns(labels_of(record), plan.names))
                    row["image"] = data
                    rows.append(row)
                shard_bytes = _parquet(rows, plan.schema)
            target.write(shard_file, shard_bytes)
            counts["images_written"] += len(records)
            marker.claim(shard, entry, len(shard_bytes))
            log(f"[sdgen] export {shard}: {len(records)} rows -> {redact_uri(target.url(shard_file))}")


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: list[str] | None = None, prog: str = "sdgen export") -> int:
    """Exit status: 0 exported; 2 nothing to export from OUTPUT, DEST holds something else, a
    label no Parquet column holds, bad options, or another error (one line, no traceback)."""
    from .exit_codes import TABLE

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Export an sdgen output's ok rows as a dataset (see jobs/README.md, 'Export').",
        epilog=TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", help="the job's output folder or s3:// prefix")
    parser.add_argument("dest", help="destination folder or s3:// prefix (empty, or an earlier export of OUTPUT)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument(
        "--metadata",
        choices=METADATA_KINDS,
        help="imagefolder only: metadata.jsonl (default) or metadata.parquet (typed columns; for large exports)",
    )
    args = parser.parse_args(argv)
    try:
        export(args.output, args.format, args.dest, metadata=args.metadata)
    except (ExportError, DamagedRecords, OSError, RuntimeError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OverflowError, pa.ArrowException) as exc:  # a value the export cannot hold
        print(f"error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "FORMATS",
    "MARKER",
    "METADATA_KINDS",
    "ExportError",
    "export",
    "label_columns",
    "label_names",
    "labels_of",
    "record_json",
]


if __name__ == "__main__":
    sys.exit(main())
