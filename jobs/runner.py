"""`sdgen run`'s orchestration, in three steps that `run_job` calls in order:

- `plan_job` (no Ray, no model: a bad job fails in seconds) validates the spec and the manifest,
  reads the output's job.json and refuses a different job (unless `overwrite`), lists the
  committed shards (their record files), checks that each holds one record per row of its
  shard (a damaged one is deleted and its shard redone) and plans only the rest;
- `execute` starts the workers through the distributor; when the first has loaded the model its
  fingerprint is checked against job.json, then job.json is (over)written — before any shard is
  handed out — and the shards run;
- `summarise` counts every committed record, earlier runs included, for summary.json.

That order is what keeps a job from losing or duplicating rows across crashes and reruns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from . import __version__
from .cluster import check_address, check_local_weights, check_output_shared, check_paths_where_submitted
from .errors import error_histogram, error_lines
from .faults import infrastructure_faults
from .lease import held_output
from .manifest import Manifest, load_manifest
from .output import JOB_FILE, SUMMARY_FILE, DamagedFile, Output
from .progress import Outcome, duration
from .progressbar import progress_reporter
from .reader import ShardTask, num_shards, read_shards, shard_row_ranges, shard_sort_key
from .spec import JobSpec, load_spec
from .storage import redact_uri
from .worker import ShardResult, ShardWorker, WorkerConfig, WorkerInfo

JOB_FORMAT = 1


class JobConflict(RuntimeError):
    """The output holds a different job; the message lists the differences."""


def _print_line(line: str) -> None:
    print(line, flush=True)


def write_report(uri: str, log: Callable[[str], None]) -> None:
    """OUTPUT/index.html after each run (jobs/report.py); a report that cannot be written is a
    warning, never a failed job."""
    from .report import build_report

    try:
        build_report(uri, log=log)
    except Exception as exc:  # noqa: BLE001 - the job's result stands whatever the report does
        log(f"[sdgen] warning: report not written ({type(exc).__name__}: {exc}); `sdgen report OUTPUT` retries")


# -------------------------------------------------------------------------------------------- run


def run_job(
    spec: JobSpec | str,
    *,
    overwrite: bool = False,
    address: str | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] = _print_line,
    worker_factory: Callable[[WorkerConfig], Any] = ShardWorker,
    progress_every: float = 10.0,
    break_lease: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) a job, holding the output's lease (`lease.py`; `break_lease` takes over
    a live one); returns the summary (also written to OUTPUT/summary.json), or with `dry_run`
    what the dry run found (jobs/dryrun.py). `limit`: only the first N rows, into
    OUTPUT-limitN. Raises SpecError / ManifestError / JobConflict / LeaseHeld /
    WorkerStartError before any work, InfrastructureFault after."""
    if dry_run:
        from .dryrun import dry_run as check

        plan = plan_job(spec, overwrite, log, limit, read_only=True)  # no lease held: nothing is changed
        to_run = [(task.start, task.stop) for task in plan.tasks]
        return check(plan.spec, plan.manifest, plan.dry_run_summary(), log, to_run)
    if not isinstance(spec, JobSpec):
        spec = load_spec(spec)
    check_address(address)  # before the lease: nothing written
    check_local_weights(spec, address)
    if limit is None:
        leased = spec.output  # where it writes
    else:
        from .dryrun import trial_output

        leased = trial_output(spec.output, limit)
    with held_output(leased, break_lease=break_lease, log=log) as lease:  # before anything is written
        plan = plan_job(spec, overwrite, log, limit)
        with infrastructure_faults():  # from here on a storage fault stops the run (exit 3)
            outcome = execute(
                plan,
                address=address,
                log=log,
                worker_factory=worker_factory,
                progress_every=progress_every,
                check=lease.check,  # a run whose lease was taken over stops within a second
            )
            summary = summarise(plan, outcome)
            lease.check()
            plan.output.write_json(SUMMARY_FILE, summary)
        lease.check()
        write_report(plan.output.uri, log)  # index.html, still under the lease
    for line in summary_lines(summary):
        log(line)
    return summary


# ------------------------------------------------------------------------------------------- plan


@dataclass
class JobPlan:
    """Everything known before Ray starts: the job, what its output already holds, what to run."""

    spec: JobSpec
    manifest: Manifest
    output: Output
    existing: dict[str, Any] | None  # the output's job.json; None for a new output
    overwrite: bool
    committed_counts: dict[str, dict[str, Any]]  # shards an earlier run committed (skipped) -> their counts
    tasks: list[ShardTask]  # the shards to run
    started_at: str  # when the run started (for summary.json)
    started: float  # the same, time.monotonic()

    @property
    def committed(self) -> set[str]:
        return set(self.committed_counts)

    @property
    def total_shards(self) -> int:
        return num_shards(self.manifest.num_rows, self.spec.execution.shard_size)

    def dry_run_summary(self) -> dict[str, Any]:
        return {
            "total_rows": self.manifest.num_rows,
            "shards": {"total": self.total_shards, "committed": len(self.committed), "to_run": len(self.tasks)},
        }


