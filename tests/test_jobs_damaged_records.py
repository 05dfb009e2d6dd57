"""A committed shard whose record file is unreadable or does not hold one record per row of the
shard (a damaged file, or a shard that sdgen before d53d990 could commit short after a storage
fault): `status` calls it damaged and the job incomplete, a rerun redoes exactly that shard
(images bit for bit the same), and reproduce / export say what is wrong instead of failing
with pyarrow's message. A damaged job.json is refused naming it (exit 2), a damaged
summary.json read past."""

from __future__ import annotations

import hashlib

import pyarrow.parquet as pq
import pytest

from jobs.export import main as export_main
from jobs.manifest import load_manifest
from jobs.output import Output
from jobs.reproduce import main as reproduce_main
from jobs.runner import JobConflict, job_document, plan_job, run_job
from jobs.spec import load_spec
from jobs.status import format_status, job_status
from jobs.status import main as status_main
from jobs.worker import WorkerInfo

from conftest import manifest_schema, small_rows, spec_dict, write_manifest, write_spec


def _records(output: Output, shard: str) -> list[dict]:
    return output.read_records(shard).to_pylist()


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _hand_made_output(tmp_path):
    """9 rows in shards of 3: shard 0 sound, shard 1 short (2 of 3 rows), shard 2 with a
    duplicated row instead of its last one, shard 3 unreadable."""
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(12), manifest_schema())
    spec = load_spec(write_spec(tmp_path / "s.yaml", spec_dict(str(manifest), str(tmp_path / "out"))))
    output = Output(spec.output)
    info = WorkerInfo("w", "f" * 64, "float32", "cpu", "cpu", {})
    output.write_job(job_document(spec, load_manifest(spec.manifest), info, None, {}))

    def ok(row):
        return {"row": row, "id": f"r{row:03d}", "status": "ok"}

    output.commit_records("shard-00000", [ok(0), ok(1), ok(2)])
    output.commit_records("shard-00001", [ok(3), ok(4)])
    output.commit_records("shard-00002", [ok(6), ok(7), ok(7)])
    output.commit_records("shard-00003", [ok(9), ok(10), ok(11)])
    _truncate(tmp_path / "out" / "records" / "shard-00003.parquet")
    return spec, output


def test_status_calls_short_duplicated_and_unreadable_record_files_damaged(tmp_path, capsys):
    _hand_made_output(tmp_path)
    status = job_status(str(tmp_path / "out"))
    states = {s["shard"]: s["state"] for s in status["shard_list"]}
    assert states == {
        "shard-00000": "done",
        "shard-00001": "damaged",
        "shard-00002": "damaged",
        "shard-00003": "damaged",
    }
    assert status["complete"] is False
    assert (status["shards"]["done"], status["shards"]["damaged"]) == (1, 3)
    notes = {s["shard"]: s.get("damaged") for s in status["shard_list"]}
    assert "holds 2 record(s) for the shard's 3 rows (1 row(s) without a record)" in notes["shard-00001"]
    assert "holds 3 record(s) for the shard's 3 rows (1 row(s) without a record, 1 extra)" in notes["shard-00002"]
    assert notes["shard-00003"].startswith("unreadable record file")
    text = format_status(status)
    assert "3 damaged" in text and "incomplete" in text
    assert status_main([str(tmp_path / "out"), "--errors"]) == 1  # the unreadable file is not read for errors
    assert "no error rows" in capsys.readouterr().out


def test_a_dry_run_names_damaged_shards_and_a_run_redoes_them(tmp_path):
    spec, output = _hand_made_output(tmp_path)
    files = {p: p.read_bytes() for p in (tmp_path / "out" / "records").iterdir()}
    lines = []
    plan = plan_job(spec, log=lines.append, read_only=True)
    assert plan.committed == {"shard-00000"}
    assert [t.shard_id for t in plan.tasks] == ["shard-00001", "shard-00002", "shard-00003"]
    assert {p: p.read_bytes() for p in (tmp_path / "out" / "records").iterdir()} == files  # nothing deleted
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 3 and all("a run would redo the shard" in w for w in warnings)

    lines.clear()
    plan = plan_job(spec, log=lines.append)  # a real run's plan, under its lease
    assert [t.shard_id for t in plan.tasks] == ["shard-00001", "shard-00002", "shard-00003"]
    assert output.committed_shards() == {"shard-00000"}  # the damaged record files are gone
    assert sum("redoing the shard" in line for line in lines) == 3
    assert plan.committed_counts == {"shard-00000": {"ok": 3, "error": 0}}


