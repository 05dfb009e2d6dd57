"""`sdgen make-manifest` (jobs/templates.py): templates expand to the expected rows, the same
bytes twice; prompt lists convert; problems are named."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
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
    # A list's repeat is the list's own: named with its file and list advice, not template syntax.
    (tmp_path / "l.csv").write_text("id,prompt\na,x\nb,y\na,z\n")
    code, err = make([tmp_path / "l.csv", tmp_path / "l.parquet"], capsys)
    assert code == 2 and f"{tmp_path / 'l.csv'}: id 'a' repeats (rows 0 and 2 of the list)" in err, err
    assert "make the list's ids unique" in err and "{seed_index}" not in err and "{row}" not in err
    assert not list(tmp_path.glob("l.parquet*"))
    # Repeated per seed (ids a-s0, a-s1, ...), the rows named are still the list's.
    code, err = make([tmp_path / "l.csv", tmp_path / "l.parquet", "--seeds-per-prompt", "2"], capsys)
    assert code == 2 and "id 'a-s0' repeats (rows 0 and 2 of the list)" in err, err


# --- Bug hunt: make-manifest's inputs and outputs ------------------------------------------------


def test_out_must_be_a_parquet_file_that_is_not_the_source(tmp_path, capsys):
    """`make-manifest l.csv l.csv` replaced the list with Parquet bytes, and `l.csv out.csv` wrote
    Parquet into a file the runner then read as CSV: OUT must be a .parquet file other than
    SOURCE, and a folder or an empty OUT is named, not a raw errno with a temp file's name."""
    listing = tmp_path / "l.csv"
    listing.write_text("prompt,seed\na,1\n")
    before = listing.read_bytes()
    for out in (listing, tmp_path / "out.csv", tmp_path / "out.jsonl"):
        code, err = make([listing, out], capsys)
        assert code == 2 and f"OUT {out}: make-manifest writes Parquet; name OUT with a .parquet extension" in err
    assert (
        f"extension: {tmp_path / 'out.csv'} would be read as CSV)" in make([listing, tmp_path / "out.csv"], capsys)[1]
    )
    assert listing.read_bytes() == before and not (tmp_path / "out.csv").exists()
    assert make([listing, tmp_path / "l.parquet"], capsys)[0] == 0
    parquet = (tmp_path / "l.parquet").read_bytes()
    (tmp_path / "sub").mkdir()
    for same in (tmp_path / "l.parquet", tmp_path / "sub" / ".." / "l.parquet"):
        code, err = make([tmp_path / "l.parquet", same], capsys)
        assert code == 2 and f"OUT {same} is SOURCE itself" in err, err
    os.link(tmp_path / "l.parquet", tmp_path / "hard.parquet")  # another name of the same file
    code, err = make([tmp_path / "l.parquet", tmp_path / "hard.parquet"], capsys)
    assert code == 2 and "is SOURCE itself" in err, err
    assert (tmp_path / "l.parquet").read_bytes() == parquet
    (tmp_path / "d.parquet").mkdir()
    code, err = make([listing, tmp_path / "d.parquet"], capsys)
    assert code == 2 and f"OUT {tmp_path / 'd.parquet'}: is a folder" in err and ".tmp-" not in err, err
    (tmp_path / "d").mkdir()
    code, err = make([listing, tmp_path / "d"], capsys)
    assert code == 2 and f"OUT {tmp_path / 'd'}: is a folder" in err, err
    code, err = make([listing, ""], capsys)
    assert code == 2 and "OUT is empty" in err, err


