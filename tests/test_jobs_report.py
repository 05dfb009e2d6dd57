"""jobs/report.py at scale: page navigation over thousands of pages, the fixed-size time histogram,
and memory that stays flat as the output grows (a report built over real record files and
thumbnail files, in a fresh process whose peak RSS is measured). The report of a real run,
rendered in Chromium, its pages, links and incremental thumbnails: tests/test_jobs_datasets.py."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import deque
from datetime import datetime, timedelta, timezone

import pytest

from jobs.output import Output
from jobs.report import TimeHistogram, nav_pages, throughput_svg, thumb_key

from conftest import REPO


@pytest.mark.parametrize("pages", [1, 2, 15, 16, 137, 8334, 1_000_000])
def test_every_page_is_a_few_clicks_from_any_other(pages):
    def links(page):
        shown = nav_pages(page, pages)
        assert shown == sorted(set(shown)) and all(1 <= p <= pages for p in shown)
        assert {1, pages, page} <= set(shown) and len(shown) <= 40  # short, whatever the sheet
        return shown

    # Breadth-first from page 1: every page reached, none further than a handful of clicks.
    distance = {1: 0}
    queue = deque([1])
    while queue:
        page = queue.popleft()
        for target in links(page):
            if target not in distance:
                distance[target] = distance[page] + 1
                queue.append(target)
        if pages > 20_000 and len(distance) > 5000:
            break  # the million-page sheet: its reach is checked by sampling below
    if pages <= 20_000:
        assert len(distance) == pages and max(distance.values()) <= 12
    for page in (1, 2, pages // 3, pages // 2 + 7, pages - 1, pages):
        if 1 <= page <= pages:
            assert {max(1, page - 1), min(pages, page + 1)} <= set(links(page))  # previous, next


def test_time_histogram_is_fixed_size_and_keeps_the_counts():
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    times = TimeHistogram(max_bins=64)
    for i in range(10_000):
        times.add(start + timedelta(seconds=i * 60))  # a week of rows
    assert len(times.bins) <= 64 and times.count == 10_000 and sum(times.bins.values()) == 10_000
    svg = throughput_svg(times)
    assert "10000 rows over 599940s: mean 0.02 rows/s" in svg and svg.count("<rect") == 40
    assert throughput_svg([start]) == "<p>not enough rows for a plot</p>"


def fake_output(root, rows: int, shard_size: int = 500, error_every: int = 50) -> Output:
    """An output of `rows` records in shards (every `error_every`-th row an error), with each ok
    row's thumbnail file already there, so that building the report reads records and writes
    pages only: what is measured is the report's own memory."""
    output = Output(str(root))
    job = {"name": "big", "manifest": {"rows": rows}, "shards": {"size": shard_size}, "model": {"weights": "x"}}
    output.write_job(job)
    thumb = b"\xff\xd8 not decoded by the report \xff\xd9"
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for first in range(0, rows, shard_size):
        shard = f"shard-{first // shard_size:05d}"
        records = []
        for row in range(first, min(rows, first + shard_size)):
            ok = row % error_every != 7
            record = {
                "row": row, "id": f"row-{row:08d}", "shard": shard, "status": "ok" if ok else "error",
                "error": None if ok else f"init_image not found: init/{row}.png", "prompt": f"a prompt number {row}",
                "negative": "", "seed": row, "mode": "txt2img", "sampler": "ddim", "karras": False, "steps": 25,
                "guidance_scale": 7.5, "width": 512, "height": 512, "started_at": start + timedelta(seconds=row / 10),
                "labels": json.dumps({"colour": "red", "n": row}),
            }  # fmt: skip
            if ok:
                record.update(image_path=f"images/{shard}/row-{row:08d}.png", image_sha256=f"{row:064x}")
                path = root / thumb_key(record)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(thumb)
            records.append(record)
        output.commit_records(shard, records)
    return output


MEASURE = """
import json, resource, sys
from jobs.report import build_report
result = build_report(sys.argv[1], log=lambda line: None)
print(json.dumps({**result, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def measure(root) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(root)], cwd=REPO, capture_output=True, text=True, timeout=600, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_memory_stays_flat_as_the_output_grows(tmp_path):
    """2,000 and 20,000 rows (every ok row in the sheet, 120 a page): the peak RSS of a process
    building the report grows by less than 12 MB (measured: 2 MB; a report holding every row
    as a record, as this one did before, grew by 37 MB)."""
    small, large = tmp_path / "small", tmp_path / "large"
    fake_output(small, 2_000)
    fake_output(large, 20_000)
    measure(small)  # warm the page cache and Python's bytecode cache: both runs start alike
    one, ten = measure(small), measure(large)
    assert one["rows"] == 2_000 and ten["rows"] == 20_000 and ten["thumbnails_made"] == 0
    assert ten["images"] == 19_600 and ten["pages"] == 164  # 20,000 rows less 400 errors, 120 a page
    grown_mb = (ten["maxrss_kb"] - one["maxrss_kb"]) / 1024
    print(f"peak RSS {one['maxrss_kb'] // 1024} MB at 2,000 rows, {ten['maxrss_kb'] // 1024} MB at 20,000")
    assert grown_mb < 12, (one, ten)
    page = (large / "index.html").read_text()
    assert "400</td><td>init_image not found: …" in page and "20000 rows over 2000s: mean 10.00 rows/s" in page
    assert (large / "report-page-164.html").exists() and not (large / "report-page-165.html").exists()


def test_a_job_of_many_shards_lists_those_that_need_attention(tmp_path, monkeypatch):
    from jobs import report

    output = fake_output(tmp_path / "out", 3_000)  # 6 shards of 500
    job = output.read_job()
    output.write_job({**job, "manifest": {"rows": 5_000}})  # 4 shards more, not committed yet
    monkeypatch.setattr(report, "SHARD_TABLE_MAX", 5)
    report.build_report(str(tmp_path / "out"), log=lambda line: None)
    page = (tmp_path / "out" / "index.html").read_text()
    table = page.split("<h2>Shards</h2>")[1].split("</table>")[0]
    assert [f"shard-{i:05d}" in table for i in range(10)] == [False] * 6 + [True] * 4
    assert "6 shard(s) not listed (6 done); <code>sdgen status OUTPUT --all</code> lists every shard" in page
    monkeypatch.setattr(report, "SHARD_TABLE_MAX", 10)
    report.build_report(str(tmp_path / "out"), log=lambda line: None)
    page = (tmp_path / "out" / "index.html").read_text()
    assert all(f"shard-{i:05d}" in page for i in range(10)) and "not listed" not in page
