"""Memory and speed of `sdgen make-manifest` on large templates: peak RSS must stay flat as the
row count grows (rows are made lazily and written one row group at a time).

    .venv/bin/python bench/bench_make_manifest.py [ROWS ...]     (default: 10000 100000 1000000)

Each size runs in its own process (`jobs.templates.main`), so its peak RSS (VmHWM of the
child) is its own; the result is appended to bench/MANIFEST_RESULTS.md. The
figure `tests/test_jobs_templates.py` holds a 1M-row run to is BOUND_MB below.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "MANIFEST_RESULTS.md"
BOUND_MB = 400  # peak RSS allowed for a 1M-row template (measured ~ see MANIFEST_RESULTS.md)


def template(rows: int) -> dict:
    """A 4-variable template (10 x 10 x 10 colours/shapes/positions/sizes, a weighted style) with
    2 samplers x 2 seeds, repeated to reach `rows`."""
    per_repeat = 10 * 10 * 10 * 2 * 2
    return {
        "prompt": "a {size} {color} {shape} {position}, {style}",
        "negative": "blurry",
        "vars": {
            "color": [f"color{i}" for i in range(10)],
            "shape": [f"shape{i}" for i in range(10)],
            "position": [f"position{i}" for i in range(10)],
            "size": ["small"],
            "style": {"choices": ["photo", "drawing", "render"], "weights": [5, 3, 2]},
        },
        "settings": {"sampler": ["ddim", "euler_a"], "steps": 20},
        "seeds_per_prompt": 2,
        "repeat": max(1, rows // per_repeat),
        "columns": {"split": "train"},
        "id": "{color}-{shape}-{position}-{row}",
        "row_group_size": 65536,
    }


def measure(rows: int, folder: Path) -> dict:
    src = folder / f"t{rows}.yaml"
    src.write_text(yaml.safe_dump(template(rows)))
    out = folder / f"m{rows}.parquet"
    # VmHWM (peak RSS of this process image), not ru_maxrss: on Linux ru_maxrss survives exec, so
    # a child forked from a big parent (pytest with torch loaded) would report the parent's size.
    code = (
        "import sys; from jobs.templates import main; rc = main(sys.argv[1:]); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print('maxrss_kb', hwm); sys.exit(rc)"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, str(src), str(out)], cwd=REPO, capture_output=True, text=True, check=True
    )
    seconds = time.perf_counter() - started
    rss_kb = int(done.stdout.split("maxrss_kb")[1].split()[0])
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(out).metadata
    return {
        "rows": meta.num_rows,
        "row_groups": meta.num_row_groups,
        "seconds": seconds,
        "peak_rss_mb": rss_kb / 1024,
        "file_mb": out.stat().st_size / 2**20,
    }


def main(sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(n, Path(tmp)) for n in sizes]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## {stamp} — {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"pyarrow {__import__('pyarrow').__version__}; shared machine (other tests running)\n",
        "| rows | row groups | seconds | rows/s | peak RSS MB | file MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['rows']} | {r['row_groups']} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['file_mb']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    if not RESULTS.exists():
        RESULTS.write_text(
            "# make-manifest: memory and speed (bench/bench_make_manifest.py)\n\n"
            "Peak RSS is the whole process (Python, pyarrow, yaml); it stays flat from 10k to 1M rows because\n"
            "rows are made lazily and written one row group (65536 rows) at a time. The test\n"
            f"`test_million_row_template_streams_in_bounded_memory` holds a 1M-row run to {BOUND_MB} MB.\n"
        )
    with RESULTS.open("a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10000, 100000, 1000000])
