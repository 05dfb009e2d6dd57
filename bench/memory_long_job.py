#!/usr/bin/env python
"""Memory of the driver and of a worker over a long job of tiny rows (issue 10, item 5).

Runs `jobs/run.py` on a manifest of N tiny rows (builtin:tiny, 32x32, 1 DDIM step, one worker,
small shards so the driver's event loop turns many times) and samples the resident set size of
the driver and of every other process of its session (the embedded Ray: raylet, GCS, the worker
actor) from /proc once a second. Writes the samples' summary (start / middle / end RSS of the
driver and of the largest worker) to bench/MEMORY.md.

    .venv/bin/python bench/memory_long_job.py [ROWS]      # default 3000
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parent.parent


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def session_procs(sid: int) -> dict[int, str]:
    procs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[3]) == sid:
            procs[int(entry.name)] = cmd
    return procs


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    tmp = Path(tempfile.mkdtemp(prefix="sdgen-mem-"))
    table = pa.table(
        {"id": [f"r{i:06d}" for i in range(rows)], "prompt": [f"shape {i}" for i in range(rows)],
         "seed": pa.array(range(rows), pa.int64())}
    )  # fmt: skip
    pq.write_table(table, tmp / "m.parquet")
    spec = {
        "manifest": str(tmp / "m.parquet"),
        "output": str(tmp / "out"),
        "model": {"weights": "builtin:tiny", "dtype": "float32"},
        "sampler": {"name": "ddim", "steps": 1, "guidance_scale": 1.0, "width": 32, "height": 32},
        "execution": {"workers": 1, "batch_size": 16, "shard_size": 50, "cpu_threads": 1},
    }
    (tmp / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "jobs/run.py", str(tmp / "job.yaml"), "--progress-every", "30"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    samples = []  # (t, driver kB, largest worker kB, done shards)
    started = time.monotonic()
    while proc.poll() is None:
        procs = session_procs(proc.pid)
        workers = [rss_kb(p) for p, cmd in procs.items() if "_WorkerActor" in cmd or "ray::" in cmd]
        done = len(list((tmp / "out" / "records").glob("*.parquet"))) if (tmp / "out" / "records").exists() else 0
        samples.append((time.monotonic() - started, rss_kb(proc.pid), max(workers or [0]), done))
        time.sleep(1.0)
    out = proc.stdout.read()
    tail = [line for line in out.splitlines() if "complete" in line or "INCOMPLETE" in line]
    busy = [s for s in samples if s[2] > 0 and s[3] > 0]
    if len(busy) < 3:
        print(out)
        raise SystemExit("too few samples while shards were committing")
    first, middle, last = busy[0], busy[len(busy) // 2], busy[-1]
    lines = [
        "# Memory over a long job (bench/memory_long_job.py)",
        "",
        f"{rows} rows of builtin:tiny, 32x32, 1 DDIM step, 1 CPU worker, batch 16, shards of 50 "
        f"({rows // 50} shards); RSS sampled once a second from /proc. "
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| when | seconds | shards committed | driver RSS (MB) | worker RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for name, s in (("first shard", first), ("middle", middle), ("last sample", last)):
        lines.append(f"| {name} | {s[0]:.0f} | {s[3]} | {s[1] / 1024:.0f} | {s[2] / 1024:.0f} |")
    lines += [
        "",
        f"Driver growth first -> last: {(last[1] - first[1]) / 1024:+.1f} MB; "
        f"worker: {(last[2] - first[2]) / 1024:+.1f} MB.",
        "",
        "Job: " + (tail[-1] if tail else "(no summary line)"),
        "",
    ]
    (REPO / "bench" / "MEMORY.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
