"""jobs/manifest.py: manifest-level checks fail fast; row-level problems become messages."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pytest

from jobs.manifest import ManifestError, load_manifest, parse_row, resolve_init_image, safe_name
from jobs.spec import SamplerSpec

from conftest import manifest_schema, small_rows, write_manifest

SAMPLER = SamplerSpec(steps=10, width=32, height=32)


def test_loads_rows_fingerprint_and_resolves_init_images(tmp_path):
    path = write_manifest(tmp_path / "m" / "a.parquet", small_rows(4, img2img_every=2), manifest_schema())
    manifest = load_manifest([str(path)])
    assert manifest.num_rows == 4
    assert manifest.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest.ids == ["r000", "r001", "r002", "r003"]
    assert manifest.table.column("init_image_uri").to_pylist() == [
        None,
        str(tmp_path / "m" / "init/a.png"),
        None,
        str(tmp_path / "m" / "init/a.png"),
    ]
    assert manifest.duplicates == {} and manifest.bad_columns == {}


def test_several_files_and_globs_concatenate_in_order(tmp_path):
    a = write_manifest(tmp_path / "p-0.parquet", small_rows(2))
    rows = small_rows(4)[2:]
    write_manifest(tmp_path / "p-1.parquet", rows)
    manifest = load_manifest([str(tmp_path / "p-*.parquet")])
    assert manifest.ids == ["r000", "r001", "r002", "r003"]
    single = load_manifest([str(a)])
    assert single.fingerprint != manifest.fingerprint


def test_default_ids_are_row_numbers(tmp_path):
    rows = [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}]
    manifest = load_manifest([str(write_manifest(tmp_path / "m.parquet", rows))])
    assert manifest.ids == ["0", "1"]


def test_duplicates_keep_their_first_row(tmp_path):
    rows = [
        {"id": "x", "prompt": "a", "seed": 1},
        {"id": "y", "prompt": "b", "seed": 2},
        {"id": "x", "prompt": "c", "seed": 3},
    ]
    manifest = load_manifest([str(write_manifest(tmp_path / "m.parquet", rows))])
    assert manifest.duplicates == {2: 0}


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([{"seed": 1}], "missing required column 'prompt'"),
        ([{"prompt": "a"}], "missing required column 'seed'"),
        ([{"prompt": 1, "seed": 1}], "column 'prompt' has type int64, expected string"),
        ([{"prompt": "a", "seed": "1"}], "column 'seed' has type string, expected integer"),
        ([{"id": 1.5, "prompt": "a", "seed": 1}], "column 'id' has type double, expected string"),
    ],
)
def test_manifest_level_errors_name_the_column(tmp_path, rows, needle):
    path = write_manifest(tmp_path / "m.parquet", rows)
    with pytest.raises(ManifestError, match=needle):
        load_manifest([str(path)])


def test_unreadable_empty_and_missing_manifests(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        load_manifest([str(tmp_path / "bad.parquet")])
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest([str(tmp_path / "none.parquet")])
    with pytest.raises(ManifestError, match="matches no file"):
        load_manifest([str(tmp_path / "none-*.parquet")])
    empty = write_manifest(tmp_path / "empty.parquet", [], manifest_schema())
    with pytest.raises(ManifestError, match="has no rows"):
        load_manifest([str(empty)])


def test_optional_column_of_wrong_type_is_a_row_problem(tmp_path):
    rows = [{"prompt": "a", "seed": 1, "strength": None}, {"prompt": "b", "seed": 2, "strength": "0.5"}]
    manifest = load_manifest([str(write_manifest(tmp_path / "m.parquet", rows))])
    assert manifest.bad_columns == {"strength": "column 'strength' has type string, expected float"}
    raw = manifest.table.to_pylist()
    ok, problem, _ = parse_row(0, raw[0], row_id="0", sampler=SAMPLER, bad_columns=manifest.bad_columns)
    assert ok is not None and problem is None
    bad, problem, _ = parse_row(1, raw[1], row_id="1", sampler=SAMPLER, bad_columns=manifest.bad_columns)
    assert bad is None and "column 'strength' has type string" in problem


def test_an_init_image_uri_column_is_ignored_and_named(tmp_path):
    """sdgen derives `init_image_uri` from `init_image` (e.g. a manifest made from old records):
    a column of that name is not used, and the run says so instead of dropping it silently."""
    from jobs.runner import plan_job

    from conftest import spec_dict, write_spec

    rows = [{"prompt": "a", "seed": 1, "init_image_uri": "/elsewhere/x.png", "color": "red"}]
    path = write_manifest(tmp_path / "m.parquet", rows)
    manifest = load_manifest([str(path)])
    assert manifest.ignored_columns == ("init_image_uri",) and manifest.label_columns == ("color",)
    assert "init_image_uri" not in manifest.table.column_names  # no init_image column: txt2img
    lines = []
    plan_job(
        str(write_spec(tmp_path / "s.yaml", spec_dict(str(path), str(tmp_path / "out")))),
        log=lines.append,
        read_only=True,
    )
    assert any("column 'init_image_uri' is ignored" in line for line in lines)


def test_extra_columns_are_labels_carried_to_the_row(tmp_path):
    rows = [{"prompt": "a", "category": "x", "seed": 1, "score": 0.5}]
    manifest = load_manifest([str(write_manifest(tmp_path / "m.parquet", rows))])
    assert manifest.label_columns == ("category", "score") and manifest.ignored_columns == ()
    request, problem, known = parse_row(0, manifest.table.to_pylist()[0], row_id="0", sampler=SAMPLER)
    assert problem is None and json.loads(request.labels) == {"category": "x", "score": 0.5}
    assert list(json.loads(request.labels)) == ["category", "score"]  # manifest column order


def test_csv_tsv_and_jsonl_manifests_read_like_parquet(tmp_path):
    (tmp_path / "m.csv").write_text(
        'id,prompt,seed,init_image,strength,color\n007,"a, b",1,,,red\n8,c,2,x.png,0.5,blue\n'
    )
    (tmp_path / "m.tsv").write_text("id\tprompt\tseed\tcolor\n007\ta, b\t1\tred\n")
    (tmp_path / "m.jsonl").write_text('{"id": 7, "prompt": "a", "seed": 1, "color": "red", "sampler": "euler_a"}\n')
    csv = load_manifest([str(tmp_path / "m.csv")])
    assert csv.ids == ["007", "8"] and csv.label_columns == ("color",)
    rows = csv.table.to_pylist()
    assert rows[0]["prompt"] == "a, b" and rows[0]["init_image"] is None  # an empty cell is missing
    assert rows[1]["init_image_uri"] == str(tmp_path / "x.png")
    request, problem, _ = parse_row(0, rows[0], row_id="007", sampler=SAMPLER)
    assert problem is None and request.mode == "txt2img" and json.loads(request.labels) == {"color": "red"}
    assert load_manifest([str(tmp_path / "m.tsv")]).table.to_pylist()[0]["prompt"] == "a, b"
    jsonl = load_manifest([str(tmp_path / "m.jsonl")])
    assert jsonl.ids == ["7"]
    request, problem, _ = parse_row(0, jsonl.table.to_pylist()[0], row_id="7", sampler=SAMPLER)
    assert problem is None and request.sampler == "euler_a"
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "seed": 1}\nnot json\n')
    with pytest.raises(ManifestError, match="bad.jsonl: not a readable JSONL file"):
        load_manifest([str(tmp_path / "bad.jsonl")])


def test_an_error_record_keeps_the_karras_flag_the_row_asked_for():
    request, problem, known = parse_row(0, row(sampler="ddim", karras=True), row_id="0", sampler=SAMPLER)
    assert request is None and problem.startswith("karras:") and known["karras"] is True


def test_an_error_record_shows_the_rows_settings_never_the_spec_values_it_did_not_ask_for():
    _, problem, known = parse_row(0, row(steps=0, guidance_scale=5.0), row_id="0", sampler=SAMPLER)
    assert "steps:" in problem and known["steps"] is None and known["guidance_scale"] == 5.0
    _, problem, known = parse_row(0, row(guidance_scale=-1.0, width=36), row_id="0", sampler=SAMPLER)
    assert known["guidance_scale"] is None and known["width"] is None
    assert known["height"] == SAMPLER.height  # not in the row: the spec's, which the row would have used
    _, problem, known = parse_row(
        0, row(), row_id="0", sampler=SAMPLER, cell_problems={"steps": "'ten' is not an integer"}
    )
    assert problem == "steps: 'ten' is not an integer" and known["steps"] is None
    _, problem, known = parse_row(0, row(sampler="plms"), row_id="0", sampler=SAMPLER)
    assert known["sampler"] == "plms"


def test_float32_columns_of_a_parquet_manifest_are_read_as_written(tmp_path):
    """pandas/numpy often write float32: 0.7 stored so is 0.699999988, and int(10 * that) ran one
    img2img step fewer than the row asked for; a float32 seed above 2**24 may be a neighbour's."""
    schema = pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("seed", pa.float32()), ("init_image", pa.string()),
         ("strength", pa.float32()), ("guidance_scale", pa.float32())]
    )  # fmt: skip
    rows = [
        {"id": "a", "prompt": "p", "seed": 5.0, "init_image": "x.png", "strength": 0.7, "guidance_scale": 7.3},
        {"id": "b", "prompt": "p", "seed": float(2**25 + 2), "init_image": None, "strength": None,
         "guidance_scale": None},
    ]  # fmt: skip
    manifest = load_manifest([str(write_manifest(tmp_path / "m.parquet", rows, schema))])
    first, second = manifest.table.to_pylist()
    assert (first["strength"], first["guidance_scale"], first["seed"]) == (0.7, 7.3, 5.0)
    request, problem, _ = parse_row(0, first, row_id="a", sampler=SAMPLER)
    assert problem is None and request.strength == 0.7 and request.seed == 5
    assert "holds integers exactly only up to 16777216" in manifest.cell_problems[1]["seed"]
    _, problem, known = parse_row(1, second, row_id="b", sampler=SAMPLER, cell_problems=manifest.cell_problems[1])
    # float32 steps by 4 there: 2**25 + 2 was stored as 2**25
    assert problem.startswith("seed: 33554432 is stored as float32") and known.get("seed") is None


