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


# --- Input checks: lists, refusals, limits (each ran wrong before: a traceback, a wrong manifest
# or a runaway expansion) -------------------------------------------------------------------------


def make(args, capsys):
    """`sdgen make-manifest ARGS` in this process: (exit status, stderr)."""
    from jobs.templates import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_list_ids_stay_unique_when_rows_are_repeated_per_seed(tmp_path, capsys):
    (tmp_path / "p.csv").write_text("id,prompt,score\nr1,a red circle,1\nr2,a blue square,2\n")
    assert make([tmp_path / "p.csv", tmp_path / "m.parquet", "--seeds-per-prompt", "2"], capsys)[0] == 0
    rows = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert [(r["id"], r["seed"]) for r in rows] == [
        ("r1-s0", derive_seed(0, 0, 0)),
        ("r1-s1", derive_seed(0, 0, 1)),
        ("r2-s0", derive_seed(0, 1, 0)),
        ("r2-s1", derive_seed(0, 1, 1)),
    ]
    assert load_manifest([str(tmp_path / "m.parquet")]).duplicates == {}
    # Integer ids (JSONL) likewise; a missing id stays missing; one seed per row keeps ids as they are.
    lines = [{"id": 7, "prompt": "x"}, {"id": None, "prompt": "y"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert make([tmp_path / "p.jsonl", tmp_path / "j.parquet", "--seeds-per-prompt", "3"], capsys)[0] == 0
    ids = pq.read_table(tmp_path / "j.parquet").column("id").to_pylist()
    assert ids == ["7-s0", "7-s1", "7-s2", None, None, None]
    assert make([tmp_path / "p.csv", tmp_path / "one.parquet"], capsys)[0] == 0
    assert pq.read_table(tmp_path / "one.parquet").column("id").to_pylist() == ["r1", "r2"]


def test_list_relative_init_images_are_rebased_onto_the_manifest_folder(tmp_path, capsys):
    red, blue = init_image(tmp_path / "lists" / "img" / "red.png"), init_image(tmp_path / "lists" / "blue.png")
    elsewhere = init_image(tmp_path / "abs" / "green.png")
    (tmp_path / "lists" / "p.csv").write_text(
        "prompt,init_image,strength\n"
        "a,img/red.png,0.5\n"
        "b,./blue.png,0.6\n"
        f"c,{elsewhere},0.7\n"
        "d,s3://bucket/x.png,0.8\n"
        "e,,\n"
    )
    out = tmp_path / "out" / "deeper" / "m.parquet"
    assert make([tmp_path / "lists" / "p.csv", out], capsys)[0] == 0
    assert pq.read_table(out).column("init_image").to_pylist() == [
        "../../lists/img/red.png",
        "../../lists/blue.png",
        str(elsewhere),
        "s3://bucket/x.png",
        None,
    ]
    uris = load_manifest([str(out)]).table.column("init_image_uri").to_pylist()
    assert [os.path.normpath(u) for u in uris[:3]] == [str(red), str(blue), str(elsewhere)]
    # Written beside the list: nothing to rebase, the values are kept byte for byte.
    assert make([tmp_path / "lists" / "p.csv", tmp_path / "lists" / "m.parquet"], capsys)[0] == 0
    assert pq.read_table(tmp_path / "lists" / "m.parquet").column("init_image").to_pylist()[:2] == [
        "img/red.png",
        "./blue.png",
    ]


def test_list_init_images_across_s3_become_absolute(tmp_path, capsys, s3):
    bucket, client, _ = s3
    red = init_image(tmp_path / "img" / "red.png")
    (tmp_path / "p.csv").write_text("prompt,init_image,strength\na,img/red.png,0.5\n")
    # A local list to an S3 manifest: the local file by its absolute path (as templates do).
    assert make([tmp_path / "p.csv", f"s3://{bucket}/m/a.parquet"], capsys)[0] == 0
    manifest = load_manifest([f"s3://{bucket}/m/a.parquet"])
    assert manifest.table.column("init_image").to_pylist() == [str(red)]
    # An S3 list to a local manifest: the image beside the list, by its s3:// URI.
    client.put_object(Bucket=bucket, Key="lists/p.csv", Body=b"prompt,init_image,strength\nb,img/x.png,0.5\n")
    assert make([f"s3://{bucket}/lists/p.csv", tmp_path / "b.parquet"], capsys)[0] == 0
    assert pq.read_table(tmp_path / "b.parquet").column("init_image").to_pylist() == [f"s3://{bucket}/lists/img/x.png"]


@pytest.mark.parametrize(
    ("template", "needle"),
    [
        ('prompt: "a {c:d} circle"\nvars: {c: [red]}\n', "prompt: {c:d} cannot format 'red': Unknown format code 'd'"),
        ('prompt: "a {c!x} circle"\nvars: {c: [red]}\n', "prompt: {c!x} cannot format 'red'"),
        ('prompt: "a circle"\nid: "{row:>999999}"\n', "id: {row:>999999}: a width or precision over 99999"),
        ('prompt: "a circle"\ncolumns: {1: x}\n', "columns: 1: a column name must be a non-empty string"),
        ('prompt: "a {n} circle"\nvars: {n: [99999999999999999999]}\n', "vars.n: integer 99999999999999999999 does"),
        ('prompt: "a circle"\ncolumns: {n: -99999999999999999999}\n', "columns.n: integer -99999999999999999999"),
        ('prompt: "a {v} circle"\nvars: {true: [x], v: [y]}\n', "vars.True: a variable name must be"),
        ('prompt: "a {row} circle"\nvars: {row: [red]}\nid: "{row}"\n', "vars.row: the name of a counter"),
    ],
)
def test_bad_format_specs_key_types_and_big_integers_are_named_not_tracebacks(tmp_path, capsys, template, needle):
    (tmp_path / "t.yaml").write_text(template)
    code, err = make([tmp_path / "t.yaml", tmp_path / "m.parquet"], capsys)
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("m.parquet*"))


def test_an_error_the_checks_cannot_foresee_is_one_line_and_leaves_no_file(tmp_path, capsys):
    # {row:c} formats row 55296 as a lone surrogate, which Arrow cannot encode as UTF-8.
    (tmp_path / "t.yaml").write_text('prompt: "a circle"\nid: "{row:c}"\nrepeat: 60000\n')
    code, err = make([tmp_path / "t.yaml", tmp_path / "m.parquet"], capsys)
    assert code == 2 and err.startswith("error: cannot build the manifest from") and "UnicodeEncodeError" in err
    assert err.count("\n") == 1 and not list(tmp_path.glob("m.parquet*"))


BOMB = (
    'x: [&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], '
    "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], "
    "&f [*e,*e,*e,*e,*e,*e,*e,*e,*e], &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]]"
)


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("columns:\n  {bomb}\n", "columns.x: values must be all strings"),
        ("vars:\n  {bomb}\n", "vars.x: values must be all strings"),
        ("vars:\n  {bomb}\n  y: {{choices: *g}}\n", "vars.y: values must be all strings"),
        ("settings:\n  {bomb}\n  steps: *g\n", "settings.steps: expected a value, got a list"),
        ("columns:\n  {bomb}\nseeds_per_prompt: *g\n", "seeds_per_prompt: expected an integer"),
    ],
)
def test_a_yaml_alias_bomb_is_refused_fast_with_a_short_message(tmp_path, capsys, where, needle):
    import time

    (tmp_path / "t.yaml").write_text('prompt: "a circle"\n' + where.format(bomb=BOMB))
    started = time.perf_counter()
    code, err = make([tmp_path / "t.yaml", tmp_path / "m.parquet"], capsys)
    assert time.perf_counter() - started < 5  # was 7 s and 1.1 GB printing a 351 MB message
    assert code == 2 and needle in err and len(err) < 5000, err[:2000]


