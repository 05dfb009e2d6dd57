"""jobs/report.py at scale: page navigation over thousands of pages, the fixed-size time histogram,
and memory that stays flat as the output grows (a report built over real record files and
thumbnail files, in a fresh process whose peak RSS is measured). The report of a real run,
rendered in Chromium, its pages, links and incremental thumbnails: tests/test_jobs_datasets.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import deque
from datetime import datetime, timedelta, timezone

import pytest
from PIL import Image

from jobs.output import Output
from jobs.reader import shard_id
from jobs.report import TimeHistogram, build_report, nav_pages, throughput_svg, thumb_key

from conftest import REPO

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


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


def small_output(root, rows, shard_of=lambda row: "shard-00000", shard_size=None) -> Output:
    """A real output of ok rows with real PNG images: each row a dict of record fields over
    these defaults, in the shards `shard_of` names."""
    output = Output(str(root))
    size = shard_size or len(rows)
    output.write_job({"name": "small", "manifest": {"rows": len(rows)}, "shards": {"size": size}, "model": {}})
    shards: dict[str, list] = {}
    for row, values in enumerate(rows):
        shard = shard_of(row)
        path = f"images/{shard}/{row}.png"
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (row * 40 % 256, 0, 0)).save(buffer, format="PNG")
        output.storage.write(path, buffer.getvalue())
        record = {
            "row": row, "id": f"r{row}", "shard": shard, "status": "ok", "prompt": f"prompt {row}", "negative": "",
            "seed": row, "mode": "txt2img", "sampler": "ddim", "karras": False, "steps": 2, "guidance_scale": 5.0,
            "width": 8, "height": 8, "image_path": path, "image_sha256": f"{row:064x}",
            "started_at": T0 + timedelta(seconds=row),
        }  # fmt: skip
        shards.setdefault(shard, []).append(record | values)
    for shard, records in shards.items():
        output.commit_records(shard, records)
    return output


def test_a_missing_image_is_marked_in_the_sheet_not_a_failed_report(tmp_path):
    small_output(tmp_path, [{}, {}, {}])
    (tmp_path / "images" / "shard-00000" / "1.png").unlink()
    result = build_report(str(tmp_path), log=lambda line: None)
    assert result["missing"] == 1 and result["thumbnails_made"] == 2 and result["images"] == 3
    page = (tmp_path / "index.html").read_text()
    assert '<p class="missing-note">1 ok row(s) with image missing (row 1): marked “image missing”' in page
    sheet = page.split('<div class="sheet">')[1]
    assert sheet.count("<img ") == 2 and sheet.count('<div class="missing" title="id r1 (row 1,') == 1
    assert "image missing<br>row 1</div>" in sheet and 'href="images/shard-00000/1.png"' not in sheet


def test_hover_shows_nested_labels_as_json(tmp_path):
    small_output(tmp_path, [{"labels": json.dumps({"box": {"a": 1}, "none": None, "ok": True, "name": "ü"})}])
    build_report(str(tmp_path), log=lambda line: None)
    page = (tmp_path / "index.html").read_text()
    assert "labels: box={&quot;a&quot;: 1}, none=null, ok=true, name=ü" in page


def test_mean_rate_leaves_out_the_time_between_runs(tmp_path):
    """A job resumed 8 minutes later: the reused rows keep their first run's start times."""
    first = [{"worker": "host:11@ip", "time_generate_s": 1.0} for _ in range(4)]  # rows 0-3 at 0-3 s, ends 4 s
    resumed = [{"worker": "host:22@ip", "time_generate_s": 1.0, "started_at": T0 + timedelta(seconds=480 + i)}
               for i in range(4)]  # fmt: skip
    small_output(tmp_path, first + resumed)
    build_report(str(tmp_path), log=lambda line: None)
    page = (tmp_path / "index.html").read_text()
    assert "8 rows over 483s, 8s of it running (the time between runs left out): mean 1.00 rows/s" in page


def test_the_peak_rate_is_over_a_bucket_of_at_least_a_second():
    """A batch starts its rows within a few ms: a 6-row job showed a peak of 351 rows/s."""
    svg = throughput_svg([T0 + timedelta(milliseconds=i) for i in range(6)])
    assert "6 rows over 0s: mean 6.00 rows/s, peak 6.00 rows/s (bucket 1.0s)" in svg and svg.count("<rect") == 1
    svg = throughput_svg([T0 + timedelta(seconds=i / 2) for i in range(20)])  # 9.5 s: ten 1 s buckets
    assert "peak 2.00 rows/s (bucket 1.0s)" in svg and svg.count("<rect") == 10


def test_the_sheet_is_in_shard_order_past_99999_shards(tmp_path):
    """`shard-100000` sorts between `shard-10000` and `shard-10001` as text."""
    rows = [{"row": r, "shard": shard_id(r)} for r in (10000, 10001, 100000)]
    output = small_output(tmp_path, rows, shard_of=lambda i: shard_id((10000, 10001, 100000)[i]), shard_size=1)
    output.write_job({**output.read_job(), "manifest": {"rows": 100_001}})
    build_report(str(tmp_path), log=lambda line: None)
    sheet = (tmp_path / "index.html").read_text().split('<div class="sheet">')[1]
    assert sheet.index("row 10000,") < sheet.index("row 10001,") < sheet.index("row 100000,")
