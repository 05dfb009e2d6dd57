#!/usr/bin/env python
"""Regenerate images from their records: `python jobs/reproduce.py OUTPUT ID [ID ...]`.

Each record alone says how to remake its image: the weights are located by the recorded URI
(or --weights) and must have the recorded fingerprint; the init image (img2img) is read from its
recorded URI (or the manifest's value, or --init-image) and must have the recorded sha256. The
new image is encoded exactly as the job encoded it and compared:

- `identical`: same sha256 as the recorded image;
- `pixel-identical`: same pixels, different file bytes (another image-library version);
- otherwise the max absolute pixel difference and PSNR against the stored image, and whether
  that is within tolerance (PSNR >= --min-psnr, default 40 dB; --exact accepts identical only).

Exit status 0 only when every requested image is identical or within tolerance; 2, before
anything is remade, when an ID or row has no record (every record file read).
"""

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from jobs.exit_codes import TABLE, finish, guarded
from jobs.generation import generate_settings, generation_request, recorded_slots
from jobs.init_images import decode_init_image
from jobs.manifest import resolve_init_image
from jobs.output import DamagedFile, Output
from jobs.provenance import a1111_parameters
from jobs.reader import shard_sort_key
from jobs.record import Record
from jobs.redact import redact_text
from jobs.storage import StorageError, read_uri, redact_uri
from jobs.weights import resolve_weights, weights_here_problem
from jobs.writer import encode_image

DEFAULT_MIN_PSNR = 40.0


class ReproduceError(RuntimeError):
    pass


@dataclass
class Comparison:
    row: int
    id: str
    verdict: str  # identical | pixel-identical | different | error
    detail: str
    passed: bool
    max_abs_diff: int | None = None
    psnr: float | None = None