def test_per_row_sampler_and_karras_override_the_spec():
    spec = SamplerSpec(name="dpmpp_2m", karras=True, steps=4, guidance_scale=7.5, width=32, height=32)
    request, problem, _ = parse_row(0, row(sampler="euler_a"), row_id="0", sampler=spec)
    assert problem is None and (request.sampler, request.karras) == ("euler_a", False)
    request, problem, _ = parse_row(0, row(karras=False), row_id="0", sampler=spec)
    assert problem is None and (request.sampler, request.karras) == ("dpmpp_2m", False)
    request, problem, _ = parse_row(0, row(), row_id="0", sampler=spec)
    assert (request.sampler, request.karras) == ("dpmpp_2m", True)
    _, problem, known = parse_row(0, row(sampler="plms"), row_id="0", sampler=spec)
    assert "sampler: unknown sampler 'plms'" in problem
    _, problem, _ = parse_row(0, row(sampler="ddim", karras=True), row_id="0", sampler=spec)
    assert "karras: karras sigmas apply only to dpmpp_2m, not ddim" in problem
    a, _, _ = parse_row(0, row(sampler="ddim"), row_id="0", sampler=spec)
    b, _, _ = parse_row(1, row(sampler="euler_a"), row_id="1", sampler=spec)
    assert a.forward_key() == b.forward_key()  # different samplers share forwards (continuous batching)