def test_a_template_over_the_row_limit_is_refused_up_front_unless_raised(tmp_path, capsys):
    import time

    (tmp_path / "big.yaml").write_text('prompt: "a circle"\nrepeat: 1000000000\nseeds_per_prompt: 1000000\n')
    started = time.perf_counter()
    code, err = make([tmp_path / "big.yaml", tmp_path / "m.parquet"], capsys)
    assert code == 2 and time.perf_counter() - started < 5
    assert "repeat 1000000000 x 1 variable combination(s)" in err and "seeds_per_prompt 1000000" in err
    assert "= 1000000000000000 rows: over the limit of 100000000 (raise it with --max-rows)" in err
    small = write(tmp_path / "s.yaml", {"prompt": "a {c}", "vars": {"c": ["x", "y"]}, "seeds_per_prompt": 3})
    code, err = make([small, tmp_path / "m.parquet", "--max-rows", "5"], capsys)
    assert code == 2 and "= 6 rows: over the limit of 5" in err
    assert make([small, tmp_path / "m.parquet", "--max-rows", "6"], capsys)[0] == 0
    (tmp_path / "p.csv").write_text("prompt\na\nb\n")
    code, err = make([tmp_path / "p.csv", tmp_path / "l.parquet", "--seeds-per-prompt", "3", "--max-rows", "5"], capsys)
    assert code == 2 and "2 rows x --seeds-per-prompt 3 = 6 rows: over the limit of 5" in err