def find_records(
    output: Output, ids: list[str], rows: list[int], damaged: dict[str, str] | None = None
) -> dict[str, Record]:
    """key ('id:X' or 'row:N') -> record, searching every committed record file (read in
    parallel: on S3 each is a request's latency). A record file that cannot be read raises
    DamagedRecords, or with a `damaged` dict is skipped and noted there (shard -> why)."""
    wanted_ids, wanted_rows = set(ids), set(rows)
    found: dict[str, Record] = {}
    index = output.read_all_records(output.committed_shards(), columns=["row", "id"], damaged=damaged)
    for shard, table in sorted(index.items(), key=lambda item: shard_sort_key(item[0])):
        hits = [
            i
            for i, (r, x) in enumerate(zip(table.column("row").to_pylist(), table.column("id").to_pylist()))
            if x in wanted_ids or r in wanted_rows
        ]
        if not hits:
            continue
        records = output.read_records(shard).to_pylist()
        for i in hits:
            record = Record.from_dict(records[i])
            if record.id in wanted_ids:
                found.setdefault(f"id:{record.id}", record)  # first occurrence (duplicates are errors)
            if record.row in wanted_rows:
                found[f"row:{record.row}"] = record
    return found


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class Reproducer:
    """Loads each (weights, device, dtype) once and remakes records' images."""

    def __init__(
        self,
        output: Output,
        *,
        weights: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        init_image: str | None = None,
        quality: int | None = None,
    ):
        self.output = output
        self.weights_override = weights
        self.device = device
        self.dtype = dtype
        self.init_image_override = init_image
        job = output.read_job() or {}
        self.quality = quality or job.get("spec", {}).get("image", {}).get("quality", 95)
        self.model_config = (job.get("model") or {}).get("config")  # None in older outputs
        self._pipes: dict[tuple, Any] = {}

    def pipeline(self, record: Record):
        import torch

        import sdcore

        weights = self.weights_override or record.model_weights
        device = self.device or (record.device if record.device != "cuda" or torch.cuda.is_available() else "cpu")
        dtype = self.dtype or record.dtype
        kernels = json.loads(record.kernels or "{}")
        compile_mode = kernels.get("compile", "none")
        if torch.device(device).type != "cuda":  # CUDA graphs replay the same kernels; off CUDA, none
            compile_mode = {"reduce-overhead": "default", "cuda-graphs": "none"}.get(compile_mode, compile_mode)
        # Records from before the Winograd convolutions were made with direct ones.
        conv = kernels.get("conv", "direct")
        key = (weights, device, dtype, compile_mode, conv)
        if torch.device(device).type == "cpu" and record.threads:
            torch.set_num_threads(int(record.threads))  # CPU sums depend on the thread count
        if key not in self._pipes:
            sdcore.exact_kernels(device)  # as the worker had them (before the first CUDA work)
            try:
                pipe = sdcore.load_pipeline(resolve_weights(weights), device=device, dtype=dtype)
            except (FileNotFoundError, ValueError, OSError, StorageError) as exc:
                raise ReproduceError(f"cannot load the weights {redact_uri(weights)} ({exc}); pass --weights") from None
            sdcore.set_conv_algorithm(pipe, conv)  # before compiling: the compiled graph follows it
            sdcore.compile_unet(pipe, compile_mode)  # a compiled UNet's bits differ from eager ones
            self._pipes[key] = pipe
        pipe = self._pipes[key]
        if pipe.fingerprint != record.model_fingerprint:
            raise ReproduceError(
                f"weights {redact_uri(weights)} have fingerprint {pipe.fingerprint[:16]}…, the record "
                f"says {record.model_fingerprint[:16]}…: not the weights that made this image"
            )
        built = json.loads(pipe.config.to_json())
        if self.model_config is not None and built != self.model_config:
            from jobs.runner import differences  # how a resume names them too

            raise ReproduceError(
                f"weights {redact_uri(weights)} have the recorded fingerprint but build another architecture "
                f"({'; '.join(differences(self.model_config, built)[:3])}): a checkpoint without sdcore's config "
                "metadata? pass the weights the job ran with"
            )
        return pipe

    def init_image(self, record: Record) -> Image.Image:
        raw = record.init_image
        candidates = [self.init_image_override, record.init_image_uri, raw]
        if raw and not os.path.isabs(raw) and "://" not in raw:
            # Moved since the job (or a `ray job submit` working dir that is gone): the manifest's
            # relative value, against the manifest folders named in job.json.
            for source in (self.output.read_job() or {}).get("manifest", {}).get("sources", []):
                candidates.append(resolve_init_image(raw, source))
        seen = []
        for uri in dict.fromkeys(c for c in candidates if c):
            try:
                data = read_uri(uri)
            except (FileNotFoundError, StorageError, OSError):
                seen.append(f"{redact_uri(uri)} (not readable)")
                continue
            if hashlib.sha256(data).hexdigest() != record.init_image_sha256:
                seen.append(f"{redact_uri(uri)} (different sha256)")
                continue
            return decode_init_image(data, decoding=record.init_decoding or 1)  # as the job decoded it
        raise ReproduceError(
            "init image with the recorded sha256 not found: tried " + ", ".join(seen) + "; pass --init-image"
        )

    def remake(self, record: Record) -> bytes:
        """The record's image, made as the job made it (`jobs.generation`) and encoded alike."""
        pipe = self.pipeline(record)
        init_image = self.init_image(record) if record.mode == "img2img" else None
        request = generation_request(record, init_image)
        image = pipe.generate([request], **generate_settings(record), **recorded_slots(record))[0]
        parameters = a1111_parameters(record)
        return encode_image(image, record.image_format, parameters, self.quality, record.image_metadata or 1)

    def compare(self, record: Record, min_psnr: float, exact: bool) -> tuple[Comparison, bytes | None]:
        row, rid = record.row, record.id
        if record.status != "ok":
            return Comparison(row, rid, "error", f"an error record, no image: {record.error}", False), None
        try:
            data = self.remake(record)
        except ReproduceError as exc:
            return Comparison(row, rid, "error", str(exc), False), None
        digest = hashlib.sha256(data).hexdigest()
        stored, note = self.stored_image(record)
        intact = not note  # the stored image exists and matches its recorded sha256
        if digest == record.image_sha256:
            return Comparison(row, rid, "identical", f"sha256 {digest[:16]}…{note}", intact, 0, math.inf), data
        if stored is None:
            detail = f"sha256 differs, no stored image to compare pixels with{note}"
            return Comparison(row, rid, "different", detail, False), data
        result = compare_pixels(row, rid, stored, data, min_psnr, exact, note)
        return dataclasses.replace(result, passed=result.passed and intact), data

    def stored_image(self, record: Record) -> tuple[bytes | None, str]:
        """The stored image's bytes (None when missing), and a note when it is missing or no
        longer matches its record."""
        try:
            stored = self.output.storage.read(record.image_path)
        except FileNotFoundError:
            return None, f"; the stored image {record.image_path} is missing (--save-dir writes the new one)"
        if hashlib.sha256(stored).hexdigest() != record.image_sha256:
            return stored, (
                f"; WARNING: the stored image {record.image_path} does not match its recorded sha256 "
                "(changed after the job)"
            )
        return stored, ""


