"""jobs/export.py on real outputs made by the worker (no Ray), read back with `datasets`,
`webdataset` and pyarrow: an export into a folder holding another export (or an export of the
output before it changed), label types unified over shards, uint64 labels, labels that datasets'
imagefolder reads specially, and label names that collide."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.export import MARKER, ExportError, ShardSurvey, export, label_names, label_types, main
from jobs.manifest import load_manifest
from jobs.output import Output
from jobs.reader import read_shards
from jobs.spec import SamplerSpec
from jobs.worker import ShardWorker, WorkerConfig

from conftest import write_manifest

# Labels that meet the export's own columns, each other's new names, and the names datasets'
# imagefolder reads as file paths (`file_name`, `*_file_name`) or fills with the image (`image`).
NAMES = ("sparse", "status", "label_status", "text", "label_text", "image", "file_name", "file_name_label")
NAMES += ("source_file_name", "score")
IMAGEFOLDER_NAMES = {
    "sparse": "sparse",
    "status": "status",
    "label_status": "label_status",
    "text": "label_label_text",  # label_text is taken by the label of that name
    "label_text": "label_text",
    "image": "label_image",
    "file_name": "file_name_label_label",  # file_name_label is taken too
    "file_name_label": "file_name_label",
    "source_file_name": "source_file_name_label",
    "score": "score",
}
PARQUET_NAMES = {**{n: n for n in NAMES}, "status": "label_label_status", "image": "label_image"}


def labelled_rows() -> list[dict]:
    """6 rows in shards of 2: shard 0's `sparse` is null throughout, shard 1's a string, and
    shard 2's rows all fail (empty prompts): a shard without ok rows."""
    rows = []
    for i in range(6):
        row = {"id": f"r{i}", "prompt": f"a shape number {i}" if i < 4 else "", "seed": 100 + i}
        row.update({n: f"{n[:3]}-{i}" for n in NAMES})
        row.update(sparse=None if i < 2 else f"s{i}", score=i / 2)
        rows.append(row)
    return rows


def make_output(folder, weights, pipe, rows, schema=None, shard_size=2):
    """`folder`/out made by the worker from `rows` (a manifest); an output already there is
    replaced, as `sdgen run --overwrite` replaces it."""
    shutil.rmtree(folder / "out", ignore_errors=True)
    manifest = load_manifest([str(write_manifest(folder / "m.parquet", rows, schema))])
    sampler = SamplerSpec(steps=2, width=32, height=32)
    config = WorkerConfig(weights=str(weights), output=str(folder / "out"), sampler=sampler, dtype="float32", threads=1)
    worker = ShardWorker(config, pipeline=pipe)
    for task in read_shards(manifest, shard_size):
        worker.run(task)
    Output(str(folder / "out")).write_job({"spec": {"image": {"quality": 95}}, "manifest": {"sources": ["m"]}})
    return folder / "out"


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tiny_pipe):
    from sdcore.weights import export_single_file

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    export_single_file(tiny_pipe, path)
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, weights, tiny_pipe):
    return make_output(tmp_path_factory.mktemp("labelled"), weights, tiny_pipe, labelled_rows())


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory, weights, tiny_pipe):
    """A uint64 label: 2^64-1 and 7 in shard 0, 3 in shard 1 (int64 there)."""
    rows = [{"id": f"u{i}", "prompt": f"p {i}", "seed": i, "u64": v} for i, v in enumerate([2**64 - 1, 7, 3])]
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("u64", pa.uint64())])
    return make_output(tmp_path_factory.mktemp("unsigned"), weights, tiny_pipe, rows, schema)


def ok_records(out) -> dict[int, dict]:
    output = Output(str(out))
    tables = output.read_all_records(output.committed_shards())
    return {r["row"]: r for t in tables.values() for r in t.to_pylist() if r["status"] == "ok"}


def load_imagefolder(folder, cache):
    import datasets

    return datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(cache))


