"""Resume after a crash: SIGKILL the driver of a running `jobs/run.py` (and clean up its embedded
Ray), rerun the same command, and check that no record is duplicated or missing and that
committed shards, and saved batches, are not generated again."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

from jobs.output import Output

from conftest import (
    PYTHON,
    REPO,
    command_env,
    kill_session,
    manifest_schema,
    run_command,
    small_rows,
    spec_dict,
    write_manifest,
    write_spec,
)


def snapshot(folder):
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_kill_the_driver_then_resume(tmp_path):
    rows = 24
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(rows), manifest_schema())
    # 12 shards of 2 rows, 1 row a batch, 20 steps a row: slow enough to stop partway.
    spec = write_spec(
        tmp_path / "job.yaml",
        spec_dict(
            str(manifest),
            str(tmp_path / "out"),
            sampler={"steps": 20},
            execution={"workers": 1, "batch_size": 1, "shard_size": 2},
        ),
    )
    out = tmp_path / "out"
    driver = subprocess.Popen(
        [PYTHON, "jobs/run.py", str(spec)],
        cwd=REPO,
        env=command_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            committed = list((out / "records").glob("*.parquet")) if (out / "records").exists() else []
            if len(committed) >= 2 or driver.poll() is not None:
                break
            time.sleep(0.05)
        assert driver.poll() is None, "the job finished before it could be stopped:\n" + driver.stdout.read()
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        kill_session(driver.pid)  # the embedded Ray's processes, all in the driver's session
    assert not [p for p in _session_processes(driver.pid)], "Ray processes of the killed driver are left"

    output = Output(str(out))
    done_before = output.committed_shards()
    assert 2 <= len(done_before) < rows // 2
    before = {k: v for k, v in snapshot(out).items() if k.startswith(("records/", "images/"))}
    saved_rows = {
        row for shard in {k.split("/")[1] for k in output.partial_keys()} for row in output.read_partials(shard)
    }

    result = run_command([PYTHON, "jobs/run.py", str(spec)], timeout=400)
    assert f"{len(done_before)} shard(s) already committed, {rows // 2 - len(done_before)} to run" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and (summary["ok"], summary["error"], summary["missing"]) == (rows, 0, 0)
    assert summary["run"]["shards_skipped"] == len(done_before)
    assert summary["run"]["rows_reused"] == len(saved_rows)
    assert summary["run"]["images_generated"] == rows - 2 * len(done_before) - len(saved_rows)

    records = [r for t in output.read_all_records(output.committed_shards()).values() for r in t.to_pylist()]
    assert sorted(r["row"] for r in records) == list(range(rows))  # none lost, none duplicated
    after = snapshot(out)
    for key, (mtime, digest) in before.items():  # nothing committed before was rewritten
        assert after[key] == (mtime, digest), key
    assert output.partial_keys() == []
    resumed = [r for r in records if r["row"] in saved_rows]
    assert all(r["attempt"] == 1 for r in resumed)


def _session_processes(sid):
    from conftest import session_pids

    return session_pids(sid)