def compare_pixels(
    row: int, rid: str, stored: bytes, data: bytes, min_psnr: float, exact: bool, note: str
) -> Comparison:
    """A remade image whose bytes differ from the stored one, judged by its pixels."""
    a = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB"))
    b = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if a.shape != b.shape:
        detail = f"size {b.shape[1]}x{b.shape[0]} vs stored {a.shape[1]}x{a.shape[0]}{note}"
        return Comparison(row, rid, "different", detail, False)
    diff = int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
    value = psnr(a, b)
    if diff == 0:
        detail = f"same pixels, file bytes differ (encoder version){note}"
        return Comparison(row, rid, "pixel-identical", detail, not exact, 0, math.inf)
    within = (not exact) and value >= min_psnr
    verdict = "within tolerance" if within else "OUTSIDE tolerance"
    rule = "identical only (--exact)" if exact else f"PSNR >= {min_psnr:g} dB"
    detail = f"max abs pixel diff {diff}, PSNR {value:.2f} dB: {verdict} ({rule}){note}"
    return Comparison(row, rid, "different", detail, within, diff, value)


def main(argv: list[str] | None = None, prog: str = "jobs/reproduce.py") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Regenerate images from their records and compare.",
        epilog=TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", help="the job's output folder or s3:// prefix")
    parser.add_argument("ids", nargs="*", metavar="ID", help="record id(s) to regenerate")
    parser.add_argument(
        "--row", type=int, action="append", default=[], help="select a record by manifest row (repeatable)"
    )
    parser.add_argument(
        "--weights", help="load the weights from here instead of the recorded URI (fingerprint still checked)"
    )
    parser.add_argument("--init-image", help="img2img: read the init image from here (sha256 still checked)")
    parser.add_argument("--device", help="device to run on (default: the recorded one when available, else cpu)")
    parser.add_argument("--dtype", help="float32 | float16 | bfloat16 (default: the recorded one)")
    parser.add_argument("--min-psnr", type=float, default=DEFAULT_MIN_PSNR, help="tolerance in dB (default 40)")
    parser.add_argument("--exact", action="store_true", help="accept only identical images")
    parser.add_argument("--save-dir", help="also write the regenerated images here")
    parser.add_argument("--debug", action="store_true", help="print a traceback for unexpected errors")
    args = parser.parse_args(argv)
    if not args.ids and not args.row:
        parser.error("give at least one ID (or --row N)")
    return guarded(lambda: _main(args), args.debug)


def _main(args: argparse.Namespace) -> int:
    output = Output(args.output)
    try:
        job = output.read_job()
    except DamagedFile as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    if job is None:
        print(f"error: {output.uri}: no job.json here (not an sdgen output)", file=sys.stderr)
        return 2
    problem = weights_here_problem(args.weights) if args.weights else None
    if problem:  # a bad argument (exit 2), not a mismatch of the records it was to remake
        print(f"error: --weights: {redact_text(problem)}", file=sys.stderr)
        return 2
    damaged: dict[str, str] = {}
    found = find_records(output, args.ids, args.row, damaged)
    keys = [f"id:{i}" for i in args.ids] + [f"row:{r}" for r in args.row]
    missing = [key for key in keys if key not in found]
    if missing and not damaged:  # every record file was read: an id or row not there is a bad argument
        for key in missing:
            print(f"error: {key.replace(':', ' ')}: no such record in {output.uri}", file=sys.stderr)
        return 2
    reproducer = Reproducer(
        output, weights=args.weights, device=args.device, dtype=args.dtype, init_image=args.init_image
    )
    all_passed = True
    for key in keys:
        record = found.get(key)
        if record is None:  # perhaps in a record file that could not be read: the output is damaged (exit 1)
            unread = f" (not searched: {', '.join(damaged)}, record file damaged; rerun the job to redo it)"
            print(f"{key.replace(':', ' ')}: no such record in {output.uri}" + (unread if damaged else ""))
            all_passed = False
            continue
        result, data = reproducer.compare(record, args.min_psnr, args.exact)
        all_passed &= result.passed
        print(f"row {result.row} id {result.id!r}: {result.verdict}: {result.detail}", flush=True)
        if args.save_dir and data is not None:
            os.makedirs(args.save_dir, exist_ok=True)
            path = os.path.join(args.save_dir, os.path.basename(record.image_path))
            with open(path, "wb") as handle:
                handle.write(data)
    return 0 if all_passed else 1


if __name__ == "__main__":
    finish(main())
