"""What Ray's own processes cost a job's worker, measured inside one real job.

On a host whose cores all compute (2 torch threads on 2 cores here), every other process that
wakes up takes a core from one of the UNet's threads while the other waits for it. This runs the
`builtin:shapes` job of `side_by_side.py` (embedded Ray, one worker) and, in its steady state,
alternates windows in which Ray's daemons are stopped (SIGSTOP: GCS, raylet, the dashboard and
runtime-env agents, the autoscaler monitor, the API server, the log monitor, and sdgen's
watchdog) with windows in which they run, counting the images the worker commits in each. The
driver keeps running: the worker streams each shard's progress and result to it. Alternating
windows of a few seconds within one run keeps the host's drift out of the comparison.

A diagnostic only: a few seconds without its daemons does not hurt the run here, but no run
should ever be treated so.

    .venv/bin/python bench/ray_background.py --windows 40 --seconds 6
"""

from __future__ import annotations

import argparse
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


def daemons(driver: int, which: str) -> list[int]:
    """The driver's descendants but its workers: Ray's daemons and the watchdog (`all`), or only
    the Python ones of PYTHON_DAEMONS (`python`)."""
    table, found, stack = _children_table(), [], [driver]
    while stack:
        for child in table.get(stack.pop(), []):
            stack.append(child)
            try:
                with open(f"/proc/{child}/cmdline") as handle:
                    command = handle.read()
            except OSError:
                continue
            if (which == "all" and "_WorkerActor" not in command) or any(d in command for d in PYTHON_DAEMONS):
                found.append(child)
    return found


def images(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder / "out" / "images"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=40, help="windows, alternately running and stopped")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of a window")
    parser.add_argument(
        "--stop",
        choices=["all", "python"],
        default="all",
        help="all: every daemon and the watchdog; python: the autoscaler monitor, log monitor and API server only",
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = parser.parse_args()

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
    stopped_pids = daemons(run.pid, args.stop)
    print(f"{len(stopped_pids)} processes to stop: {stopped_pids}", flush=True)
    rates: dict[bool, list[float]] = {True: [], False: []}  # stopped? -> images/s per window
    try:
        for window in range(args.windows):
            stop = window % 2 == 1
            if stop:
                for pid in stopped_pids:
                    os.kill(pid, signal.SIGSTOP)
            count, start = images(folder), time.monotonic()
            time.sleep(args.seconds)
            rates[stop].append((images(folder) - count) / (time.monotonic() - start))
            if stop:
                for pid in stopped_pids:
                    os.kill(pid, signal.SIGCONT)
            time.sleep(1.0)  # whatever the daemons kept waiting happens outside the windows
            print(f"window {window + 1}: {'stopped' if stop else 'running'} {rates[stop][-1]:.2f} img/s", flush=True)
    finally:
        for pid in stopped_pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        run.send_signal(signal.SIGINT)  # the run shuts its Ray down and exits
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()

    running, stopped_rate = statistics.mean(rates[False]), statistics.mean(rates[True])
    stopped = {
        "all": "Ray's daemons and the watchdog",
        "python": "Ray's Python daemons (autoscaler monitor, log monitor, API server)",
    }[args.stop]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"\n## {when} — Ray's daemons stopped and running, inside one job (`bench/ray_background.py`), "
        f"commit {sbs.git_commit()}\n\n{sbs.cpu_model()}, 2 thread(s), {case.title}, {case.size}x{case.size}, "
        f"batch {case.batch}, DDIM {case.steps}, shards of {case.shard_size}; {args.windows} windows of "
        f"{args.seconds:g} s, alternately with {stopped} running and stopped "
        f"({len(stopped_pids)} processes; the driver and the worker always run).\n\n"
        f"Images/s, daemons running: {', '.join(f'{r:.2f}' for r in rates[False])}; mean {running:.3f}.\n\n"
        f"Images/s, daemons stopped: {', '.join(f'{r:.2f}' for r in rates[True])}; mean {stopped_rate:.3f}.\n\n"
        f"**Running / stopped: {running / stopped_rate:.3f}x** (a window counts whole batches of "
        f"{case.batch} images: single windows are coarse, the means are not).\n"
    )
    print(text)
    with open(args.out, "a") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
