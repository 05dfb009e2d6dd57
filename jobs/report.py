"""`sdgen report OUTPUT`: the job's HTML report, `OUTPUT/index.html` (also rebuilt when a run ends).

Static files with relative links only, so the report works opened from a local folder and served
from the output's S3 prefix (objects are written with their Content-Type):

  index.html             counts, throughput over time (an inline SVG plot), per-shard status
                         (beyond SHARD_TABLE_MAX shards, those not done), the error table
                         grouped by reason, and page 1 of the contact sheet
  report-page-N.html     further pages of the contact sheet (`page_size` thumbnails each, every
                         ok row by default; `--max-images` keeps the first N)
  report-pages.html      every page of the sheet with the manifest rows it holds
  thumbs/SHARD/NAME-SHA.jpg   thumbnails (THUMB px; SHA: the image's sha256 prefix, so an
                         overwritten job never shows a stale thumbnail)

A million-row output is read as a stream: the committed shards' record files one after another
(a few read ahead), only the columns the report shows; memory holds one page of the sheet, a few
shards' records, the error reasons and a fixed-size time histogram, never all the rows. A rebuild
makes thumbnails only for rows that have none (one listing of `thumbs/SHARD/` per shard) and
deletes no thumbnail; pages left over from a longer earlier sheet are deleted. `index.html` is
written last, so it never links to a page not yet there.

Hovering a thumbnail shows its id, prompt, negative prompt, seed and settings; clicking opens the
full image. Reading only the output, it can be rebuilt at any time, also while a job runs. An ok
row whose image is not there when its thumbnail is made is an "image missing" cell in the sheet,
counted on index.html, not a failed report.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from PIL import Image

from .errors import error_reason
from .output import REPORT_FILE, REPORT_PAGES_FILE, THUMBS_DIR, Output, report_page_key
from .reader import shard_sort_key

THUMB = 128
PAGE_SIZE = 120
NAV_ALL = 15  # a sheet of up to this many pages lists them all in its navigation
SHARD_TABLE_MAX = 2000  # more shards than this: the table lists only those not done
MIN_BUCKET_S = 1.0  # the throughput plot's shortest bucket: a batch starts its rows within a few ms
RECORD_COLUMNS = [
    "row",
    "id",
    "shard",
    "status",
    "error",
    "prompt",
    "negative",
    "seed",
    "mode",
    "strength",
    "sampler",
    "karras",
    "steps",
    "guidance_scale",
    "width",
    "height",
    "image_path",
    "image_sha256",
    "started_at",
    "time_load_s",
    "time_generate_s",
    "time_write_s",
    "worker",
    "labels",
]

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: left; }
td.n, th.n { text-align: right; }
.counts span { display: inline-block; margin-right: 24px; font-size: 16px; }
.sheet { display: flex; flex-wrap: wrap; gap: 6px; }
.sheet a { display: block; width: %dpx; height: %dpx; }
.sheet img { width: %dpx; height: %dpx; object-fit: contain; background: #eee; image-rendering: pixelated; }
.sheet .missing { width: %dpx; height: %dpx; display: flex; align-items: center; justify-content: center;
  text-align: center; background: #fdd; color: #900; }
.pages a, .pages b, .pages span { margin-right: 8px; }
.scroll { max-height: 320px; overflow: auto; }
""" % ((THUMB,) * 6)


def _write(output: Output, key: str, data: bytes) -> None:
    """Commit one report file (on S3 with its Content-Type, `storage.content_type`, so a browser
    renders it)."""
    output.storage.write(key, data)


def thumb_key(record: dict[str, Any]) -> str:
    name = record["image_path"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return f"{THUMBS_DIR}/{record['shard']}/{name}-{record['image_sha256'][:10]}.jpg"


def make_thumbnail(data: bytes) -> bytes:
    """A JPEG at most THUMB px a side; small images are scaled up (nearest) so they can be seen."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = THUMB / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    buffer = io.BytesIO()
    image.resize(size, resample).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _text(value: Any) -> str:
    """A label's value as text: text as it is, anything else as JSON (`{"a": 1}`, `null`, `true`:
    as labels are written), not Python's repr."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _hover(record: dict[str, Any]) -> str:
    settings = f"{record['sampler']}{' karras' if record['karras'] else ''}, {record['steps']} steps, "
    settings += f"CFG {record['guidance_scale']}, {record['width']}x{record['height']}"
    lines = [f"id {record['id']} (row {record['row']}, {record['shard']})", record["prompt"] or ""]
    if record["negative"]:
        lines.append(f"negative: {record['negative']}")
    lines.append(f"seed {record['seed']} | {settings}")
    if record["mode"] == "img2img":
        lines.append(f"img2img, strength {record['strength']}")
    if record.get("labels"):
        lines.append("labels: " + ", ".join(f"{k}={_text(v)}" for k, v in json.loads(record["labels"]).items()))
    return "\n".join(lines)