def load_parquet(folder, cache):
    import datasets

    return datasets.load_dataset("parquet", data_dir=str(folder), split="train", cache_dir=str(cache))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Label names


def test_label_names_are_collision_free_and_never_file_columns():
    assert label_names(NAMES, "imagefolder") == IMAGEFOLDER_NAMES
    assert label_names(NAMES, "parquet") == PARQUET_NAMES
    assert label_names(["file_names", "b_file_names"], "imagefolder") == {
        "file_names": "file_names_label",
        "b_file_names": "b_file_names_label",
    }
    for fmt in ("imagefolder", "parquet"):
        columns = list(label_names(NAMES, fmt).values())
        assert len(set(columns)) == len(NAMES)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_imagefolder_keeps_the_image_column_and_every_label(labelled, tmp_path, kind):
    """Before: the label `image` replaced the images with its strings, and `file_name` (as
    `label_file_name`) and `source_file_name` were read as second image columns, their values
    lost; `status` and `text` collided with `label_status` and `label_text`."""
    assert main([str(labelled), str(tmp_path / "hf"), "--format", "imagefolder", "--metadata", kind]) == 0
    dataset = load_imagefolder(tmp_path / "hf", tmp_path / "cache")
    records = ok_records(labelled)
    assert dataset.num_rows == len(records) == 4
    assert set(dataset.column_names) >= {"image", "text", *IMAGEFOLDER_NAMES.values()}
    for row in dataset:
        record = records[row["row"]]
        assert row["text"] == record["prompt"]
        assert row["image"].tobytes() == Image.open(labelled / record["image_path"]).tobytes()
        labels = json.loads(record["labels"])
        assert {IMAGEFOLDER_NAMES[k]: row[IMAGEFOLDER_NAMES[k]] for k in labels} == {
            IMAGEFOLDER_NAMES[k]: v for k, v in labels.items()
        }


# ---------------------------------------------------------------------------------------------
# Parquet: one schema for every shard file


def test_parquet_export_is_one_schema_and_no_empty_files(labelled, tmp_path, capsys):
    """Before: `sparse` was typed null in shard 0 and string in shard 1 (pyarrow: "Unsupported
    cast from string to null"), and shard 2, without ok rows, was a 0-column file that datasets
    refuses; `status` (as label_status) was overwritten by the label `label_status`."""
    assert main([str(labelled), str(tmp_path / "pq"), "--format", "parquet"]) == 0
    files = sorted((tmp_path / "pq").glob("*.parquet"))
    assert [f.name for f in files] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert pq.read_schema(files[0]) == pq.read_schema(files[1])
    assert pq.read_schema(files[0]).field("sparse").type == pa.string()
    table = pq.read_table(tmp_path / "pq")  # the folder, as pyarrow.dataset discovers it
    records = ok_records(labelled)
    assert table.num_rows == len(records) == 4
    for row in table.to_pylist():
        record = records[row["row"]]
        assert row["status"] == "ok" and sha256(row["image"]) == record["image_sha256"]
        labels = json.loads(record["labels"])
        assert {PARQUET_NAMES[k]: row[PARQUET_NAMES[k]] for k in labels} == {
            PARQUET_NAMES[k]: v for k, v in labels.items()
        }
    loaded = load_parquet(tmp_path / "pq", tmp_path / "cache")
    assert loaded.num_rows == 4 and sorted(loaded["label_label_status"]) == ["sta-0", "sta-1", "sta-2", "sta-3"]
    assert sorted(loaded["label_status"]) == ["lab-0", "lab-1", "lab-2", "lab-3"]
    assert "shard-00002: no ok rows, no file" in capsys.readouterr().out
    marker = json.loads((tmp_path / "pq" / MARKER).read_text())
    assert marker["shards"]["shard-00002"]["files"] == []  # exported: no file to make