def test_a_template_on_s3_or_as_a_file_uri_finds_its_init_images_beside_it(tmp_path, capsys, s3, monkeypatch):
    """A relative `init_images.source` is relative to the template, also when the template is on
    S3 (the prefix beside it) or given as file:///abs/t.yaml; it was read from the current folder."""
    bucket, client, _ = s3
    monkeypatch.chdir(tmp_path)  # no init/ folder here
    template = b'prompt: "a circle"\ninit_images: {source: init/, strengths: [0.5]}\n'
    client.put_object(Bucket=bucket, Key="tp/st.yaml", Body=template)
    for key in ("tp/init/a.png", "tp/init/b.jpg", "tp/initial/c.png", "init/d.png"):
        client.put_object(Bucket=bucket, Key=key, Body=b"img")
    assert make([f"s3://{bucket}/tp/st.yaml", tmp_path / "s.parquet"], capsys)[0] == 0
    assert pq.read_table(tmp_path / "s.parquet").column("init_image").to_pylist() == [
        f"s3://{bucket}/tp/init/a.png",
        f"s3://{bucket}/tp/init/b.jpg",
    ]
    client.put_object(Bucket=bucket, Key="tp/up.yaml", Body=template.replace(b"init/", b"../init"))
    assert make([f"s3://{bucket}/tp/up.yaml", tmp_path / "u.parquet"], capsys)[0] == 0
    assert pq.read_table(tmp_path / "u.parquet").column("init_image").to_pylist() == [f"s3://{bucket}/init/d.png"]
    client.put_object(Bucket=bucket, Key="tp/out.yaml", Body=template.replace(b"init/", b"../../init"))
    code, err = make([f"s3://{bucket}/tp/out.yaml", tmp_path / "o.parquet"], capsys)
    assert code == 2 and "init_images.source: ../../init: leaves the bucket" in err, err
    # file:// (percent-escaped, as Path.as_uri() writes a space)
    red = init_image(tmp_path / "my templates" / "init" / "red.png")
    (tmp_path / "my templates" / "t.yaml").write_bytes(template)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    uri = (tmp_path / "my templates" / "t.yaml").as_uri()
    assert "%20" in uri and make([uri, tmp_path / "out" / "f.parquet"], capsys)[0] == 0
    assert pq.read_table(tmp_path / "out" / "f.parquet").column("init_image").to_pylist() == [
        "../my templates/init/red.png"
    ]
    manifest = load_manifest([str(tmp_path / "out" / "f.parquet")])
    assert os.path.normpath(manifest.table.column("init_image_uri")[0].as_py()) == str(red)


def _row_problems(path):
    """What the runner says of each row of the manifest at `path` (None: the row would run)."""
    from jobs.manifest import parse_row
    from jobs.spec import SamplerSpec

    manifest = load_manifest([str(path)])
    rows = manifest.table.to_pylist()
    return [parse_row(i, row, row_id=manifest.ids[i], sampler=SamplerSpec())[1] for i, row in enumerate(rows)]


def test_karras_in_a_sampler_sweep_is_written_only_where_the_sampler_has_it(tmp_path, capsys):
    """`sampler: [ddim, dpmpp_2m], karras: true` wrote karras=true on the ddim rows, which the
    runner makes error records (Karras sigmas are dpmpp_2m's only)."""
    base = {"prompt": "a {c}", "vars": {"c": ["x", "y"]}, "seeds_per_prompt": 2}
    single = write(tmp_path / "t.yaml", {**base, "settings": {"sampler": ["ddim", "dpmpp_2m"], "karras": True}})
    assert make([single, tmp_path / "a.parquet"], capsys)[0] == 0
    rows = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert [(r["c"], r["sampler"], r["karras"]) for r in rows[::2]] == [
        ("x", "ddim", False), ("x", "dpmpp_2m", True), ("y", "ddim", False), ("y", "dpmpp_2m", True)
    ]  # fmt: skip
    assert _row_problems(tmp_path / "a.parquet") == [None] * 8
    # A sweep over both flags: ddim x true would repeat ddim x false, so it is left out.
    both = {**base, "settings": {"karras": [False, True], "steps": [3, 4], "sampler": ["ddim", "euler_a", "dpmpp_2m"]}}
    result = make_manifest(str(write(tmp_path / "b.yaml", both)), str(tmp_path / "b.parquet"))
    rows = pq.read_table(tmp_path / "b.parquet").to_pylist()
    combos = [(r["karras"], r["steps"], r["sampler"]) for r in rows if r["c"] == "x" and r["seed"] == rows[0]["seed"]]
    assert combos == [
        (False, 3, "ddim"), (False, 3, "euler_a"), (False, 3, "dpmpp_2m"),
        (False, 4, "ddim"), (False, 4, "euler_a"), (False, 4, "dpmpp_2m"),
        (True, 3, "dpmpp_2m"), (True, 4, "dpmpp_2m"),
    ]  # fmt: skip
    assert result["rows"] == len(rows) == 2 * 8 * 2 and _row_problems(tmp_path / "b.parquet") == [None] * 32
    # The row limit counts the rows that are made.
    code, err = make([tmp_path / "b.yaml", tmp_path / "c.parquet", "--max-rows", "31"], capsys)
    assert code == 2 and "x 8 settings combination(s) x" in err and "= 32 rows" in err, err