def _seconds(when: datetime) -> float:
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


class ActiveTime:
    """How long the job's runs were busy, the mean rate's divisor: the union of every worker's
    span, from its first row's start to its last row's end. A worker is one process of one run
    (named host:pid@ip), so no span covers the idle time between a run and its resume, which
    rows' start times alone would count (a job resumed 8 minutes later showed 0.08 rows/s while
    it ran at 1.15). Memory: one span per worker process, whatever the number of rows."""

    def __init__(self) -> None:
        self.spans: dict[str | None, tuple[float, float]] = {}  # worker (None: not recorded) -> (start, end)

    def add(self, worker: str | None, started: datetime, seconds: float) -> None:
        start = _seconds(started)
        first, last = self.spans.get(worker, (start, start))
        self.spans[worker] = (min(first, start), max(last, start + seconds))

    def seconds(self) -> float:
        total, reached = 0.0, -math.inf
        for start, end in sorted(self.spans.values()):
            if end > reached:  # the part of this span no earlier one covered
                total, reached = total + end - max(start, reached), end
        return total


class TimeHistogram:
    """Counts of timestamps in bins of `resolution` seconds, at most `max_bins` of them: when a
    new bin would pass the limit, the bins are merged in pairs (the resolution doubles). Memory is
    fixed however many rows; a week-long job ends with bins of a few minutes, enough for a plot."""

    def __init__(self, max_bins: int = 4096, resolution: float = 1 / 1024):
        self.max_bins, self.resolution = max_bins, resolution
        self.bins: Counter[int] = Counter()
        self.count = 0
        self.start: float | None = None
        self.end: float | None = None

    def add(self, when: datetime) -> None:
        t = _seconds(when)
        self.count += 1
        self.start = t if self.start is None else min(self.start, t)
        self.end = t if self.end is None else max(self.end, t)
        self.bins[math.floor(t / self.resolution)] += 1
        while len(self.bins) > self.max_bins:
            merged: Counter[int] = Counter()
            for key, n in self.bins.items():
                merged[key // 2] += n
            self.bins, self.resolution = merged, self.resolution * 2


def throughput_svg(
    times: TimeHistogram | Iterable[datetime],
    buckets: int = 40,
    width: int = 720,
    height: int = 160,
    active: float | None = None,
) -> str:
    """Rows started per time bucket (at most `buckets`, each at least MIN_BUCKET_S long), as
    bars, with the rate of the busiest bucket and the mean rate over `active` seconds (the time
    runs were busy, ActiveTime; default: first to last start)."""
    if not isinstance(times, TimeHistogram):
        histogram_ = TimeHistogram()
        for t in times:
            histogram_.add(t)
        times = histogram_
    if times.count < 2 or times.start is None or times.end is None:
        return "<p>not enough rows for a plot</p>"
    start, end = times.start, times.end
    span = end - start
    # A bucket of a few ms made a 6-row batch a peak of 351 rows/s: buckets are at least 1 s.
    buckets = max(1, min(buckets, math.ceil(span / MIN_BUCKET_S)))
    step = max(span / buckets, MIN_BUCKET_S)
    counts = [0] * buckets
    for key, n in times.bins.items():
        middle = min(max((key + 0.5) * times.resolution, start), end)
        counts[min(int((middle - start) / step), buckets - 1)] += n
    peak = max(counts)
    running = max(span if active is None else active, MIN_BUCKET_S)
    bar = width / buckets
    rects = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - 20 - c / peak * (height - 40):.1f}" width="{bar - 1:.1f}" '
        f'height="{c / peak * (height - 40):.1f}" fill="#777"><title>{c / step:.2f} rows/s</title></rect>'
        for i, c in enumerate(counts)
    )
    idle = f", {running:.0f}s of it running (the time between runs left out)" if running < span - step else ""
    label = (
        f"{times.count} rows over {span:.0f}s{idle}: mean {times.count / running:.2f} rows/s, "
        f"peak {peak / step:.2f} rows/s (bucket {step:.1f}s)"
    )
    first, last = (datetime.fromtimestamp(t, timezone.utc) for t in (start, end))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
        f'<text x="0" y="12" font-size="12">{html.escape(label)}</text>{rects}'
        f'<line x1="0" y1="{height - 20}" x2="{width}" y2="{height - 20}" stroke="#333"/>'
        f'<text x="0" y="{height - 4}" font-size="11">{first:%H:%M:%S}</text>'
        f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{last:%H:%M:%S} UTC</text></svg>'
    )


