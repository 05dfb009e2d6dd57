"""Exit codes a script can trust: the table in every --help, no traceback for bad input or
environment, and `status` / `run --dry-run` exit right every time (the SIGABRT at exit)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jobs.exit_codes import TABLE
from jobs.output import Output

from conftest import PYTHON, manifest_schema, run_command, small_rows, spec_dict, write_manifest, write_spec

# The abort was seen in 3-5% of runs of each before its fix. A dry run loads the model and
# calibrates (~5 s): fewer of those.
REPEATS = {"status": 20, "dry-run": 10}


def _no_traceback(result):
    assert "Traceback" not in result.stdout, result.stdout
    assert "terminate called" not in result.stdout, result.stdout


@pytest.mark.parametrize("script", ["jobs/run.py", "jobs/status.py", "jobs/reproduce.py"])
def test_every_command_shows_the_exit_code_table(script):
    result = run_command([PYTHON, script, "--help"])
    assert "exit codes" in result.stdout and "130" in result.stdout and "3    stopped mid-run" in result.stdout
    assert TABLE.splitlines()[1].strip() in result.stdout


def test_status_and_dry_run_exit_right_every_time(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(4), manifest_schema())
    spec = write_spec(tmp_path / "job.yaml", spec_dict(str(manifest), str(tmp_path / "out")))
    # Committed record files matter: reading them (pyarrow, on a thread pool) is what left native
    # threads for the interpreter's teardown to abort on (3 runs in 80 before the fix).
    out = tmp_path / "status-out"
    output = Output(str(out))
    output.write_job({"manifest": {"rows": 7}, "shards": {"size": 2}, "model": {}})
    for shard, rows in (("shard-00000", (0, 1)), ("shard-00001", (2, 3))):
        output.commit_records(shard, [{"row": r, "id": f"r{r}", "status": "ok"} for r in rows])
    commands = {
        "status": [PYTHON, "jobs/status.py", str(out)],
        "dry-run": [PYTHON, "jobs/run.py", str(spec), "--dry-run"],
    }
    codes = {"status": [], "dry-run": []}
    # The two commands run side by side, each REPEATS times in a row.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for attempt in range(max(REPEATS.values())):
            due = {name: args for name, args in commands.items() if attempt < REPEATS[name]}
            runs = {name: pool.submit(run_command, args, check=False, timeout=60) for name, args in due.items()}
            for name, run in runs.items():
                _no_traceback(run.result())
                codes[name].append(run.result().returncode)
    assert codes == {"status": [1] * REPEATS["status"], "dry-run": [0] * REPEATS["dry-run"]}


def test_bad_input_and_environment_give_one_line_not_a_traceback(tmp_path, s3):
    bucket, _, env = s3
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(2), manifest_schema())
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_bytes(b"name: \xff\xfe\x00bad\nmanifest: [\n")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    bomb = tmp_path / "bomb.yaml"  # 9**9 "lol"s once expanded; every message must stay short
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"{n}: &{n} [{','.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]
    bomb.write_text("\n".join(levels) + "\nmanifest: *i\noutput: *i\nmodel: {weights: *i}\nsampler: {steps: *i}\n")
    cases = {
        "YAML alias bomb": bomb,
        "non-UTF-8 YAML": bad_yaml,
        "unwritable output folder": write_spec(tmp_path / "ro.yaml", spec_dict(str(manifest), str(blocked / "out"))),
        "read-only file system": write_spec(tmp_path / "sys.yaml", spec_dict(str(manifest), "/sys/sdgen-out")),
        "missing output bucket": write_spec(
            tmp_path / "nob.yaml", spec_dict(str(manifest), f"s3://{bucket}-missing/out")
        ),
    }
    for what, spec in cases.items():
        result = run_command([PYTHON, "jobs/run.py", str(spec)], check=False, env=env, timeout=60)
        assert len(result.stdout) < 5000, (what, result.stdout[:5000])
        _no_traceback(result)
        assert result.returncode == 2, (what, result.stdout)
        errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, (what, result.stdout)


def test_a_ray_client_address_is_refused_before_anything_is_written(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(2), manifest_schema())
    spec = write_spec(tmp_path / "job.yaml", spec_dict(str(manifest), str(tmp_path / "out")))
    for argv, env in [
        (["--address", "ray://127.0.0.1:10001"], None),
        ([], {"RAY_ADDRESS": "RAY://head.example:10001"}),
    ]:
        result = run_command([PYTHON, "jobs/run.py", str(spec), *argv], check=False, env=env, timeout=60)
        _no_traceback(result)
        assert result.returncode == 2, result.stdout
        assert "a Ray Client address" in result.stdout and "ray job submit" in result.stdout, result.stdout
        assert not (tmp_path / "out").exists()  # refused before the lease: nothing written


def test_the_job_api_address_is_refused_and_a_cluster_that_is_not_there_is_exit_3(tmp_path):
    """RAY_ADDRESS=http://HEAD:8265 (what `ray job submit` takes) is a bad argument, exit 2; a
    HOST:PORT where no cluster runs used to hang in ray.init for minutes: now one line, exit 3."""
    from conftest import free_port

    manifest = write_manifest(tmp_path / "m.parquet", small_rows(2), manifest_schema())
    spec = write_spec(tmp_path / "job.yaml", spec_dict(str(manifest), str(tmp_path / "out")))
    result = run_command([PYTHON, "jobs/run.py", str(spec)], check=False, env={"RAY_ADDRESS": "http://127.0.0.1:8265"})
    _no_traceback(result)
    assert result.returncode == 2 and "the address of Ray's job API" in result.stdout, result.stdout
    assert not (tmp_path / "out").exists()
    started = time.monotonic()
    dead = f"127.0.0.1:{free_port()}"
    result = run_command([PYTHON, "jobs/run.py", str(spec)], check=False, env={"RAY_ADDRESS": dead}, timeout=120)
    _no_traceback(result)
    assert result.returncode == 3, result.stdout
    assert f"error: no Ray cluster answers at {dead}" in result.stdout
    assert time.monotonic() - started < 60


def _start_run(spec: Path, log: Path, env: dict | None = None):
    """`jobs/run.py spec` in its own session, its output going to `log`."""
    import subprocess

    from conftest import REPO, command_env

    with open(log, "w") as handle:
        return subprocess.Popen(
            [PYTHON, "jobs/run.py", str(spec)], cwd=REPO, env=command_env(env), stdout=handle,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _wait_for_line(log: Path, text: str) -> None:
    import time

    deadline = time.monotonic() + 180
    while text not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert text in log.read_text(), log.read_text()


def _assert_session_gone(pid: int) -> None:
    """No process of the run's session (its embedded Ray) outlives it for long."""
    import time

    from conftest import session_pids

    deadline = time.monotonic() + 20
    while session_pids(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = session_pids(pid)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:100] for p in left]


