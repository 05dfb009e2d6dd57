"""jobs/status.py: per-shard state and counts, read from the output alone."""

from __future__ import annotations

import json

from jobs.output import SUMMARY_FILE, Output
from jobs.status import format_status, job_status, main


def make_output(tmp_path):
    output = Output(str(tmp_path))
    output.write_job(
        {
            "name": "t",
            "manifest": {"rows": 7},
            "shards": {"size": 2, "count": 4},
            "model": {"weights": "builtin:tiny", "fingerprint": "ab" * 32, "dtype": "float32", "device": "cpu"},
        }
    )
    output.commit_records(
        "shard-00000", [{"row": 0, "id": "a", "status": "ok"}, {"row": 1, "id": "b", "status": "error", "error": "x"}]
    )
    output.write_partial("shard-00001", [{"row": 2, "id": "c", "status": "ok"}])
    output.write_json(SUMMARY_FILE, {"failed_shards": {"shard-00002": "RuntimeError: boom", "shard-00000": "old"}})
    return output


def test_job_status_counts(tmp_path):
    make_output(tmp_path)
    status = job_status(str(tmp_path))
    assert status["rows"] == {"total": 7, "ok": 1, "error": 1, "not_done": 5}
    # Batches saved, not committed, and no run holds the output: the run was interrupted.
    assert status["shards"] == {
        "total": 4,
        "done": 1,
        "damaged": 0,
        "running": 0,
        "interrupted": 1,
        "failed": 1,
        "pending": 1,
    }
    assert status["running"] is False
    states = {s["shard"]: s["state"] for s in status["shard_list"]}
    assert states == {
        "shard-00000": "done",
        "shard-00001": "interrupted",
        "shard-00002": "failed",
        "shard-00003": "pending",
    }
    assert status["complete"] is False
    text = format_status(status)
    assert "shards  4 total: 1 done, 0 running, 1 interrupted, 1 failed, 1 pending" in text
    assert "rows    7 total: 1 ok, 1 error, 5 not done" in text
    assert "RuntimeError: boom" in text and "shard-00003" in text


def test_a_shard_with_saved_batches_is_running_while_a_run_holds_the_lease(tmp_path):
    from jobs.lease import OutputLease

    make_output(tmp_path)
    with OutputLease.acquire(str(tmp_path), log=lambda s: None):
        status = job_status(str(tmp_path))
    assert status["running"] is True
    assert {s["shard"]: s["state"] for s in status["shard_list"]}["shard-00001"] == "running"
    assert job_status(str(tmp_path))["shard_list"][1]["state"] == "interrupted"  # released


def test_cli_exit_codes_and_json(tmp_path, capsys):
    make_output(tmp_path)
    assert main([str(tmp_path), "--json"]) == 1  # incomplete
    data = json.loads(capsys.readouterr().out)
    assert data["shards"]["done"] == 1
    assert main([str(tmp_path / "nothing-here")]) == 2
    assert "no job.json" in capsys.readouterr().err


def test_all_lists_every_shard(tmp_path, capsys):
    make_output(tmp_path)
    assert "shard-00000" in format_status(job_status(str(tmp_path)), show_all=True)
    assert main([str(tmp_path), "--all"], prog="sdgen status") == 1
    assert ["shard-00000", "done"] in [line.split()[:2] for line in capsys.readouterr().out.splitlines()]


def test_a_shard_stopped_in_its_first_rows_is_interrupted(tmp_path):
    """A run that died before saving any batch of a shard left only the in-flight note: the shard
    was started, so it is interrupted (not pending), with no batch file saved."""
    output = make_output(tmp_path)
    output.write_inflight("shard-00003", [6], False, 1)
    entry = job_status(str(tmp_path))["shard_list"][3]
    assert (entry["state"], entry["partial_files"]) == ("interrupted", 0)
    assert "0 batch file(s) saved" in format_status(job_status(str(tmp_path)))


def test_errors_lists_the_committed_shards_error_rows_beside_a_failed_shard(tmp_path, capsys):
    """A failed shard has no record file; its failure message is not a count of rows to read."""
    make_output(tmp_path)
    assert main([str(tmp_path), "--errors", "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)["error_rows"]
    assert [(r["row"], r["id"], r["error"]) for r in rows] == [(1, "b", "x")]
