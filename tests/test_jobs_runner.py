"""jobs/runner.py in-process on a real local Ray with the tiny model: bad rows, independence
from workers/batch/shard sizes, refusing a different job on an existing output."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from jobs.manifest import ManifestError, load_manifest
from jobs.output import Output
from jobs.runner import JobConflict, check_job, check_model, job_document, plan_job, run_job, summary_lines
from jobs.spec import load_spec
from jobs.worker import ShardWorker, WorkerConfig, WorkerInfo

from conftest import init_image, manifest_schema, small_rows, spec_dict, write_manifest, write_spec


def run(tmp_path, spec, name="spec.yaml", **kwargs):
    lines = []
    summary = run_job(str(write_spec(tmp_path / name, spec)), log=lines.append, progress_every=1.0, **kwargs)
    return summary, lines


def records_of(output) -> list[dict]:
    output = Output(str(output))
    tables = output.read_all_records(output.committed_shards())
    return sorted((r for t in tables.values() for r in t.to_pylist()), key=lambda r: r["row"])


def test_bad_rows_become_error_records_and_the_rest_completes(tmp_path, ray_local):
    init_image(tmp_path / "m" / "init" / "ok.png")
    (tmp_path / "m" / "init" / "corrupt.png").write_bytes(b"garbage")
    rows = [
        {"id": "good-1", "prompt": "a circle", "seed": 1, "strength": None, "init_image": None, "steps": "2"},
        {"id": "no-prompt", "prompt": None, "seed": 2, "strength": None, "init_image": None, "steps": None},
        {"id": "zero", "prompt": "x", "seed": 3, "strength": 0.0, "init_image": "init/ok.png", "steps": None},
        {"id": "too-strong", "prompt": "x", "seed": 4, "strength": 1.5, "init_image": "init/ok.png", "steps": None},
        {"id": "missing-init", "prompt": "x", "seed": 5, "strength": 0.5, "init_image": "init/none.png", "steps": None},
        {
            "id": "corrupt-init",
            "prompt": "x",
            "seed": 6,
            "strength": 0.5,
            "init_image": "init/corrupt.png",
            "steps": None,
        },
        {"id": "good-1", "prompt": "duplicate", "seed": 7, "strength": None, "init_image": None, "steps": None},
        {"id": "good-2", "prompt": "a square", "seed": 8, "strength": 0.5, "init_image": "init/ok.png", "steps": None},
    ]
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("seed", pa.int64()),
            ("strength", pa.float64()),
            ("init_image", pa.string()),
            ("steps", pa.string()),
        ]
    )
    manifest = write_manifest(tmp_path / "m" / "m.parquet", rows, schema)
    summary, lines = run(tmp_path, spec_dict(str(manifest), str(tmp_path / "out"), execution={"shard_size": 3}))
    assert summary["complete"] and (summary["ok"], summary["error"], summary["total"]) == (1, 7, 8)
    assert any("column 'steps' has type string" in line for line in lines)

    records = records_of(tmp_path / "out")
    assert [r["row"] for r in records] == list(range(8))
    errors = {r["row"]: r["error"] for r in records if r["status"] == "error"}
    assert "column 'steps' has type string, expected integer" in errors[0]  # wrong column type
    assert "prompt is missing" in errors[1]
    assert "strength: 0 outside (0, 1]" in errors[2]
    assert "strength: 1.5 outside (0, 1]" in errors[3]
    assert "init_image not found" in errors[4]
    assert "not a readable image" in errors[5]
    assert "duplicate id 'good-1' (first used by manifest row 0)" in errors[6]
    assert records[7]["status"] == "ok" and records[7]["id"] == "good-2"


def test_images_do_not_depend_on_workers_batch_size_or_shard_size(tmp_path, ray_local):
    """With batch_invariant: true (one row per UNet forward). The default, fixed-shape batches,
    ties a row's last bits to its forward's shape instead, which its record keeps (reproduce)."""
    init_image(tmp_path / "m" / "init" / "a.png")
    manifest = write_manifest(tmp_path / "m" / "m.parquet", small_rows(6, img2img_every=3), manifest_schema())
    pngs = []
    for i, execution in enumerate(
        [
            {"workers": 1, "batch_size": 1, "shard_size": 2, "batch_invariant": True},
            {"workers": 2, "batch_size": 3, "shard_size": 5, "batch_invariant": True},
        ]
    ):
        out = tmp_path / f"out-{i}"
        summary, _ = run(tmp_path, spec_dict(str(manifest), str(out), execution=execution), name=f"s{i}.yaml")
        assert summary["complete"] and summary["ok"] == 6
        pngs.append({r["id"]: (out / r["image_path"]).read_bytes() for r in records_of(out)})
    assert pngs[0].keys() == pngs[1].keys() and len(pngs[0]) == 6
    assert pngs[0] == pngs[1]


def test_a_different_job_on_an_existing_output_is_refused(tmp_path, ray_local):
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(2), manifest_schema())
    spec = spec_dict(str(manifest), str(tmp_path / "out"))
    summary, _ = run(tmp_path, spec)
    assert summary["complete"]
    job = Output(str(tmp_path / "out")).read_job()
    assert job["model"]["fingerprint"] and job["manifest"]["fingerprint"] == load_manifest([str(manifest)]).fingerprint
    assert job["spec"]["sampler"]["steps"] == 3 and job["versions"]["torch"] and job["versions"]["sdcore"]

    # Workers, batch size, name: not part of the job's identity; every shard is already done.
    summary, lines = run(
        tmp_path,
        {
            **spec_dict(str(manifest), str(tmp_path / "out"), execution={"workers": 2, "batch_size": 1}),
            "name": "renamed",
        },
    )
    assert summary["complete"] and summary["run"]["shards_run"] == 0
    assert any("nothing to do" in line for line in lines)

    with pytest.raises(JobConflict, match=r"sampler\.steps: 3 on disk, 4 now"):
        run(tmp_path, spec_dict(str(manifest), str(tmp_path / "out"), sampler={"steps": 4}))
    write_manifest(tmp_path / "m.parquet", small_rows(3), manifest_schema())
    with pytest.raises(JobConflict, match="manifest content") as info:
        run(tmp_path, spec)
    assert "--overwrite" in str(info.value)

    summary, _ = run(tmp_path, spec_dict(str(manifest), str(tmp_path / "out"), sampler={"steps": 2}), overwrite=True)
    assert summary["complete"] and summary["total"] == 3
    assert {r["steps"] for r in records_of(tmp_path / "out")} == {2}


def test_the_same_tensors_built_into_another_architecture_are_refused(tmp_path, tiny_pipe):
    """The fingerprint covers the tensors; the heads of attention show in no tensor's shape. A
    .ckpt of the tiny model's tensors without sdcore's config metadata loads with inferred heads
    (8 and 1 instead of 2 and 4): the same fingerprint, other images. A resume with it is refused."""
    import json

    import torch
    from safetensors.torch import load_file

    import sdcore
    from sdcore.weights import export_single_file

    export_single_file(tiny_pipe, tmp_path / "tiny.safetensors")
    torch.save(load_file(str(tmp_path / "tiny.safetensors")), tmp_path / "tiny.ckpt")
    inferred = sdcore.load_pipeline(str(tmp_path / "tiny.ckpt"))
    assert inferred.fingerprint == tiny_pipe.fingerprint and inferred.config != tiny_pipe.config

    def info(pipe):
        worker = ShardWorker(
            WorkerConfig(weights="builtin:tiny", output=str(tmp_path / "out"), dtype="float32"), pipeline=pipe
        )
        return worker.info()

    manifest = load_manifest([str(write_manifest(tmp_path / "m.parquet", small_rows(2), manifest_schema()))])
    spec = load_spec(write_spec(tmp_path / "s.yaml", spec_dict(str(tmp_path / "m.parquet"), str(tmp_path / "out"))))
    existing = json.loads(json.dumps(job_document(spec, manifest, info(tiny_pipe), None, {})))  # as read back
    assert existing["model"]["config"]["unet"]["num_heads"] == 2
    assert check_model(existing, info(tiny_pipe)) == []
    problems = check_model(existing, info(inferred))
    assert any(p.startswith("model architecture text_encoder.num_heads: 4 on disk, 1 now") for p in problems)
    assert any(p.startswith("model architecture unet.num_heads: 2 on disk, 8 now") for p in problems)
    del existing["model"]["config"]  # an output of an sdgen that did not record it: not compared
    assert check_model(existing, info(inferred)) == []


def test_model_dtype_as_written_is_not_compared_the_resolved_one_is(tmp_path):
    """`auto` resolved to float32 here, then written out as `float32` (what the refusal's hint
    says to do): the same job. It was refused as a changed `model.dtype`."""
    manifest = load_manifest([str(write_manifest(tmp_path / "m.parquet", small_rows(2), manifest_schema()))])
    auto = load_spec(
        write_spec(tmp_path / "a.yaml", spec_dict(str(tmp_path / "m.parquet"), "out", model={"dtype": "auto"}))
    )
    fixed = load_spec(write_spec(tmp_path / "f.yaml", spec_dict(str(tmp_path / "m.parquet"), "out")))
    info = WorkerInfo("w", "f" * 64, "float32", "cpu", "cpu", {})
    existing = json.loads(json.dumps(job_document(auto, manifest, info, None, {})))
    assert fixed.model.dtype == "float32" and check_job(existing, fixed, manifest) == []


def test_model_changes_are_refused():
    info = WorkerInfo("w", "b" * 64, "float16", "cuda", "gpu", {})
    existing = {"model": {"fingerprint": "a" * 64, "dtype": "float32", "device": "cpu"}}
    problems = check_model(existing, info)
    assert any(p.startswith("model fingerprint") for p in problems)
    assert any(p.startswith("model dtype: float32 on disk, float16 now") for p in problems)
    assert check_model(None, info) == []


def test_dry_run_and_invalid_manifest(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(5), manifest_schema())
    summary, _ = run(tmp_path, spec_dict(str(manifest), str(tmp_path / "out")), dry_run=True)
    assert summary["shards"] == {"total": 2, "committed": 0, "to_run": 2}
    assert not (tmp_path / "out").exists()
    (tmp_path / "m.csv").write_text("prompt,seed,steps\na,1,3\nb,2,ten\n")  # a cell steps cannot hold
    summary, lines = run(tmp_path, spec_dict(str(tmp_path / "m.csv"), str(tmp_path / "out")), dry_run=True)
    assert (summary["rows"]["ok"], summary["rows"]["bad"]) == (1, 1)
    assert any("e.g. row 1: steps: 'ten' is not an integer" in line for line in lines)
    # Invalid UTF-8 in one Parquet cell (Parquet does not check string bytes): that row only,
    # as the worker finds it, not a crash of the dry run.
    import pyarrow.parquet as pq

    prompts = pa.array([b"a circle", b"\xff\xfe bad"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"prompt": prompts, "seed": [1, 2]}), tmp_path / "utf8.parquet")
    summary, lines = run(tmp_path, spec_dict(str(tmp_path / "utf8.parquet"), str(tmp_path / "out")), dry_run=True)
    assert (summary["rows"]["ok"], summary["rows"]["bad"]) == (1, 1)
    assert any("row 1: invalid UTF-8 (not readable) in column(s) prompt" in line for line in lines)
    write_manifest(tmp_path / "bad.parquet", [{"prompt": "a"}])
    with pytest.raises(ManifestError, match="missing required column 'seed'"):
        run(tmp_path, spec_dict(str(tmp_path / "bad.parquet"), str(tmp_path / "out")))


def test_a_dry_run_warns_of_rows_whose_texts_clip_will_cut(tmp_path):
    """CLIP reads 75 tokens of a prompt and of a negative prompt; the rest is cut, as diffusers
    cuts it. The dry run counts those rows apart (a warning: they still run) and names some."""
    rows = [{**row, "guidance_scale": None} for row in small_rows(6)]
    rows[1]["prompt"] = "a large red circle " + "and a red circle " * 20  # 84 tokens: 9 cut
    rows[4]["prompt"] = "cat " * 76  # one token too many
    rows[3]["negative"] = "blurry " * 80
    rows.append({**small_rows(7)[6], "guidance_scale": 1.0, "negative": "blurry " * 80})  # not guided: not encoded
    rows.append({**small_rows(8)[7], "prompt": "cat " * 90, "seed": -1})  # an error record: never encoded
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    summary, lines = run(tmp_path, spec_dict(str(manifest), str(tmp_path / "out")), dry_run=True)
    assert (summary["rows"]["ok"], summary["rows"]["bad"]) == (7, 1)  # warnings, not errors
    assert summary["rows"]["truncated"] == {
        "prompt": {
            "rows": 2,
            "examples": [{"row": 1, "id": "r001", "tokens_dropped": 9}, {"row": 4, "id": "r004", "tokens_dropped": 1}],
        },
        "negative": {"rows": 1, "examples": [{"row": 3, "id": "r003", "tokens_dropped": 5}]},
    }
    warnings = [line for line in lines if "longer than CLIP's 75 tokens" in line]
    assert warnings == [
        "[sdgen] warning: 2 row(s) have a prompt longer than CLIP's 75 tokens; the tokens past the 75th are "
        "dropped (the rows still run), e.g. row 1 (id 'r001': 9 dropped), row 4 (id 'r004': 1 dropped)",
        "[sdgen] warning: 1 row(s) have a negative prompt longer than CLIP's 75 tokens; the tokens past the 75th "
        "are dropped (the rows still run), e.g. row 3 (id 'r003': 5 dropped)",
    ]
    # A manifest whose texts all fit: no warning.
    manifest = write_manifest(tmp_path / "fits.parquet", small_rows(3), manifest_schema())
    summary, lines = run(tmp_path, spec_dict(str(manifest), str(tmp_path / "out")), dry_run=True)
    assert summary["rows"]["truncated"]["prompt"] == {"rows": 0, "examples": []}
    assert not any("CLIP" in line for line in lines)


def test_spec_paths_are_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write_spec(tmp_path / "s.yaml", spec_dict("m.parquet", "out")))
    assert spec.manifest == (str(tmp_path / "m.parquet"),) and spec.output == str(tmp_path / "out")


def test_plan_skips_committed_shards_and_keeps_partials_of_the_rest(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(5), manifest_schema())
    spec = load_spec(write_spec(tmp_path / "s.yaml", spec_dict(str(manifest), str(tmp_path / "out"))))
    output = Output(spec.output)
    info = WorkerInfo("w", "f" * 64, "float32", "cpu", "cpu", {})
    output.write_job(job_document(spec, load_manifest(spec.manifest), info, None, {}))
    output.commit_records("shard-00000", [{"row": r, "id": f"r{r}", "status": "ok"} for r in range(3)])
    output.write_partial("shard-00000", [{"row": 0, "id": "r0", "status": "ok"}])  # left by a crash after commit
    output.write_partial("shard-00001", [{"row": 3, "id": "r3", "status": "ok"}])  # a saved batch: kept
    lines = []
    plan = plan_job(spec, log=lines.append)
    assert plan.committed == {"shard-00000"} and [t.shard_id for t in plan.tasks] == ["shard-00001"]
    assert [k.split("/")[1] for k in output.partial_keys()] == ["shard-00001"]
    assert lines[-1].endswith("1 shard(s) already committed, 1 to run")
    assert plan.dry_run_summary() == {"total_rows": 5, "shards": {"total": 2, "committed": 1, "to_run": 1}}

    again = plan_job(spec, overwrite=True, log=lines.append)  # nothing is deleted before the model is checked
    assert again.committed == set() and len(again.tasks) == 2 and output.committed_shards() == {"shard-00000"}


def test_records_without_job_json_are_refused(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(2), manifest_schema())
    Output(str(tmp_path / "out")).commit_records("shard-00000", [{"row": 0, "id": "a", "status": "ok"}])
    with pytest.raises(JobConflict, match="holds records but no job.json"):
        plan_job(
            str(write_spec(tmp_path / "s.yaml", spec_dict(str(manifest), str(tmp_path / "out")))), log=lambda line: None
        )


def test_summary_lines():
    summary = {
        "complete": False,
        "ok": 5,
        "error": 1,
        "missing": 2,
        "total": 8,
        "shards": {"total": 3, "done": 2, "failed": 1, "pending": 0},
        "failed_shards": {"shard-00002": "RuntimeError: boom"},
        "run": {"rows_run": 6, "wall_s": 75.2, "rows_per_s": 0.5},
    }
    assert summary_lines(summary) == [
        (
            "[sdgen] INCOMPLETE (1 shard(s) failed, rerun to retry): 5 ok, 1 error, 2 missing of 8 rows; 2/3 shards; "
            "this run 6 rows in 1m15s (0.5 rows/s after model load)"
        ),
        "[sdgen]   shard-00002: RuntimeError: boom",
    ]


def test_a_dry_run_changes_nothing_in_the_output(tmp_path):
    """A dry run holds no lease, so it must not touch the output: not the stale partial files
    a real run would clean up, not another run's lease, nothing."""
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(5), manifest_schema())
    spec = load_spec(write_spec(tmp_path / "s.yaml", spec_dict(str(manifest), str(tmp_path / "out"))))
    output = Output(spec.output)
    info = WorkerInfo("w", "f" * 64, "float32", "cpu", "cpu", {})
    output.write_job(job_document(spec, load_manifest(spec.manifest), info, None, {}))
    output.commit_records("shard-00000", [{"row": r, "id": f"r{r}", "status": "ok"} for r in range(3)])
    output.write_partial("shard-00000", [{"row": 0, "id": "r0", "status": "ok"}])  # stale: a real run deletes it
    output.write_inflight("shard-00000", [1, 2], False, 1)
    output.write_partial("shard-00001", [{"row": 3, "id": "r3", "status": "ok"}])
    output.storage.write("lease.json", b'{"token": "another run"}')

    def tree() -> dict[str, tuple[bytes, int]]:
        files = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
        return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}

    before = tree()
    lines = []
    summary = run_job(spec, dry_run=True, log=lines.append)
    assert summary["shards"] == {"total": 2, "committed": 1, "to_run": 1}
    assert tree() == before
    # The estimate is for the shard left (rows 3 and 4), not the whole manifest.
    assert (summary["rows"]["ok"], summary["rows"]["ok_to_run"]) == (5, 2)
    assert any("for 2 image(s) (the shards not yet committed; 5 in all)" in line for line in lines), lines
    plan_job(spec, log=lambda s: None)  # a real run's plan (under its lease) does clean up
    assert [k.split("/")[1] for k in output.partial_files()] == ["shard-00001"]