def plan_job(
    spec: JobSpec | str,
    overwrite: bool = False,
    log: Callable[[str], None] = _print_line,
    limit: int | None = None,
    *,
    read_only: bool = False,
) -> JobPlan:
    """Steps 1-3: validate the spec and manifest, refuse a different job on the output, and plan
    the shards not yet committed. No Ray, no model, so a bad job fails in seconds. Raises
    SpecError / ManifestError / JobConflict; changes nothing but stale partial files, and with
    `read_only` (a dry run, which holds no lease) nothing at all."""
    started_at, started = _now(), time.monotonic()
    if not isinstance(spec, JobSpec):
        spec = load_spec(spec)
    check_paths_where_submitted(spec)  # under `ray job submit`: nothing in Ray's temporary working dir
    manifest = load_manifest(spec.manifest)
    if limit is not None:
        from .dryrun import trial_job

        spec, manifest = trial_job(spec, manifest, limit)
        log(f"[sdgen] --limit {limit}: the first {manifest.num_rows} row(s) only, into {redact_uri(spec.output)}")
    _log_manifest(spec, manifest, log)
    output = Output(spec.output)
    try:
        existing = output.read_job()
    except DamagedFile as exc:
        if not overwrite:
            raise JobConflict(
                f"{exc}; the output's job cannot be compared with this one: restore the file, use another "
                "output, or pass --overwrite to delete the output's images and records and start again"
            ) from None
        existing = None  # --overwrite clears the output and writes a new job.json
    counts = _committed_shards(output, existing, spec, manifest, overwrite, log, clean=not read_only)
    tasks = list(read_shards(manifest, spec.execution.shard_size, skip=set(counts)))
    log(f"[sdgen] output {output.uri}: {len(counts)} shard(s) already committed, {len(tasks)} to run")
    return JobPlan(spec, manifest, output, existing, overwrite, counts, tasks, started_at, started)


def _log_manifest(spec: JobSpec, manifest: Manifest, log: Callable[[str], None]) -> None:
    total = num_shards(manifest.num_rows, spec.execution.shard_size)
    log(
        f"[sdgen] job {spec.name!r}: {manifest.num_rows} rows from {', '.join(manifest.sources)} "
        f"-> {total} shard(s) of {spec.execution.shard_size}"
    )
    if manifest.label_columns:
        log(f"[sdgen] labels (kept in each record's `labels`): {', '.join(manifest.label_columns)}")
    for column in manifest.ignored_columns:
        log(
            f"[sdgen] warning: column {column!r} is ignored: sdgen resolves it from `init_image` (a record's "
            f"{column} is where the init image was read from); rename the column to keep it as a label"
        )
    for problem in manifest.bad_columns.values():
        log(f"[sdgen] warning: {problem}; rows with a value there become error records")


def _committed_shards(
    output: Output,
    existing: dict[str, Any] | None,
    spec: JobSpec,
    manifest: Manifest,
    overwrite: bool,
    log: Callable[[str], None],
    clean: bool = True,
) -> dict[str, dict[str, Any]]:
    """The shards a rerun skips, with their record counts: none with `overwrite` (everything is
    redone), else those with a sound record file, once the output is known to hold this same
    job. A record file that cannot be read, or does not hold one record per row of its shard
    (damage, or a shard that sdgen before d53d990 could commit short after a storage fault), is
    deleted so that its shard runs again (its images are remade bit for bit). With `clean`
    (only under the lease) that deletion happens, and partial files of committed shards (left
    by a crash between commit and clean-up) are deleted; without it (a dry run) nothing is."""
    problems = check_job(existing, spec, manifest)
    if problems and not overwrite:
        raise JobConflict(conflict_message(output, problems))
    if overwrite:
        return {}
    listed = output.committed_shards()
    if existing is None and listed:
        raise JobConflict(
            f"output {output.uri} holds records but no {JOB_FILE}: not an sdgen output "
            "(or a damaged one); use another output or pass --overwrite"
        )
    counts = output.count_records(listed, shard_row_ranges(manifest.num_rows, spec.execution.shard_size))
    damaged = sorted(s for s, c in counts.items() if "damaged" in c)
    for shard in damaged:
        action = "redoing the shard" if clean else "a run would redo the shard"
        log(f"[sdgen] warning: {shard}: {counts.pop(shard)['damaged']}: {action}")
    if damaged and clean:
        output.storage.delete([output.record_key(s) for s in damaged])
    stale = [k for k in output.partial_files() if k.split("/")[1] in counts] if clean else []
    if stale:
        output.storage.delete(stale)
    return counts


