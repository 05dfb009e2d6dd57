"""From a manifest with labels and per-row settings to a dataset, through the real commands:
`sdgen run` (embedded local Ray) on a CSV manifest, then `sdgen status --errors`, `sdgen report`
(rendered in headless Chromium) and `sdgen export` in every format, read back with `webdataset`
and `datasets`."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.output import Output

from conftest import PYTHON, init_image, run_command, spec_dict, write_spec

SDGEN = [PYTHON, "-m", "jobs.cli"]
# 8 good rows (3 samplers, karras on one), then an empty prompt, a duplicate id, a missing init.
CSV = """id,prompt,seed,sampler,karras,init_image,strength,color,shape,score
a0,a red circle,1,ddim,,,,red,circle,0.5
a1,a blue square,2,euler_a,,,,blue,square,1.5
a2,a green triangle,3,dpmpp_2m,true,,,green,triangle,2.5
a3,a red square,4,dpmpp_2m,false,,,red,square,3.5
a4,a blue circle,5,,,init/a.png,0.7,blue,circle,4.5
a5,a green circle,6,euler_a,,,,green,circle,5.5
a6,a red triangle,7,ddim,,,,red,triangle,6.5
a7,a blue triangle,8,,,,,blue,triangle,7.5
bad-prompt,,9,,,,,red,circle,8.5
a1,a duplicate,10,,,,,red,circle,9.5
no-init,a lost circle,11,,,init/missing.png,0.7,red,circle,10.5
"""
LABELS = ("color", "shape", "score")


def records_of(out):
    output = Output(str(out))
    tables = output.read_all_records(output.committed_shards())
    return sorted((r for t in tables.values() for r in t.to_pylist()), key=lambda r: r["row"])


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("datasets")
    init_image(tmp / "data" / "init" / "a.png")
    (tmp / "data" / "m.csv").write_text(CSV)
    spec = write_spec(
        tmp / "job.yaml",
        spec_dict(str(tmp / "data" / "m.csv"), str(tmp / "out"), execution={"shard_size": 4, "batch_size": 4}),
    )
    result = run_command([*SDGEN, "run", str(spec)], timeout=400)
    return tmp, spec, result


def test_labels_and_per_row_settings_reach_the_records(job):
    tmp, _, _ = job
    records = records_of(tmp / "out")
    assert len(records) == 11
    for record, line in zip(records, CSV.splitlines()[1:]):
        values = dict(zip(CSV.splitlines()[0].split(","), line.split(",")))
        labels = json.loads(record["labels"])
        assert labels == {"color": values["color"], "shape": values["shape"], "score": float(values["score"])}
        if record["status"] == "ok":
            assert record["sampler"] == (values["sampler"] or "ddim")
            assert record["karras"] is (values["karras"] == "true")
    assert [r["status"] for r in records].count("ok") == 8


def test_per_row_sampler_matches_the_library_call_for_that_sampler(job, tiny_pipe):
    import torch

    from sdcore import GenerationRequest

    tmp, _, _ = job
    torch.set_num_threads(1)  # the job's cpu_threads
    for record in records_of(tmp / "out"):
        if record["status"] != "ok" or record["mode"] != "txt2img":
            continue
        (image,) = tiny_pipe.generate(
            [GenerationRequest(record["prompt"], seed=record["seed"])],
            sampler=record["sampler"],
            karras=record["karras"],
            steps=3,
            guidance_scale=7.5,
            width=32,
            height=32,
            fixed_batch=record["batch_rows"],  # the forward shape the job ran, the row in its slot
            slots=[record["batch_slot"]],
        )
        stored = Image.open(tmp / "out" / record["image_path"])
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(stored.convert("RGB"))), record["id"]
    # `sdgen reproduce` remakes every row, its per-row sampler included, identically.
    ok_ids = [r["id"] for r in records_of(tmp / "out") if r["status"] == "ok"]
    reproduced = run_command([*SDGEN, "reproduce", str(tmp / "out"), *ok_ids, "--exact"], timeout=300)
    assert reproduced.returncode == 0, reproduced.stdout
    assert reproduced.stdout.count(": identical") == len(ok_ids), reproduced.stdout
    # Different samplers give different images of the same prompt and seed.
    same = {}
    for sampler in ("ddim", "euler_a", "dpmpp_2m"):
        (same[sampler],) = tiny_pipe.generate(
            [GenerationRequest("a red circle", seed=1)],
            sampler=sampler,
            steps=3,
            guidance_scale=7.5,
            width=32,
            height=32,
        )
    assert not np.array_equal(np.asarray(same["ddim"]), np.asarray(same["euler_a"]))


def test_errors_are_named_with_counts(job):
    tmp, _, result = job
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    assert summary["errors"] == {
        "duplicate id …": 1,
        "init_image not found: …": 1,
        "prompt is missing": 1,
    }
    assert "[sdgen] top error reasons (3 error rows" in result.stdout
    assert "[sdgen]        1  duplicate id …" in result.stdout
    status = run_command([*SDGEN, "status", str(tmp / "out"), "--errors"], check=False)
    assert status.returncode == 0, status.stdout
    assert "1 row(s): init_image not found: …" in status.stdout
    assert "row 10       id no-init" in status.stdout and "init/missing.png" in status.stdout


def chromium_screenshot(page, png, width=1000, height=2400):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Debian's chromium is needed (make test installs it)"
    subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={png}",
         f"--window-size={width},{height}", "--virtual-time-budget=5000",
         page if isinstance(page, str) else page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return np.asarray(Image.open(png).convert("RGB")).astype(int)


def colourful_pixels(pixels):
    """Pixels far from grey: the page itself is greys only, the thumbnails are not."""
    return int(((pixels.max(axis=2) - pixels.min(axis=2)) > 40).sum())


def test_report_renders_with_its_thumbnails_in_headless_chromium(job, tmp_path):
    tmp, _, result = job
    out = tmp / "out"
    assert "[sdgen] report" in result.stdout and (out / "index.html").exists()  # written when the run ended
    report = run_command([*SDGEN, "report", str(out)])
    assert "8 image(s) on 1 page(s)" in report.stdout
    page = (out / "index.html").read_text()
    for needle in ("11 rows", "8 ok", "3 error", "<svg", "shard-00000", "duplicate id …", 'title="id a0 (row 0'):
        assert needle in page
    assert 'src="thumbs/' in page and "/work" not in page.split("<body>")[1]  # relative links only
    # Render a copy (thumbnails and all) and measure the colour the thumbnails put on the page.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shown = chromium_screenshot(copy / "index.html", tmp_path / "shown.png")
    shutil.rmtree(copy / "thumbs")
    blank = chromium_screenshot(copy / "index.html", tmp_path / "blank.png")
    thumb_area = 128 * 128
    assert colourful_pixels(shown) - colourful_pixels(blank) > 4 * thumb_area  # at least 4 of 8 thumbnails' worth
    assert colourful_pixels(blank) < thumb_area // 4


def report_links(folder):
    """page -> (its <a href>s, its <img src>s), for every .html page of the report in `folder`."""
    from html.parser import HTMLParser

    class Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.hrefs, self.srcs, self.alts = [], [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "a":
                self.hrefs.append(attrs["href"])
            if tag == "img":
                self.srcs.append(attrs["src"])
                self.alts.append(attrs["alt"])

    pages = {}
    for page in sorted(folder.glob("*.html")):
        parser = Links()
        parser.feed(page.read_text())
        pages[page.name] = parser
    return pages


def test_report_pages_link_and_a_rebuild_makes_only_new_thumbnails(job, tmp_path):
    """A shard committed after the last report (its record file appears): the rebuild makes the
    thumbnails of its rows only, keeps the others untouched, and pages the whole sheet."""
    tmp, _, _ = job
    copy = tmp_path / "copy"
    shutil.copytree(tmp / "out", copy)
    shutil.rmtree(copy / "thumbs")
    later = tmp_path / "shard-00001.parquet"
    (copy / "records" / "shard-00001.parquet").rename(later)  # not committed yet
    first = run_command([*SDGEN, "report", str(copy), "--page-size", "3"])
    assert "4 image(s) on 2 page(s), 4 new thumbnail(s)" in first.stdout
    before = {p: p.stat() for p in (copy / "thumbs").rglob("*.jpg")}
    assert len(before) == 4 and {p.parent.name for p in before} == {"shard-00000"}

    later.rename(copy / "records" / "shard-00001.parquet")  # the shard commits
    again = run_command([*SDGEN, "report", str(copy), "--page-size", "3"])
    assert "8 image(s) on 3 page(s), 4 new thumbnail(s)" in again.stdout
    after = {p: p.stat() for p in (copy / "thumbs").rglob("*.jpg")}
    assert len(after) == 8 and {p.parent.name for p in set(after) - set(before)} == {"shard-00001"}
    for path, stat in before.items():  # the old thumbnails were neither rewritten nor deleted
        assert (after[path].st_ino, after[path].st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    nothing = run_command([*SDGEN, "report", str(copy), "--page-size", "3"])
    assert "8 image(s) on 3 page(s), 0 new thumbnail(s)" in nothing.stdout

    # Every link of every page points at a file that is there; from index.html, "next" walks the
    # pages in order, and the pages together show each ok row exactly once, in row order.
    pages = report_links(copy)
    assert set(pages) == {"index.html", "report-page-2.html", "report-page-3.html", "report-pages.html"}
    for name, links in pages.items():
        for target in links.hrefs + links.srcs:
            assert (copy / target).is_file(), (name, target)
    assert all(src.startswith("thumbs/") for links in pages.values() for src in links.srcs)
    ok_ids = [r["id"] for r in records_of(copy) if r["status"] == "ok"]
    walked, name = [], "index.html"
    while name:
        walked.append(name)
        html_text = (copy / name).read_text()
        name = html_text.split('" rel="next">')[0].rsplit('href="', 1)[1] if 'rel="next"' in html_text else None
    assert walked == ["index.html", "report-page-2.html", "report-page-3.html"]
    assert [alt for page in walked for alt in pages[page].alts] == ok_ids
    assert "page 3</a>: rows 6–7" in (copy / "report-pages.html").read_text()
    assert "Images 4–6 of 8" in (copy / "report-page-2.html").read_text()
    # A page other than index.html renders with its thumbnails in Chromium.
    shown = chromium_screenshot(copy / "report-page-2.html", tmp_path / "page2.png", height=1200)
    assert colourful_pixels(shown) > 2 * 128 * 128  # at least 2 of its 3 thumbnails' worth

    # --max-images keeps the first N: the sheet shrinks and the pages it no longer has are deleted.
    capped = run_command([*SDGEN, "report", str(copy), "--page-size", "3", "--max-images", "5"])
    assert "5 image(s) on 2 page(s), 0 new thumbnail(s)" in capped.stdout
    assert not (copy / "report-page-3.html").exists() and len(list((copy / "thumbs").rglob("*.jpg"))) == 8
    assert "Images 4–5 of 8 (the first 5 in the sheet, --max-images)" in (copy / "report-page-2.html").read_text()
    bad = run_command([*SDGEN, "report", str(copy), "--page-size", "0"], check=False)
    assert bad.returncode == 2 and "--page-size: expected at least 1, got 0" in bad.stdout


def test_report_of_an_s3_output_renders_served_from_the_bucket(job, s3, moto_endpoint, tmp_path):
    """The output copied to S3 (without its report), `sdgen report s3://...`, then the report
    opened over HTTP from the S3 server itself (a bucket policy lets anyone read the prefix), as a
    bucket website or CDN would serve it."""
    bucket, client, env = s3
    out = job[0] / "out"
    for path in out.rglob("*"):
        key = path.relative_to(out).as_posix()
        if path.is_file() and not key.startswith("thumbs/") and not key.endswith(".html"):
            client.upload_file(str(path), bucket, f"out/{key}")
    report = run_command([*SDGEN, "report", f"s3://{bucket}/out", "--page-size", "6"], env=env)
    assert "8 image(s) on 2 page(s), 8 new thumbnail(s)" in report.stdout
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]]
    thumbs = [k for k in keys if k.startswith("out/thumbs/")]
    assert len(thumbs) == 8 and {"out/index.html", "out/report-page-2.html", "out/report-pages.html"} <= set(keys)
    assert client.head_object(Bucket=bucket, Key="out/index.html")["ContentType"] == "text/html; charset=utf-8"
    assert client.head_object(Bucket=bucket, Key=thumbs[0])["ContentType"] == "image/jpeg"
    public = {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/out/*"}
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [public]}))
    url = f"{moto_endpoint}/{bucket}/out"  # anonymous GETs, as a browser makes them
    shown = chromium_screenshot(f"{url}/index.html", tmp_path / "s3.png")
    assert colourful_pixels(shown) > 4 * 128 * 128  # at least 4 of its 6 thumbnails' worth
    second = chromium_screenshot(f"{url}/report-page-2.html", tmp_path / "s3-2.png", height=1200)
    assert colourful_pixels(second) > 128 * 128  # at least 1 of its 2
    again = run_command([*SDGEN, "report", f"s3://{bucket}/out", "--page-size", "6"], env=env)
    assert "8 image(s) on 2 page(s), 0 new thumbnail(s)" in again.stdout


def test_export_webdataset_imagefolder_parquet(job, tmp_path):
    import datasets
    import webdataset as wds

    tmp, _, _ = job
    out = tmp / "out"
    ok = [r for r in records_of(out) if r["status"] == "ok"]

    run_command([*SDGEN, "export", str(out), "--format", "webdataset", str(tmp_path / "wds")])
    shards = sorted(str(p) for p in (tmp_path / "wds").glob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert len(samples) == len(ok)
    for sample, record in zip(samples, ok):
        assert sample["txt"] == record["prompt"] and sample["json"]["id"] == record["id"]
        assert sample["json"]["labels"] == json.loads(record["labels"])
        assert sample["png"].size == (32, 32)
    first = {p.name: p.read_bytes() for p in (tmp_path / "wds").iterdir()}
    again = run_command([*SDGEN, "export", str(out), "--format", "webdataset", str(tmp_path / "wds")])
    assert "3 shard file(s) already there" in again.stdout
    (tmp_path / "wds" / "shard-00001.tar").unlink()  # resume: only the missing shard is made, same bytes
    run_command([*SDGEN, "export", str(out), "--format", "webdataset", str(tmp_path / "wds")])
    assert {p.name: p.read_bytes() for p in (tmp_path / "wds").iterdir()} == first

    run_command([*SDGEN, "export", str(out), "--format", "imagefolder", str(tmp_path / "hf")])
    dataset = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "hf"), split="train")
    assert dataset.num_rows == len(ok)
    rows = sorted(dataset, key=lambda r: r["row"])
    for row, record in zip(rows, ok):
        assert row["text"] == record["prompt"] and row["seed"] == record["seed"]
        assert {k: row[k] for k in LABELS} == json.loads(record["labels"])
        assert row["image"].size == (32, 32)
    # The same folder with metadata.parquet instead: the jsonl goes (datasets refuses two kinds of
    # metadata file in one folder), the images stay, and the columns keep the record's types.
    again = run_command(
        [*SDGEN, "export", str(out), "--format", "imagefolder", "--metadata", "parquet", str(tmp_path / "hf")]
    )
    assert "deleted metadata.jsonl" in again.stdout and "(0 images written" in again.stdout
    assert sorted(p.name for p in (tmp_path / "hf").glob("metadata.*")) == ["metadata.parquet"]
    metadata = pq.read_table(tmp_path / "hf" / "metadata.parquet")
    assert (
        str(metadata.schema.field("seed").type) == "int64" and str(metadata.schema.field("strength").type) == "double"
    )
    dataset = datasets.load_dataset(
        "imagefolder", data_dir=str(tmp_path / "hf"), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert dataset.num_rows == len(ok)
    rows = sorted(dataset, key=lambda r: r["row"])
    for row, record in zip(rows, ok):
        assert row["text"] == record["prompt"] and row["id"] == record["id"] and row["seed"] == record["seed"]
        assert {k: row[k] for k in LABELS} == json.loads(record["labels"])
        assert row["image"].size == (32, 32)
    wrong = run_command(
        [*SDGEN, "export", str(out), "--format", "webdataset", "--metadata", "parquet", str(tmp_path / "w2")],
        check=False,
    )
    assert wrong.returncode == 2 and "--metadata applies to --format imagefolder only" in wrong.stdout

    run_command([*SDGEN, "export", str(out), "--format", "parquet", str(tmp_path / "pq")])
    table = pq.read_table(sorted((tmp_path / "pq").glob("*.parquet")))
    assert table.num_rows == len(ok)
    for row, record in zip(table.to_pylist(), ok):
        assert row["image_sha256"] == record["image_sha256"] and row["color"] == json.loads(record["labels"])["color"]
        assert Image.open(io.BytesIO(row["image"])).size == (32, 32)


def test_export_to_s3(job, s3):
    import boto3

    bucket, client, env = s3
    tmp, _, _ = job
    run_command([*SDGEN, "export", str(tmp / "out"), "--format", "imagefolder", f"s3://{bucket}/hf"], env=env)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="hf/")["Contents"]]
    assert "hf/metadata.jsonl" in keys and len([k for k in keys if k.endswith(".png")]) == 8
    lines = client.get_object(Bucket=bucket, Key="hf/metadata.jsonl")["Body"].read().decode().splitlines()
    assert {json.loads(line)["file_name"] for line in lines} == {k[len("hf/") :] for k in keys if k.endswith(".png")}
    assert boto3  # the client above is boto3's, talking to the loopback server


def test_dry_run_tells_the_truth_and_limit_runs_a_trial(job, tmp_path):
    tmp, spec, _ = job
    dry = run_command([*SDGEN, "run", str(spec), "--dry-run"], check=False)
    assert dry.returncode == 1, dry.stdout  # some rows would be error records
    out = dry.stdout
    assert "[sdgen] dry run: 32x32, 3 steps, sampler ddim, guidance 7.5, dtype float32, device cpu" in out
    assert "[sdgen] rows: 11 checked, 8 ok, 3 would be error records; 1 of 2 distinct init image(s) found" in out
    assert "init_image not found: …   e.g. row 10: init_image not found:" in out
    assert "readable, fingerprint" in out and "[sdgen] estimate: " in out and "s/step" in out
    missing = write_spec(tmp_path / "m.yaml", {**spec_dict(str(tmp / "data" / "m.csv"), str(tmp_path / "o")),
                                               "model": {"weights": str(tmp_path / "nope.safetensors")}})  # fmt: skip
    refused = run_command([*SDGEN, "run", str(missing), "--dry-run"], check=False)
    assert (
        refused.returncode == 2 and "model.weights: not found:" in refused.stdout and "Traceback" not in refused.stdout
    )
    assert "running on" not in refused.stdout  # Ray never started

    trial_spec = write_spec(tmp_path / "t.yaml", spec_dict(str(tmp / "data" / "m.csv"), str(tmp_path / "trial")))
    trial = run_command([*SDGEN, "run", str(trial_spec), "--limit", "2"], timeout=400)
    assert "--limit 2: the first 2 row(s) only" in trial.stdout
    assert not (tmp_path / "trial").exists()
    assert [r["id"] for r in records_of(tmp_path / "trial-limit2")] == ["a0", "a1"]


def test_grid_lays_out_a_sweep_with_labels(job, tmp_path):
    """Every row of a cell is shown: (red, ddim) holds a0 and a6, (blue, ddim) a4 and a7, so every
    cell is a 2x1 sub-grid of 128 px images, in manifest row order; the pixels are the images'."""
    tmp, _, _ = job
    out = tmp / "out"
    result = run_command([*SDGEN, "grid", str(out), str(tmp_path / "g.png"), "--rows", "color", "--cols", "sampler"])
    assert "3 color x 3 sampler; up to 2 images per cell (2x1)" in result.stdout
    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB")).astype(int)
    top, gap, cell_w, cell_h = 18 + 24, 6, 2 * 128, 128
    left = grid.shape[1] - 3 * (cell_w + gap)
    assert grid.shape[0] == top + 3 * (cell_h + gap) and left > 0
    records = {r["id"]: r for r in records_of(out) if r["status"] == "ok"}

    def shown(image_id):  # the stored 32 px image as the grid draws it: 4x, nearest
        image = Image.open(out / records[image_id]["image_path"]).convert("RGB")
        return np.asarray(image.resize((128, 128), Image.Resampling.NEAREST)).astype(int)

    def at(i, j, k):  # row value i, column value j, k-th image of the cell
        x, y = left + j * (cell_w + gap) + k * 128, top + i * (cell_h + gap)
        return grid[y : y + 128, x : x + 128]

    colors, samplers = ["red", "blue", "green"], ["ddim", "euler_a", "dpmpp_2m"]
    expected = {("red", "ddim"): ["a0", "a6"], ("blue", "ddim"): ["a4", "a7"]}
    for record in sorted(records.values(), key=lambda r: r["row"]):
        key = (json.loads(record["labels"])["color"], record["sampler"])
        expected.setdefault(key, [record["id"]])
    for (color, sampler), ids in expected.items():
        i, j = colors.index(color), samplers.index(sampler)
        for k, image_id in enumerate(ids):
            assert np.array_equal(at(i, j, k), shown(image_id)), (color, sampler, image_id)
        if len(ids) == 1:
            assert (at(i, j, 1) == 255).all()  # the cell's second place is empty
    assert (at(2, 0, 0) == 255).all()  # (green, ddim): no row
    assert (grid[:18] < 100).any()  # the legend line
    assert (grid[18:top, left:] < 100).any() and (grid[top:, :left] < 100).any()  # column and row labels
    # --per-cell 1: the first manifest row of each cell only, one image per cell.
    first = run_command(
        [*SDGEN, "grid", str(out), str(tmp_path / "f.png"), "--rows", "color", "--cols", "sampler", "--per-cell", "1"]
    )
    assert "3 color x 3 sampler" in first.stdout and "per cell" not in first.stdout
    single = np.asarray(Image.open(tmp_path / "f.png").convert("RGB")).astype(int)
    x0 = single.shape[1] - 3 * (128 + gap)
    assert np.array_equal(single[top : top + 128, x0 : x0 + 128], shown("a0"))
    bad = run_command([*SDGEN, "grid", str(out), str(tmp_path / "x.png"), "--rows", "nope"], check=False)
    assert bad.returncode == 2 and "no record field or label 'nope'" in bad.stdout
    bad = run_command([*SDGEN, "grid", str(out), str(tmp_path / "x.png"), "--where", "steps"], check=False)
    assert bad.returncode == 2 and "--where: expected FIELD=VALUE, got 'steps'" in bad.stdout
