"""Worker: built once (the model is loaded in the constructor), turns one shard into committed
images and one record per row — a bad row becomes an error record, never an exception.

Within a shard, rows with equal settings (steps, guidance, size: `RowRequest.batch_key`) are
grouped and sent to `Pipeline.generate` `batch_size` at a time; each row's image depends only on
its own seed and settings (sdcore's per-row generators), so grouping never changes an image. If a
batch fails, its rows are retried one by one so that a single bad row cannot take its neighbours
with it; a failure that hits every row alike (device lost, out of memory at batch size 1) is
raised, and the shard is retried elsewhere by the distributor instead of being committed as
errors.

Nothing here knows about Ray.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import groupby
from typing import Any, Callable

from PIL import Image

from . import __version__
from .manifest import RowRequest, parse_row
from .output import Output
from .provenance import a1111_parameters, software_versions
from .reader import ShardTask
from .spec import SamplerSpec
from .storage import StorageError, read_uri, redact_uri
from .weights import resolve_weights
from .writer import ShardWriter

INIT_IMAGE_CACHE = 64


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs, all plain data (it travels to Ray actors)."""

    weights: str
    output: str
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    dtype: str = "auto"
    device: str = "cpu"  # cpu | cuda (resolved by the distributor)
    batch_size: int = 8
    batch_invariant: bool = True  # see ExecutionSpec.batch_invariant
    image_format: str = "png"
    quality: int = 95
    threads: int | None = None  # torch intra-op threads on CPU (same for every worker of a job)
    name: str | None = None  # shown in records; default host:pid


@dataclass(frozen=True)
class WorkerInfo:
    worker: str
    model_fingerprint: str
    dtype: str
    device: str
    device_name: str
    versions: dict[str, str]
    threads: int | None = None  # torch intra-op threads (CPU only)


@dataclass(frozen=True)
class ShardResult:
    shard_id: str
    rows: int
    ok: int
    error: int
    generated: int  # images made in this attempt
    reused: int  # records kept from partial files of an earlier attempt
    committed: bool  # False: the record file already existed (another attempt won)
    attempt: int
    seconds: float
    worker: str


class InitImageError(Exception):
    pass


class WorkerStartError(RuntimeError):
    """No worker could be started (the message is the worker's own error, e.g. bad weights)."""


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


