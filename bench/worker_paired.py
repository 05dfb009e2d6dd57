"""The job's worker against the bare pipeline, in pairs: does the shard machinery cost throughput?

On a host whose speed moves 25-40% within minutes, a job timed in one minute and the bare
pipeline in another cannot show a gap under ~20%. Here both are loaded at once, in two
processes, and take turns shard by shard (order alternating), so each pair sees the same host:

- a Ray actor holding a `jobs.worker.ShardWorker` (the job's worker: row checks, init-image
  read-ahead, the NaN/Inf hooks, the writer, in-flight notes, checkpoints, the commit) runs the
  next shard of a generated txt2img manifest into a local output;
- a plain Python process holding the bare pipeline generates the same number of rows, fixed-shape.

It prints each pair's rows/s and appends the median ratio to bench/RESULTS.md. What it leaves out
of the whole job: the driver (its shard loop, the log), Ray's daemons' share of the cores (see
`ray_background.py`) and Ray's start. With `--load 6`, half the pairs run the worker's turn
beside a process busy 6% of one core, about what the driver side of a run took, to show what
such a load costs the worker.

    .venv/bin/python bench/worker_paired.py --case shapes --pairs 12 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import side_by_side as sbs  # noqa: E402 - needs the path above


def bare_server(case: sbs.Case, weights: str, threads: int) -> None:
    """`--bare-server`: load the bare pipeline, then generate one shard's rows, fixed-shape, per
    line read from stdin, printing each run's images/s."""
    from sdcore.weights import load_pipeline

    torch.set_num_threads(threads)
    pipe = load_pipeline(weights, dtype="float32")
    settings = dict(sampler="ddim", guidance_scale=sbs.GUIDANCE, width=case.size, height=case.size)
    done = 0
    print("ready", flush=True)
    for _ in sys.stdin:
        rows = [{"prompt": sbs.prompt(done + i), "seed": 5000 + done + i} for i in range(case.shard_size)]
        done += case.shard_size
        start = time.perf_counter()
        pipe.generate(rows, steps=case.steps, **settings, fixed_batch=case.batch)
        print(len(rows) / (time.perf_counter() - start), flush=True)


def job_worker(spec_path: str, threads: int) -> tuple[Any, list[Any]]:
    """The job's `ShardWorker` for the job spec at `spec_path` (CPU, `threads` torch threads) and
    its manifest's shards, in order."""
    from jobs.manifest import load_manifest
    from jobs.reader import read_shards
    from jobs.runner import worker_config
    from jobs.spec import load_spec
    from jobs.worker import ShardWorker

    spec = load_spec(spec_path)
    worker = ShardWorker(dataclasses.replace(worker_config(spec), threads=threads, device="cpu"))
    return worker, list(read_shards(load_manifest(spec.manifest), spec.execution.shard_size, skip=set()))


