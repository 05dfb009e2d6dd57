"""`sdgen make-manifest` (jobs/templates.py): templates expand to the expected rows, the same
bytes twice; prompt lists convert; problems are named."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.manifest import load_manifest
from jobs.templates import TemplateError, derive_seed, make_manifest

from conftest import PYTHON, REPO, init_image, run_command

TEMPLATE = {
    "prompt": "a {size} {color} {shape}",
    "negative": "blurry {shape}",
    "vars": {
        "color": ["red", "blue"],
        "shape": ["circle", "square", "triangle"],
        "size": {"choices": ["small", "large"], "weights": [3, 1]},
    },
    "seeds_per_prompt": 2,
    "base_seed": 42,
    "settings": {"sampler": ["ddim", "euler_a"], "steps": 4},
    "columns": {"split": "train"},
    "id": "{color}-{shape}-{row}",
}


def write(path, data):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_template_expands_to_the_expected_rows_and_the_same_bytes_twice(tmp_path):
    template = {**TEMPLATE, "id": "{color}-{shape}-{row}"}
    src = write(tmp_path / "t.yaml", template)
    result = make_manifest(str(src), str(tmp_path / "a.parquet"))
    make_manifest(str(src), str(tmp_path / "b.parquet"))
    a, b = (tmp_path / "a.parquet").read_bytes(), (tmp_path / "b.parquet").read_bytes()
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()
    rows = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert result["rows"] == len(rows) == 2 * 3 * 2 * 2  # colors x shapes x samplers x seeds
    assert list(rows[0]) == [
        "id", "prompt", "negative", "seed", "sampler", "steps", "color", "shape", "size", "split"
    ]  # fmt: skip
    first = rows[0]
    assert first["id"] == "red-circle-0" and first["prompt"] == f"a {first['size']} red circle"
    assert first["negative"] == "blurry circle" and first["steps"] == 4 and first["split"] == "train"
    # Order: prompt, then setting, then seed index; a prompt's seeds are shared by every setting.
    assert [(r["color"], r["shape"], r["sampler"]) for r in rows[:4]] == [("red", "circle", "ddim")] * 2 + [
        ("red", "circle", "euler_a")
    ] * 2
    assert [r["seed"] for r in rows[:4]] == [derive_seed(42, 0, 0), derive_seed(42, 0, 1)] * 2
    assert rows[4]["seed"] == derive_seed(42, 1, 0) and len({r["seed"] for r in rows}) == 12
    # Weighted draws: per prompt, deterministic, both values occur over many prompts.
    assert len({(r["color"], r["shape"], r["size"]) for r in rows}) == 6
    many = write(tmp_path / "m.yaml", {**TEMPLATE, "id": None, "repeat": 200, "settings": {}, "seeds_per_prompt": 1})
    make_manifest(str(many), str(tmp_path / "m.parquet"))
    sizes = pq.read_table(tmp_path / "m.parquet", columns=["size"]).column("size").to_pylist()
    assert 0.65 < sizes.count("small") / len(sizes) < 0.85  # weights 3:1
    # The runner reads it: the variables are labels.
    manifest = load_manifest([str(tmp_path / "a.parquet")])
    assert manifest.label_columns == ("color", "shape", "size", "split")


def test_zip_init_images_and_base_seed_override(tmp_path):
    for name in ("b.png", "a.png", "notes.txt"):
        if name.endswith(".png"):
            init_image(tmp_path / "inits" / name)
        else:
            (tmp_path / "inits" / name).write_text("x")
    template = {
        "prompt": "a {color} {shape}",
        "vars": {"color": ["red", "blue"], "shape": ["circle", "square"]},
        "combine": "zip",
        "init_images": {"source": "inits", "strengths": [0.5, 0.8]},
    }
    src = write(tmp_path / "t.yaml", template)
    (tmp_path / "out").mkdir()
    make_manifest(str(src), str(tmp_path / "out" / "m.parquet"), base_seed=7)
    rows = pq.read_table(tmp_path / "out" / "m.parquet").to_pylist()
    assert [(r["prompt"], r["init_image"], r["strength"]) for r in rows] == [
        ("a red circle", "../inits/a.png", 0.5),
        ("a red circle", "../inits/a.png", 0.8),
        ("a red circle", "../inits/b.png", 0.5),
        ("a red circle", "../inits/b.png", 0.8),
        ("a blue square", "../inits/a.png", 0.5),
        ("a blue square", "../inits/a.png", 0.8),
        ("a blue square", "../inits/b.png", 0.5),
        ("a blue square", "../inits/b.png", 0.8),
    ]
    assert {r["seed"] for r in rows[:4]} == {derive_seed(7, 0, 0)}
    manifest = load_manifest([str(tmp_path / "out" / "m.parquet")])
    assert os.path.normpath(manifest.table.column("init_image_uri")[0].as_py()) == str(tmp_path / "inits" / "a.png")


def test_s3_init_images_and_s3_output(tmp_path, s3):
    bucket, client, _ = s3
    for key in ("inits/x.png", "inits/y.jpg", "inits/readme.md"):
        client.put_object(Bucket=bucket, Key=key, Body=b"img")
    src = write(
        tmp_path / "t.yaml",
        {"prompt": "a circle", "init_images": {"source": f"s3://{bucket}/inits", "strengths": 0.6}},
    )
    make_manifest(str(src), f"s3://{bucket}/manifests/m.parquet")
    manifest = load_manifest([f"s3://{bucket}/manifests/m.parquet"])
    assert manifest.table.column("init_image").to_pylist() == [
        f"s3://{bucket}/inits/x.png",
        f"s3://{bucket}/inits/y.jpg",
    ]


def test_template_problems_are_all_named(tmp_path):
    bad = {
        "prompt": "a {colour} {shape}",
        "vars": {"shape": ["circle"], "seed": [1], "w": {"choices": ["a"], "weights": [1, 2]}},
        "settings": {"sampler": "plms", "steps": 0},
        "combine": "cross",
        "extra": 1,
    }
    with pytest.raises(TemplateError) as info:
        make_manifest(str(write(tmp_path / "t.yaml", bad)), str(tmp_path / "m.parquet"))
    message = str(info.value)
    for needle in (
        "extra: unknown key",
        "prompt: {colour} is not a variable",
        "vars.w.weights: expected 1 numbers",
        "settings.sampler: unknown sampler 'plms'",
        "settings.steps: expected an integer in 1..999, got 0",
        "combine: expected product or zip",
        "'seed' is a manifest column",
    ):
        assert needle in message
    assert not (tmp_path / "m.parquet").exists()


def test_prompt_lists_convert_with_derived_seeds(tmp_path):
    (tmp_path / "p.csv").write_text("prompt,color\na red circle,red\na blue square,blue\n")
    result = run_command(
        [PYTHON, "-m", "jobs.cli", "make-manifest", str(tmp_path / "p.csv"), str(tmp_path / "m.parquet"),
         "--base-seed", "3", "--seeds-per-prompt", "2"]
    )  # fmt: skip
    assert "4 rows" in result.stdout
    rows = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert [(r["prompt"], r["seed"], r["color"]) for r in rows] == [
        ("a red circle", derive_seed(3, 0, 0), "red"),
        ("a red circle", derive_seed(3, 0, 1), "red"),
        ("a blue square", derive_seed(3, 1, 0), "blue"),
        ("a blue square", derive_seed(3, 1, 1), "blue"),
    ]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "x", "seed": 5, "tag": [1, 2]}) + "\n")
    make_manifest(str(tmp_path / "p.jsonl"), str(tmp_path / "j.parquet"))
    assert pq.read_table(tmp_path / "j.parquet").to_pylist() == [{"prompt": "x", "seed": 5, "tag": [1, 2]}]
    bad = run_command([PYTHON, "-m", "jobs.cli", "make-manifest", str(tmp_path / "nope.csv"), "x.parquet"], check=False)
    assert bad.returncode == 2 and "error:" in bad.stdout and "Traceback" not in bad.stdout


def test_million_row_template_streams_in_bounded_memory(tmp_path):
    """Peak RSS of a 1M-row expansion stays under the bound recorded in bench/MANIFEST_RESULTS.md
    (rows are made lazily, one row group in memory at a time)."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        from bench_make_manifest import BOUND_MB, measure
    finally:
        sys.path.pop(0)
    result = measure(1_000_000, tmp_path)
    assert result["rows"] == 1_000_000 and result["row_groups"] == 16
    assert result["peak_rss_mb"] < BOUND_MB, result


def test_the_committed_sweep_manifest_is_its_template_expanded(tmp_path):
    from jobs.spec import load_spec

    make_manifest(str(REPO / "manifests" / "shapes-sweep.yaml"), str(tmp_path / "m.parquet"))
    assert (tmp_path / "m.parquet").read_bytes() == (REPO / "manifests" / "shapes-sweep.parquet").read_bytes()
    spec = load_spec(REPO / "manifests" / "shapes-sweep-job.yaml")
    assert spec.model.weights == "builtin:shapes"
    manifest = load_manifest([str(REPO / "manifests" / "shapes-sweep.parquet")])
    assert manifest.num_rows == 18 and manifest.label_columns == ("colour", "shape", "size", "split")
