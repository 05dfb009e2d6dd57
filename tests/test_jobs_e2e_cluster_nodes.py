"""Two Ray nodes on this machine, one lost mid-job (the normal case on spot GPUs).

A head (127.0.0.1) and a second node (127.0.0.2), each with its own ports and temp dir and one
CPU, so a job with two workers puts one on each. The job runs through `ray job submit` and reads
and writes S3 (moto's server on loopback), which both nodes share. Once the second node has
committed a shard it is killed (every process of its `ray start`, as when a spot instance goes),
and the job still completes: every row exactly once, the lost node's shard retried on the head.
The cluster's GCS checks node health every 0.5 s (Ray's `health_check_*` settings) so that the
loss is noticed in seconds rather than Ray's default half minute.
"""

from __future__ import annotations

import io
import re
import time
import uuid

import pytest

from conftest import RAY as RAY_CLI
from conftest import (
    S3_ENV,
    RayNode,
    manifest_schema,
    ray_node_env,
    run_command,
    small_rows,
    spec_dict,
    write_manifest,
    write_spec,
)

# Enough work that the head alone needs ~30 s: the second node's worker (a fresh process that
# imports torch and loads the model, ~8 s on a loaded 2-core host) must be ready while shards are
# still queued. At 10 steps the head did all 40 rows in ~8 s and the second node none.
ROWS = 40
STEPS = 40
FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


@pytest.fixture(scope="module")
def two_nodes(moto_endpoint):
    # Each node's own credentials chain is its environment here (the driver forwards only the
    # endpoint and region to the actors).
    env = ray_node_env(uuid.uuid4().hex, {**S3_ENV, "AWS_ENDPOINT_URL": moto_endpoint, **FAST_HEALTH_CHECKS})
    head = RayNode(env, args=("--num-cpus=1",))
    try:
        other = RayNode(env, head_address=head.gcs, ip="127.0.0.2", args=("--num-cpus=1",))
    except BaseException:
        head.stop()
        raise
    try:
        yield head, other, env
    finally:
        other.stop()
        head.stop()


def submit(head, env, spec, *, wait: bool, submission_id: str | None = None, timeout: float = 300):
    args = [RAY_CLI, "job", "submit", "--address", head.dashboard, "--working-dir", "."]
    if not wait:
        args += ["--no-wait", "--submission-id", submission_id]
    return run_command([*args, "--", "python", "jobs/run.py", str(spec)], env=env, timeout=timeout, check=False)


def test_a_local_output_is_refused_when_workers_run_on_other_nodes(two_nodes, tmp_path):
    head, _, env = two_nodes
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(2), manifest_schema())
    spec = write_spec(tmp_path / "job.yaml", spec_dict(str(manifest), str(tmp_path / "out")))
    result = submit(head, env, spec, wait=True)
    assert result.returncode == 1, result.stdout  # the job failed ...
    assert "is a local folder, and workers may run on 1 other node(s)" in result.stdout, result.stdout
    assert "execution.shared_output: true" in result.stdout
    assert not (tmp_path / "out").exists()  # ... before any work


def records_by_shard(client, bucket):
    import pyarrow.parquet as pq

    listing = client.list_objects_v2(Bucket=bucket, Prefix="out/records/").get("Contents", [])
    found = {}
    for item in listing:
        body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        found[item["Key"].rsplit("/", 1)[1].removesuffix(".parquet")] = pq.read_table(io.BytesIO(body)).to_pylist()
    return found


def test_a_node_lost_mid_job_costs_only_its_shard(two_nodes, s3, tmp_path):
    head, other, env = two_nodes
    bucket, client, _ = s3
    local = write_manifest(tmp_path / "m.parquet", small_rows(ROWS), manifest_schema())
    client.upload_file(str(local), bucket, "m.parquet")
    spec = write_spec(
        tmp_path / "job.yaml",
        spec_dict(
            f"s3://{bucket}/m.parquet",
            f"s3://{bucket}/out",
            sampler={"steps": STEPS, "width": 48, "height": 48},
            execution={"workers": 2, "batch_size": 2, "shard_size": 2, "max_attempts": 3},
        ),
    )
    job = f"sdgen-nodes-{uuid.uuid4().hex[:8]}"
    submitted = submit(head, env, spec, wait=False, submission_id=job)
    assert submitted.returncode == 0, submitted.stdout

    # Wait until the second node has committed a shard: it is then on its next one.
    deadline = time.monotonic() + 240
    while True:
        committed = records_by_shard(client, bucket)
        workers = {r["worker"] for rows in committed.values() for r in rows}
        if any(w.endswith("@127.0.0.2") for w in workers):
            break
        if time.monotonic() > deadline or len(committed) * 2 >= ROWS - 4:
            logs = run_command([RAY_CLI, "job", "logs", "--address", head.dashboard, job], env=env, check=False)
            raise AssertionError(
                f"the second node committed no shard in time (workers {workers}):\n{logs.stdout}\n"
                f"second node's logs:\n{other.log_tail()}"
            )
        time.sleep(0.2)
    before_loss = set(committed)
    other.stop()  # the node is gone: raylet, its workers, everything its `ray start` started

    logs = run_command(
        [RAY_CLI, "job", "logs", "--address", head.dashboard, "--follow", job], env=env, timeout=300, check=False
    ).stdout
    status = run_command([RAY_CLI, "job", "status", "--address", head.dashboard, job], env=env, check=False).stdout
    assert f"Job '{job}' succeeded" in status, f"{status}\n{logs}"
    assert f"complete: {ROWS} ok, 0 error, 0 missing of {ROWS} rows" in logs, logs

    records = records_by_shard(client, bucket)
    rows = sorted(r["row"] for shard in records.values() for r in shard)
    assert rows == list(range(ROWS)), rows  # every row exactly once
    assert all(r["status"] == "ok" for shard in records.values() for r in shard)
    # The shard the lost node was on: its attempt failed with the worker, and the head redid it.
    retried = [s for s in records if f"{s} attempt 1 failed (worker died" in logs]
    assert retried, logs
    # The head's one worker (its node IP is the machine's address as Ray sees it, not 127.0.0.1).
    (head_worker,) = {
        r["worker"] for shard in records.values() for r in shard if not r["worker"].endswith("@127.0.0.2")
    }
    lost = {r["worker"] for shard in records.values() for r in shard if r["worker"].endswith("@127.0.0.2")}
    for shard in retried:
        redone = records[shard]
        if re.search(
            rf"\[sdgen\] {shard} done: .*(kept from an earlier attempt|already committed by an earlier attempt)", logs
        ):
            # The race the loss can land in: the lost node had finished this shard's rows (saved,
            # or even committed) but died before its report reached the driver. The head's retry
            # kept them instead of generating them again; any row it did generate is its own.
            assert all(
                (r["worker"] == head_worker and r["attempt"] >= 2) or (r["worker"] in lost and r["attempt"] == 1)
                for r in redone
            ), redone
        else:
            assert shard not in before_loss
            assert all(r["worker"] == head_worker and r["attempt"] >= 2 for r in redone), redone
    nodes = {r["worker"].rsplit("@", 1)[1] for shard in records.values() for r in shard}
    assert len(nodes) == 2 and "127.0.0.2" in nodes  # both nodes did work before the loss
