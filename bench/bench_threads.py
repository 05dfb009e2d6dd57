"""CPU thread count vs speed on this machine, as it is (busy or not): the README's advice.

    .venv/bin/python bench/bench_threads.py [THREADS ...]    (default: 1 and os.cpu_count())

Each count runs in its own process (torch.set_num_threads before any work): builtin:shapes,
4 images of 64x64, DDIM 20 steps, guidance 5; the time of the second of two identical calls is
taken (the first warms up). The load average at the start is recorded with the result, appended
to bench/THREADS_RESULTS.md.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "THREADS_RESULTS.md"
CODE = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
import sdcore
pipe = sdcore.load_pipeline("builtin:shapes")
prompt = "a large red circle in the center on a white background"
requests = [sdcore.GenerationRequest(prompt, seed=i) for i in range(4)]
for _ in range(2):
    t0 = time.perf_counter()
    pipe.generate(requests, sampler="ddim", steps=20, guidance_scale=5.0, width=64, height=64)
    seconds = time.perf_counter() - t0
print("seconds", seconds)
"""


def run(threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", CODE, str(threads)], capture_output=True, text=True, check=True)
    return float(out.stdout.split("seconds")[1])


def main(counts: list[int]) -> None:
    load = os.getloadavg()
    times = {n: run(n) for n in counts}
    best = min(times.values())
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## {stamp} — {platform.machine()}, {os.cpu_count()} CPU cores, load average {load[0]:.1f} "
        f"(1 min) at the start\n",
        "| torch threads | seconds (4 images) | images/s | vs fastest |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {t:.2f} | {4 / t:.2f} | {t / best:.1f}x |" for n, t in times.items()]
    text = "\n".join(lines) + "\n"
    if not RESULTS.exists():
        RESULTS.write_text("# CPU threads vs speed (bench/bench_threads.py)\n")
    with RESULTS.open("a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, os.cpu_count() or 1])