def test_strengths_that_leave_no_denoising_step_are_refused(tmp_path, capsys):
    """`settings: {steps: 2}` with `strengths: [0.1]`: int(2 * 0.1) = 0, every such row an error
    record at run time. Refused, naming the combination, by the runner's own rule."""
    from sdcore import rules

    init_image(tmp_path / "init" / "a.png")
    template = {
        "prompt": "a circle",
        "settings": {"steps": [2, 20]},
        "init_images": {"source": "init", "strengths": [0.1, 0.5]},
    }
    code, err = make([write(tmp_path / "t.yaml", template), tmp_path / "m.parquet"], capsys)
    assert code == 2 and f"init_images.strengths: 0.1 with settings.steps 2: {rules.strength_problem(0.1, 2)}" in err
    assert "0.5 with" not in err and "settings.steps 20" not in err and not list(tmp_path.glob("m.parquet*"))
    # Without settings.steps the job's steps decide, but no step count saves 0.0001.
    template = {"prompt": "a circle", "init_images": {"source": "init", "strengths": [0.0001, 0.5]}}
    code, err = make([write(tmp_path / "u.yaml", template), tmp_path / "m.parquet"], capsys)
    assert code == 2 and "init_images.strengths: 0.0001 leaves no denoising step at any step count" in err, err
    template["init_images"]["strengths"] = [0.01, 0.5]  # 0.01 x 100+ steps is fine: the job's steps decide
    assert make([write(tmp_path / "v.yaml", template), tmp_path / "m.parquet"], capsys)[0] == 0


def test_a_variable_giving_an_empty_prompt_or_id_is_refused(tmp_path, capsys):
    """The runner makes a row with an empty prompt (or id) an error record; a template whose
    variable makes one is refused, naming the row and the values, nothing written."""
    from jobs.manifest import parse_row
    from jobs.spec import SamplerSpec

    assert "prompt is empty" in parse_row(0, {"prompt": " ", "seed": 1}, row_id="0", sampler=SamplerSpec())[1]
    assert "id is empty" in parse_row(0, {"prompt": "a", "seed": 1}, row_id="", sampler=SamplerSpec())[1]
    template = write(tmp_path / "t.yaml", {"prompt": "{c}{d}", "vars": {"c": ["red", ""], "d": [" "]}})
    code, err = make([template, tmp_path / "m.parquet"], capsys)
    assert code == 2 and "prompt: row 1 (c='', d=' ') gets an empty prompt, which the runner refuses" in err, err
    assert not list(tmp_path.glob("m.parquet*"))
    template = write(tmp_path / "i.yaml", {"prompt": "a {c} circle", "vars": {"c": ["red", ""]}, "id": "{c}"})
    code, err = make([template, tmp_path / "m.parquet"], capsys)
    assert code == 2 and "id: row 1 (c='') gets an empty id" in err, err
    assert not list(tmp_path.glob("m.parquet*"))


def test_a_nested_format_width_is_capped_like_a_literal_one(tmp_path, capsys):
    """`{c:{w}}` with w = 1000000 wrote a 1,000,000-character prompt where `{c:1000000}` is
    refused: the nested values are checked, and the string is never built."""
    import time

    cases = [
        (
            {"c": ["x"], "w": [1000000]},
            "prompt: {c:{w}}: a width or precision over 99999 is refused (w=1000000 makes the spec '1000000')",
        ),
        ({"c": ["x"], "w": ["5", "99999999"]}, "(w='99999999' makes the spec '99999999')"),
    ]
    for variables, needle in cases:
        template = write(tmp_path / "t.yaml", {"prompt": "a {c:{w}} circle", "vars": variables})
        started = time.perf_counter()
        code, err = make([template, tmp_path / "m.parquet"], capsys)
        assert code == 2 and needle in err and time.perf_counter() - started < 5, err
        assert len(err) < 1000 and not list(tmp_path.glob("m.parquet*"))
    # Widths the check does not try (a=999 with b=999 only) are refused while the rows are made.
    template = write(tmp_path / "t.yaml", {"prompt": "{c:>{a}{b}}", "vars": {"c": ["x"], "a": [1, 999], "b": [1, 999]}})
    code, err = make([template, tmp_path / "m.parquet"], capsys)
    assert code == 2 and "prompt: row 3 (c='x', a=999, b=999): a format spec filled in as '>999999'" in err, err
    assert not list(tmp_path.glob("m.parquet*"))
    # Nested widths within the cap still work.
    template = write(tmp_path / "t.yaml", {"prompt": "{c:>{w}}", "vars": {"c": ["x"], "w": [3]}, "id": "{row:0{w}d}"})
    assert make([template, tmp_path / "m.parquet"], capsys)[0] == 0
    assert pq.read_table(tmp_path / "m.parquet").select(["id", "prompt"]).to_pylist() == [
        {"id": "000", "prompt": "  x"}
    ]


def test_tilde_init_images_in_a_list_are_kept_for_the_runner_to_expand(tmp_path, capsys):
    """`~/q.png` became `../../../root/q.png`-style paths (made relative before `~` was expanded)."""
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "p.csv").write_text("prompt,init_image,strength\na,~/q.png,0.5\nb,~,0.5\n")
    assert make([tmp_path / "lists" / "p.csv", tmp_path / "out" / "m.parquet"], capsys)[0] == 0
    assert pq.read_table(tmp_path / "out" / "m.parquet").column("init_image").to_pylist() == ["~/q.png", "~"]
    uris = load_manifest([str(tmp_path / "out" / "m.parquet")]).table.column("init_image_uri").to_pylist()
    assert uris[0] == os.path.expanduser("~/q.png")