def row(**values):
    base = {
        "prompt": "a cat",
        "negative": None,
        "seed": 5,
        "strength": None,
        "init_image": None,
        "init_image_uri": None,
    }
    return {**base, **values}


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"prompt": None}, "prompt is missing"),
        ({"prompt": "  "}, "prompt is empty"),
        ({"seed": None}, "seed is missing"),
        ({"seed": float("nan")}, "seed is missing"),
        ({"seed": 1.5}, "seed: expected an integer, got 1.5"),
        ({"seed": -1}, "seed: -1 outside 0..2**63-1"),
        ({"init_image": "a.png", "init_image_uri": "/x/a.png"}, "strength is required with init_image"),
        ({"init_image": "a.png", "init_image_uri": "/x/a.png", "strength": 0.0}, "strength: 0 outside (0, 1]"),
        ({"init_image": "a.png", "init_image_uri": "/x/a.png", "strength": 1.5}, "strength: 1.5 outside (0, 1]"),
        ({"init_image": "a.png", "init_image_uri": "/x/a.png", "strength": 0.05}, "leaves no denoising step"),
        ({"init_image": ""}, "init_image is an empty string"),
        ({"steps": 0}, "steps: expected an integer in 1..999, got 0"),
        ({"width": 36}, "width: 36 is not a multiple of 8"),
        ({"guidance_scale": -1.0}, "guidance_scale: expected a finite number >= 0"),
    ],
)
def test_row_problems(values, needle):
    request, problem, known = parse_row(7, row(**values), row_id="x", sampler=SAMPLER)
    assert request is None
    assert needle in problem
    assert known["row"] == 7 and known["id"] == "x"


