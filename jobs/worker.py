"""Worker: built once (the model is loaded in the constructor), turns one shard into committed
images and one record per row — a bad row becomes an error record, never an exception.

Within a shard, rows of one forward shape (size, guided or not: `RowRequest.forward_key`) are
streamed through `Pipeline.generate_stream`, whose `batch_size` slots each take the next row as
soon as theirs finishes (continuous batching: rows of other samplers, step counts, strengths and
guidance scales share forwards). Finished latents are decoded `decode_rows` at a time (the
spec's `decode_batch`: batch_size on CUDA, 1 on CPU). A row's image depends only on its own inputs
and its slots in its forwards and its decode (sdcore's per-row generators, fixed shapes), which
its record keeps. Records are saved
every `batch_size` finished rows.
Around that loop, each idea has its own module: the records (`record.py`: one `RecordBuilder` per
worker), the generate call made from a record (`generation.py`, shared with `reproduce.py`), init
images and their cache (`init_images.py`), and what happens when a batch fails (`isolation.py`:
rows retried one by one; a failure of the worker rather than the rows is raised, and the
distributor retries the shard elsewhere instead of committing it as errors). A row that kills the
worker process itself is narrowed down across attempts from the in-flight note written as rows
are taken (`_after_a_death`). Storage work runs beside generation: init images are read
`batch_size` rows ahead of the stream (`InitImagePrefetch`), and the writer encodes, commits and
saves finished rows while the next ones generate.

Nothing here knows about Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import groupby
from typing import Any

from PIL import Image

from . import __version__
from .faults import inject_row_fault
from .generation import generation_request
from .inflight import InflightNotes
from .init_images import INIT_DECODING, InitImage, InitImageCache, InitImageError, InitImagePrefetch
from .isolation import RowOutcome, generate_isolated
from .manifest import RowRequest, parse_row
from .numerics import generate_finite
from .output import Output
from .provenance import a1111_parameters, software_versions
from .reader import ShardTask
from .record import Record, RecordBuilder
from .rows import table_rows
from .spec import SamplerSpec, compile_mode
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
    compile: bool = False  # torch.compile the UNet (ExecutionSpec.compile)
    cuda_graphs: bool | str = "auto"  # replay its forwards from CUDA graphs (ExecutionSpec.cuda_graphs)
    conv_algorithm: str | None = None  # sdcore.kernels.set_conv_algorithm (ExecutionSpec.conv); None: the pipeline's
    decode_batch: int | str = "auto"  # latents per VAE decode (ExecutionSpec.decode_batch)
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
    niceness: int = 0  # the process's scheduling niceness (Ray starts workers at its `worker_niceness`)
    # The architecture the weights were built into (sdcore ModelConfig, as JSON data): the
    # fingerprint covers the tensors only, and two configurations (e.g. attention heads, which
    # no tensor's shape shows) can take the same tensors and make other images.
    model_config: dict[str, Any] | None = None


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


def _decode_rows(config: WorkerConfig, device_type: str) -> int:
    """Latents per VAE decode (ExecutionSpec.decode_batch): auto is the batch size on CUDA, where
    one image per decode leaves the GPU mostly idle, and 1 on CPU (no faster batched) and when
    images must not depend on the batching at all."""
    if config.decode_batch != "auto":
        return int(config.decode_batch)
    return config.batch_size if device_type == "cuda" and not config.batch_invariant else 1


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

    Storage work overlaps generation: the next `batch_size` rows' init images are read while the
    current ones generate (`read_ahead`), and finished rows are encoded, committed and saved while
    the next ones generate (`write_lag` checkpoints may still be saving), and the in-flight note
    is written a chunk ahead (`note_ahead`, `jobs.inflight`). All off (False, 0, False) is the
    plain sequential loop, for benchmarks (bench/worker_io.py, bench/gpu_job_check.py)."""

    read_ahead = True
    write_lag = 1
    note_ahead = True

    def __init__(self, config: WorkerConfig, pipeline: Any = None):
        import torch

        self.config = config
        if config.device == "cpu" and config.threads:
            # CPU float results depend on the number of torch threads (kernels split their sums
            # by thread), so every worker of a job uses the same count, whatever the number of
            # workers, and records it.
            torch.set_num_threads(config.threads)
        import sdcore

        # Before the first CUDA work: repeatable kernel choices (recorded with every image).
        kernels = sdcore.exact_kernels(config.device)
        if pipeline is None:
            if config.device == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("execution.device is cuda but this worker sees no CUDA device")
            pipeline = sdcore.load_pipeline(resolve_weights(config.weights), device=config.device, dtype=config.dtype)
        if config.conv_algorithm is not None:
            sdcore.set_conv_algorithm(pipeline, config.conv_algorithm)  # before compiling: the graph follows it
        mode = compile_mode(config.compile, config.cuda_graphs, pipeline.device.type)
        sdcore.compile_unet(pipeline, mode)
        kernels["compile"] = mode
        kernels["conv"] = pipeline.conv_algorithm  # sdcore.kernels.set_conv_algorithm
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
            niceness=os.nice(0),
            model_config=json.loads(pipeline.config.to_json()),
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
            kernels=json.dumps(kernels, sort_keys=True),
        )
        self.decode_rows = _decode_rows(config, pipeline.device.type)
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

    def run(
        self,
        task: ShardTask,
        attempt: int = 1,
        progress: Callable[[int], None] | None = None,
        *,
        after_death: bool = False,
    ) -> ShardResult:
        """Make and commit one shard, calling `progress(rows done)` as `shard_steps` yields."""
        steps = self.shard_steps(task, attempt, after_death=after_death)
        while True:
            try:
                done = next(steps)
            except StopIteration as end:
                return end.value
            if progress is not None:
                progress(done)

    def shard_steps(
        self, task: ShardTask, attempt: int = 1, *, after_death: bool = False
    ) -> Generator[int, None, ShardResult]:
        """Make and commit one shard: yields the rows done so far (at the start and after each
        saved batch) and returns the `ShardResult`. A generator, so that the Ray actor streams
        the progress to the driver along with the work (no other channel, no other process).
        `after_death`: the shard's previous attempt ended in a worker death (the distributor
        knows; an exception is not one), so the in-flight note it left says which rows may have
        killed it (`_after_a_death`)."""
        started = time.perf_counter()
        writer = ShardWriter(
            self.output, task.shard_id, self.config.image_format, self.config.quality, lag=self.write_lag
        )
        try:
            return (yield from self._steps(task, attempt, writer, started, after_death))
        except BaseException:  # GeneratorExit too: a stream closed before its end commits nothing
            writer.abort()
            raise

    def _steps(
        self,
        task: ShardTask,
        attempt: int,
        writer: ShardWriter,
        started: float,
        after_death: bool,
    ) -> Generator[int, None, ShardResult]:
        statuses: Counter[str] = Counter()  # ok / error records handed to the writer

        reused = self._saved_records(task)
        if reused:
            # A rerun of the shard is a later attempt than any whose batches it keeps.
            attempt = max(attempt, 1 + max(int(r.attempt or 1) for r in reused.values()))
        for record in reused.values():
            writer.keep(record)
            statuses[record.status] += 1
        yield len(reused)

        requests, rejected = self._check_rows(task, set(reused), attempt)
        crashed: list[Record] = []
        alone_first: set[int] = set()
        if after_death:  # a failure that raised (e.g. a transient storage fault) never blames a row
            requests, crashed, alone_first = self._after_a_death(task.shard_id, requests, attempt)
        for record in rejected + crashed:
            writer.write(record)
            statuses[record.status] += 1
        if crashed:
            writer.checkpoint()  # saved before anything else runs: it will not be tried again
        done = len(reused) + len(rejected) + len(crashed)
        yield done

        generated = 0
        unsaved = 0  # rows finished since the last checkpoint
        for record, image, name in self._generate(requests, task.shard_id, attempt, alone_first):
            if image is None:
                writer.write(record)
            else:
                writer.write(record, image, name=name, parameters=a1111_parameters(record))
                generated += 1
            statuses[record.status] += 1
            done += 1
            unsaved += 1
            if unsaved == self.config.batch_size:
                writer.checkpoint()
                yield done
                unsaved = 0
        writer.checkpoint()
        yield done

        if done != task.num_rows:  # every row has a record, or nothing is committed
            raise RuntimeError(f"{task.shard_id}: {task.num_rows - done} row(s) got no record; not committed")
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
        """row -> record, from the shard's partial files (batches saved by an earlier attempt).
        An ok record is kept only while its image is there with the recorded sha256: a saved
        row whose image was deleted or changed since is generated again, never committed as ok
        without its image."""
        saved = self.output.read_partials(task.shard_id)
        records = {row: Record.from_dict(values) for row, values in saved.items() if task.start <= row < task.stop}
        ok = [r for r in records.values() if r.status == "ok"]
        if not ok:
            return records

        def intact(record: Record) -> bool | None:
            """True: the image is there as recorded; False: other bytes are; None: none are."""
            try:
                data = self.output.storage.read(record.image_path)
            except FileNotFoundError:
                return None
            return hashlib.sha256(data).hexdigest() == record.image_sha256

        with ThreadPoolExecutor(max_workers=min(8, len(ok))) as pool:
            found = list(pool.map(intact, ok))
        changed = [r.image_path for r, state in zip(ok, found) if state is False]
        self.output.storage.delete(changed)  # no record names them now; the writer never overwrites an image
        for record, state in zip(ok, found):
            if not state:
                del records[record.row]
        return records

    def _check_rows(self, task: ShardTask, skip: set[int], attempt: int) -> tuple[list[RowRequest], list[Record]]:
        """The shard's rows not in `skip`, checked: requests to generate, and error records for
        the rows that cannot be generated."""
        requests: list[RowRequest] = []
        rejected: list[Record] = []
        for offset, raw in enumerate(table_rows(task.rows)):
            row = task.start + offset
            if row in skip:
                continue
            request, problem, known = parse_row(  # invalid UTF-8 in a cell: this row's error only
                row,
                raw,
                row_id=task.ids[offset],
                sampler=self.config.sampler,
                duplicate_of=task.duplicates.get(row),
                bad_columns=task.bad_columns,
                cell_problems=task.cell_problems.get(row),
            )
            if problem is None:
                requests.append(request)
            else:
                record = self.records.build(
                    known, shard=task.shard_id, attempt=attempt, started_at=_now(), error=problem
                )
                rejected.append(record)
        return requests, rejected

    # ------------------------------------------------------------------------------ generation

    def _after_a_death(
        self, shard: str, requests: list[RowRequest], attempt: int
    ) -> tuple[list[RowRequest], list[Record], set[int]]:
        """Narrow down a row that crashes its worker process (a segfault, an abort in a native
        library: nothing to catch), from the in-flight note the dead attempt left. Rows that may
        have been in flight run first, each alone (`alone_first`); a row that was in flight
        alone when its worker died — its second death, after its stream's — becomes its own
        error record and is not generated again, so the shard's other rows commit. Returns the
        requests still to generate, those error records, and the rows to run alone first."""
        note = self.output.read_inflight(shard)
        pending = {request.row: request for request in requests}
        in_flight = [row for row in (note or {}).get("rows", []) if row in pending]
        if not in_flight:
            return requests, [], set()
        if note.get("alone") and len(in_flight) == 1:
            row = in_flight[0]
            error = (
                "the worker process died while generating this row, in its batch and then alone "
                f"(attempt {note.get('attempt')}); not generated again"
            )
            record = self.records.build(pending[row], shard=shard, attempt=attempt, started_at=_now(), error=error)
            return [r for r in requests if r.row != row], [record], set()
        return requests, [], set(in_flight)

    # ------------------------------------------------------------------------------ generation

    def _generate(
        self, requests: list[RowRequest], shard: str, attempt: int, alone_first: set[int] = frozenset()
    ) -> Iterator[tuple[Record, Any, str]]:
        """(record, image or None, image file name) per row, as rows finish: the rows of
        `alone_first` (in flight when a worker died) first, each in a stream of its own, then
        one stream per forward shape (`RowRequest.forward_key`)."""
        alone = [[r] for r in sorted(requests, key=lambda r: r.row) if r.row in alone_first]
        ordered = sorted((r for r in requests if r.row not in alone_first), key=lambda r: (r.forward_key(), r.row))
        shared = [list(group) for _, group in groupby(ordered, key=RowRequest.forward_key)]
        for rows in alone:
            yield from self._stream(rows, shard, attempt, alone=True)
        for rows in shared:
            yield from self._stream(rows, shard, attempt, alone=False)

    def _stream(
        self, requests: list[RowRequest], shard: str, attempt: int, alone: bool
    ) -> Iterator[tuple[Record, Any, str]]:
        """One stream of rows of one forward shape through the pipeline (continuous batching)."""
        # Every forward at one shape: `batch_rows` rows (1 in the batch-invariant mode). Every
        # request carries its own settings; the defaults are only what the call needs.
        spec = self.config.sampler
        settings = dict(sampler=spec.name, karras=spec.karras, steps=spec.steps, guidance_scale=spec.guidance_scale)
        settings.update(width=spec.width, height=spec.height, batch_invariant=self.config.batch_invariant)
        settings["fixed_batch"] = self.records.batch_rows
        settings["decode_batch"] = self.decode_rows
        unusable: list[Record] = []  # rows whose init image failed: error records, not generated
        in_flight: set[int] = set()  # rows the stream has taken and not finished

        def stream(rows: Iterator[tuple[Record, Image.Image | None, str]]) -> Iterator:
            requests = (generation_request(record, init_image) for record, init_image, _ in rows)
            return generate_finite(self.pipe, requests, **settings)  # NaN/Inf: the row's error

        rows = self._prepared(requests, shard, attempt, unusable, in_flight, alone)
        for (record, _, name), outcome in generate_isolated(stream, rows, before_retry=release_memory):
            while unusable:
                yield unusable.pop(0), None, ""
            in_flight.discard(record.row)
            record, image = _finish(record, outcome)
            yield record, image, name
        while unusable:
            yield unusable.pop(0), None, ""

    def _prepared(
        self,
        requests: list[RowRequest],
        shard: str,
        attempt: int,
        unusable: list[Record],
        in_flight: set[int],
        alone: bool,
    ) -> Iterator[tuple[Record, Image.Image | None, str]]:
        """(record, init image, image file name) of each row that can be generated, prepared when
        the stream takes it; the error record of each row that cannot goes to `unusable`.

        Rows are prepared `batch_size` at a time, the next chunk's init images read ahead on a
        background thread. Before a chunk is taken, a written in-flight note names its rows and
        those still in flight (`jobs.inflight`, which writes it a chunk ahead): if the worker
        process dies, the next attempt knows which rows may have killed it."""
        size = self.config.batch_size
        chunks = [requests[start : start + size] for start in range(0, len(requests), size)]
        prefetch = InitImagePrefetch(self.init_images)
        notes = InflightNotes(self.output, shard, alone, attempt, ahead=self.note_ahead)
        try:
            ahead = None
            for index, chunk in enumerate(chunks):
                # raises a transient storage fault: the shard fails
                loaded = (ahead or prefetch.submit(r.init_image_uri for r in chunk)).result()
                ahead = None
                following = chunks[index + 1] if index + 1 < len(chunks) else []
                if self.read_ahead and following:
                    ahead = prefetch.submit(r.init_image_uri for r in following)
                notes.before_taking((r.row for r in chunk), in_flight, (r.row for r in following))
                for request in chunk:
                    record, init_image = self._prepare(request, shard, attempt, loaded)
                    if record.status != "ok":
                        unusable.append(record)
                        continue
                    inject_row_fault([record.id])  # test hook ($SDGEN_FAULT_CRASH_ROW); nothing otherwise
                    in_flight.add(request.row)
                    yield record, init_image, request.name
            notes.wait()  # a failed note fails the shard, as a failed image write does
        finally:
            prefetch.close()
            notes.close()

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
            init_decoding=INIT_DECODING if sha256 else None,
            time_load_s=load_seconds,
        )
        return record, init_image


def _finish(record: Record, outcome: RowOutcome) -> tuple[Record, Image.Image | None]:
    """The record after generation, and its image (None when generation failed)."""
    if outcome.error is not None:
        error = outcome.error
        return record.generated(outcome.seconds, f"generation failed: {type(error).__name__}: {error}"), None
    return record.generated(outcome.seconds, placement=outcome.placement), outcome.image
