#!/usr/bin/env python
"""Show a job's progress: `sdgen status OUTPUT [--all] [--json] [--errors]` (or `python jobs/status.py ...`).

Shards done / failed / pending and rows ok / error / not done, read from the output alone (record
files, partial files, job.json, summary.json), so it works while a job runs, after it stopped,
and on s3:// outputs. A shard is `done` when its record file exists, `failed` when the last run
gave up on it, `running` when some of its batches are saved but it is not committed and a run
holds the output's lease, `interrupted` the same without a live lease (the run stopped; a rerun
resumes it), else `pending`. A committed shard whose record file cannot be read or does not
hold one record per row is `damaged`: the job is not complete, and the next run redoes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from jobs.exit_codes import TABLE, finish, guarded, one_line
from jobs.lease import live_lease
from jobs.output import Output
from jobs.reader import shard_ranges, shard_row_ranges
from jobs.redact import redact_text


def job_status(uri: str) -> dict:
    """The output's state as a dict (what `--json` prints)."""
    output = Output(uri)
    job = output.read_job()
    if job is None:
        raise FileNotFoundError(f"{output.uri}: no job.json here (not an sdgen output, or nothing started yet)")
    summary = output.read_summary()
    rows, size = job["manifest"]["rows"], job["shards"]["size"]
    done = output.committed_shards()
    counts = output.count_records(done, shard_row_ranges(rows, size))
    partial_files = output.partial_files()
    # A shard a run started: saved batches, or at least the in-flight note of its first rows.
    started = {k.split("/")[1] for k in partial_files}
    partial_rows = Counter(k.split("/")[1] for k in partial_files if k.endswith(".parquet"))
    failed = summary.get("failed_shards", {})
    running = live_lease(output.storage) is not None  # a run holds the output now
    shards = []
    for shard, start, stop in shard_ranges(rows, size):
        entry = {"shard": shard, "rows": stop - start}
        if shard in done and "damaged" in counts[shard]:
            # Committed, but its record file is unreadable or short: the next run redoes it.
            entry.update(state="damaged", **counts[shard])
        elif shard in done:
            entry.update(state="done", **counts[shard])
        elif shard in failed:
            entry.update(state="failed", error=failed[shard])
        elif shard in started:
            # Started but not committed: being worked on while a run holds the lease, else left
            # by a run that stopped (interrupted, killed); a rerun resumes it.
            entry.update(state="running" if running else "interrupted", partial_files=partial_rows[shard])
        else:
            entry.update(state="pending")
        shards.append(entry)
    states = Counter(s["state"] for s in shards)
    ok = sum(c["ok"] for c in counts.values())
    error = sum(c["error"] for c in counts.values())
    return {
        "output": output.uri,
        "name": job.get("name"),
        "model": job.get("model", {}),
        "rows": {"total": rows, "ok": ok, "error": error, "not_done": rows - ok - error},
        "shards": {
            "total": len(shards),
            **{k: states.get(k, 0) for k in ("done", "damaged", "running", "interrupted", "failed", "pending")},
        },
        "running": running,
        "complete": states.get("done", 0) == len(shards),
        "last_run": summary.get("run"),
        "shard_list": shards,
    }


def format_status(status: dict, show_all: bool = False) -> str:
    """The text `status` prints: the totals, then a table of the shards worth a look (all of
    them with `show_all`)."""
    rows, shards, model = status["rows"], status["shards"], status["model"]
    lines = [
        f"output  {status['output']}  (job {status['name']!r})",
        (
            f"model   {model.get('weights')}  fingerprint {str(model.get('fingerprint'))[:12]}  "
            f"{model.get('dtype')} on {model.get('device')}"
        ),
        (
            f"shards  {shards['total']} total: {shards['done']} done, {shards['running']} running, "
            f"{shards['interrupted']} interrupted, {shards['failed']} failed, {shards['pending']} pending"
            + (f", {shards['damaged']} damaged" if shards["damaged"] else "")
        ),
        f"rows    {rows['total']} total: {rows['ok']} ok, {rows['error']} error, {rows['not_done']} not done",
        "state   " + ("complete" if status["complete"] else "incomplete (rerun the job to finish it)"),
    ]
    listed = [s for s in status["shard_list"] if show_all or s["state"] != "done" or s.get("error", 0)]
    if listed:
        lines.append("")
        lines.append(f"{'shard':<14}{'state':<12}{'rows':>6}{'ok':>6}{'error':>7}  note")
        lines.extend(_shard_line(s) for s in listed)
        hidden = len(status["shard_list"]) - len(listed)
        if not show_all and hidden:
            lines.append(f"({hidden} done shard(s) without errors not shown; --all lists them)")
    return "\n".join(lines)


def _shard_line(s: dict) -> str:
    note = (
        s.get("error")
        if s["state"] == "failed"
        else s["damaged"]
        if s["state"] == "damaged"
        else (f"{s['partial_files']} batch file(s) saved" if s["state"] in ("running", "interrupted") else "")
    )
    ok = s.get("ok", "")
    err = s.get("error", "") if s["state"] in ("done", "damaged") else ""
    return f"{s['shard']:<14}{s['state']:<12}{s['rows']:>6}{ok!s:>6}{err!s:>7}  {note or ''}".rstrip()


def main(argv: list[str] | None = None, prog: str = "jobs/status.py") -> int:
    """Exit status: 0 the job is complete, 1 it is not, 2 no sdgen output there (or unreadable)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Show an sdgen output's progress.",
        epilog=TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", help="the job's output folder or s3:// prefix")
    parser.add_argument("--all", action="store_true", help="list every shard, not only the unfinished or erroring ones")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.add_argument("--debug", action="store_true", help="print a traceback for unexpected errors")
    parser.add_argument(
        "--errors", action="store_true", help="list the error rows (row, id, shard, message) grouped by reason"
    )
    args = parser.parse_args(argv)
    return guarded(lambda: _main(args), args.debug)


def _main(args: argparse.Namespace) -> int:
    try:
        status = job_status(args.output)
        if args.errors:
            from jobs.errors import error_rows

            # Committed shards with records to read (an unreadable record file counts none).
            readable = [
                s["shard"] for s in status["shard_list"] if s["state"] in ("done", "damaged") and s["ok"] + s["error"]
            ]
            status["error_rows"] = error_rows(Output(args.output), readable)
    except (FileNotFoundError, OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {one_line(redact_text(str(exc)))}", file=sys.stderr)
        return 2
    if args.errors and not args.json:
        from jobs.errors import format_error_rows

        print(format_error_rows(status["error_rows"]))
    elif args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status, args.all))
    return 0 if status["complete"] else 1


if __name__ == "__main__":
    # `python jobs/status.py` imports `jobs` as installed (`make venv` installs this checkout
    # editable); `sdgen status` is the same command.
    finish(main())