def test_several_problems_are_all_named():
    _, problem, _ = parse_row(0, row(prompt=None, seed=None), row_id="x", sampler=SAMPLER, duplicate_of=None)
    assert "prompt is missing" in problem and "seed is missing" in problem


def test_duplicate_and_missing_ids():
    _, problem, _ = parse_row(3, row(), row_id="x", sampler=SAMPLER, duplicate_of=1)
    assert problem == "duplicate id 'x' (first used by manifest row 1)"
    _, problem, _ = parse_row(3, row(), row_id=None, sampler=SAMPLER)
    assert problem == "id is missing"


def test_good_rows_and_overrides():
    request, problem, _ = parse_row(0, row(steps=4, width=64.0, guidance_scale=3), row_id="a/b", sampler=SAMPLER)
    assert problem is None
    assert (request.steps, request.width, request.height, request.guidance_scale) == (4, 64, 32, 3.0)
    assert request.mode == "txt2img" and request.negative == "" and request.strength is None
    assert request.name == safe_name("a/b") != "a/b"
    img2img = row(init_image="i.png", init_image_uri="/m/i.png", strength=0.5)
    img, problem, _ = parse_row(1, img2img, row_id="b", sampler=SAMPLER)
    assert problem is None and img.mode == "img2img" and img.strength == 0.5
    # a strength without an init image has nothing to act on (as in sdcore)
    txt, problem, _ = parse_row(2, row(strength=3.0), row_id="c", sampler=SAMPLER)
    assert problem is None and txt.strength is None
    # Forwards are shared by rows of one size that are all guided or all not: any steps, any strength.
    assert img.forward_key() == txt.forward_key() != request.forward_key()  # 64x32 vs the spec's size
    unguided, _, _ = parse_row(3, row(guidance_scale=1.0), row_id="d", sampler=SAMPLER)
    assert unguided.forward_key() != txt.forward_key()  # one forward half as many rows


def test_safe_names_are_safe_and_distinct():
    assert safe_name("cat-001_v2.final") == "cat-001_v2.final"
    names = {safe_name(x) for x in ["a/b", "a_b", "a b", "../etc", ".hidden", "", "x" * 300, "ünï"]}
    assert len(names) == 8
    for name in names:
        assert name and not name.startswith(".") and "/" not in name and len(name) <= 96


def test_resolve_init_image():
    assert resolve_init_image("init/a.png", "/data/m.parquet") == "/data/init/a.png"
    assert resolve_init_image("init/a.png", "s3://b/p/m.parquet") == "s3://b/p/init/a.png"
    assert resolve_init_image("/abs/a.png", "s3://b/p/m.parquet") == "/abs/a.png"
    assert resolve_init_image("file:///abs/a.png", "/data/m.parquet") == "/abs/a.png"
    # As Path.as_uri() writes them: spaces and non-ASCII percent-encoded.
    assert resolve_init_image("file:///abs/sp%20ace/gr%C3%BC%C3%9F.png", "/m.parquet") == "/abs/sp ace/grüß.png"
    assert resolve_init_image("file://localhost/abs/a.png", "/data/m.parquet") == "/abs/a.png"
    assert resolve_init_image("file://../img/a.png", "/data/m.parquet") == "file://../img/a.png"  # a host '..'
    assert resolve_init_image("~/a.png", "/data/m.parquet") == os.path.expanduser("~/a.png")
    assert resolve_init_image("s3://c/a.png", "/data/m.parquet") == "s3://c/a.png"