def test_webdataset_keeps_both_colliding_labels(labelled, tmp_path):
    import webdataset as wds

    assert main([str(labelled), str(tmp_path / "wds"), "--format", "webdataset"]) == 0
    urls = sorted(str(p) for p in (tmp_path / "wds").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 4
    for sample in samples:
        labels = json.loads(sample["json"])["labels"]
        assert labels["status"].startswith("sta-") and labels["label_status"].startswith("lab-")


# ---------------------------------------------------------------------------------------------
# uint64 labels and one-line errors


def test_uint64_label_is_a_uint64_column(unsigned, tmp_path):
    assert main([str(unsigned), str(tmp_path / "pq"), "--format", "parquet"]) == 0
    table = pq.read_table(tmp_path / "pq")
    assert table.schema.field("u64").type == pa.uint64()
    assert sorted(table.column("u64").to_pylist()) == [3, 7, 2**64 - 1]
    loaded = load_parquet(tmp_path / "pq", tmp_path / "cache")
    assert sorted(loaded["u64"]) == [3, 7, 2**64 - 1]


def test_uint64_label_in_imagefolder_parquet_is_a_one_line_error(unsigned, tmp_path, capsys):
    """datasets' imagefolder loader cannot read integers above 2^63-1 (OverflowError): refused."""
    args = [str(unsigned), str(tmp_path / "hf"), "--format", "imagefolder", "--metadata", "parquet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: label 'u64' holds integers above 2^63-1") and err.count("\n") == 1
    assert "Traceback" not in err


def test_uint64_beside_negative_integers_is_refused():
    def survey(kind: pa.DataType, negative: bool) -> ShardSurvey:
        return ShardSurvey("0" * 64, 1, ("n",), pa.schema([("n", kind)]), frozenset({"n"} if negative else ()))

    assert label_types([survey(pa.uint64(), False), survey(pa.int64(), False)]).field("n").type == pa.uint64()
    assert label_types([survey(pa.null(), False), survey(pa.int64(), True)]).field("n").type == pa.int64()
    with pytest.raises(ExportError, match="integers above 2\\^63-1 beside negative"):
        label_types([survey(pa.uint64(), False), survey(pa.int64(), True)])


def test_unreadable_labels_are_a_one_line_error(labelled, tmp_path, capsys):
    """A value error the export did not foresee (here: a record whose labels are not JSON) is one
    line and exit 2, not a traceback."""
    out = tmp_path / "out"
    shutil.copytree(labelled, out)
    path = out / "records" / "shard-00000.parquet"
    table = pq.read_table(path)
    labels = pa.array(["{not json"] * table.num_rows, pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index("labels"), "labels", labels), path)
    assert main([str(out), str(tmp_path / "wds"), "--format", "parquet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: JSONDecodeError: ") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Re-exports


def test_export_refuses_a_folder_holding_something_else(labelled, unsigned, tmp_path, capsys):
    """Before: an export into another job's export kept that one's images and tars (skipped by
    name) under new metadata, exit 0."""
    for fmt in ("imagefolder", "webdataset"):
        dest = tmp_path / fmt
        assert main([str(labelled), str(dest), "--format", fmt]) == 0
        before = snapshot(dest)
        assert main([str(unsigned), str(dest), "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert f"holds an export of {labelled} as {fmt}, not of {unsigned} as {fmt}" in err
        assert "export into an empty or new folder" in err
        assert snapshot(dest) == before
    assert main([str(labelled), str(tmp_path / "webdataset"), "--format", "parquet"]) == 2  # another format
    assert "as webdataset, not of" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main([str(labelled), str(tmp_path / "other"), "--format", "parquet"]) == 2
    assert f"is not empty and holds no {MARKER}" in capsys.readouterr().err
    assert snapshot(tmp_path / "other") == {"notes.txt": b"mine"}
    (tmp_path / "empty").mkdir()
    assert main([str(labelled), str(tmp_path / "empty"), "--format", "parquet"]) == 0


def test_rerun_skips_shards_of_identical_record_files(labelled, tmp_path):
    for fmt in ("imagefolder", "parquet"):
        dest = tmp_path / fmt
        first = export(str(labelled), fmt, str(dest), log=lambda line: None)
        assert (first["images_written"], first["shards_skipped"]) == (4, 0)
        before = snapshot(dest)
        again = export(str(labelled), fmt, str(dest), log=lambda line: None)
        assert again["images_written"] == 0 and again["rows"] == 4
        assert snapshot(dest) == before  # the marker too: the same bytes
    (tmp_path / "parquet" / "shard-00001.parquet").unlink()
    resumed = export(str(labelled), "parquet", str(tmp_path / "parquet"), log=lambda line: None)
    assert (resumed["images_written"], resumed["shards_skipped"]) == (2, 1)


def changed_rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"a shape number {i}", "seed": 100 + i} for i in range(n)]


@pytest.fixture
def changing(tmp_path, weights, tiny_pipe):
    """An output of 6 rows (3 shards), and how to replace it with 4 other rows (2 shards)."""
    out = make_output(tmp_path / "job", weights, tiny_pipe, changed_rows(6))

    def change():
        rows = [{**row, "seed": row["seed"] + 1000} for row in changed_rows(4)]  # other images
        return make_output(tmp_path / "job", weights, tiny_pipe, rows)

    return out, change


def test_reexport_after_the_output_changed_holds_only_the_new_rows(changing, tmp_path):
    """As after `sdgen run --overwrite`: every shard is rewritten from its new record file, and
    what the old export had beyond the new one (shard 2; images of rows no longer ok) is gone."""
    import webdataset as wds

    out, change = changing
    for fmt in ("imagefolder", "webdataset", "parquet"):
        assert export(str(out), fmt, str(tmp_path / fmt), log=lambda line: None)["rows"] == 6
    change()
    records = ok_records(out)
    shas = {r["image_sha256"] for r in records.values()}
    for fmt in ("imagefolder", "webdataset", "parquet"):
        counts = export(str(out), fmt, str(tmp_path / fmt), log=lambda line: None)
        assert (counts["rows"], counts["images_written"], counts["shards_skipped"]) == (4, 4, 0)

    hf = tmp_path / "imagefolder"
    lines = [json.loads(line) for line in (hf / "metadata.jsonl").read_text().splitlines()]
    assert {sha256((hf / m["file_name"]).read_bytes()) for m in lines} == {m["image_sha256"] for m in lines} == shas
    assert sorted(str(p.relative_to(hf)) for p in hf.rglob("*.png")) == sorted(m["file_name"] for m in lines)
    dataset = load_imagefolder(hf, tmp_path / "cache")
    assert sorted(dataset["seed"]) == [1100, 1101, 1102, 1103]

    tars = sorted(str(p) for p in (tmp_path / "webdataset").glob("*.tar"))
    assert [t.rsplit("/", 1)[-1] for t in tars] == ["shard-00000.tar", "shard-00001.tar"]
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert {sha256(s["png"]) for s in samples} == {json.loads(s["json"])["image_sha256"] for s in samples} == shas

    table = pq.read_table(tmp_path / "parquet")
    assert sorted(p.name for p in (tmp_path / "parquet").glob("*.parquet")) == [
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]
    assert {sha256(b) for b in table.column("image").to_pylist()} == set(table.column("image_sha256").to_pylist())
    assert set(table.column("image_sha256").to_pylist()) == shas
    marker = json.loads((tmp_path / "parquet" / MARKER).read_text())
    assert sorted(marker["shards"]) == ["shard-00000", "shard-00001"] and marker["source"] == str(out)


def test_interrupted_export_names_only_the_shards_it_finished(changing, tmp_path):
    out, change = changing
    dest = tmp_path / "hf"
    export(str(out), "imagefolder", str(dest), log=lambda line: None)
    change()
    shutil.rmtree(dest / "shard-00001")
    (dest / "shard-00001").write_bytes(b"")  # writing shard 1's images fails
    with pytest.raises(OSError):
        export(str(out), "imagefolder", str(dest), log=lambda line: None)
    output = Output(str(out))
    new = {s: sha256((out / output.record_key(s)).read_bytes()) for s in ("shard-00000", "shard-00001")}
    claimed = json.loads((dest / MARKER).read_text())["shards"]
    assert claimed["shard-00000"]["records_sha256"] == new["shard-00000"]
    assert claimed["shard-00001"]["records_sha256"] != new["shard-00001"]  # still the old export's
    (dest / "shard-00001").unlink()
    counts = export(str(out), "imagefolder", str(dest), log=lambda line: None)
    assert (counts["images_written"], counts["shards_skipped"]) == (2, 1)
    assert load_imagefolder(dest, tmp_path / "cache").num_rows == 4


def test_export_to_s3_keeps_a_marker(labelled, unsigned, s3):
    bucket, client, _ = s3
    dest = f"s3://{bucket}/pq"
    assert export(str(labelled), "parquet", dest, log=lambda line: None)["images_written"] == 4
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="pq/")["Contents"])
    assert keys == [f"pq/{MARKER}", "pq/shard-00000.parquet", "pq/shard-00001.parquet"]
    again = export(str(labelled), "parquet", dest, log=lambda line: None)
    assert (again["images_written"], again["shards_skipped"]) == (0, 2)
    with pytest.raises(ExportError, match=f"holds an export of {labelled} as parquet, not of {unsigned}"):
        export(str(unsigned), "parquet", dest, log=lambda line: None)
    data = client.get_object(Bucket=bucket, Key="pq/shard-00001.parquet")["Body"].read()
    assert pq.read_table(io.BytesIO(data)).num_rows == 2