# ---------------------------------------------------------------------------------------- execute


class JobEvents:
    """The runner's side of the distributor's callbacks: what a job does when its first worker
    is ready (job.json) and when a shard is done (a log line). The distributor knows nothing of
    jobs or outputs, only of workers and shards."""

    def __init__(self, plan: JobPlan, log: Callable[[str], None], ray_version: str):
        self.plan = plan
        self.log = log
        self.ray_version = ray_version
        self.progress: Any = None  # the run's progress reporter (jobs/progressbar.py)

    def first_worker_ready(self, info: WorkerInfo) -> None:
        """Step 4, before any shard is handed out: the loaded model must be the one job.json
        names (else JobConflict); then job.json is (over)written, so a crash from here on leaves
        an output that resumes."""
        plan, output = self.plan, self.plan.output
        model_problems = [] if plan.overwrite else check_model(plan.existing, info)
        if model_problems:
            raise JobConflict(conflict_message(output, model_problems))
        self._note_device_change(info)
        if plan.overwrite:
            self.log(f"[sdgen] --overwrite: deleting any previous job's records and images in {output.uri}")
            output.clear()
        versions = {**info.versions, "ray": self.ray_version}
        output.write_job(
            job_document(plan.spec, plan.manifest, info, None if plan.overwrite else plan.existing, versions)
        )
        self.log(
            f"[sdgen] model {plan.spec.to_dict()['model']['weights']} fingerprint {info.model_fingerprint[:12]} "
            f"{info.dtype} on {info.device} ({info.device_name})"
        )
        if info.device == "cpu" and info.niceness > 0:
            self.log(
                f"[sdgen] note: the worker runs at niceness {info.niceness}: where its threads take every core, "
                "Ray's own processes cut into it (sdgen runs workers at 0 unless RAY_worker_niceness is set "
                "in the driver's environment or Ray itself runs under `nice`)"
            )

    def _note_device_change(self, info: WorkerInfo) -> None:
        """Device and thread count are not part of the job (images barely depend on them), but a
        resume that changes them is worth a line."""
        existing = self.plan.existing
        before = (existing or {}).get("model", {})
        if existing and (before.get("device"), before.get("threads")) != (info.device, info.threads):
            self.log(
                f"[sdgen] note: resuming on {info.device} ({info.threads or '-'} CPU threads); earlier "
                f"shards ran on {before.get('device')} ({before.get('threads') or '-'}): their pixels may "
                "differ slightly"
            )

    def shard_done(self, result: ShardResult) -> None:
        if hasattr(self.progress, "shard_done"):
            self.progress.shard_done(result)  # the bar's ok / error counts
        extra = f", {result.reused} kept from an earlier attempt" if result.reused else ""
        note = "" if result.committed else " (already committed by an earlier attempt)"
        self.log(
            f"[sdgen] {result.shard_id} done: {result.ok} ok, {result.error} error{extra} "
            f"in {result.seconds:.1f}s on {result.worker}{note}"
        )


def worker_config(spec: JobSpec) -> WorkerConfig:
    """What every worker of the job is built from (device and threads: set by the distributor)."""
    return WorkerConfig(
        weights=spec.model.weights,
        output=spec.output,
        sampler=spec.sampler,
        dtype=spec.model.dtype,
        batch_size=spec.execution.batch_size,
        batch_invariant=spec.execution.batch_invariant,
        compile=spec.execution.compile,
        cuda_graphs=spec.execution.cuda_graphs,
        conv_algorithm=spec.execution.conv,
        decode_batch=spec.execution.decode_batch,
        image_format=spec.image.format,
        quality=spec.image.quality,
    )


