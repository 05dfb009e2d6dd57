"""`sdgen report OUTPUT`: the job's HTML report, `OUTPUT/index.html` (also rebuilt when a run ends).

Static files with relative links only, so the report works opened from a local folder and served
from the output's S3 prefix (objects are written with their Content-Type):

  index.html             counts, throughput over time (an inline SVG plot), per-shard status,
                         the error table grouped by reason, and page 1 of the contact sheet
  report-page-N.html     further pages of the contact sheet (PAGE_SIZE thumbnails each; the
                         first MAX_IMAGES ok rows, `--max-images` to change)
  thumbs/SHARD/NAME-SHA.jpg   thumbnails (THUMB px, made once; SHA: the image's sha256 prefix,
                         so an overwritten job never shows a stale thumbnail)

Hovering a thumbnail shows its id, prompt, negative prompt, seed and settings; clicking opens the
full image. Reading only the output, it can be rebuilt at any time, also while a job runs.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from PIL import Image

from .errors import error_rows, histogram
from .output import SUMMARY_FILE, Output
from .storage import S3Storage, _s3_error, s3_client

REPORT_FILE = "index.html"
THUMBS_DIR = "thumbs"
THUMB = 128
PAGE_SIZE = 120
MAX_IMAGES = 6000  # contact sheet: the first 50 pages (a million-row job is not read back whole)
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".jpg": "image/jpeg"}
RECORD_COLUMNS = [
    "row",
    "id",
    "shard",
    "status",
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
    "time_generate_s",
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
.pages a, .pages b { margin-right: 8px; }
.scroll { max-height: 320px; overflow: auto; }
""" % (THUMB, THUMB, THUMB, THUMB)


def _write(output: Output, key: str, data: bytes) -> None:
    """Commit one report file; on S3 with its Content-Type, so a browser renders it."""
    storage = output.storage
    if isinstance(storage, S3Storage):
        kind = CONTENT_TYPES.get(key[key.rfind(".") :], "application/octet-stream")
        from .faults import retrying

        def put() -> None:
            try:
                s3_client().put_object(Bucket=storage.bucket, Key=storage._key(key), Body=data, ContentType=kind)
            except Exception as exc:  # noqa: BLE001 - as storage's own calls: transient ones retried
                raise _s3_error(exc, storage.url(key)) from None

        retrying(put, storage.url(key))
    else:
        storage.write(key, data)


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
        lines.append("labels: " + ", ".join(f"{k}={v}" for k, v in json.loads(record["labels"]).items()))
    return "\n".join(lines)


def throughput_svg(times: list[datetime], buckets: int = 40, width: int = 720, height: int = 160) -> str:
    """Rows started per time bucket, as bars, with the rate of the busiest bucket and the mean."""
    if len(times) < 2:
        return "<p>not enough rows for a plot</p>"
    start, end = min(times), max(times)
    span = max((end - start).total_seconds(), 1e-3)
    counts = [0] * buckets
    for t in times:
        counts[min(int((t - start).total_seconds() / span * buckets), buckets - 1)] += 1
    peak, step = max(counts), span / buckets
    bar = width / buckets
    rects = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - 20 - c / peak * (height - 40):.1f}" width="{bar - 1:.1f}" '
        f'height="{c / peak * (height - 40):.1f}" fill="#777"><title>{c / step:.2f} rows/s</title></rect>'
        for i, c in enumerate(counts)
    )
    label = (
        f"{len(times)} rows over {span:.0f}s: mean {len(times) / span:.2f} rows/s, peak {peak / step:.2f} rows/s "
        f"(bucket {step:.1f}s)"
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
        f'<text x="0" y="12" font-size="12">{html.escape(label)}</text>{rects}'
        f'<line x1="0" y1="{height - 20}" x2="{width}" y2="{height - 20}" stroke="#333"/>'
        f'<text x="0" y="{height - 4}" font-size="11">{start:%H:%M:%S}</text>'
        f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{end:%H:%M:%S} UTC</text></svg>'
    )


def _page_name(page: int) -> str:
    return REPORT_FILE if page == 1 else f"report-page-{page}.html"


def _pages_nav(page: int, pages: int) -> str:
    if pages <= 1:
        return ""
    links = [f"<b>{p}</b>" if p == page else f'<a href="{_page_name(p)}">{p}</a>' for p in range(1, pages + 1)]
    return '<p class="pages">pages: ' + " ".join(links) + "</p>"


def _sheet(records: list[dict[str, Any]]) -> str:
    cells = []
    for r in records:
        cells.append(
            f'<a href="{html.escape(r["image_path"])}" title="{html.escape(_hover(r))}">'
            f'<img src="{html.escape(thumb_key(r))}" alt="{html.escape(str(r["id"]))}" loading="eager"></a>'
        )
    return '<div class="sheet">' + "".join(cells) + "</div>"