def nav_pages(page: int, pages: int) -> list[int]:
    """The pages page `page`'s navigation links to: all of them up to NAV_ALL pages; else the
    first and last, the 3 either side, and jumps of 10, 100, 1000, ... either way, so that any
    page of any sheet is a few clicks away (and report-pages.html lists every page)."""
    if pages <= NAV_ALL:
        return list(range(1, pages + 1))
    shown = {1, pages, *range(max(1, page - 3), min(pages, page + 3) + 1)}
    jump = 10
    while jump < pages:
        for target in (page - jump, page + jump, page // jump * jump, page // jump * jump + jump):
            if 1 <= target <= pages:
                shown.add(target)
        jump *= 10
    return sorted(shown)


def _pages_nav(page: int, pages: int) -> str:
    if pages <= 1:
        return ""
    links = []
    if page > 1:
        links.append(f'<a href="{report_page_key(page - 1)}" rel="prev">previous</a>')
    previous = 0
    for p in nav_pages(page, pages):
        if p > previous + 1:
            links.append("<span>…</span>")
        links.append(f"<b>{p}</b>" if p == page else f'<a href="{report_page_key(p)}">{p}</a>')
        previous = p
    if page < pages:
        links.append(f'<a href="{report_page_key(page + 1)}" rel="next">next</a>')
    links.append(f'<a href="{REPORT_PAGES_FILE}">all {pages} pages</a>')
    return '<p class="pages">pages: ' + " ".join(links) + "</p>"


def _sheet(records: list[dict[str, Any]]) -> str:
    cells = []
    for r in records:
        if r.get("image_missing"):  # no thumbnail and no link: there is no image to show
            cells.append(f'<div class="missing" title="{html.escape(_hover(r))}">image missing<br>row {r["row"]}</div>')
            continue
        cells.append(
            f'<a href="{html.escape(r["image_path"])}" title="{html.escape(_hover(r))}">'
            f'<img src="{html.escape(thumb_key(r))}" alt="{html.escape(str(r["id"]))}" loading="eager"></a>'
        )
    return '<div class="sheet">' + "".join(cells) + "</div>"


class _Sheet:
    """The contact sheet, written page by page as the ok rows stream by: pages 2.. as soon as
    they are full, page 1 (index.html, with the summary) kept for the end."""

    def __init__(self, output: Output, head: str, title: str, total: int, shown: int, page_size: int):
        self.output, self.head, self.title = output, head, title
        self.total, self.shown, self.page_size = total, shown, page_size
        self.pages = max(1, -(-shown // page_size))
        self.page, self.rows, self.first_page = 1, [], ""
        self.spans: list[tuple[int, int, int]] = []  # page, its first and last manifest row

    def add(self, record: dict[str, Any]) -> None:
        self.rows.append(record)
        if len(self.rows) == self.page_size:
            self.flush()

    def flush(self, force: bool = False) -> None:
        if not self.rows and self.page > 1 and not force:
            return
        start = (self.page - 1) * self.page_size
        capped = f" (the first {self.shown} in the sheet, --max-images)" if self.total > self.shown else ""
        body = (
            f"<h2 id=sheet>Images {start + 1 if self.rows else 0}–{start + len(self.rows)} of {self.total}{capped}</h2>"
            f"{_pages_nav(self.page, self.pages)}{_sheet(self.rows)}{_pages_nav(self.page, self.pages)}"
        )
        if self.rows:
            self.spans.append((self.page, self.rows[0]["row"], self.rows[-1]["row"]))
        if self.page == 1:
            self.first_page = body
        else:
            page = f'{self.title}<p><a href="{REPORT_FILE}">summary</a></p>{body}'
            _write(self.output, report_page_key(self.page), (self.head + page + "</body></html>\n").encode())
        self.page, self.rows = self.page + 1, []

    def index(self) -> str:
        """report-pages.html: every page with the manifest rows on it."""
        items = "".join(
            f'<li><a href="{report_page_key(page)}">page {page}</a>: rows {first}–{last}</li>'
            for page, first, last in self.spans
        )
        return f'{self.title}<p><a href="{REPORT_FILE}">summary</a></p><h2>All {self.pages} pages</h2><ul>{items}</ul>'


def build_report(
    uri: str,
    *,
    log: Callable[[str], None] = print,
    threads: int = 8,
    max_images: int | None = None,
    page_size: int = PAGE_SIZE,
) -> dict[str, Any]:
    """Write the report into the output; returns {"pages", "images", "thumbnails_made", "rows",
    "missing"} (missing: ok rows whose image was not there to make their thumbnail from).

    The contact sheet holds every ok row, or the first `max_images`."""
    from .status import job_status  # the same shard states and counts as `sdgen status`

    if page_size < 1:
        raise ValueError(f"--page-size: expected at least 1, got {page_size}")
    if max_images is not None and max_images < 0:
        raise ValueError(f"--max-images: expected 0 or more, got {max_images}")
    began = time.monotonic()
    output = Output(uri)
    status = job_status(uri)
    summary = output.read_summary()
    done = sorted((s["shard"] for s in status["shard_list"] if s["state"] == "done"), key=shard_sort_key)
    ok_total = sum(s["ok"] for s in status["shard_list"] if s["state"] == "done")
    shown = ok_total if max_images is None else min(ok_total, max_images)

    head = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>sdgen report: {html.escape(str(status["name"]))}'
        f"</title><style>{CSS}</style></head><body>"
    )
    title = f"<h1>sdgen job {html.escape(str(status['name']))}</h1><p>{html.escape(status['output'])} — " + (
        "complete" if status["complete"] else "incomplete (rerun the job to finish it)"
    )
    model = status["model"]
    title += (
        f"<br>model {html.escape(str(model.get('weights')))} fingerprint {str(model.get('fingerprint'))[:12]}, "
        f"{model.get('dtype')} on {model.get('device')}</p>"
    )

    sheet = _Sheet(output, head, title, ok_total, shown, page_size)
    times, active = TimeHistogram(), ActiveTime()
    reasons: Counter[str] = Counter()
    examples: dict[str, dict[str, Any]] = {}
    rows_read = made = in_sheet = 0
    missing, missing_rows = 0, []  # ok rows whose image is not there: how many, the first 20 (memory stays flat)

    def make(record: dict[str, Any]) -> bool:
        """Make the row's thumbnail; False when its image is missing (deleted since the run)."""
        try:
            data = output.storage.read(record["image_path"])
        except FileNotFoundError:
            return False
        _write(output, thumb_key(record), make_thumbnail(data))
        return True

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for shard, table in output.iter_records(done, RECORD_COLUMNS, threads):
            records = table.to_pylist()  # one shard's rows (sorted by row when committed)
            del table
            rows_read += len(records)
            page_rows = []
            for record in records:
                if record["started_at"] is not None:
                    times.add(record["started_at"])
                    took = (
                        (record["time_load_s"] or 0) + (record["time_generate_s"] or 0) + (record["time_write_s"] or 0)
                    )
                    active.add(record["worker"], record["started_at"], took)
                if record["status"] != "ok":
                    reason = error_reason(record["error"])
                    reasons[reason] += 1
                    examples.setdefault(reason, record)
                elif in_sheet < shown:
                    page_rows.append(record)
                    in_sheet += 1
            if not page_rows:
                continue
            existing = set(output.storage.list(f"{THUMBS_DIR}/{shard}/"))
            to_make = [r for r in page_rows if thumb_key(r) not in existing]
            for record, ok in zip(to_make, pool.map(make, to_make)):  # before the pages that show them are written
                made += ok
                if not ok:
                    record["image_missing"] = True
                    missing += 1
                    if len(missing_rows) < 20:
                        missing_rows.append(record["row"])
            for record in page_rows:
                sheet.add(record)
    sheet.flush()
    while sheet.page <= sheet.pages:  # fewer ok rows than counted (records changed meanwhile): no dead links
        sheet.flush(force=True)

    rows, shards = status["rows"], status["shards"]
    counts = (
        '<div class="counts">'
        f"<span>{rows['total']} rows</span><span>{rows['ok']} ok</span><span>{rows['error']} error</span>"
        f"<span>{rows['not_done']} not done</span><span>shards {shards['done']}/{shards['total']} done, "
        f"{shards['failed']} failed, {shards['pending'] + shards['running']} pending"
        + (f", {shards['damaged']} damaged (a rerun redoes them)" if shards["damaged"] else "")
        + "</span></div>"
    )
    run = summary.get("run") or {}
    if run:
        counts += f"<p>last run: {run.get('rows_run')} rows in {run.get('wall_s')}s, {run.get('rows_per_s')} rows/s</p>"
    if missing:
        rows_named = ", ".join(map(str, missing_rows)) + (", ..." if missing > len(missing_rows) else "")
        counts += (
            f'<p class="missing-note">{missing} ok row(s) with image missing (row {rows_named}): '
            "marked “image missing” in the sheet</p>"
        )
    plot = "<h2>Throughput</h2>" + throughput_svg(times, active=active.seconds() if active.spans else None)
    listed, note = status["shard_list"], ""
    if len(listed) > SHARD_TABLE_MAX:  # a job of 100,000 shards: the ones that need attention
        listed = [s for s in listed if s["state"] != "done"][:SHARD_TABLE_MAX]
        hidden = len(status["shard_list"]) - len(listed)
        note = (
            f"<p>{hidden} shard(s) not listed ({shards['done']} done); "
            "<code>sdgen status OUTPUT --all</code> lists every shard.</p>"
        )
    shard_rows = "".join(
        f"<tr><td>{s['shard']}</td><td>{s['state']}</td><td class=n>{s['rows']}</td><td class=n>{s.get('ok', '')}</td>"
        f"<td class=n>{s.get('error', '') if s['state'] == 'done' else ''}</td>"
        f"<td>{html.escape(str(s.get('error' if s['state'] == 'failed' else 'damaged', '')))}</td></tr>"
        for s in listed
    )
    shard_table = (
        '<h2>Shards</h2><div class="scroll"><table><tr><th>shard</th><th>state</th><th class=n>rows</th>'
        f"<th class=n>ok</th><th class=n>error</th><th>note</th></tr>{shard_rows}</table></div>{note}"
    )
    if reasons:
        error_table = "".join(
            f"<tr><td class=n>{count}</td><td>{html.escape(reason)}</td>"
            f"<td>row {examples[reason]['row']} ({html.escape(str(examples[reason]['id']))}): "
            f"{html.escape(str(examples[reason]['error']))}</td></tr>"
            for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
        )
        error_table = (
            "<h2>Errors by reason</h2><table><tr><th class=n>rows</th><th>reason</th><th>example</th></tr>"
            f"{error_table}</table>"
        )
    else:
        error_table = "<h2>Errors by reason</h2><p>no error rows</p>"

    if sheet.pages > 1:
        _write(output, REPORT_PAGES_FILE, (head + sheet.index() + "</body></html>\n").encode())
    else:
        output.storage.delete([REPORT_PAGES_FILE])  # an earlier, longer sheet's
    output.delete_report_pages(sheet.pages + 1)  # left over from a longer sheet
    body = title + counts + plot + shard_table + error_table + sheet.first_page
    _write(output, REPORT_FILE, (head + body + "</body></html>\n").encode())  # last: its links exist
    log(
        f"[sdgen] report {output.storage.url(REPORT_FILE)}: {shown} image(s) on {sheet.pages} page(s), "
        f"{made} new thumbnail(s)" + (f", {missing} image(s) missing" if missing else "")
        + f" in {time.monotonic() - began:.1f}s"
    )  # fmt: skip
    return {"pages": sheet.pages, "images": shown, "thumbnails_made": made, "rows": rows_read, "missing": missing}


def main(argv: list[str] | None = None, prog: str = "sdgen report") -> int:
    """Exit status: 0 written, 2 no sdgen output there (or bad options)."""
    from .exit_codes import TABLE

    parser = argparse.ArgumentParser(
        prog=prog,
        description="(Re)build OUTPUT/index.html, the job's HTML report.",
        epilog=TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("output", help="the job's output folder or s3:// prefix")
    parser.add_argument(
        "--max-images", type=int, metavar="N", help="only the first N ok rows in the contact sheet (default: all)"
    )
    parser.add_argument(
        "--page-size", type=int, default=PAGE_SIZE, metavar="N", help=f"thumbnails per page (default {PAGE_SIZE})"
    )
    args = parser.parse_args(argv)
    try:
        build_report(args.output, max_images=args.max_images, page_size=args.page_size)
    except (FileNotFoundError, OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "PAGE_SIZE",
    "REPORT_FILE",
    "TimeHistogram",
    "build_report",
    "make_thumbnail",
    "nav_pages",
    "thumb_key",
    "throughput_svg",
]


if __name__ == "__main__":
    import sys

    sys.exit(main())
