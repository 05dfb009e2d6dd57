"""End to end on local disk through the real commands: `jobs/run.py` (embedded local Ray),
`jobs/status.py`, `jobs/reproduce.py`."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pytest
from PIL import Image

from jobs.output import Output
from jobs.record import RECORD_FIELDS

from conftest import PYTHON, init_image, manifest_schema, run_command, small_rows, spec_dict, write_manifest, write_spec

# Fields an error record may leave empty, and those only img2img rows fill.
ERROR_ONLY = {"error"}
NO_LABELS = {"labels"}  # null: this manifest has no label columns
IMG2IMG_ONLY = {"strength", "init_image", "init_image_uri", "init_image_sha256", "init_decoding", "time_load_s"}
GPU_ONLY = {"cuda_visible_devices"}  # this run's workers hold no GPU


def all_records(out):
    output = Output(str(out))
    return sorted(
        (r for t in output.read_all_records(output.committed_shards()).values() for r in t.to_pylist()),
        key=lambda r: r["row"],
    )


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-local")
    init_image(tmp / "data" / "init" / "a.png")
    rows = small_rows(7, img2img_every=3)  # rows 2 and 5 are img2img
    rows[4]["prompt"] += " and a red circle" * 20  # 84 tokens: CLIP reads 75
    rows[5]["negative"] = "blurry " * 80
    rows.append({"id": "bad", "prompt": None, "negative": "", "seed": 1, "strength": None, "init_image": None})
    manifest = write_manifest(tmp / "data" / "m.parquet", rows, manifest_schema())
    spec = write_spec(
        tmp / "job.yaml",
        spec_dict(str(manifest), str(tmp / "out"), execution={"workers": 1, "batch_size": 2, "shard_size": 3}),
    )
    result = run_command([PYTHON, "jobs/run.py", str(spec), "--progress-every", "1"], timeout=400)
    return tmp, spec, result


def test_run_prints_progress_and_summary(finished_job):
    _, _, result = finished_job
    out = result.stdout
    assert "[sdgen] job 'test': 8 rows" in out and "3 shard(s) of 3" in out
    assert "rows (" in out and "rows/s" in out and "ETA" in out
    assert "[sdgen] complete: 7 ok, 1 error, 0 missing of 8 rows; 3/3 shards" in out


def test_every_row_has_exactly_one_complete_record(finished_job):
    tmp, _, _ = finished_job
    records = all_records(tmp / "out")
    assert [r["row"] for r in records] == list(range(8))
    assert sorted(Output(str(tmp / "out")).committed_shards()) == ["shard-00000", "shard-00001", "shard-00002"]
    for r in records:
        if r["status"] == "error":
            assert r["id"] == "bad" and r["error"] == "prompt is missing"
            continue
        missing = [
            f
            for f in RECORD_FIELDS
            if r[f] is None
            and f not in ERROR_ONLY | GPU_ONLY | NO_LABELS
            and not (r["mode"] == "txt2img" and f in IMG2IMG_ONLY)
        ]
        assert missing == [], (r["id"], missing)
        data = (tmp / "out" / r["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["image_sha256"]
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.size == (32, 32) and image.text["parameters"].startswith(r["prompt"])
        assert r["image_path"] == f"images/{r['shard']}/{r['id']}.png"
    assert [r["mode"] for r in records if r["status"] == "ok"].count("img2img") == 2


def test_records_count_the_tokens_clip_dropped(finished_job):
    """The long prompt of r004 and the long negative of r005 lost their tokens past CLIP's 75
    (cut, as diffusers cuts them): their records say how many; the texts that fit, 0."""
    tmp, _, _ = finished_job
    dropped = {r["id"]: (r["prompt_tokens_dropped"], r["negative_tokens_dropped"]) for r in all_records(tmp / "out")}
    assert dropped == {
        **{f"r{i:03d}": (0, 0) for i in range(7)},
        "r004": (9, 0),
        "r005": (0, 5),
        "bad": (None, None),  # an error record: never generated
    }


def test_job_and_summary_files(finished_job):
    tmp, _, _ = finished_job
    job = json.loads((tmp / "out" / "job.json").read_text())
    assert job["spec"]["sampler"]["steps"] == 3 and job["manifest"]["rows"] == 8
    assert len(job["model"]["fingerprint"]) == 64 and job["versions"]["torch"] and job["versions"]["ray"]
    assert job["model"]["niceness"] == os.nice(0)  # not Ray's default of 15 above this process
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    assert (summary["ok"], summary["error"], summary["total"], summary["complete"]) == (7, 1, 8, True)
    assert summary["run"]["rows_per_s"] > 0
    assert not (tmp / "out" / "partial").exists()


def test_status_command(finished_job):
    tmp, _, _ = finished_job
    result = run_command([PYTHON, "jobs/status.py", str(tmp / "out")])
    assert "shards  3 total: 3 done, 0 running, 0 interrupted, 0 failed, 0 pending" in result.stdout
    assert "rows    8 total: 7 ok, 1 error, 0 not done" in result.stdout
    assert "complete" in result.stdout


def test_reproduce_says_identical(finished_job):
    tmp, _, _ = finished_job
    result = run_command([PYTHON, "jobs/reproduce.py", str(tmp / "out"), "r000", "r002", "r004", "r005"])
    lines = [line for line in result.stdout.splitlines() if line.startswith("row ")]
    assert len(lines) == 4 and all(": identical: sha256" in line for line in lines), result.stdout


def test_reproduce_reports_differences_and_a_changed_stored_image(finished_job):
    tmp, _, _ = finished_job
    out = str(tmp / "out")
    # Another dtype: not identical; how far it is, and the verdict under each tolerance.
    loose = run_command(
        [PYTHON, "jobs/reproduce.py", out, "r001", "--dtype", "bfloat16", "--min-psnr", "0"], check=False
    )
    assert loose.returncode == 0 and "different: max abs pixel diff" in loose.stdout and "PSNR" in loose.stdout
    assert "within tolerance (PSNR >= 0 dB)" in loose.stdout
    exact = run_command([PYTHON, "jobs/reproduce.py", out, "r001", "--dtype", "bfloat16", "--exact"], check=False)
    assert exact.returncode == 1 and "OUTSIDE tolerance" in exact.stdout

    # A stored image changed after the job: the record still reproduces, and the change is named.
    record = next(r for r in all_records(tmp / "out") if r["id"] == "r001")
    path = tmp / "out" / record["image_path"]
    original = path.read_bytes()
    try:
        image = Image.open(io.BytesIO(original)).convert("RGB")
        image.putpixel((0, 0), tuple((c + 3) % 256 for c in image.getpixel((0, 0))))
        image.save(path)
        result = run_command([PYTHON, "jobs/reproduce.py", out, "r001", "bad"], check=False)
        assert "row 1 id 'r001': identical" in result.stdout and "does not match its recorded sha256" in result.stdout
        assert result.returncode == 1 and "an error record" in result.stdout
        # An id no record holds is a bad argument (exit 2), refused before anything is remade.
        unknown = run_command([PYTHON, "jobs/reproduce.py", out, "r001", "no-such-id"], check=False)
        assert unknown.returncode == 2 and "id no-such-id: no such record" in unknown.stdout
        assert "r001" not in unknown.stdout
    finally:
        path.write_bytes(original)


def test_rerun_skips_everything(finished_job):
    tmp, spec, _ = finished_job
    records = tmp / "out" / "records"
    before = {p.name: p.stat().st_mtime_ns for p in records.iterdir()}
    result = run_command([PYTHON, "jobs/run.py", str(spec)])
    assert "nothing to do" in result.stdout and "3 shard(s) already committed, 0 to run" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in records.iterdir()} == before


def test_bad_spec_fails_fast_with_exit_2(tmp_path):
    spec = write_spec(tmp_path / "bad.yaml", spec_dict("m.parquet", str(tmp_path / "o"), sampler={"steps": 0}))
    result = run_command([PYTHON, "jobs/run.py", str(spec)], check=False, timeout=60)
    assert result.returncode == 2 and "sampler.steps: expected an integer in 1..999, got 0" in result.stdout
