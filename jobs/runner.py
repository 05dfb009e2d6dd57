"""`run.py`'s orchestration: spec -> manifest -> output state -> distributor -> summary.

Order of things, so that nothing is lost or duplicated across crashes and reruns:
1. validate the spec and the manifest (no Ray, no model: errors come in seconds);
2. read the output's job.json and refuse a different job (unless `overwrite`);
3. list committed shards (their record files) and plan only the rest;
4. start the workers; when the first has loaded the model, check its fingerprint against
   job.json, then (over)write job.json — before any shard is handed out;
5. run; 6. count every committed record and write summary.json.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Callable

from . import __version__
from .manifest import Manifest, load_manifest
from .output import JOB_FILE, SUMMARY_FILE, Output
from .reader import num_shards, read_shards
from .spec import JobSpec, load_spec
from .worker import ShardResult, ShardWorker, WorkerConfig, WorkerInfo

JOB_FORMAT = 1


class JobConflict(RuntimeError):
    """The output holds a different job; the message lists the differences."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): data}


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    a, b = _flatten(before), _flatten(now)
    return [f"{key}: {a.get(key)!r} on disk, {b.get(key)!r} now" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def check_job(existing: dict[str, Any] | None, spec: JobSpec, manifest: Manifest) -> list[str]:
    """Differences between the job recorded in an output and this one (empty: same job)."""
    if existing is None:
        return []
    problems = _differences(existing.get("identity", {}), spec.identity())
    old_fp = existing.get("manifest", {}).get("fingerprint")
    if old_fp != manifest.fingerprint:
        problems.append(f"manifest content: fingerprint {str(old_fp)[:16]}… on disk, {manifest.fingerprint[:16]}… now")
    return problems


def check_model(existing: dict[str, Any] | None, info: WorkerInfo) -> list[str]:
    if existing is None:
        return []
    model = existing.get("model", {})
    problems = []
    if model.get("fingerprint") != info.model_fingerprint:
        problems.append(f"model fingerprint: {str(model.get('fingerprint'))[:16]}… on disk, {info.model_fingerprint[:16]}… now")
    if model.get("dtype") != info.dtype:
        problems.append(f"model dtype: {model.get('dtype')} on disk, {info.dtype} now (set model.dtype explicitly)")
    return problems


def conflict_message(output: Output, problems: list[str]) -> str:
    return (
        f"output {output.uri} already holds a different job ({JOB_FILE}):\n  "
        + "\n  ".join(problems)
        + "\nUse another output, or pass --overwrite to delete its images and records and start again."
    )


def job_document(spec: JobSpec, manifest: Manifest, info: WorkerInfo, previous: dict[str, Any] | None, versions: dict[str, str]) -> dict[str, Any]:
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
        },
        "model": {
            "weights": spec.to_dict()["model"]["weights"],
            "fingerprint": info.model_fingerprint,
            "dtype": info.dtype,
            "device": info.device,
            "device_name": info.device_name,
            "threads": info.threads,
        },
        "shards": {"size": spec.execution.shard_size, "count": num_shards(manifest.num_rows, spec.execution.shard_size)},
        "versions": versions,
        "created_at": (previous or {}).get("created_at") or _now(),
        "updated_at": _now(),
    }