@pytest.mark.parametrize("fmt", ["parquet", "imagefolder", "webdataset"])
def test_an_output_made_before_the_latest_record_fields_exports(labelled, tmp_path, fmt):
    """Record files of an older sdgen lack the fields added since (here `decode_rows`,
    `decode_slot`, `init_decoding`, the tokens dropped): exporting them failed with KeyError:
    'init_decoding'."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(labelled, old)
    newer = ["decode_rows", "decode_slot", "init_decoding", "prompt_tokens_dropped", "negative_tokens_dropped"]
    for path in (old / "records").glob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(newer), path)
    assert main([str(old), str(tmp_path / fmt), "--format", fmt]) == 0
    if fmt == "parquet":
        table = pq.read_table(tmp_path / fmt)
        assert table.num_rows == 4 and table.column("init_decoding").null_count == 4
        assert table.column("prompt_tokens_dropped").null_count == 4
    if fmt == "imagefolder":
        lines = [json.loads(line) for line in (tmp_path / fmt / "metadata.jsonl").read_text().splitlines()]
        assert [m["prompt_tokens_dropped"] for m in lines] == [None] * 4


# ---------------------------------------------------------------------------------------------
# What the export reads and what it left: checked, not trusted


def repainted(labelled, folder):
    """A copy of `labelled` whose row 1 image (shard 0) was changed by hand: a valid PNG of
    other pixels, its record's image_sha256 unchanged."""
    out = folder / "out"
    shutil.copytree(labelled, out)
    path = out / "images" / "shard-00000" / "r1.png"
    image = Image.open(path).convert("RGB")
    image.putpixel((0, 0), tuple(255 - c for c in image.getpixel((0, 0))))
    image.save(path)
    return out, path


