"""The fault-injection suite: the real job (`jobs/run.py`, embedded local Ray, real processes,
moto's S3 server behind a fault-injecting proxy) under worker kills, driver kills, concurrent
runs, stale leases, transient and permanent storage faults and hostile rows. After every fault
the exactly-once invariant must hold:

- record ids = manifest ids, each once;
- every `ok` record's image exists and matches its sha256;
- no committed shard was regenerated (its record file is byte for byte what it was).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from faultproxy import FaultProxy, Rule

from jobs.output import Output

from conftest import (
    PYTHON,
    REPO,
    command_env,
    init_image,
    kill_session,
    manifest_schema,
    run_command,
    small_rows,
    spec_dict,
    write_manifest,
    write_spec,
)


def records_of(uri: str) -> list[dict]:
    output = Output(uri)
    tables = output.read_all_records(output.committed_shards()) if output.committed_shards() else {}
    return sorted((r for t in tables.values() for r in t.to_pylist()), key=lambda r: r["row"])


def record_files(uri: str) -> dict[str, bytes]:
    output = Output(uri)
    return {s: output.storage.read(output.record_key(s)) for s in output.committed_shards()}


def assert_exactly_once(uri: str, manifest_ids: list[str], before: dict[str, bytes] | None = None) -> list[dict]:
    """The invariant, on a complete output; `before`: record files committed earlier."""
    output = Output(uri)
    records = records_of(uri)
    assert [r["row"] for r in records] == list(range(len(manifest_ids)))
    assert [r["id"] for r in records] == manifest_ids
    for r in records:
        if r["status"] == "ok":
            data = output.storage.read(r["image_path"])
            assert hashlib.sha256(data).hexdigest() == r["image_sha256"], r["id"]
    names = [r["image_path"] for r in records if r["status"] == "ok"]
    assert len(set(names)) == len(names)
    now = record_files(uri)
    for shard, data in (before or {}).items():
        assert now[shard] == data, f"{shard} was regenerated"
    return records


def start_run(spec: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "jobs/run.py", str(spec), "--progress-every", "1"],
        cwd=REPO,
        env=command_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- one writer, driver kills


def test_concurrent_run_refused_then_driver_killed_and_stale_lease_taken_over(tmp_path):
    rows = small_rows(12)
    manifest = write_manifest(tmp_path / "m.parquet", rows, manifest_schema())
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "job.yaml", spec_dict(str(manifest), str(out), execution={"batch_size": 1}))
    first = start_run(spec)
    try:
        wait_for(lambda: (out / "lease.json").exists(), 60, "the first run's lease")
        second = run_command([PYTHON, "jobs/run.py", str(spec)], check=False, timeout=60)
        assert second.returncode == 2, second.stdout
        assert "in use by another run" in second.stdout and f"pid {first.pid}" in second.stdout
        assert "Traceback" not in second.stdout
        wait_for(lambda: list((out / "records").glob("*.parquet")), 240, "a committed shard")
    finally:
        kill_session(first.pid)  # the driver and its embedded Ray, SIGKILL: no clean-up at all
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    before = record_files(str(out))
    assert before and (out / "lease.json").exists()  # the dead run's lease is left behind
    status = run_command([PYTHON, "jobs/status.py", str(out)], check=False)
    assert status.returncode == 1 and ("interrupted" in status.stdout or "pending" in status.stdout)
    rerun = run_command([PYTHON, "jobs/run.py", str(spec)], timeout=300)
    assert "taking over the lease" in rerun.stdout and "is gone" in rerun.stdout
    assert_exactly_once(str(out), [r["id"] for r in rows], before)
    assert not (out / "lease.json").exists()


# --------------------------------------------------------------------------- worker kills


def test_workers_killed_come_back_and_a_poison_shard_fails_alone(tmp_path):
    rows = small_rows(9)
    ids = [r["id"] for r in rows]
    manifest = write_manifest(tmp_path / "m.parquet", rows, manifest_schema())
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "job.yaml", spec_dict(str(manifest), str(out)))
    # The only worker killed twice (two shards' first attempts): the job completes.
    first = run_command(
        [PYTHON, "jobs/run.py", str(spec)], env={"SDGEN_FAULT_KILL": "shard-00000@1,shard-00002@1"}, timeout=300
    )
    assert first.stdout.count("failed (worker died") == 2, first.stdout
    assert_exactly_once(str(out), ids)

    # A shard that kills its worker on every attempt: failed with the reason, the rest commits,
    # and a rerun retries only it.
    out2 = tmp_path / "out2"
    spec2 = write_spec(tmp_path / "job2.yaml", spec_dict(str(manifest), str(out2)))
    poisoned = run_command(
        [PYTHON, "jobs/run.py", str(spec2)], env={"SDGEN_FAULT_KILL": "shard-00001"}, check=False, timeout=300
    )
    assert poisoned.returncode == 1, poisoned.stdout
    summary = json.loads((out2 / "summary.json").read_text())
    assert (
        list(summary["failed_shards"]) == ["shard-00001"] and "worker died" in summary["failed_shards"]["shard-00001"]
    )
    before = record_files(str(out2))
    assert sorted(before) == ["shard-00000", "shard-00002"]
    status = run_command([PYTHON, "jobs/status.py", str(out2)], check=False)
    assert status.returncode == 1 and "failed" in status.stdout
    run_command([PYTHON, "jobs/run.py", str(spec2)], timeout=300)
    assert_exactly_once(str(out2), ids, before)


def test_every_worker_killed_once(tmp_path):
    rows = small_rows(6)
    manifest = write_manifest(tmp_path / "m.parquet", rows, manifest_schema())
    out = tmp_path / "out"
    spec = write_spec(
        tmp_path / "job.yaml", spec_dict(str(manifest), str(out), execution={"workers": 2, "shard_size": 2})
    )
    result = run_command(
        [PYTHON, "jobs/run.py", str(spec)], env={"SDGEN_FAULT_KILL": "shard-00000@1,shard-00001@1"}, timeout=300
    )
    assert result.stdout.count("failed (worker died") == 2, result.stdout
    assert_exactly_once(str(out), [r["id"] for r in rows])


# --------------------------------------------------------------------------- hostile rows


def test_hostile_rows_become_their_own_error_records(tmp_path):
    data = tmp_path / "data"
    init_image(data / "good.png")
    init_image(data / "big.png", size=64)  # 4096 pixels: over the pixel cap set below
    (data / "noise.bin").write_bytes(os.urandom(300_000))  # over the byte cap set below
    (data / "not-an-image.png").write_bytes(b"hello")
    os.mkfifo(data / "fifo.png")
    ok = {"negative": "", "seed": 7, "strength": 0.5}
    rows = [
        {"id": "good-1", "prompt": "a", "seed": 1, "negative": "", "strength": None, "init_image": None},
        {"id": "nul", "prompt": "b", "init_image": "good\x00.png", **ok},
        {"id": "fifo", "prompt": "c", "init_image": "fifo.png", **ok},
        {"id": "device", "prompt": "d", "init_image": "/dev/zero", **ok},
        {"id": "not-image", "prompt": "e", "init_image": "not-an-image.png", **ok},
        {"id": "too-many-pixels", "prompt": "f", "init_image": "big.png", **ok},
        {"id": "too-many-bytes", "prompt": "g", "init_image": "noise.bin", **ok},
        {"id": "good-2", "prompt": "h", "init_image": "good.png", **ok},
        {"id": "bad-utf8", "prompt": "PLACEHOLDER", "seed": 9, "negative": "", "strength": None, "init_image": None},
        {"id": "nan", "prompt": "i", "seed": 3, "negative": "", "strength": None, "init_image": None},
        {"id": "good-3", "prompt": "j", "seed": 4, "negative": "", "strength": None, "init_image": None},
        {"id": "BAD-ID", "prompt": "k", "seed": 5, "negative": "", "strength": None, "init_image": None},
    ]
    table = pa.Table.from_pylist(rows, schema=manifest_schema())
    prompts = [p.encode() if p != "PLACEHOLDER" else b"\xff\xfe bad" for p in table.column("prompt").to_pylist()]
    table = table.set_column(1, "prompt", pa.array(prompts, pa.binary()).view(pa.string()))
    ids = [i.encode() if i != "BAD-ID" else b"\xc3\x28" for i in table.column("id").to_pylist()]
    table = table.set_column(0, "id", pa.array(ids, pa.binary()).view(pa.string()))
    guidance = [1e308 if r["id"] == "nan" else 7.5 for r in rows]
    table = table.append_column("guidance_scale", pa.array(guidance, pa.float64()))
    pq.write_table(table, data / "m.parquet")
    out = tmp_path / "out"
    spec = write_spec(
        tmp_path / "job.yaml",
        spec_dict(str(data / "m.parquet"), str(out), execution={"shard_size": 12, "batch_size": 4}),
    )
    env = {"SDGEN_INIT_MAX_PIXELS": "2000", "SDGEN_INIT_MAX_BYTES": "200000"}
    result = run_command([PYTHON, "jobs/run.py", str(spec)], env=env, timeout=300)
    assert "Traceback" not in result.stdout
    manifest_ids = [r["id"] if r["id"] != "BAD-ID" else None for r in rows]
    records = {r["id"] or "BAD-ID": r for r in assert_exactly_once(str(out), manifest_ids)}
    assert {i for i, r in records.items() if r["status"] == "ok"} == {"good-1", "good-2", "good-3"}
    expect = {
        "nul": "cannot read",
        "fifo": "not a regular file",
        "device": "not a regular file",
        "not-image": "not a readable image",
        "too-many-pixels": "over the cap of 2000",
        "too-many-bytes": "over the cap of 200000",
        "bad-utf8": "invalid UTF-8 (not readable) in column(s) prompt",
        "BAD-ID": "invalid UTF-8 (not readable) in column(s) id",
        "nan": "non-finite values at step 1",
    }
    for row_id, words in expect.items():
        assert words in (records[row_id]["error"] or ""), (row_id, records[row_id]["error"])


# --------------------------------------------------------------------------- storage faults (S3)


def test_transient_s3_faults_never_become_error_records(tmp_path, s3, moto_endpoint):
    bucket, client, env = s3
    init = init_image(tmp_path / "init" / "a.png")
    client.upload_file(str(init), bucket, "in/init/a.png")
    rows = small_rows(6, img2img_every=2, init=f"s3://{bucket}/in/init/a.png")
    ids = [r["id"] for r in rows]
    manifest = write_manifest(tmp_path / "m.parquet", rows, manifest_schema())
    out = f"s3://{bucket}/out"
    spec = write_spec(tmp_path / "job.yaml", spec_dict(str(manifest), out, execution={"max_attempts": 2}))
    with FaultProxy(moto_endpoint) as proxy:
        run_env = {**env, "AWS_ENDPOINT_URL": proxy.url, "SDGEN_S3_ATTEMPTS": "2", "SDGEN_S3_TIMEOUT": "2"}
        # Permanent: access denied on the output -> refused before any work, one line.
        proxy.add(Rule("denied", method="PUT", path="/out/"))
        denied = run_command([PYTHON, "jobs/run.py", str(spec)], env=run_env, check=False, timeout=120)
        assert denied.returncode == 2 and "AccessDenied" in denied.stdout and "Traceback" not in denied.stdout
        proxy.clear()
        # Transient: the init image's endpoint is down for longer than boto3's retries and the
        # shard's attempts (2 x 2 failures), image and record writes see resets, SlowDown, a stall.
        proxy.add(Rule("503", method="GET", path="/in/init/", count=4))
        proxy.add(Rule("reset", method="PUT", path="/images/", count=1))
        proxy.add(Rule("slowdown", method="PUT", path="/records/", count=1))
        proxy.add(Rule("stall", method="GET", path="/in/init/", count=1, stall_s=6))
        first = run_command([PYTHON, "jobs/run.py", str(spec)], env=run_env, check=False, timeout=300)
        assert first.returncode in (0, 1), first.stdout
        assert proxy.faults, "no fault was injected"
        assert "Traceback" not in first.stdout
        for r in records_of(out):
            assert r["status"] == "ok", r  # a transient fault is never a committed error record
        before = record_files(out)
        if first.returncode == 1:
            assert "transient" in first.stdout
            rerun = run_command([PYTHON, "jobs/run.py", str(spec)], env=run_env, timeout=300)
            assert "complete" in rerun.stdout
        records = assert_exactly_once(out, ids, before)
        assert all(r["status"] == "ok" for r in records)
        assert "testing-secret-key" not in first.stdout