def test_a_rerun_redoes_only_the_damaged_shards_with_the_same_images(tmp_path, ray_local, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(9), manifest_schema())
    spec = write_spec(tmp_path / "s.yaml", spec_dict(str(manifest), str(tmp_path / "out")))
    out = tmp_path / "out"
    first = run_job(str(spec), log=lambda s: None)
    assert first["complete"]
    images = {p.relative_to(out): hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "images").rglob("*.png")}
    assert len(images) == 9

    output = Output(str(out))
    short = output.read_records("shard-00001").slice(0, 1)  # one of its three records left
    pq.write_table(short, out / "records" / "shard-00001.parquet")
    _truncate(out / "records" / "shard-00002.parquet")
    status = job_status(str(out))
    assert status["complete"] is False and status["rows"]["not_done"] == 5  # 2 missing + 3 unreadable

    # Before the rerun: a row of a sound shard still reproduces; one in the unreadable file is
    # not found, and the message says why; export refuses with the file's name.
    assert reproduce_main([str(out), "r000"]) == 0
    assert reproduce_main([str(out), "r007"]) == 1
    said = capsys.readouterr().out
    assert "row 0 id 'r000': identical" in said
    assert "id r007: no such record" in said and "not searched: shard-00002, record file damaged" in said
    assert export_main([str(out), str(tmp_path / "export"), "--format", "parquet"]) == 2
    assert "shard-00002.parquet: unreadable record file" in capsys.readouterr().err

    lines = []
    second = run_job(str(spec), log=lines.append)
    assert second["complete"] and (second["ok"], second["missing"]) == (9, 0)
    assert second["run"]["shards_run"] == 2 and second["run"]["shards_skipped"] == 1
    assert sum("redoing the shard" in line for line in lines) == 2
    records = [r for shard in sorted(output.committed_shards()) for r in _records(output, shard)]
    assert [r["row"] for r in records] == list(range(9))
    again = {p.relative_to(out): hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "images").rglob("*.png")}
    assert again == images
    assert {r["image_path"]: r["image_sha256"] for r in records} == {str(k): v for k, v in images.items()}
    assert job_status(str(out))["complete"] is True


def test_a_damaged_job_json_is_refused_naming_it_and_overwrite_still_works(tmp_path, capsys):
    """A truncated (or hand-edited) job.json used to end `run` and `reproduce` with exit 3 (an
    infrastructure fault, 'rerun resumes': it never would) and a JSON parser's message."""
    spec, output = _hand_made_output(tmp_path)
    job = tmp_path / "out" / "job.json"
    for damage in (job.read_bytes()[:200], b"[]"):
        job.write_bytes(damage)
        with pytest.raises(JobConflict, match=r"out/job.json is damaged: .*pass --overwrite"):
            plan_job(spec, log=lambda s: None)
        assert status_main([str(tmp_path / "out")]) == 2
        assert reproduce_main([str(tmp_path / "out"), "r000"]) == 2
        err = capsys.readouterr().err
        assert err.count("job.json is damaged") == 2
    plan = plan_job(spec, overwrite=True, log=lambda s: None)  # --overwrite starts again
    assert len(plan.tasks) == 4


def test_a_damaged_summary_json_is_read_past(tmp_path):
    """summary.json is rewritten from the record files at the end of every run."""
    _hand_made_output(tmp_path)
    (tmp_path / "out" / "summary.json").write_text('{"failed_sh')
    status = job_status(str(tmp_path / "out"))
    assert status["shards"]["done"] == 1 and status["last_run"] is None
