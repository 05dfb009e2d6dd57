"""What Ray's own processes cost a job's worker, measured inside one real job.

On a host whose cores all compute (2 torch threads on 2 cores here), every other process that
wakes up takes a core from one of the UNet's threads while the other waits for it. This runs the
`builtin:shapes` job of `side_by_side.py` (embedded Ray, one worker) and, in its steady state,
alternates windows in which Ray's daemons are stopped (SIGSTOP: GCS, raylet, the dashboard and
runtime-env agents, the autoscaler monitor, the API server, the log monitor, and sdgen's
watchdog) with windows in which they run, counting the images the worker commits in each. The
driver keeps running: the worker streams each shard's progress and result to it. Alternating
windows of a few seconds within one run keeps the host's drift out of the comparison.

With `--worker-niceness N`, the daemons always run and the alternate windows instead lower the
worker's priority to niceness N (Ray's own default for workers is 15; sdgen starts them at 0):
what Ray's daemons cost a worker that yields to them. With `--daemon-niceness N`, the alternate
windows instead lower the priority of the driver and of every daemon but the raylet (the workers
are its children: they would inherit it) to niceness N: what the worker would gain if a run
reniced them. Setting a process back to 0 after such a window needs root (CAP_SYS_NICE).

A diagnostic only: a few seconds without its daemons does not hurt the run here, but no run
should ever be treated so.

    .venv/bin/python bench/ray_background.py --windows 40 --seconds 6
    .venv/bin/python bench/ray_background.py --windows 30 --seconds 6 --worker-niceness 15
    .venv/bin/python bench/ray_background.py --windows 40 --seconds 6 --daemon-niceness 19
"""

from __future__ import annotations

import argparse
import contextlib
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


def _children_table() -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    stat = handle.read()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            table.setdefault(parent, []).append(int(entry))
    return table


# `--stop python`: the daemons a cluster started with `ray start --no-monitor
# --include-log-monitor=false` (and no API server) would not have
PYTHON_DAEMONS = ("autoscaler/_private/monitor.py", "_private/log_monitor.py", "dashboard/dashboard.py")
# `--stop unused`: those of them an embedded single-node run never uses (no autoscaling, no
# dashboard or job API); the log monitor carries the workers' output to the driver's
UNUSED_DAEMONS = ("autoscaler/_private/monitor.py", "dashboard/dashboard.py")


def descendants(driver: int) -> dict[int, str]:
    """pid -> command line of every live descendant of the driver."""
    table, found, stack = _children_table(), {}, [driver]
    while stack:
        for child in table.get(stack.pop(), []):
            stack.append(child)
            try:
                with open(f"/proc/{child}/cmdline") as handle:
                    found[child] = handle.read()
            except OSError:
                continue
    return found


def daemons(driver: int, which: str) -> list[int]:
    """The driver's descendants but its workers: Ray's daemons and the watchdog (`all`), or only
    the Python ones of PYTHON_DAEMONS (`python`) or UNUSED_DAEMONS (`unused`)."""
    named = UNUSED_DAEMONS if which == "unused" else PYTHON_DAEMONS
    return [
        pid
        for pid, command in descendants(driver).items()
        if (which == "all" and "_WorkerActor" not in command) or any(d in command for d in named)
    ]


def worker_of(driver: int) -> int:
    """The job's (only) worker process among the driver's descendants."""
    for pid, command in descendants(driver).items():
        if "_WorkerActor" in command:
            return pid
    raise RuntimeError("the job's worker process was not found")


def renice(pid: int, niceness: int) -> None:
    """Every thread of `pid` (Linux niceness is per thread)."""
    for thread in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(thread), niceness)


def set_policy(pid: int, policy: int, skip: frozenset[int] = frozenset()) -> None:
    """Every thread of `pid` but those in `skip` to scheduling `policy` (os.SCHED_*)."""
    for thread in os.listdir(f"/proc/{pid}/task"):
        if int(thread) not in skip:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.sched_setscheduler(int(thread), policy, os.sched_param(0))