def test_float_seed_column_from_pandas_style_nan(tmp_path):
    rows = pa.table({"prompt": ["a", "b"], "seed": pa.array([3.0, None], pa.float64())})
    import pyarrow.parquet as pq

    pq.write_table(rows, tmp_path / "m.parquet")
    manifest = load_manifest([str(tmp_path / "m.parquet")])
    raw = manifest.table.to_pylist()
    request, problem, _ = parse_row(0, raw[0], row_id="0", sampler=SAMPLER)
    assert problem is None and request.seed == 3 and isinstance(request.seed, int)
    _, problem, _ = parse_row(1, raw[1], row_id="1", sampler=SAMPLER)
    assert problem == "seed is missing"


def _checked(manifest, row):
    return parse_row(
        row,
        manifest.table.to_pylist()[row],
        row_id=manifest.ids[row],
        sampler=SAMPLER,
        cell_problems=manifest.cell_problems.get(row),
    )


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_text_manifests_keep_every_seed_exact_beside_a_bad_cell(tmp_path, kind):
    """One non-integer seed used to turn the whole column into float64, rounding every seed
    above 2**53 to another seed (7550895919379764811 -> 7550895919379765248): images made
    from seeds nobody wrote. Now each cell is read alone: the bad one fails its row only."""
    seeds = [7550895919379764811, 2156179671271286137, 9223372036854775807]
    path = tmp_path / f"m.{kind}"
    if kind == "csv":
        path.write_text("id,prompt,seed\n" + "".join(f"r{i},p {i},{s}\n" for i, s in enumerate(seeds)) + "r3,q,1.5\n")
    else:
        lines = [json.dumps({"id": f"r{i}", "prompt": f"p {i}", "seed": s}) for i, s in enumerate(seeds)]
        path.write_text("\n".join([*lines, '{"id": "r3", "prompt": "q", "seed": 1.5}']) + "\n")
    manifest = load_manifest([str(path)])
    assert manifest.table.column("seed").to_pylist()[:3] == seeds
    for row, seed in enumerate(seeds):
        request, problem, _ = _checked(manifest, row)
        assert problem is None and request.seed == seed
    request, problem, _ = _checked(manifest, 3)
    written = "'1.5'" if kind == "csv" else "1.5"  # CSV cells are text, JSON's a number
    assert request is None and problem == f"seed: {written} is not an integer"


def test_a_bad_override_cell_in_a_csv_fails_its_row_alone(tmp_path):
    """A spreadsheet's `ten` in one row's steps used to make the column text and every row
    with a value there an error record."""
    (tmp_path / "m.csv").write_text(
        "prompt,seed,steps,guidance_scale,karras,sampler\n"
        "a,1,4,5,,ddim\n"
        "b,2,ten,5,,ddim\n"
        "c,3,6,high,,ddim\n"
        "d,4,4.0,7.5,TRUE,dpmpp_2m\n"
        "e,5,4,5,maybe,dpmpp_2m\n"
    )
    manifest = load_manifest([str(tmp_path / "m.csv")])
    assert manifest.bad_columns == {}
    results = [_checked(manifest, row) for row in range(5)]
    assert [problem for _, problem, _ in results] == [
        None,
        "steps: 'ten' is not an integer",
        "guidance_scale: 'high' is not a number",
        None,
        "karras: 'maybe' is not true or false",
    ]
    assert (results[0][0].steps, results[3][0].steps, results[3][0].karras) == (4, 4, True)


def test_a_float_seed_too_large_to_be_exact_is_refused(tmp_path):
    """A Parquet seed column stored as float64 (pandas with a NaN) cannot hold 7550895919379764811:
    its float is 7550895919379765248, which is not the seed the row was meant to have."""
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a"], "seed": pa.array([7550895919379764811.0])}), tmp_path / "m.parquet")
    _, problem, _ = _checked(load_manifest([str(tmp_path / "m.parquet")]), 0)
    assert "a float too large to hold an exact integer" in problem


def test_converting_a_text_manifest_refuses_a_bad_cell_naming_it(tmp_path):
    from jobs.tabular import read_table_bytes

    data = b"prompt,seed,steps\na,1,4\nb,2,ten\nc,3,x\n"
    with pytest.raises(ValueError, match=r"row 1, column 'steps': 'ten' is not an integer \(and 1 more cell\(s\)\)"):
        read_table_bytes(data, "m.csv")