def build_report(
    uri: str, *, log: Callable[[str], None] = print, threads: int = 8, max_images: int = MAX_IMAGES
) -> dict[str, Any]:
    """Write the report into the output; returns {"pages", "thumbnails_made", "rows"}."""
    from .status import job_status  # the same shard states and counts as `sdgen status`

    output = Output(uri)
    status = job_status(uri)
    summary = output.read_json(SUMMARY_FILE) or {}
    done = sorted(s["shard"] for s in status["shard_list"] if s["state"] == "done")
    tables = output.read_all_records(done, columns=RECORD_COLUMNS)
    records = [r for shard in done for r in tables[shard].to_pylist()]
    ok_total = sum(1 for r in records if r["status"] == "ok" and r["image_path"])
    ok = [r for r in records if r["status"] == "ok" and r["image_path"]][:max_images]

    existing = set(output.storage.list(THUMBS_DIR + "/"))
    missing = [r for r in ok if thumb_key(r) not in existing]

    def make(record: dict[str, Any]) -> None:
        _write(output, thumb_key(record), make_thumbnail(output.storage.read(record["image_path"])))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(make, missing))

    errors = [r for r in error_rows(output, done)]
    rows = status["rows"]
    shards = status["shards"]
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
    counts = (
        '<div class="counts">'
        f"<span>{rows['total']} rows</span><span>{rows['ok']} ok</span><span>{rows['error']} error</span>"
        f"<span>{rows['not_done']} not done</span><span>shards {shards['done']}/{shards['total']} done, "
        f"{shards['failed']} failed, {shards['pending'] + shards['running']} pending</span></div>"
    )
    run = summary.get("run") or {}
    if run:
        counts += f"<p>last run: {run.get('rows_run')} rows in {run.get('wall_s')}s, {run.get('rows_per_s')} rows/s</p>"
    plot = "<h2>Throughput</h2>" + throughput_svg([r["started_at"] for r in records if r["started_at"] is not None])
    shard_rows = "".join(
        f"<tr><td>{s['shard']}</td><td>{s['state']}</td><td class=n>{s['rows']}</td><td class=n>{s.get('ok', '')}</td>"
        f"<td class=n>{s.get('error', '') if s['state'] == 'done' else ''}</td>"
        f"<td>{html.escape(str(s.get('error', ''))) if s['state'] == 'failed' else ''}</td></tr>"
        for s in status["shard_list"]
    )
    shard_table = (
        '<h2>Shards</h2><div class="scroll"><table><tr><th>shard</th><th>state</th><th class=n>rows</th>'
        f"<th class=n>ok</th><th class=n>error</th><th>note</th></tr>{shard_rows}</table></div>"
    )
    if errors:
        example = {}
        for r in errors:
            example.setdefault(r["reason"], r)
        error_table = "".join(
            f"<tr><td class=n>{count}</td><td>{html.escape(reason)}</td>"
            f"<td>row {example[reason]['row']} ({html.escape(str(example[reason]['id']))}): "
            f"{html.escape(str(example[reason]['error']))}</td></tr>"
            for reason, count in histogram(errors).items()
        )
        error_table = (
            "<h2>Errors by reason</h2><table><tr><th class=n>rows</th><th>reason</th><th>example</th></tr>"
            f"{error_table}</table>"
        )
    else:
        error_table = "<h2>Errors by reason</h2><p>no error rows</p>"

    pages = max(1, -(-len(ok) // PAGE_SIZE))
    for page in range(1, pages + 1):
        chunk = ok[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        sheet = (
            f"<h2 id=sheet>Images {len(ok) and (page - 1) * PAGE_SIZE + 1}–{(page - 1) * PAGE_SIZE + len(chunk)} "
            f"of {ok_total}{' (the first ' + str(len(ok)) + ' in the sheet)' if ok_total > len(ok) else ''}</h2>"
            f"{_pages_nav(page, pages)}{_sheet(chunk)}{_pages_nav(page, pages)}"
        )
        body = (
            title + counts + plot + shard_table + error_table + sheet
            if page == 1
            else f'{title}<p><a href="{REPORT_FILE}">summary</a></p>{sheet}'
        )
        _write(output, _page_name(page), (head + body + "</body></html>\n").encode())
    log(f"[sdgen] report {output.storage.url(REPORT_FILE)}: {len(ok)} image(s) on {pages} page(s)")
    return {"pages": pages, "thumbnails_made": len(missing), "rows": len(records)}


def main(argv: list[str] | None = None, prog: str = "sdgen report") -> int:
    """Exit status: 0 written, 2 no sdgen output there."""
    parser = argparse.ArgumentParser(prog=prog, description="(Re)build OUTPUT/index.html, the job's HTML report.")
    parser.add_argument("output", help="the job's output folder or s3:// prefix")
    parser.add_argument(
        "--max-images", type=int, default=MAX_IMAGES, help=f"images in the contact sheet (default {MAX_IMAGES})"
    )
    args = parser.parse_args(argv)
    try:
        build_report(args.output, max_images=args.max_images)
    except (FileNotFoundError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


__all__ = ["PAGE_SIZE", "REPORT_FILE", "build_report", "make_thumbnail", "thumb_key", "throughput_svg"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