def busiest_threads(pid: int, count: int) -> frozenset[int]:
    """The `count` threads of `pid` with the most CPU time so far: a busy worker's compute threads."""
    used = {}
    for thread in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{thread}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
            used[int(thread)] = int(fields[11]) + int(fields[12])  # utime + stime
    return frozenset(sorted(used, key=used.get, reverse=True)[:count])


def images(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder / "out" / "images"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=40, help="windows, alternately running and stopped")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of a window")
    parser.add_argument(
        "--stop",
        choices=["all", "python", "unused"],
        default="all",
        help="all: every daemon and the watchdog; python: the autoscaler monitor, log monitor and API server "
        "only; unused: the autoscaler monitor and API server only",
    )
    parser.add_argument(
        "--worker-niceness",
        type=int,
        default=None,
        help="instead of stopping daemons, run the worker at this niceness in alternate windows (needs root)",
    )
    parser.add_argument(
        "--daemon-niceness",
        type=int,
        default=None,
        help="instead, run the driver and every daemon but the raylet at this niceness in alternate windows "
        "(needs root)",
    )
    parser.add_argument(
        "--policy",
        choices=["batch", "idle"],
        default=None,
        help="instead, run every thread of Ray's daemons, the driver and the worker but its two compute "
        "threads under SCHED_BATCH or SCHED_IDLE in alternate windows",
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    experiments = [args.worker_niceness, args.daemon_niceness, args.policy]
    if sum(e is not None for e in experiments) > 1:
        parser.error("--worker-niceness, --daemon-niceness and --policy are three experiments: give one")

    case = sbs.FULL["shapes"]
    folder = Path(tempfile.mkdtemp(prefix="ray-background-"))
    rows = int(args.windows * (args.seconds + 1) * 12) + 4 * case.shard_size  # outlasts the windows
    spec = sbs.write_job(folder, case, f"builtin:{case.key}", rows, False, 2)
    run = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "run.py"), str(spec)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    shards_done = 0
    for line in run.stdout:  # the steady state: from the second shard on
        shards_done += "done:" in line
        if shards_done == 2:
            break
    niced = args.worker_niceness is not None
    daemons_niced = args.daemon_niceness is not None
    policy = {"batch": os.SCHED_BATCH, "idle": os.SCHED_IDLE}.get(args.policy)
    worker = worker_of(run.pid)
    base_niceness = os.getpriority(os.PRIO_PROCESS, worker)
    stopped_pids = [] if niced else daemons(run.pid, args.stop)
    compute = busiest_threads(worker, 2)
    if policy is not None:
        stopped_pids = [*daemons(run.pid, "all"), run.pid, worker]
    if daemons_niced:  # the raylet's children (workers) inherit its niceness: it keeps its own
        commands = descendants(run.pid)
        stopped_pids = [pid for pid in stopped_pids if "raylet/raylet" not in commands.get(pid, "")]
        stopped_pids.append(run.pid)
    print(
        f"worker {worker} at niceness {base_niceness}, compute threads {sorted(compute)}; "
        f"{len(stopped_pids)} processes to change",
        flush=True,
    )

    def change(on: bool) -> None:
        """The alternate windows' state: the daemons stopped or reniced, or the worker reniced."""
        if niced:
            renice(worker, args.worker_niceness if on else base_niceness)
            return
        if policy is not None:
            for pid in stopped_pids:
                with contextlib.suppress(FileNotFoundError):
                    set_policy(pid, policy if on else os.SCHED_OTHER, compute)
            return
        if daemons_niced:
            for pid in stopped_pids:
                with contextlib.suppress(FileNotFoundError):
                    renice(pid, args.daemon_niceness if on else base_niceness)
            return
        for pid in stopped_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP if on else signal.SIGCONT)

    rates: dict[bool, list[float]] = {True: [], False: []}  # changed? -> images/s per window
    try:
        for window in range(args.windows):
            changed = window % 2 == 1
            if changed:
                change(True)
            count, start = images(folder), time.monotonic()
            time.sleep(args.seconds)
            rates[changed].append((images(folder) - count) / (time.monotonic() - start))
            if changed:
                change(False)
            time.sleep(1.0)  # whatever the daemons kept waiting happens outside the windows
            stopping = not (niced or daemons_niced or policy is not None)
            label = ("stopped" if stopping else "changed") if changed else "as started"
            print(f"window {window + 1}: {label} {rates[changed][-1]:.2f} img/s", flush=True)
    finally:
        change(False)
        run.send_signal(signal.SIGINT)  # the run shuts its Ray down and exits
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()

    as_started, changed_rate = statistics.mean(rates[False]), statistics.mean(rates[True])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    setup = (
        f"commit {sbs.git_commit()}\n\n{sbs.cpu_model()}, 2 thread(s), {case.title}, {case.size}x{case.size}, "
        f"batch {case.batch}, DDIM {case.steps}, shards of {case.shard_size}; {args.windows} windows of "
        f"{args.seconds:g} s, "
    )
    if niced:
        title = "the worker at two priorities, inside one job"
        setup += (
            f"the worker alternately at niceness {base_niceness} (as started) and {args.worker_niceness}; "
            "Ray's daemons always run."
        )
        labels = (f"worker at niceness {base_niceness}", f"worker at niceness {args.worker_niceness}")
        ratio = f"At niceness {args.worker_niceness} / at {base_niceness}: {changed_rate / as_started:.3f}x"
    elif policy is not None:
        name = f"SCHED_{args.policy.upper()}"
        title = f"Ray's threads under {name}, inside one job"
        setup += (
            f"alternately with every thread of Ray's daemons, the driver and the worker but its two compute "
            f"threads ({len(stopped_pids)} processes) under SCHED_OTHER (as started) and {name}."
        )
        labels = ("SCHED_OTHER", name)
        ratio = f"{name} / SCHED_OTHER: {changed_rate / as_started:.3f}x"
    elif daemons_niced:
        title = "Ray's daemons at two priorities, inside one job"
        setup += (
            f"alternately with the driver and Ray's daemons but the raylet ({len(stopped_pids)} processes) at "
            f"niceness {base_niceness} (as started) and {args.daemon_niceness}; the worker at {base_niceness}."
        )
        labels = (f"daemons at niceness {base_niceness}", f"daemons at niceness {args.daemon_niceness}")
        ratio = f"Daemons at {args.daemon_niceness} / at {base_niceness}: {changed_rate / as_started:.3f}x"
    else:
        stopped = {
            "all": "Ray's daemons and the watchdog",
            "python": "Ray's Python daemons (autoscaler monitor, log monitor, API server)",
            "unused": "the daemons an embedded run does not use (autoscaler monitor, API server)",
        }[args.stop]
        title = "Ray's daemons stopped and running, inside one job"
        setup += (
            f"alternately with {stopped} running and stopped ({len(stopped_pids)} processes; the driver and "
            f"the worker (niceness {base_niceness}) always run)."
        )
        labels = ("daemons running", "daemons stopped")
        ratio = f"Running / stopped: {as_started / changed_rate:.3f}x"
    text = (
        f"\n## {when} — {title} (`bench/ray_background.py`), {setup}\n\n"
        f"Images/s, {labels[0]}: {', '.join(f'{r:.2f}' for r in rates[False])}; mean {as_started:.3f}.\n\n"
        f"Images/s, {labels[1]}: {', '.join(f'{r:.2f}' for r in rates[True])}; mean {changed_rate:.3f}.\n\n"
        f"**{ratio}** (a window counts whole batches of {case.batch} images: single windows are coarse, "
        "the means are not).\n"
    )
    print(text)
    with open(args.out, "a") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