@pytest.mark.parametrize("signals", [["SIGTERM"], ["SIGINT"] * 4])
def test_sigterm_stops_the_run_and_its_embedded_ray(tmp_path, signals):
    """SIGTERM (as Ctrl-C) of the driver: exit 130, the embedded Ray it started shut down (no
    process of its session left), the lease released; status then says interrupted or pending.
    Ctrl-C pressed again and again too: a second one used to cut Ray's shutdown short (exit 1)."""
    import signal

    from conftest import kill_session

    manifest = write_manifest(tmp_path / "m.parquet", small_rows(30), manifest_schema())
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "job.yaml", spec_dict(str(manifest), str(out), execution={"batch_size": 1}))
    log = tmp_path / "run.log"
    proc = _start_run(spec, log)
    try:
        _wait_for_line(log, "model builtin:tiny")
        for name in signals:
            if proc.poll() is None:
                proc.send_signal(getattr(signal, name))
                time.sleep(0.25)
        assert proc.wait(timeout=60) == 130, log.read_text()
        _assert_session_gone(proc.pid)
    finally:
        kill_session(proc.pid)
    text = log.read_text()
    assert "interrupted: committed work is kept; rerun the same command to resume" in text
    assert "Traceback" not in text
    assert not (out / "lease.json").exists()
    status = run_command([PYTHON, "jobs/status.py", str(out)], check=False)
    assert status.returncode == 1 and "0 running" in status.stdout


def test_a_run_whose_lease_is_taken_over_exits_3_and_stops_its_ray(tmp_path):
    """Another run takes the output over (`--break-lease`) while this one generates: the driver
    says so, exits 3, stops long before the end, leaves no process of its session behind, and
    does not touch the new holder's lease."""
    from jobs.lease import OutputLease, read_lease
    from jobs.storage import open_storage

    from conftest import kill_session

    manifest = write_manifest(tmp_path / "m.parquet", small_rows(80), manifest_schema())
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "job.yaml", spec_dict(str(manifest), str(out), execution={"shard_size": 1}))
    log = tmp_path / "run.log"
    proc = _start_run(spec, log, {"SDGEN_LEASE_TTL": "4"})  # renewed every second
    try:
        _wait_for_line(log, " done: ")
        other = OutputLease.acquire(str(out), break_lease=True, log=lambda s: None)
        assert proc.wait(timeout=60) == 3, log.read_text()
        _assert_session_gone(proc.pid)
    finally:
        kill_session(proc.pid)
    text = log.read_text()
    assert "was taken over" in text and "Traceback" not in text, text
    assert read_lease(open_storage(str(out))).token == other.info.token
    assert not (out / "summary.json").exists()
    assert len(Output(str(out)).committed_shards()) < 80  # stopped long before the end (80 shards of ~0.1 s)
    other.release()


def test_an_interrupted_command_says_only_what_holds_for_it(capsys):
    """`run` and `export` resume when rerun; `status` or `reproduce` have nothing to resume."""
    from jobs.exit_codes import RESUMABLE, guarded

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert guarded(interrupted, debug=False) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert guarded(interrupted, debug=False, on_interrupt=RESUMABLE) == 130
    assert capsys.readouterr().err == f"interrupted: {RESUMABLE}\n"


def test_a_command_run_in_process_leaves_ctrl_c_as_it_found_it():
    """`guarded` ignores a second Ctrl-C while its cleanup runs; afterwards, a caller in the
    same process (a test, a notebook) gets its own handlers back: Ctrl-C interrupts it again."""
    import signal

    from jobs.exit_codes import guarded

    def interrupted_twice() -> int:
        os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt; later ones ignored while it unwinds
        time.sleep(1)
        return 0

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert guarded(interrupted_twice, debug=False) == 130
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