def count_records(output: Output, shards: set[str]) -> dict[str, dict[str, int]]:
    """shard -> {"ok": n, "error": n} for committed shards."""
    counts = {}
    for shard, table in output.read_all_records(shards, columns=["status"]).items():
        statuses = table.column("status").to_pylist()
        counts[shard] = {"ok": statuses.count("ok"), "error": len(statuses) - statuses.count("ok")}
    return counts


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def run_job(
    spec: JobSpec | str,
    *,
    overwrite: bool = False,
    address: str | None = None,
    dry_run: bool = False,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
    worker_factory: Callable[[WorkerConfig], Any] = ShardWorker,
    progress_every: float = 10.0,
) -> dict[str, Any]:
    """Run (or resume) a job; returns the summary (also written to OUTPUT/summary.json).
    Raises SpecError / ManifestError / JobConflict / WorkerStartError before any work."""
    started_at, t0 = _now(), time.monotonic()
    if not isinstance(spec, JobSpec):
        spec = load_spec(spec)
    manifest = load_manifest(spec.manifest)
    total_shards = num_shards(manifest.num_rows, spec.execution.shard_size)
    log(f"[sdgen] job {spec.name!r}: {manifest.num_rows} rows from {', '.join(manifest.sources)} "
        f"-> {total_shards} shard(s) of {spec.execution.shard_size}")
    if manifest.ignored_columns:
        log(f"[sdgen] note: ignoring manifest columns {', '.join(manifest.ignored_columns)}")
    for problem in manifest.bad_columns.values():
        log(f"[sdgen] warning: {problem}; rows with a value there become error records")

    output = Output(spec.output)
    existing = output.read_job()
    problems = check_job(existing, spec, manifest)
    if problems and not overwrite:
        raise JobConflict(conflict_message(output, problems))
    committed = set() if overwrite else output.committed_shards()
    if existing is None and committed and not overwrite:
        raise JobConflict(f"output {output.uri} holds records but no {JOB_FILE}: not an sdgen output "
                          "(or a damaged one); use another output or pass --overwrite")
    if not overwrite:
        stale = [k for k in output.partial_keys() if k.split("/")[1] in committed]
        if stale:
            output.storage.delete(stale)
    tasks = list(read_shards(manifest, spec.execution.shard_size, skip=committed))
    log(f"[sdgen] output {output.uri}: {len(committed)} shard(s) already committed, {len(tasks)} to run")
    if dry_run:
        return {"total_rows": manifest.num_rows, "shards": {"total": total_shards, "committed": len(committed), "to_run": len(tasks)}}

    outcome_results: dict[str, ShardResult] = {}
    failed: dict[str, str] = {}
    workers_used = 0
    first_ready: list[float] = []
    if tasks:
        from .distributor import RayDistributor, connect, describe_cluster, disconnect

        embedded, where = connect(address)
        log(f"[sdgen] running on {where}: {describe_cluster()}")
        distributor = RayDistributor(spec.execution.device, spec.execution.workers, spec.execution.max_attempts,
                                     log, spec.execution.cpu_threads)
        try:
            import ray

            config = WorkerConfig(
                weights=spec.model.weights,
                output=spec.output,
                sampler=spec.sampler,
                dtype=spec.model.dtype,
                batch_size=spec.execution.batch_size,
                batch_invariant=spec.execution.batch_invariant,
                image_format=spec.image.format,
                quality=spec.image.quality,
            )
            distributor.start(config, worker_factory)

            def on_ready(info: WorkerInfo) -> None:
                model_problems = [] if overwrite else check_model(existing, info)
                if model_problems:
                    raise JobConflict(conflict_message(output, model_problems))
                before = (existing or {}).get("model", {})
                if existing and (before.get("device"), before.get("threads")) != (info.device, info.threads):
                    log(f"[sdgen] note: resuming on {info.device} ({info.threads or '-'} CPU threads); earlier shards "
                        f"ran on {before.get('device')} ({before.get('threads') or '-'}): their pixels may differ slightly")
                if overwrite:
                    log(f"[sdgen] --overwrite: deleting any previous job's records and images in {output.uri}")
                    output.clear()
                versions = {**info.versions, "ray": ray.__version__}
                output.write_job(job_document(spec, manifest, info, None if overwrite else existing, versions))
                log(f"[sdgen] model {spec.to_dict()['model']['weights']} fingerprint {info.model_fingerprint[:12]} "
                    f"{info.dtype} on {info.device} ({info.device_name})")
                first_ready.append(time.monotonic())

            def on_result(result: ShardResult) -> None:
                extra = f", {result.reused} kept from an earlier attempt" if result.reused else ""
                note = "" if result.committed else " (already committed by an earlier attempt)"
                log(f"[sdgen] {result.shard_id} done: {result.ok} ok, {result.error} error{extra} "
                    f"in {result.seconds:.1f}s on {result.worker}{note}")

            last_line = {"rows": -1, "at": 0.0}

            def on_progress(p) -> None:
                # A line when rows moved, else one a minute (so a long shard still shows life).
                if p.rows_done == last_line["rows"] and time.monotonic() - last_line["at"] < max(60.0, progress_every):
                    return
                last_line.update(rows=p.rows_done, at=time.monotonic())
                rate = p.rows_done / p.elapsed if p.elapsed > 0 else 0.0
                eta = _duration((p.rows_total - p.rows_done) / rate) if rate > 0 else "?"
                pct = 100.0 * p.rows_done / p.rows_total if p.rows_total else 100.0
                log(f"[sdgen] {p.rows_done}/{p.rows_total} rows ({pct:.0f}%) | {rate:.2f} rows/s | ETA {eta} | "
                    f"shards {p.shards_done}/{p.shards_total} done, {p.shards_failed} failed | {p.workers} worker(s)")

            outcome = distributor.run(tasks, on_ready, on_result, on_progress, progress_every)
            outcome_results, failed, workers_used = outcome.results, outcome.failed, outcome.workers_ready
        finally:
            distributor.shutdown()
            disconnect(embedded)
    else:
        log("[sdgen] nothing to do: every shard is committed")

    # Summary over the whole output, earlier runs included.
    done = output.committed_shards()
    counts = count_records(output, done)
    ok = sum(c["ok"] for c in counts.values())
    errors = sum(c["error"] for c in counts.values())
    wall = time.monotonic() - t0
    generated = sum(r.generated for r in outcome_results.values())
    gen_time = time.monotonic() - first_ready[0] if first_ready else 0.0
    failed = {s: e for s, e in failed.items() if s not in done}
    summary = {
        "name": spec.name,
        "output": output.uri,
        "complete": len(done) == total_shards,
        "total": manifest.num_rows,
        "ok": ok,
        "error": errors,
        "missing": manifest.num_rows - ok - errors,
        "shards": {
            "total": total_shards,
            "done": len(done),
            "failed": len(failed),
            "pending": total_shards - len(done) - len(failed),
        },
        "failed_shards": failed,
        "run": {
            "started_at": started_at,
            "finished_at": _now(),
            "wall_s": round(wall, 3),
            "shards_skipped": len(committed),
            "shards_run": len(outcome_results),
            "rows_run": sum(r.rows for r in outcome_results.values()),
            "images_generated": generated,
            "rows_reused": sum(r.reused for r in outcome_results.values()),
            "workers": workers_used,
            "generate_wall_s": round(gen_time, 3),
            "rows_per_s": round(sum(r.rows - r.reused for r in outcome_results.values()) / gen_time, 3) if gen_time > 0 else None,
            "images_per_s": round(generated / gen_time, 3) if gen_time > 0 else None,
        },
        "sdgen_version": __version__,
    }
    output.write_json(SUMMARY_FILE, summary)
    state = "complete" if summary["complete"] else f"INCOMPLETE ({len(failed)} shard(s) failed, rerun to retry)"
    rate = summary["run"]["rows_per_s"]
    log(f"[sdgen] {state}: {ok} ok, {errors} error, {summary['missing']} missing of {manifest.num_rows} rows; "
        f"{len(done)}/{total_shards} shards; this run {summary['run']['rows_run']} rows in {_duration(wall)}"
        + (f" ({rate} rows/s after model load)" if rate else ""))
    for shard, error in sorted(failed.items()):
        log(f"[sdgen]   {shard}: {error}")
    return summary


__all__ = ["JobConflict", "run_job", "check_job", "check_model", "job_document", "count_records"]
