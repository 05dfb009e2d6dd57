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
  (the file's bytes).

Label columns keep their names; one that equals a column the export already has (a record field,
`file_name`, `text`, `image`) is written as `label_NAME`.

Like a job, an export is resumable and idempotent: each file is committed whole (temp + rename,
or one S3 PUT); a rerun skips the shard files (and imagefolder images) already in DEST and
writes the same bytes for the rest; the metadata file is written last. DEST is local or s3://.
Shards are exported one at a time and the imagefolder's metadata is built in a local temporary
folder, so memory does not grow with the number of rows.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .output import DamagedRecords, Output
from .record import RECORD_FIELDS, RECORD_SCHEMA
from .storage import Storage, open_storage, redact_uri

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
)


class ExportError(RuntimeError):
    """Nothing to export from there (the message says why)."""


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def labels_of(record: dict[str, Any]) -> dict[str, Any]:
    return json.loads(record["labels"]) if record.get("labels") else {}


def label_columns(labels: dict[str, Any], taken: Iterable[str]) -> dict[str, Any]:
    """Labels as columns, renamed `label_NAME` where NAME is already a column."""
    taken = set(taken)
    return {(f"label_{k}" if k in taken else k): v for k, v in labels.items()}


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


def _typed(rows: list[dict[str, Any]]) -> pa.Table:
    """The record columns keep the record schema's types (a shard whose `strength` is all null
    still has a float column), so every shard file of an export has the same schema."""
    table = pa.Table.from_pylist(rows)
    fields = [RECORD_SCHEMA.field(n) if n in RECORD_FIELDS else table.schema.field(n) for n in table.column_names]
    return table.cast(pa.schema(fields))


def _parquet(rows: list[dict[str, Any]]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(_typed(rows), sink, compression="zstd")
    return sink.getvalue()


class MetadataFile:
    """The imagefolder's metadata file, built shard by shard in a local temporary folder, so an
    export of millions of rows never holds its metadata in memory. Parquet: one piece per shard,
    joined at the end under one schema (a label that is null in one shard and a string in
    another, or int and float, is unified the permissive way)."""

    def __init__(self, kind: str, folder: str):
        self.kind, self.folder = kind, Path(folder)
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
        pq.write_table(_typed(rows), piece)
        self.pieces.append(piece)

    def finish(self) -> str:
        """The finished file's path."""
        if self.lines is not None:
            self.lines.close()
            return str(self.path)
        if not self.pieces:
            empty = pa.schema([("file_name", pa.string()), ("text", pa.string())])
            pq.write_table(empty.empty_table(), self.path, compression="zstd")
            return str(self.path)
        schema = pa.unify_schemas([pq.read_schema(p) for p in self.pieces], promote_options="permissive")
        with pq.ParquetWriter(self.path, schema, compression="zstd") as writer:
            for piece in self.pieces:
                writer.write_table(pq.read_table(piece).cast(schema))
                piece.unlink()
        return str(self.path)


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
    shards = sorted(output.committed_shards())
    target = open_storage(dest)
    counts = {"shards": len(shards), "shards_skipped": 0, "rows": 0, "images_written": 0}
    with tempfile.TemporaryDirectory(prefix="sdgen-export-") as scratch:
        if fmt == "imagefolder":
            metadata_file = MetadataFile(metadata, scratch)
            _export_shards(output, shards, fmt, target, counts, metadata_file, log, threads)
            name = f"metadata.{metadata}"
            target.write_file(name, metadata_file.finish())  # last: it names only images already written
            others = [f"metadata.{k}" for k in METADATA_KINDS if k != metadata and target.exists(f"metadata.{k}")]
            if others:  # datasets refuses a folder with metadata files of two kinds
                target.delete(others)
                log(f"[sdgen] export: deleted {', '.join(others)} (an earlier export's; {name} replaces it)")
        else:
            _export_shards(output, shards, fmt, target, counts, None, log, threads)
    log(
        f"[sdgen] exported {counts['rows']} ok rows of {len(shards)} shard(s) as {fmt} to {target.uri} "
        f"({counts['images_written']} images written, {counts['shards_skipped']} shard file(s) already there)"
    )
    return counts


def _export_shards(
    output: Output,
    shards: list[str],
    fmt: str,
    target: Storage,
    counts: dict[str, int],
    metadata_file: MetadataFile | None,
    log: Callable[[str], None],
    threads: int,
) -> None:
    """Each shard in turn: only its records and images are in memory at a time."""
    existing = set() if fmt == "imagefolder" else set(target.list(""))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for shard in shards:
            records = [r for r in output.read_records(shard).to_pylist() if r["status"] == "ok"]
            counts["rows"] += len(records)
            shard_file = f"{shard}.tar" if fmt == "webdataset" else f"{shard}.parquet"
            if fmt == "imagefolder":
                assert metadata_file is not None
                existing = set(target.list(f"{shard}/"))  # this shard's images already there
                names = [f"{shard}/{r['image_path'].rsplit('/', 1)[-1]}" for r in records]
                todo = [(r, n) for r, n in zip(records, names) if n not in existing]
                images = pool.map(lambda r: output.storage.read(r["image_path"]), [r for r, _ in todo])
                for (_, name), data in zip(todo, images):
                    target.write(name, data)
                    counts["images_written"] += 1
                rows = []
                for record, name in zip(records, names):
                    row = {"file_name": name, "text": record["prompt"]}
                    row.update({k: record[k] for k in IMAGEFOLDER_FIELDS})
                    row.update(label_columns(labels_of(record), row))
                    rows.append(row)
                metadata_file.add(rows)
                continue
            if shard_file in existing:
                counts["shards_skipped"] += 1
                continue
            images = list(pool.map(lambda r: output.storage.read(r["image_path"]), records))
            if fmt == "webdataset":
                members: list[tuple[str, bytes]] = []
                for record, data in zip(records, images):
                    key = f"{record['row']:010d}"
                    extension = record["image_path"].rsplit(".", 1)[-1]
                    members.append((f"{key}.{extension}", data))
                    members.append((f"{key}.json", json.dumps(record_json(record), ensure_ascii=False).encode()))
                    members.append((f"{key}.txt", record["prompt"].encode()))
                target.write(shard_file, _tar(members))
            else:
                rows = []
                for record, data in zip(records, images):
                    row = {k: record[k] for k in RECORD_FIELDS}
                    row.update(label_columns(labels_of(record), [*row, "image"]))
                    row["image"] = data
                    rows.append(row)
                target.write(shard_file, _parquet(rows))
            counts["images_written"] += len(records)
            log(f"[sdgen] export {shard}: {len(records)} rows -> {redact_uri(target.url(shard_file))}")


def main(argv: list[str] | None = None, prog: str = "sdgen export") -> int:
    """Exit status: 0 exported, 2 nothing to export from OUTPUT (or a bad format)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Export an sdgen output's ok rows as a dataset (see jobs/README.md, 'Export')."
    )
    parser.add_argument("output", help="the job's output folder or s3:// prefix")
    parser.add_argument("dest", help="destination folder or s3:// prefix")
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
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["FORMATS", "METADATA_KINDS", "ExportError", "export", "label_columns", "labels_of", "record_json"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
