"""One model per GPU, proven without a GPU: a local cluster that advertises GPUs as a resource
(`ray start --num-gpus 2` works on a CPU machine). `workers: auto` starts one worker per GPU,
each holding one GPU (its own CUDA_VISIBLE_DEVICES) and loading the model once; asking for more
workers than GPUs says so, and the job runs on the workers that start. The driver is
tests/cpu_model_driver.py: `run_job` as `jobs/run.py` calls it, with workers that load their
model on the CPU once placed (there is no CUDA here to load it on)."""

from __future__ import annotations

import json
import uuid

import pytest

from jobs.output import Output

from conftest import (
    PYTHON,
    REPO,
    RayNode,
    manifest_schema,
    ray_node_env,
    run_command,
    small_rows,
    spec_dict,
    write_manifest,
    write_spec,
)

GPUS = 2


@pytest.fixture(scope="module")
def gpu_cluster():
    env = ray_node_env(uuid.uuid4().hex)
    head = RayNode(env, args=(f"--num-gpus={GPUS}", f"--num-cpus={GPUS}"))
    try:
        yield head, env
    finally:
        head.stop()


def run_placed(gpu_cluster, tmp_path, workers):
    head, env = gpu_cluster
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(8), manifest_schema())
    spec = write_spec(
        tmp_path / "job.yaml",
        spec_dict(str(manifest), str(tmp_path / "out"), execution={"workers": workers, "shard_size": 2}),
    )
    markers = tmp_path / "loads"
    markers.mkdir()
    result = run_command(
        [PYTHON, str(REPO / "tests" / "cpu_model_driver.py"), str(spec), str(markers)],
        env={**env, "RAY_ADDRESS": head.gcs},
        timeout=300,
    )
    loads = [json.loads(p.read_text()) for p in sorted(markers.glob("load-*.json"))]
    output = Output(str(tmp_path / "out"))
    records = [r for t in output.read_all_records(output.committed_shards()).values() for r in t.to_pylist()]
    return result.stdout, loads, records


def check_one_model_per_gpu(out, loads, records):
    assert f"{GPUS} GPUs" in out, out  # the cluster, as the driver saw it
    assert "num_gpus=1" in out, out  # each worker asks Ray for one GPU
    assert "complete: 8 ok, 0 error, 0 missing of 8 rows" in out, out
    # GPU_COUNT workers loaded the model, once each, each on its own GPU
    assert len(loads) == GPUS, loads
    assert sorted(g for load in loads for g in load["gpu_ids"]) == [str(i) for i in range(GPUS)], loads
    assert sorted(load["cuda_visible_devices"] for load in loads) == [str(i) for i in range(GPUS)], loads
    assert {load["placed_for"] for load in loads} == {"cuda"}
    # every row exactly once; records name the worker and the GPU it held
    assert sorted(r["row"] for r in records) == list(range(8))
    by_worker = {r["worker"]: r["cuda_visible_devices"] for r in records}
    pids = {str(load["pid"]) for load in loads}
    assert all(worker.split("@")[0].split(":")[1] in pids for worker in by_worker), by_worker
    assert all(r["device"] == "cpu" for r in records)  # the model ran on the CPU (no CUDA here)
    for worker, visible in by_worker.items():
        pid = int(worker.split("@")[0].split(":")[1])
        assert visible == next(load["cuda_visible_devices"] for load in loads if load["pid"] == pid)


def test_workers_auto_starts_one_worker_per_gpu_each_holding_one(gpu_cluster, tmp_path):
    out, loads, records = run_placed(gpu_cluster, tmp_path, "auto")
    assert f"starting {GPUS} worker(s) on cuda" in out, out
    check_one_model_per_gpu(out, loads, records)


def test_more_workers_than_gpus_wait_and_the_job_runs_on_those_that_start(gpu_cluster, tmp_path):
    out, loads, records = run_placed(gpu_cluster, tmp_path, GPUS + 1)
    assert f"starting {GPUS + 1} worker(s) on cuda" in out, out
    assert f"{GPUS + 1} workers asked for, the cluster has {GPUS} GPU(s) now; 1 wait for a free GPU" in out, out
    check_one_model_per_gpu(out, loads, records)