def execute(
    plan: JobPlan,
    *,
    address: str | None = None,
    log: Callable[[str], None] = _print_line,
    worker_factory: Callable[[WorkerConfig], Any] = ShardWorker,
    progress_every: float = 10.0,
    check: Callable[[], None] = lambda: None,
) -> Outcome:
    """Steps 4-5: connect to Ray, start the workers, run the planned shards. Ray is imported only
    here, so validation and dry runs never start it. `check` is called at every turn of the
    shard loop and stops the run when it raises (the lease's check: LeaseLost)."""
    if not plan.tasks:
        log("[sdgen] nothing to do: every shard is committed")
        return Outcome()
    from .distributor import RayDistributor, cluster_layout, connect, describe_cluster, disconnect, ray_version

    embedded, where = connect(address)
    log(f"[sdgen] running on {where}: {describe_cluster()}")
    progress = progress_reporter(log, progress_every)  # a bar in a terminal, else lines
    if hasattr(progress, "lines"):
        log = progress.lines(log)  # lines above the bar, not glued to it
    execution = plan.spec.execution
    distributor = RayDistributor(
        execution.device, execution.workers, execution.max_attempts, log, execution.cpu_threads, embedded
    )
    try:
        check_output_shared(plan.spec, cluster_layout(), execution.device)  # before any worker starts
        distributor.start(worker_config(plan.spec), worker_factory, shards=len(plan.tasks))
        events = JobEvents(plan, log, ray_version())
        events.progress = progress
        return distributor.run(
            plan.tasks, events.first_worker_ready, events.shard_done, progress, progress_every, check=check
        )
    finally:
        getattr(progress, "close", lambda: None)()
        distributor.shutdown()
        disconnect(embedded)


# -------------------------------------------------------------------------------------- summarise


def summarise(plan: JobPlan, outcome: Outcome) -> dict[str, Any]:
    """Step 6: the summary (summary.json) over the whole output, earlier runs included: the
    counts are read back from the committed record files (those of earlier runs when the plan
    checked them), not added up from this run."""
    output, rows = plan.output, plan.manifest.num_rows
    done = output.committed_shards()
    counted = {s: c for s, c in plan.committed_counts.items() if s in done}  # read by plan_job
    ranges = shard_row_ranges(rows, plan.spec.execution.shard_size)
    counts = {**counted, **output.count_records(done - counted.keys(), ranges)}
    damaged = {s: c["damaged"] for s, c in counts.items() if "damaged" in c}
    ok = sum(c["ok"] for c in counts.values())
    errors = sum(c["error"] for c in counts.values())
    failed = {s: e for s, e in outcome.failed.items() if s not in done}
    return {
        "name": plan.spec.name,
        "output": output.uri,
        "complete": len(done) == plan.total_shards and not damaged,
        "total": rows,
        "ok": ok,
        "error": errors,
        "missing": rows - ok - errors,
        "shards": {
            "total": plan.total_shards,
            "done": len(done),
            "failed": len(failed),
            "pending": plan.total_shards - len(done) - len(failed),
        },
        "failed_shards": failed,
        "damaged_shards": damaged,  # committed, but their record files are not sound: a rerun redoes them
        "errors": error_histogram(output, done - damaged.keys()) if errors else {},  # reason -> rows (jobs/errors.py)
        "run": _run_stats(plan, outcome),
        "sdgen_version": __version__,
    }


