"""Worker: built once (the model is loaded in the constructor), turns one shard into committed
images and one record per row — a bad row becomes an error record, never an exception.

Within a shard, rows with equal settings (steps, guidance, size: `RowRequest.batch_key`) are
grouped and sent to `Pipeline.generate` `batch_size` at a time; each row's image depends only on
its own seed and settings (sdcore's per-row generators), so grouping never changes an image.
Around that loop, each idea has its own module: the records (`record.py`: one `RecordBuilder` per
worker), the generate call made from a record (`generation.py`, shared with `reproduce.py`), init
images and their cache (`init_images.py`), and what happens when a batch fails (`isolation.py`:
rows retried one by one; a failure of the worker rather than the rows is raised, and the
distributor retries the shard elsewhere instead of committing it as errors). Storage work runs
beside generation: the next batch's init images are read ahead (`InitImagePrefetch`), and the
writer encodes, commits and saves a batch's images while the next one generates.

Nothing here knows about Ray.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import groupby
from typing import Any

from PIL import Image

from . import __version__
from .generation import generate_settings, generation_request
from .init_images import InitImage, InitImageCache, InitImageError, InitImagePrefetch
from .isolation import RowOutcome, generate_isolated
from .manifest import RowRequest, parse_row
from .numerics import generate_finite
from .output import Output
from .provenance import a1111_parameters, software_versions
from .reader import ShardTask
from .record import Record, RecordBuilder
from .rows import table_rows, undecodable_columns
from .spec import SamplerSpec
from .storage import redact_uri
from .weights import resolve_weights
from .writer import ShardWriter


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs, all plain data (it travels to Ray actors)."""

    weights: str
    output: str
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    dtype: str = "auto"
    device: str = "cpu"  # cpu | cuda (resolved by the distributor)
    batch_size: int = 8
    batch_invariant: bool = False  # see ExecutionSpec.batch_invariant
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


class WorkerStartError(RuntimeError):
    """No worker could be started (the message is the worker's own error, e.g. bad weights)."""


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def release_memory() -> None:
    """Give cached CUDA memory back before a failed batch is retried row by row (best effort: a
    broken device shows in the retries' own failures)."""
    import torch

    with contextlib.suppress(Exception):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _now() -> datetime:
    return datetime.now(timezone.utc)