def busy(percent: float) -> None:
    """`--busy`: keep one core busy `percent` of the time, in 50 ms periods, as Ray's raylet,
    GCS, agents and the driver do during a job (~5% of one core together on this machine)."""
    spin = 0.05 * percent / 100
    while True:
        start = time.perf_counter()
        while time.perf_counter() - start < spin:
            pass
        time.sleep(0.05 - spin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="shapes", choices=["tiny", "shapes"])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--load",
        type=float,
        default=0.0,
        help="percent of one core kept busy beside every other pair of the worker's turns",
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    parser.add_argument("--bare-server", action="store_true", help=argparse.SUPPRESS)  # internal: the bare side
    parser.add_argument("--busy", type=float, help=argparse.SUPPRESS)  # internal: the --load process
    args = parser.parse_args()
    case = sbs.FULL[args.case]
    weights = f"builtin:{args.case}"
    if args.bare_server:
        return bare_server(case, weights, args.threads)
    if args.busy is not None:
        return busy(args.busy)
    work = Path(tempfile.mkdtemp(prefix="worker-paired-"))
    rows = (args.pairs + 1) * case.shard_size  # one warm-up shard
    spec_path = sbs.write_job(work, dataclasses.replace(case, job_rows=rows), weights, rows, False, args.threads)

    import ray

    bare = subprocess.Popen(
        [sys.executable, __file__, "--bare-server", "--case", args.case, "--threads", str(args.threads)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert bare.stdout.readline().strip() == "ready"

    ray.init(num_cpus=args.threads, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})

    @ray.remote(num_cpus=args.threads)
    class Worker:
        def __init__(self, spec_path: str, threads: int):
            self.worker, self.tasks = job_worker(spec_path, threads)

        def shard(self) -> float:
            task = self.tasks.pop(0)
            start = time.perf_counter()
            self.worker.run(task)
            return task.num_rows / (time.perf_counter() - start)

    def bare_shard() -> float:
        bare.stdin.write("go\n")
        bare.stdin.flush()
        return float(bare.stdout.readline())

    # The --load process starts once, stopped; it runs only during the worker's loaded turns.
    burner = None
    if args.load:
        burner = subprocess.Popen([sys.executable, __file__, "--busy", str(args.load)])
        time.sleep(10)  # past its imports
        burner.send_signal(signal.SIGSTOP)
    worker = Worker.remote(str(spec_path), args.threads)
    ray.get(worker.shard.remote())  # warm-up, both sides
    bare_shard()
    ratios, loaded = [], []
    for pair in range(args.pairs):
        # With --load: pairs 3-4, 7-8, ... run the job worker's turn beside a busy process.
        load = args.load and pair % 4 >= 2
        got = {}
        for side in ("job worker", "bare") if pair % 2 == 0 else ("bare", "job worker"):
            if side == "bare":
                got[side] = bare_shard()
                continue
            if load:
                burner.send_signal(signal.SIGCONT)
            got[side] = ray.get(worker.shard.remote())
            if load:
                burner.send_signal(signal.SIGSTOP)
        ratios.append(got["job worker"] / got["bare"])
        loaded.append(load)
        print(f"pair {pair + 1}: job worker {got['job worker']:.3f} rows/s, bare {got['bare']:.3f} img/s, "
              f"ratio {ratios[-1]:.3f}{' (busy process beside the worker)' if load else ''}", flush=True)  # fmt: skip
    bare.stdin.close()
    bare.wait()
    if burner is not None:
        burner.kill()
        burner.wait()
    ray.shutdown()

    plain = [r for r, w in zip(ratios, loaded) if not w]
    median = statistics.median(plain)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = (
        f"\n## {stamp} — job worker vs bare pipeline, in pairs (`bench/worker_paired.py`), "
        f"commit {sbs.git_commit()}\n\n"
        f"{sbs.cpu_model()}, {args.threads} thread(s), {weights}, {case.size}x{case.size}, batch {case.batch}, "
        f"DDIM {case.steps}, shards of {case.shard_size}. A Ray actor holding the job's `ShardWorker` (every "
        f"shard committed to a local output) and a plain process holding the bare fixed-shape pipeline take "
        f"turns, {args.pairs} pairs, order alternating.\n\n"
        f"Job worker / bare per pair: {', '.join(f'{r:.3f}' for r in plain)}. "
        f"**Median {median:.3f}x**, mean {statistics.mean(plain):.3f}x.\n"
    )
    if args.load:
        busy_ratios = [r for r, w in zip(ratios, loaded) if w]
        entry += (
            f"\nWith a process busy {args.load:g}% of one core beside the job worker's turns (as the driver side "
            f"of a run is): {', '.join(f'{r:.3f}' for r in busy_ratios)}; "
            f"**median {statistics.median(busy_ratios):.3f}x**.\n"
        )
    with open(args.out, "a") as handle:
        handle.write(entry)
    print(f"median job worker / bare: {median:.3f}x (appended to {args.out})")


if __name__ == "__main__":
    main()