def test_a_csv_with_a_repeated_column_is_refused_naming_it(tmp_path):
    (tmp_path / "m.csv").write_text("prompt,seed,seed\na,1,2\n")
    with pytest.raises(
        ManifestError, match="m.csv: not a readable CSV file \\(column 'seed' appears more than once\\)"
    ):
        load_manifest([str(tmp_path / "m.csv")])


def test_decimal_columns_as_sql_exports_write_them(tmp_path):
    """Spark and SQL exports write seeds as DECIMAL(20, 0): integral values are integers."""
    import decimal

    import pyarrow.parquet as pq

    table = pa.table(
        {
            "prompt": ["a", "b"],
            "seed": pa.array([decimal.Decimal("7550895919379764811"), decimal.Decimal("2.5")], pa.decimal128(20, 1)),
            "guidance_scale": pa.array([decimal.Decimal("5.5"), None], pa.decimal128(4, 1)),
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    manifest = load_manifest([str(tmp_path / "m.parquet")])
    request, problem, _ = _checked(manifest, 0)
    assert problem is None and (request.seed, request.guidance_scale) == (7550895919379764811, 5.5)
    assert _checked(manifest, 1)[1] == "seed: expected an integer, got 2.5"


def test_files_valid_alone_concatenate_whatever_types_their_writers_chose(tmp_path):
    """A CSV's string ids beside a Parquet file's integer ids, and a pandas categorical column
    beside a plain one, are the same columns."""
    import pyarrow.parquet as pq

    (tmp_path / "1.csv").write_text("id,prompt,seed,color\na,x,1,red\n")
    pq.write_table(pa.table({"id": [7], "prompt": ["y"], "seed": [2], "color": ["blue"]}), tmp_path / "2.parquet")
    colors = pa.array(["green"]).dictionary_encode()
    pq.write_table(pa.table({"id": ["c"], "prompt": ["z"], "seed": [3], "color": colors}), tmp_path / "3.parquet")
    manifest = load_manifest([str(tmp_path / "1.csv"), str(tmp_path / "2.parquet"), str(tmp_path / "3.parquet")])
    assert manifest.ids == ["a", "7", "c"]
    assert manifest.table.column("color").to_pylist() == ["red", "blue", "green"]
    assert all(_checked(manifest, row)[1] is None for row in range(3))


JSONL_NOT_UTF8 = (
    b'{"prompt": "a circle", "seed": 1}\n{"prompt": "bad \\ud800", "seed": 2}\n'
    b'{"prompt": "ok", "seed": 3, "note": "\xff"}\n'
)


@pytest.mark.parametrize(
    ("name", "data"),
    [("m.csv", b"prompt,seed,note\na circle,1,x\nbad \xff\xfe,2,y\nok,3,\xc3\x28\n"), ("m.jsonl", JSONL_NOT_UTF8)],
)
def test_a_cell_that_is_not_utf8_fails_its_row_not_the_file(tmp_path, name, data):
    """As a Parquet cell with invalid UTF-8 does: before, the whole text manifest was refused."""
    (tmp_path / name).write_bytes(data)
    manifest = load_manifest([str(tmp_path / name)])
    problems = [_checked(manifest, row)[1] for row in range(3)]
    assert problems == [None, "prompt: is not valid UTF-8", "note: is not valid UTF-8"]


def test_a_manifest_name_is_read_whole_question_marks_included():
    """`m?x.csv` (a legal S3 key or file name) is a CSV: the name was cut at its `?`, read as
    `m` and so as Parquet. Bytes that are not Parquet under a Parquet name say so."""
    from jobs.tabular import manifest_format, read_manifest_table

    assert manifest_format("s3://bkt/in/m?x.csv") == "csv" and manifest_format("m#1?.jsonl") == "jsonl"
    table, problems = read_manifest_table(b"id,prompt,seed\nr1,a red circle,3\n", "s3://bkt/in/m?x.csv")
    assert table.column("prompt").to_pylist() == ["a red circle"] and not problems
    with pytest.raises(ValueError, match=r"not a Parquet file \(a manifest is read by its extension"):
        read_manifest_table(b"id,prompt\n", "m.parquet")