class ShardWorker:
    """Loads the model once; `run(task)` makes and commits one shard.

    Storage work overlaps generation: the next batch's init images are read while this batch
    generates (`read_ahead`), and a batch's images are encoded, committed and saved while the
    next one generates (`write_lag` batches may still be saving). Both off (False, 0) is the
    plain sequential loop, for benchmarks (bench/worker_io.py)."""

    read_ahead = True
    write_lag = 1

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
        self.records = RecordBuilder(  # every record this worker makes comes from here
            sampler=config.sampler.name,
            karras=config.sampler.karras,
            model_weights=redact_uri(config.weights),
            model_fingerprint=pipeline.fingerprint,
            dtype=self._info.dtype,
            device=self._info.device,
            device_name=self._info.device_name,
            threads=self._info.threads,
            batch_invariant=config.batch_invariant,
            # Every UNet forward runs this many rows (a short batch is padded), so each image's
            # bits depend on its slot, not on its neighbours; one row per forward when invariant.
            batch_rows=1 if config.batch_invariant else config.batch_size,
            torch_version=versions.get("torch"),
            sdcore_version=versions.get("sdcore"),
            sdgen_version=__version__,
            worker=self.name,
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES") or None,
        )
        self.init_images = InitImageCache()
        self._output: Output | None = None

    def info(self) -> WorkerInfo:
        return self._info

    @property
    def output(self) -> Output:
        """The job's output, opened on first use (cheap, but not needed to load the model)."""
        if self._output is None:
            self._output = Output(self.config.output)
        return self._output

    # ------------------------------------------------------------------------------ one shard

    def run(self, task: ShardTask, attempt: int = 1, progress: Callable[[int], None] | None = None) -> ShardResult:
        started = time.perf_counter()
        writer = ShardWriter(
            self.output, task.shard_id, self.config.image_format, self.config.quality, lag=self.write_lag
        )
        try:
            return self._run(task, attempt, progress or (lambda done: None), writer, started)
        except BaseException:
            writer.abort()
            raise

    def _run(
        self, task: ShardTask, attempt: int, progress: Callable[[int], None], writer: ShardWriter, started: float
    ) -> ShardResult:
        statuses: Counter[str] = Counter()  # ok / error records handed to the writer

        reused = self._saved_records(task)
        if reused:
            # A rerun of the shard is a later attempt than any whose batches it keeps.
            attempt = max(attempt, 1 + max(int(r.attempt or 1) for r in reused.values()))
        for record in reused.values():
            writer.keep(record)
            statuses[record.status] += 1
        progress(len(reused))

        requests, rejected = self._check_rows(task, set(reused), attempt)
        for record in rejected:
            writer.write(record)
            statuses[record.status] += 1
        done = len(reused) + len(rejected)
        progress(done)

        generated = 0
        batches = self._batches(requests)
        # Init images are read one batch ahead, and images are encoded and saved behind (the
        # writer's pool and saver), so the model does not wait on storage between batches.
        prefetch = InitImagePrefetch(self.init_images)
        try:
            ahead = None
            for index, batch in enumerate(batches):
                # raises a transient storage fault: the shard fails
                loaded = (ahead or prefetch.submit(r.init_image_uri for r in batch)).result()
                ahead = None
                if self.read_ahead and index + 1 < len(batches):
                    ahead = prefetch.submit(r.init_image_uri for r in batches[index + 1])
                for (record, image), request in zip(self._generate(batch, task.shard_id, attempt, loaded), batch):
                    if image is None:
                        writer.write(record)
                    else:
                        writer.write(record, image, name=request.name, parameters=a1111_parameters(record))
                        generated += 1
                    statuses[record.status] += 1
                writer.checkpoint()
                done += len(batch)
                progress(done)
        finally:
            prefetch.close()

        committed = writer.close()
        return ShardResult(
            shard_id=task.shard_id,
            rows=task.num_rows,
            ok=statuses["ok"],
            error=statuses["error"],
            generated=generated,
            reused=len(reused),
            committed=committed,
            attempt=attempt,
            seconds=time.perf_counter() - started,
            worker=self.name,
        )

    def _saved_records(self, task: ShardTask) -> dict[int, Record]:
        """row -> record, from the shard's partial files (batches saved by an earlier attempt)."""
        saved = self.output.read_partials(task.shard_id)
        return {row: Record.from_dict(values) for row, values in saved.items() if task.start <= row < task.stop}

    def _check_rows(self, task: ShardTask, skip: set[int], attempt: int) -> tuple[list[RowRequest], list[Record]]:
        """The shard's rows not in `skip`, checked: requests to generate, and error records for
        the rows that cannot be generated."""
        requests: list[RowRequest] = []
        rejected: list[Record] = []
        for offset, raw in enumerate(table_rows(task.rows)):
            row = task.start + offset
            if row in skip:
                continue
            undecodable = undecodable_columns(raw)  # e.g. invalid UTF-8: this row's error only
            if undecodable:
                raw = {k: None if k in undecodable else v for k, v in raw.items()}
            request, problem, known = parse_row(
                row,
                raw,
                row_id=task.ids[offset],
                sampler=self.config.sampler,
                duplicate_of=task.duplicates.get(row),
                bad_columns=task.bad_columns,
            )
            if undecodable:
                problem = f"invalid UTF-8 (not readable) in column(s) {', '.join(undecodable)}"
            if problem is None:
                requests.append(request)
            else:
                record = self.records.build(
                    known, shard=task.shard_id, attempt=attempt, started_at=_now(), error=problem
                )
                rejected.append(record)
        return requests, rejected

    def _batches(self, requests: list[RowRequest]) -> list[list[RowRequest]]:
        ordered = sorted(requests, key=lambda r: (r.batch_key(), r.row))
        batches = []
        for _, group in groupby(ordered, key=RowRequest.batch_key):
            group = list(group)
            size = self.config.batch_size
            batches.extend(group[i : i + size] for i in range(0, len(group), size))
        return batches

    # ------------------------------------------------------------------------------ generation

    def _generate(
        self,
        batch: list[RowRequest],
        shard: str,
        attempt: int,
        loaded: dict[str, tuple[InitImage | InitImageError, float]],
    ) -> list[tuple[Record, Image.Image | None]]:
        """(record, image or None) per row of the batch, in batch order; `loaded`: the batch's
        init images by URI (`InitImagePrefetch`)."""
        prepared = [self._prepare(request, shard, attempt, loaded) for request in batch]  # (record, init image)
        results: list[tuple[Record, Image.Image | None]] = [(record, None) for record, _ in prepared]
        ready = [i for i, (record, _) in enumerate(prepared) if record.status == "ok"]
        if not ready:
            return results
        # The rows of a batch share their settings (equal `batch_key`s, one sampler per worker).
        settings = generate_settings(prepared[ready[0]][0])
        outcomes = generate_isolated(
            lambda requests: generate_finite(self.pipe, requests, **settings),  # NaN/Inf: the row's error
            [generation_request(record, init_image) for record, init_image in (prepared[i] for i in ready)],
            before_retry=release_memory,
        )
        for i, outcome in zip(ready, outcomes):
            results[i] = _finish(prepared[i][0], outcome)
        return results

    def _prepare(
        self,
        request: RowRequest,
        shard: str,
        attempt: int,
        loaded: dict[str, tuple[InitImage | InitImageError, float]],
    ) -> tuple[Record, Image.Image | None]:
        """The row's record before generation, and its init image (img2img, read ahead into
        `loaded`); an error record when the init image cannot be used."""
        started_at = _now()
        init_image = error = sha256 = load_seconds = None
        if request.init_image_uri:
            result, seconds = loaded[request.init_image_uri]
            if isinstance(result, InitImageError):
                error = str(result)
            else:
                init_image, sha256, load_seconds = result.image, result.sha256, seconds
        record = self.records.build(
            request,
            shard=shard,
            attempt=attempt,
            started_at=started_at,
            error=error,
            init_image_sha256=sha256,
            time_load_s=load_seconds,
        )
        return record, init_image


def _finish(record: Record, outcome: RowOutcome) -> tuple[Record, Image.Image | None]:
    """The record after generation, and its image (None when generation failed)."""
    if outcome.error is not None:
        error = outcome.error
        return record.generated(outcome.seconds, f"generation failed: {type(error).__name__}: {error}"), None
    return record.generated(outcome.seconds, placement=outcome.placement), outcome.image