class ShardWorker:
    """Loads the model once; `run(task)` makes and commits one shard."""

    def __init__(self, config: WorkerConfig, pipeline: Any = None):
        import torch

        self.config = config
        if config.device == "cpu" and config.threads:
            # CPU float results depend on the number of torch threads (kernels split their sums
            # by thread), so every worker of a job uses the same count, whatever the number of
            # workers, and records it.
            torch.set_num_threads(config.threads)
        if pipeline is None:
            if config.device == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("execution.device is cuda but this worker sees no CUDA device")
            import sdcore

            pipeline = sdcore.load_pipeline(resolve_weights(config.weights), device=config.device, dtype=config.dtype)
        self.pipe = pipeline
        self.name = config.name or f"{socket.gethostname()}:{os.getpid()}"
        versions = software_versions()
        self._info = WorkerInfo(
            worker=self.name,
            model_fingerprint=pipeline.fingerprint,
            dtype=_dtype_name(pipeline.dtype),
            device=pipeline.device.type,
            device_name=device_name(pipeline.device),
            versions=versions,
            threads=torch.get_num_threads() if pipeline.device.type == "cpu" else None,
        )
        self._base = {
            "sampler": config.sampler.name,
            "karras": config.sampler.karras,
            "model_weights": redact_uri(config.weights),
            "model_fingerprint": pipeline.fingerprint,
            "dtype": self._info.dtype,
            "device": self._info.device,
            "device_name": self._info.device_name,
            "threads": self._info.threads,
            "batch_invariant": config.batch_invariant,
            "torch_version": versions.get("torch"),
            "sdcore_version": versions.get("sdcore"),
            "sdgen_version": __version__,
            "worker": self.name,
        }
        self._output: Output | None = None  # opened on first use (cheap, but not needed to load)
        self._init_images: OrderedDict[str, tuple[Image.Image, str]] = OrderedDict()

    def info(self) -> WorkerInfo:
        return self._info

    # ------------------------------------------------------------------------------ one shard

    def run(self, task: ShardTask, attempt: int = 1, progress: Callable[[int], None] | None = None) -> ShardResult:
        started = time.perf_counter()
        if self._output is None:
            self._output = Output(self.config.output)
        output = self._output
        writer = ShardWriter(output, task.shard_id, self.config.image_format, self.config.quality)
        try:
            return self._run(task, attempt, progress or (lambda done: None), output, writer, started)
        except BaseException:
            writer.abort()
            raise

    def _run(self, task, attempt, progress, output, writer, started) -> ShardResult:
        reused = output.read_partials(task.shard_id)
        reused = {row: rec for row, rec in reused.items() if task.start <= row < task.stop}
        if reused:
            attempt = max(attempt, 1 + max(int(r.get("attempt") or 1) for r in reused.values()))
        counts = {"ok": 0, "error": 0}
        for record in reused.values():
            writer.write({**record, "reused": True})
            counts["ok" if record["status"] == "ok" else "error"] += 1
        done = len(reused)
        progress(done)

        requests: list[RowRequest] = []
        for offset, raw in enumerate(task.rows.to_pylist()):
            row = task.start + offset
            if row in reused:
                continue
            request, problem, known = parse_row(
                row,
                raw,
                row_id=task.ids[offset],
                sampler=self.config.sampler,
                duplicate_of=task.duplicates.get(row),
                bad_columns=task.bad_columns,
            )
            if problem is not None:
                writer.write(self._error_record(known, problem, task.shard_id, attempt))
                counts["error"] += 1
                done += 1
            else:
                requests.append(request)
        progress(done)

        generated = 0
        for batch in self._batches(requests):
            for record, image in self._generate(batch, task.shard_id, attempt):
                if image is None:
                    writer.write(record)
                    counts["error"] += 1
                else:
                    writer.write(record, image, a1111_parameters(record))
                    counts["ok"] += 1
                    generated += 1
            writer.checkpoint()
            done += len(batch)
            progress(done)

        committed = writer.close()
        return ShardResult(
            shard_id=task.shard_id,
            rows=task.num_rows,
            ok=counts["ok"],
            error=counts["error"],
            generated=generated,
            reused=len(reused),
            committed=committed,
            attempt=attempt,
            seconds=time.perf_counter() - started,
            worker=self.name,
        )

    def _batches(self, requests: list[RowRequest]) -> list[list[RowRequest]]:
        ordered = sorted(requests, key=lambda r: (r.batch_key(), r.row))
        batches = []
        for _, group in groupby(ordered, key=RowRequest.batch_key):
            group = list(group)
            size = self.config.batch_size
            batches.extend(group[i : i + size] for i in range(0, len(group), size))
        return batches

    # ------------------------------------------------------------------------------ records

    def _record(self, request: RowRequest, shard: str, attempt: int) -> dict[str, Any]:
        return {
            **self._base,
            "row": request.row,
            "id": request.id,
            "name": request.name,
            "shard": shard,
            "prompt": request.prompt,
            "negative": request.negative,
            "seed": request.seed,
            "mode": request.mode,
            "strength": request.strength,
            "init_image": request.init_image,
            "init_image_uri": redact_uri(request.init_image_uri) if request.init_image_uri else None,
            "steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "width": request.width,
            "height": request.height,
            "attempt": attempt,
        }

    def _error_record(self, known: dict[str, Any], problem: str, shard: str, attempt: int) -> dict[str, Any]:
        record = {**self._base, **known, "shard": shard, "status": "error", "error": problem, "attempt": attempt}
        if record.get("init_image_uri"):
            record["init_image_uri"] = redact_uri(record["init_image_uri"])
        record["mode"] = "img2img" if record.get("init_image_uri") else "txt2img"
        record["started_at"] = datetime.now(timezone.utc)
        return record

    # ------------------------------------------------------------------------------ generation

    def _load_init_image(self, uri: str) -> tuple[Image.Image, str]:
        cached = self._init_images.get(uri)
        if cached is not None:
            self._init_images.move_to_end(uri)
            return cached
        try:
            data = read_uri(uri)
        except FileNotFoundError:
            raise InitImageError(f"init_image not found: {redact_uri(uri)}") from None
        except (StorageError, OSError) as exc:
            raise InitImageError(f"init_image {redact_uri(uri)}: cannot read ({exc})") from None
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
            image = image.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for corrupt files
            raise InitImageError(f"init_image {redact_uri(uri)}: not a readable image ({type(exc).__name__}: {exc})") from None
        entry = (image, hashlib.sha256(data).hexdigest())
        self._init_images[uri] = entry
        if len(self._init_images) > INIT_IMAGE_CACHE:
            self._init_images.popitem(last=False)
        return entry

    def _generate(self, batch: list[RowRequest], shard: str, attempt: int) -> list[tuple[dict, Image.Image | None]]:
        """(record, image or None) per row of the batch, in batch order."""
        results: list[tuple[dict, Image.Image | None]] = []
        ready: list[tuple[RowRequest, dict, dict]] = []  # request, record, sdcore row
        for request in batch:
            record = self._record(request, shard, attempt)
            record["started_at"] = datetime.now(timezone.utc)
            row = {"prompt": request.prompt, "negative": request.negative, "seed": request.seed}
            if request.init_image_uri:
                t0 = time.perf_counter()
                try:
                    image, sha = self._load_init_image(request.init_image_uri)
                except InitImageError as exc:
                    results.append(({**record, "status": "error", "error": str(exc)}, None))
                    continue
                record["init_image_sha256"] = sha
                record["time_load_s"] = time.perf_counter() - t0
                row.update(init_image=image, strength=request.strength)
            ready.append((request, record, row))
        if not ready:
            return results

        settings = dict(
            sampler=self.config.sampler.name,
            karras=self.config.sampler.karras,
            steps=int(ready[0][0].steps),
            guidance_scale=float(ready[0][0].guidance_scale),
            width=int(ready[0][0].width),
            height=int(ready[0][0].height),
            batch_invariant=self.config.batch_invariant,
        )
        t0 = time.perf_counter()
        try:
            images: list[Any] = self.pipe.generate([r for _, _, r in ready], **settings)
            per_row = [(time.perf_counter() - t0) / len(ready)] * len(ready)
        except Exception as batch_error:  # noqa: BLE001 - isolate the failing row(s)
            if len(ready) == 1:
                images, per_row = [batch_error], [time.perf_counter() - t0]
            else:
                self._release_memory()
                images, per_row = [], []
                for _, _, row in ready:
                    t1 = time.perf_counter()
                    try:
                        images.append(self.pipe.generate([row], **settings)[0])
                    except Exception as exc:  # noqa: BLE001
                        images.append(exc)
                    per_row.append(time.perf_counter() - t1)
            failures = [x for x in images if isinstance(x, Exception)]
            systemic = [x for x in failures if not isinstance(x, (ValueError, TypeError))]
            if failures and len(systemic) == len(images):
                raise systemic[0]
        for (request, record, _), image, seconds in zip(ready, images, per_row):
            record["time_generate_s"] = seconds
            if isinstance(image, Exception):
                message = f"generation failed: {type(image).__name__}: {image}"
                results.append(({**record, "status": "error", "error": message}, None))
            else:
                results.append(({**record, "status": "ok", "error": None}, image))
        return results

    def _release_memory(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass
