"""End to end on a real Ray cluster: `ray start --head` on loopback, then
`ray job submit --working-dir . -- python jobs/run.py SPEC` — the way a user runs on a cluster."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from jobs.output import Output

from conftest import (
    PYTHON,
    REPO,
    free_port,
    init_image,
    kill_session,
    manifest_schema,
    run_command,
    small_rows,
    spec_dict,
    write_manifest,
    write_spec,
)

RAY = str(Path(PYTHON).parent / "ray")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A one-node cluster of its own: own ports, own temp dir, own auth token. Torn down by
    killing the processes of the session it was started in (never `ray stop`, which would stop
    every Ray on the machine)."""
    import subprocess

    temp = Path(f"/tmp/sdgen-ray-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths have a length limit
    gcs, dashboard, agent, client = (free_port() for _ in range(4))
    env = {
        "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}",  # `python` in the entrypoint
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    from conftest import command_env

    proc = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}",
            f"--ray-client-server-port={client}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        cwd=REPO,
        env=command_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out, _ = proc.communicate(timeout=180)
    try:
        assert proc.returncode == 0, out
        yield f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", env
    finally:
        kill_session(proc.pid)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_the_job_on_the_cluster(ray_cluster, tmp_path):
    address, _, env = ray_cluster
    init_image(tmp_path / "data" / "init" / "a.png")
    manifest = write_manifest(tmp_path / "data" / "m.parquet", small_rows(4, img2img_every=2), manifest_schema())
    spec = write_spec(
        tmp_path / "job.yaml",
        spec_dict(str(manifest), str(tmp_path / "out"), execution={"workers": 1, "batch_size": 2, "shard_size": 2}),
    )
    result = run_command(
        [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python", "jobs/run.py", str(spec)],
        env=env,
        timeout=400,
    )
    assert "succeeded" in result.stdout, result.stdout
    assert "complete: 4 ok, 0 error, 0 missing of 4 rows" in result.stdout
    assert "running on the Ray cluster at" in result.stdout  # RAY_ADDRESS from `ray job submit`, not embedded

    output = Output(str(tmp_path / "out"))
    assert output.committed_shards() == {"shard-00000", "shard-00001"}
    records = [r for t in output.read_all_records(output.committed_shards()).values() for r in t.to_pylist()]
    assert sorted(r["row"] for r in records) == [0, 1, 2, 3]
    assert all(r["status"] == "ok" and (tmp_path / "out" / r["image_path"]).exists() for r in records)
    assert output.read_job()["model"]["niceness"] == os.nice(0)  # Ray's 15 is not added on a cluster either
    assert "note: the worker runs at niceness" not in result.stdout


def test_ray_address_from_the_environment_is_used(ray_cluster, tmp_path):
    """`RAY_ADDRESS=... python jobs/run.py` (no job submission, no working dir): the driver joins
    the cluster and ships `jobs` and `sdcore` to the actors as py_modules. The driver's
    environment asks for workers at niceness 3: they run so, and the run says what it costs."""
    _, gcs_address, env = ray_cluster
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(2), manifest_schema())
    spec = write_spec(tmp_path / "job.yaml", spec_dict(str(manifest), str(tmp_path / "out")))
    result = run_command(
        [PYTHON, str(REPO / "jobs" / "run.py"), str(spec)],
        env={**env, "RAY_ADDRESS": gcs_address, "RAY_worker_niceness": "3"},
        cwd=tmp_path,
        timeout=300,
    )
    assert f"running on the Ray cluster at {gcs_address}" in result.stdout
    assert "complete: 2 ok, 0 error, 0 missing of 2 rows" in result.stdout
    niceness = os.nice(0) + 3
    assert Output(str(tmp_path / "out")).read_job()["model"]["niceness"] == niceness
    assert f"[sdgen] note: the worker runs at niceness {niceness}: where its threads take every core" in result.stdout


def test_relative_paths_under_ray_job_submit_are_refused_before_any_work(ray_cluster, tmp_path):
    """`ray job submit --working-dir .` runs the driver in Ray's temporary copy of the working
    dir: a relative output there would vanish with the copy, so the job is refused and says what
    to write instead; `--base-dir "$PWD"` makes the same spec mean this checkout."""
    address, _, env = ray_cluster
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(2), manifest_schema())
    spec = write_spec(tmp_path / "job.yaml", spec_dict(str(manifest), "outputs/sdgen-test-relative"))
    submit = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python", "jobs/run.py"]
    result = run_command([*submit, str(spec)], env=env, timeout=300, check=False)
    assert result.returncode == 1, result.stdout  # the job failed (run.py exit 2: refused)
    assert "output: 'outputs/sdgen-test-relative' resolves inside Ray's temporary copy" in result.stdout
    assert "s3://bucket/prefix" in result.stdout and "--base-dir" in result.stdout
    assert "starting" not in result.stdout  # refused before any worker started

    base = tmp_path / "checkout"
    result = run_command([*submit, str(spec), "--base-dir", str(base)], env=env, timeout=300)
    assert "complete: 2 ok, 0 error, 0 missing of 2 rows" in result.stdout
    assert Output(str(base / "outputs" / "sdgen-test-relative")).committed_shards() == {"shard-00000"}