@pytest.mark.parametrize(
    ("source", "args", "needle"),
    [
        ("t.yaml", [], "settings.steps: expected a value or a non-empty list"),
        ("t.yaml", ["--seeds-per-prompt", "0"], "seeds_per_prompt: expected an integer in 1..1000000, got 0"),
        ("p.csv", ["--seeds-per-prompt", "0"], "--seeds-per-prompt: expected an integer in 1..1000000, got 0"),
        ("p.csv", ["--seeds-per-prompt", "-1"], "--seeds-per-prompt: expected an integer in 1..1000000, got -1"),
        ("p.csv", ["--base-seed", "-5"], "--base-seed: expected an integer in 0..9223372036854775807, got -5"),
        ("header.csv", [], "header.csv: no rows (a header only?)"),
    ],
)
def test_inputs_giving_nothing_useful_are_refused(tmp_path, capsys, source, args, needle):
    write(tmp_path / "t.yaml", {"prompt": "a {c}", "vars": {"c": ["x", "y"]}, "settings": {"steps": []}})
    (tmp_path / "p.csv").write_text("prompt\na\n")
    (tmp_path / "header.csv").write_text("prompt,seed\n")
    code, err = make([tmp_path / source, tmp_path / "m.parquet", *args], capsys)
    assert code == 2 and needle in err, err
    assert not list(tmp_path.glob("m.parquet*"))


@pytest.mark.parametrize(
    "weights",
    [[".inf", 1], [".nan", 1], [-1, 2], [0, 0], [1e308, 1e308], [10**400, 1], ["x", 1]],
)
def test_weights_must_be_finite_non_negative_and_not_all_zero(tmp_path, capsys, weights):
    text = ", ".join(str(w) for w in weights)
    (tmp_path / "t.yaml").write_text(f'prompt: "a {{s}} circle"\nvars: {{s: {{choices: [a, b], weights: [{text}]}}}}\n')
    code, err = make([tmp_path / "t.yaml", tmp_path / "m.parquet"], capsys)
    assert code == 2 and "vars.s.weights: expected 2 numbers >= 0 and finite, not all zero" in err, err
    assert "is not a variable" not in err  # the variable exists; only its weights are wrong


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_an_interrupted_run_leaves_no_temp_file(tmp_path, sig):
    import signal
    import subprocess
    import time

    # 20M rows: minutes of writing, so the signal lands mid-write.
    src = write(tmp_path / "t.yaml", {"prompt": "a {c}", "vars": {"c": list("abcdefghij")}, "repeat": 2_000_000})
    out = tmp_path / "m.parquet"
    proc = subprocess.Popen(
        [PYTHON, "-m", "jobs.cli", "make-manifest", str(src), str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("m.parquet.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp_path.glob("m.parquet.tmp-*")), "the temp file never appeared"
        proc.send_signal(getattr(signal, sig))
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "interrupted" in output and "Traceback" not in output, output
    assert not list(tmp_path.glob("m.parquet*"))


def test_an_id_that_repeats_across_rows_is_refused_naming_the_rows(tmp_path, capsys):
    """`id: "{c}"` with two seeds per prompt gives every id twice: at run time every repeat
    would be an error record. Refused when the manifest is made, nothing written."""
    template = write(tmp_path / "t.yaml", {"prompt": "a {c} circle", "vars": {"c": ["red", "blue"]}, "id": "{c}"})
    assert make([template, tmp_path / "ok.parquet"], capsys)[0] == 0  # one seed: each id once
    repeated = write(tmp_path / "r.yaml", {**yaml.safe_load(template.read_text()), "seeds_per_prompt": 2})
    code, err = make([repeated, tmp_path / "m.parquet"], capsys)
    assert code == 2 and "id 'red' repeats (rows 0 and 1)" in err and "{seed_index}" in err
    assert not list(tmp_path.glob("m.parquet*"))
    (tmp_path / "l.csv").write_text("id,prompt\na,x\nb,y\na,z\n")
    code, err = make([tmp_path / "l.csv", tmp_path / "l.parquet"], capsys)
    assert code == 2 and "id 'a' repeats (rows 0 and 2)" in err