def _run_stats(plan: JobPlan, outcome: Outcome) -> dict[str, Any]:
    """This run alone. Throughput counts from the first worker ready, so model loading and
    waiting for cluster nodes do not dilute it; reused rows (saved batches) are not work done."""
    now = time.monotonic()
    results = outcome.results.values()
    generated = sum(r.generated for r in results)
    gen_time = now - outcome.first_ready_at if outcome.first_ready_at is not None else 0.0
    return {
        "started_at": plan.started_at,
        "finished_at": _now(),
        "wall_s": round(now - plan.started, 3),
        "shards_skipped": len(plan.committed),
        "shards_run": len(outcome.results),
        "rows_run": sum(r.rows for r in results),
        "images_generated": generated,
        "rows_reused": sum(r.reused for r in results),
        "workers": outcome.workers_ready,
        "generate_wall_s": round(gen_time, 3),
        "rows_per_s": round(sum(r.rows - r.reused for r in results) / gen_time, 3) if gen_time > 0 else None,
        "images_per_s": round(generated / gen_time, 3) if gen_time > 0 else None,
    }


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The closing log lines: the state, the counts, then each failed shard with its error."""
    shards, run = summary["shards"], summary["run"]
    failed, damaged = summary["failed_shards"], summary.get("damaged_shards") or {}
    state = "complete" if summary["complete"] else f"INCOMPLETE ({len(failed)} shard(s) failed, rerun to retry)"
    if damaged:
        state = f"INCOMPLETE ({len(failed)} shard(s) failed, {len(damaged)} damaged; rerun to redo them)"
    rate = run["rows_per_s"]
    lines = [
        f"[sdgen] {state}: {summary['ok']} ok, {summary['error']} error, {summary['missing']} missing of "
        f"{summary['total']} rows; {shards['done']}/{shards['total']} shards; this run {run['rows_run']} rows in "
        f"{duration(run['wall_s'])}" + (f" ({rate} rows/s after model load)" if rate else "")
    ]
    problems = {**failed, **damaged}
    lines += [f"[sdgen]   {shard}: {problems[shard]}" for shard in sorted(problems, key=shard_sort_key)]
    return lines + error_lines(summary.get("errors") or {})


# ------------------------------------------------------------------------------------- job.json


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): data}


def differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    a, b = _flatten(before), _flatten(now)
    return [
        f"{key}: {a.get(key)!r} on disk, {b.get(key)!r} now"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


def check_job(existing: dict[str, Any] | None, spec: JobSpec, manifest: Manifest) -> list[str]:
    """Differences between the job recorded in an output and this one (empty: same job)."""
    if existing is None:
        return []
    # model.dtype as written is not compared: the dtype the model ran in is (`check_model`), so
    # `auto` and the dtype it resolves to here are the same job (that check's hint says to set it).
    before, now = existing.get("identity", {}), spec.identity()
    before, now = ({k: v for k, v in d.items() if k != "model.dtype"} for d in (before, now))
    problems = differences(before, now)
    old_fp = existing.get("manifest", {}).get("fingerprint")
    if old_fp != manifest.fingerprint:
        problems.append(f"manifest content: fingerprint {str(old_fp)[:16]}… on disk, {manifest.fingerprint[:16]}… now")
    return problems


def check_model(existing: dict[str, Any] | None, info: WorkerInfo) -> list[str]:
    """Differences between the model recorded in an output and the one a worker loaded. Checked
    on the loaded model, not the weights' path: the fingerprint is of the weights themselves, and
    `dtype: auto` resolves per device."""
    if existing is None:
        return []
    model = existing.get("model", {})
    problems = []
    if model.get("fingerprint") != info.model_fingerprint:
        problems.append(
            f"model fingerprint: {str(model.get('fingerprint'))[:16]}… on disk, {info.model_fingerprint[:16]}… now"
        )
    recorded = model.get("config")  # absent in outputs of sdgen before it was recorded
    if recorded is not None and info.model_config is not None and recorded != info.model_config:
        problems += [
            f"model architecture {difference} (the same tensors built into another configuration: e.g. a "
            "checkpoint without sdcore's config metadata, whose attention heads were inferred)"
            for difference in differences(recorded, info.model_config)[:3]
        ]
    if model.get("dtype") != info.dtype:
        problems.append(f"model dtype: {model.get('dtype')} on disk, {info.dtype} now (set model.dtype explicitly)")
    return problems


def conflict_message(output: Output, problems: list[str]) -> str:
    return (
        f"output {output.uri} already holds a different job ({JOB_FILE}):\n  "
        + "\n  ".join(problems)
        + "\nUse another output, or pass --overwrite to delete its images and records and start again."
    )


def job_document(
    spec: JobSpec, manifest: Manifest, info: WorkerInfo, previous: dict[str, Any] | None, versions: dict[str, str]
) -> dict[str, Any]:
    """job.json: the resolved spec, what identifies the job (compared on every rerun), the
    manifest's and model's fingerprints, where it ran, software versions. `previous` (the
    output's old job.json, on a resume) keeps its creation time."""
    return {
        "format": JOB_FORMAT,
        "name": spec.name,
        "spec": spec.to_dict(),
        "identity": spec.identity(),
        "manifest": {
            "sources": list(manifest.sources),
            "fingerprint": manifest.fingerprint,
            "rows": manifest.num_rows,
            "columns": [c for c in manifest.table.column_names if c != "init_image_uri"],
            "ignored_columns": list(manifest.ignored_columns),
            "label_columns": list(manifest.label_columns),
        },
        "model": {
            "weights": spec.to_dict()["model"]["weights"],
            "fingerprint": info.model_fingerprint,
            "config": info.model_config,  # the architecture (sdcore ModelConfig), checked on a resume
            "dtype": info.dtype,
            "device": info.device,
            "device_name": info.device_name,
            "threads": info.threads,
            "niceness": info.niceness,
        },
        "shards": {
            "size": spec.execution.shard_size,
            "count": num_shards(manifest.num_rows, spec.execution.shard_size),
        },
        "versions": versions,
        "created_at": (previous or {}).get("created_at") or _now(),
        "updated_at": _now(),
    }


__all__ = [
    "JobConflict",
    "JobEvents",
    "JobPlan",
    "check_job",
    "check_model",
    "execute",
    "job_document",
    "plan_job",
    "run_job",
    "summarise",
    "summary_lines",
    "worker_config",
]
