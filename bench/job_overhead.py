"""Where a job's images go on a host whose cores all compute: the job's worker without Ray, and Ray
without the job, each against the bare pipeline, in turns.

Three things run at once and take turns shard by shard (order rotating), so each round sees the
same host:

- `bare`: a plain process holding the bare pipeline (`Pipeline.generate`, fixed-shape), as the
  bare side of `side_by_side.py` and `worker_paired.py`;
- `worker`: a plain process holding the job's `jobs.worker.ShardWorker`, running the next shard of
  a generated txt2img manifest into a local output: every row checked, its record built, its
  image encoded and committed, a saved batch per batch, the shard's record file — the job's whole
  per-row machinery, without Ray;
- an embedded Ray node (GCS, raylet, agents, a driver and one idle actor, as a job's would be)
  started beside them: stopped (SIGSTOP) during the turns above, running during a third turn,
  `bare beside Ray`, in which the bare process runs again.

It prints each round and appends worker/bare and (bare beside Ray)/bare, medians over the
rounds, to bench/RESULTS.md. Together they split the gap that `side_by_side.py` reads between
the whole job and the bare pipeline: the job's own bookkeeping and the Ray node it runs on. (The
driver's share, the rest, is what `ray_background.py` looks at.)

    .venv/bin/python bench/job_overhead.py --case shapes --rounds 10
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import side_by_side as sbs  # noqa: E402 - needs the path above
from ray_background import descendants  # noqa: E402
from worker_paired import job_worker  # noqa: E402

# The Ray node: an embedded cluster and one idle actor holding the cores a job's worker would.
RAY_NODE = """
import os, sys, ray
ray.init(address="local", num_cpus={threads}, include_dashboard=False)
@ray.remote(num_cpus={threads})
class Idle:
    def pid(self):
        return os.getpid()
ray.get(Idle.remote().pid.remote())
print("ready", flush=True)
sys.stdin.read()  # until the bench closes stdin
ray.shutdown()
"""


def worker_server(spec_path: str, threads: int) -> None:
    """`--worker-server`: load the job's ShardWorker, then run the manifest's next shard per line
    read from stdin, printing each shard's rows/s."""
    worker, tasks = job_worker(spec_path, threads)
    print("ready", flush=True)
    for _ in sys.stdin:
        task = tasks.pop(0)
        start = time.perf_counter()
        worker.run(task)
        print(task.num_rows / (time.perf_counter() - start), flush=True)


class Server:
    """A loaded process that runs one shard per line written to it and prints its rate."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None):
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{command[-1]}: did not start")

    def shard(self) -> float:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="shapes", choices=["tiny", "shapes"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    parser.add_argument("--worker-server", help=argparse.SUPPRESS)  # internal: the worker side
    args = parser.parse_args()
    if args.worker_server:
        return worker_server(args.worker_server, args.threads)

    case = sbs.FULL[args.case]
    rows = (args.rounds + 1) * case.shard_size  # one warm-up shard
    spec = sbs.write_job(
        Path(tempfile.mkdtemp(prefix="job-overhead-")),
        dataclasses.replace(case, job_rows=rows),
        f"builtin:{args.case}",
        rows,
        False,
        args.threads,
    )
    python, here, threads = sys.executable, str(Path(__file__).resolve()), str(args.threads)
    bare_script = str(REPO / "bench" / "worker_paired.py")
    bare = Server([python, bare_script, "--bare-server", "--case", args.case, "--threads", threads])
    worker = Server([python, here, "--worker-server", str(spec), "--threads", threads])
    node = Server(
        [python, "-c", RAY_NODE.format(threads=args.threads)],
        env={**os.environ, "RAY_worker_niceness": "0", "PYTHONPATH": str(REPO)},  # as sdgen starts workers
    )
    node_pids = [node.process.pid, *descendants(node.process.pid)]  # its keys: the pids

    def ray_running(running: bool) -> None:
        for pid in node_pids:
            try:
                os.kill(pid, signal.SIGCONT if running else signal.SIGSTOP)
            except ProcessLookupError:
                pass
        time.sleep(0.5)  # what a stopped node kept waiting runs outside the turns

    turns = {"bare": bare.shard, "worker": worker.shard, "bare beside Ray": bare.shard}
    ray_running(False)
    bare.shard(), worker.shard()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in turns}
    try:
        for round_ in range(args.rounds):
            names = list(turns)
            names = names[round_ % 3 :] + names[: round_ % 3]
            for name in names:
                ray_running(name == "bare beside Ray")
                rates[name].append(turns[name]())
                ray_running(False)
            print(
                f"round {round_ + 1}: " + ", ".join(f"{name} {rates[name][-1]:.2f}" for name in turns),
                flush=True,
            )
    finally:
        ray_running(True)
        for server in (bare, worker, node):
            server.close()

    worker_ratio = [w / b for w, b in zip(rates["worker"], rates["bare"])]
    ray_ratio = [r / b for r, b in zip(rates["bare beside Ray"], rates["bare"])]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = (
        f"\n## {stamp} — the job's worker without Ray, and Ray without the job (`bench/job_overhead.py`), "
        f"commit {sbs.git_commit()}\n\n"
        f"{sbs.cpu_model()}, {args.threads} thread(s), builtin:{args.case}, {case.size}x{case.size}, "
        f"batch {case.batch}, DDIM {case.steps}, shards of {case.shard_size}; {args.rounds} rounds, each one "
        "shard of: the bare pipeline, the job's ShardWorker in a plain process (local output), and the bare "
        "pipeline again with an idle embedded Ray node running (stopped in the other turns).\n\n"
        + "".join(
            f"{name}, rows/s: {', '.join(f'{r:.2f}' for r in rates[name])}; "
            f"median {statistics.median(rates[name]):.3f}.\n\n"
            for name in turns
        )
        + f"**Worker / bare: median {statistics.median(worker_ratio):.3f}x** "
        f"({', '.join(f'{r:.3f}' for r in worker_ratio)}).\n\n"
        f"**Bare beside Ray / bare: median {statistics.median(ray_ratio):.3f}x** "
        f"({', '.join(f'{r:.3f}' for r in ray_ratio)}).\n"
    )
    print(entry)
    with open(args.out, "a") as handle:
        handle.write(entry)


if __name__ == "__main__":
    main()
