"""manifests/: the example manifest is reproducible from its script, the specs validate, and the
example job runs as the README says (`python jobs/run.py manifests/example.yaml`)."""

from __future__ import annotations

import json
import sys

import yaml

from jobs.manifest import load_manifest
from jobs.spec import load_spec

from conftest import PYTHON, REPO, run_command, write_spec


def test_make_example_recreates_the_committed_files(tmp_path):
    sys.path.insert(0, str(REPO / "manifests"))
    try:
        import make_example
    finally:
        sys.path.remove(str(REPO / "manifests"))
    make_example.write_example(tmp_path)
    committed = REPO / "manifests"
    assert (tmp_path / "example.parquet").read_bytes() == (committed / "example.parquet").read_bytes()
    for image in (committed / "init").glob("*.png"):
        assert (tmp_path / "init" / image.name).read_bytes() == image.read_bytes(), image.name


def test_example_specs_validate_and_the_manifest_has_both_modes():
    spec = load_spec(REPO / "manifests" / "example.yaml")
    assert spec.model.weights == "builtin:shapes"
    manifest = load_manifest(list(spec.manifest))
    modes = ["img2img" if v else "txt2img" for v in manifest.table.column("init_image_uri").to_pylist()]
    assert modes.count("img2img") >= 2 and modes.count("txt2img") >= 2
    assert all(
        (REPO / "manifests" / "init").joinpath(p.rsplit("/", 1)[1]).exists()
        for p in manifest.table.column("init_image").to_pylist()
        if p
    )
    s3 = load_spec(REPO / "manifests" / "example-s3.yaml")
    assert s3.manifest[0].startswith("s3://") and s3.output.startswith("s3://")


def test_the_example_job_runs(tmp_path):
    spec = yaml.safe_load((REPO / "manifests" / "example.yaml").read_text())
    spec["output"] = str(tmp_path / "out")  # everything else as shipped
    result = run_command([PYTHON, "jobs/run.py", str(write_spec(tmp_path / "example.yaml", spec))], timeout=400)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["complete"] and summary["ok"] == summary["total"] == 12, result.stdout
    # builtin:shapes draws what the example prompts ask for (judged from the PNGs' parameters)
    from shapesworld.evaluate import find_images, judge_files, summarize

    judgements, unreadable = judge_files(find_images([str(tmp_path / "out")]))
    assert len(judgements) == 12 and not unreadable
    result = summarize(judgements)
    assert result["colour"] >= 0.75 and result["shape"] >= 0.75 and result["position"] >= 0.75, result