@pytest.mark.parametrize("fmt", ["imagefolder", "parquet", "webdataset"])
def test_an_image_changed_after_the_run_is_refused_naming_it(labelled, tmp_path, capsys, fmt):
    """Before: exit 0, and the dataset's image_sha256 no longer matched its image's bytes."""
    out, path = repainted(labelled, tmp_path)
    dest = tmp_path / fmt
    assert main([str(out), str(dest), "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 image(s) differ from the image_sha256 of their records") and err.count("\n") == 1
    assert f"row 1 ({path})" in err and "sdgen reproduce" in err
    # Nothing of the shard is published (not even row 0's image, read before row 1's) and the
    # marker does not name it; no metadata file names any image.
    assert not [p for p in dest.rglob("*") if p.is_file() and p.name != MARKER]
    assert "shard-00000" not in json.loads((dest / MARKER).read_text())["shards"]


def test_records_without_image_sha256_are_exported_unchecked(labelled, tmp_path):
    """Outputs of an sdgen that did not record the hash still export (nothing to compare with)."""
    out, _ = repainted(labelled, tmp_path)
    for path in (out / "records").glob("*.parquet"):
        pq.write_table(pq.read_table(path).drop_columns(["image_sha256"]), path)
    assert main([str(out), str(tmp_path / "pq"), "--format", "parquet"]) == 0
    assert pq.read_table(tmp_path / "pq").num_rows == 4


@pytest.mark.parametrize("fmt", ["imagefolder", "parquet", "webdataset"])
def test_an_exported_file_cut_short_is_rewritten(labelled, tmp_path, fmt):
    """Before: a rerun skipped a shard whose file was there, however short (a tar cut in half
    was "already there"). The marker records each shard's bytes, and a rerun compares."""
    dest = tmp_path / fmt
    export(str(labelled), fmt, str(dest), log=lambda line: None)
    before = snapshot(dest)
    damaged = dest / {"imagefolder": "shard-00001/r3.png", "parquet": "shard-00001.parquet"}.get(fmt, "shard-00001.tar")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    counts = export(str(labelled), fmt, str(dest), log=lambda line: None)
    assert (counts["images_written"], counts["shards_skipped"]) == (
        2,
        1 if fmt == "parquet" else 2,
    )  # parquet: no file for shard 2
    assert snapshot(dest) == before


def test_a_marker_without_byte_totals_rewrites_its_shards_once(labelled, tmp_path):
    """An export made before the marker recorded bytes cannot vouch for its files' sizes."""
    dest = tmp_path / "pq"
    export(str(labelled), "parquet", str(dest), log=lambda line: None)
    document = json.loads((dest / MARKER).read_text())
    for entry in document["shards"].values():
        del entry["bytes"]
    (dest / MARKER).write_text(json.dumps(document))
    assert export(str(labelled), "parquet", str(dest), log=lambda line: None)["images_written"] == 4
    assert export(str(labelled), "parquet", str(dest), log=lambda line: None)["images_written"] == 0


def test_an_empty_object_label_is_refused_naming_it(labelled, tmp_path, capsys):
    """Before: pyarrow's "Cannot write struct type 'meta' with no child field", naming no label."""
    out = tmp_path / "out"
    shutil.copytree(labelled, out)
    for path in (out / "records").glob("*.parquet"):
        table = pq.read_table(path)
        labels = [json.dumps({**json.loads(text), "meta": {}}) for text in table.column("labels").to_pylist()]
        index = table.schema.get_field_index("labels")
        pq.write_table(table.set_column(index, "labels", pa.array(labels, pa.string())), path)
    for args in (["--format", "parquet"], ["--format", "imagefolder", "--metadata", "parquet"]):
        assert main([str(out), str(tmp_path / "x"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: label 'meta' is an empty object ({}) in every row") and err.count("\n") == 1
        assert "export as webdataset" in err
    assert main([str(out), str(tmp_path / "wds"), "--format", "webdataset"]) == 0
    with pytest.raises(ExportError, match="label 'nested' is an empty object"):
        label_types([ShardSurvey("0" * 64, 1, ("nested",), pa.schema([("nested", pa.list_(pa.struct([])))]))])
    keyed = [pa.schema([("meta", pa.struct([]))]), pa.schema([("meta", pa.struct([("k", pa.int64())]))])]
    unified = label_types([ShardSurvey("0" * 64, 1, ("meta",), s) for s in keyed])  # a key in one shard: fine
    assert unified.field("meta").type == pa.struct([("k", pa.int64())])
