"""A job driver for test_jobs_e2e_cluster_gpus.py: `python tests/cpu_model_driver.py SPEC MARKERS`.

It runs `jobs.runner.run_job` on the cluster named by RAY_ADDRESS, exactly as `jobs/run.py`
does, with one difference: this machine has no GPU (the test's cluster only advertises GPUs
with `ray start --num-gpus N`), so each worker, placed by the distributor on one GPU like on a
real GPU cluster, loads its model on the CPU. Before loading it writes MARKERS/load-PID.json:
the GPU ids Ray gave it, its CUDA_VISIBLE_DEVICES and the device it was placed for.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from jobs.runner import run_job
from jobs.worker import ShardWorker

MARKERS = Path(sys.argv[2]) if len(sys.argv) > 2 else None


def cpu_model_worker(config):
    """The job's worker (`ShardWorker`), its model on the CPU whatever it was placed for."""
    import ray

    marker = {
        "pid": os.getpid(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "placed_for": config.device,
    }
    (MARKERS / f"load-{os.getpid()}.json").write_text(json.dumps(marker))
    return ShardWorker(replace(config, device="cpu", threads=1))


if __name__ == "__main__":
    summary = run_job(sys.argv[1], worker_factory=cpu_model_worker, progress_every=5)
    sys.exit(0 if summary["complete"] else 1)