def test_cr_only_and_utf16_lists_are_read_and_unreadable_ones_named(tmp_path, capsys):
    """A CR-only or UTF-16 CSV crashed make-manifest with a raw `_csv.Error` (exit 3, no file
    named). Both are read now, by make-manifest and by the runner alike; UTF-16 without a
    byte-order mark and UTF-32 are refused, naming the file and what to do, also by `sdgen run`."""
    from jobs.cli import run_main

    expected = [{"prompt": "a red circle", "seed": 1, "tag": "é"}, {"prompt": "b", "seed": 2, "tag": "x"}]
    files = {
        "cr.csv": "prompt,seed,tag\ra red circle,1,é\rb,2,x\r".encode(),
        "utf16.csv": "prompt,seed,tag\r\na red circle,1,é\r\nb,2,x\r\n".encode("utf-16"),
        "utf16be.tsv": b"\xfe\xff" + "prompt\tseed\ttag\na red circle\t1\té\nb\t2\tx\n".encode("utf-16-be"),
        "utf16.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in expected).encode("utf-16"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert make([tmp_path / name, tmp_path / f"{name}.parquet"], capsys)[0] == 0, name
        assert pq.read_table(tmp_path / f"{name}.parquet").to_pylist() == expected, name
        assert load_manifest([str(tmp_path / name)]).table.to_pylist() == expected, name
    broken = {
        "bomless.csv": "prompt,seed\na,1\n".encode("utf-16-le"),
        "utf32.csv": "prompt,seed\na,1\n".encode("utf-32"),
    }
    for name, data in broken.items():
        (tmp_path / name).write_bytes(data)
        code, err = make([tmp_path / name, tmp_path / "m.parquet"], capsys)
        assert code == 2 and f"{tmp_path / name}: cannot read as csv" in err and "save it as UTF-8" in err, err
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(f"manifest: {tmp_path / name}\noutput: {tmp_path / 'out'}\nmodel: {{weights: builtin:tiny}}\n")
        assert run_main([str(spec), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert f"manifest {tmp_path / name}: not a readable CSV file" in err and "save it as UTF-8" in err, err


def test_list_options_and_sources_are_checked_and_named(tmp_path, capsys):
    """--base-seed was silently ignored for a list with seeds (--seeds-per-prompt is refused
    there); an unknown extension was read as Parquet ("magic bytes")."""
    (tmp_path / "s.csv").write_text("prompt,seed\na,1\n")
    code, err = make([tmp_path / "s.csv", tmp_path / "m.parquet", "--base-seed", "3"], capsys)
    assert code == 2 and "--base-seed needs a list without a seed column" in err, err
    (tmp_path / "l.txt").write_text("prompt\na\n")
    code, err = make([tmp_path / "l.txt", tmp_path / "m.parquet"], capsys)
    assert code == 2 and f"{tmp_path / 'l.txt'}: unknown kind of file" in err and "magic" not in err, err
    assert ".yaml, .yml" in err and ".csv, .tsv, .jsonl, .ndjson, .parquet" in err
    assert not list(tmp_path.glob("m.parquet*"))


@pytest.mark.parametrize("command", ["make-manifest", "report", "grid", "export"])
def test_every_command_help_ends_with_the_exit_code_table(command, capsys):
    from jobs.cli import main
    from jobs.exit_codes import TABLE

    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.rstrip().endswith(TABLE), out
    if command == "make-manifest":
        assert ".parquet" in out.split("positional arguments:")[1].split("out")[0]  # SOURCE may be Parquet


def test_a_manifest_for_s3_goes_through_a_temporary_file_that_is_removed(tmp_path, s3):
    """An s3:// OUT was written into a BytesIO, the whole file in memory. It is written to a
    temporary file in $TMPDIR and uploaded (storage's `write_file`); the file is gone after.
    (What that saves in memory: bench/MANIFEST_RESULTS.md.)"""
    bucket, client, env = s3
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    src = write(tmp_path / "t.yaml", {"prompt": "a {c}", "vars": {"c": ["x", "y"]}, "repeat": 3000})
    code = f"import sys; from jobs.templates import main; sys.exit(main({[str(src), f's3://{bucket}/m.parquet']!r}))"
    done = run_command([PYTHON, "-c", code], env={**env, "TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stdout + done.stderr
    data = client.get_object(Bucket=bucket, Key="m.parquet")["Body"].read()
    assert pq.read_table(pa.BufferReader(data), columns=["seed"]).num_rows == 6000
    assert list(scratch.iterdir()) == []
