"""jobs/export.py's imagefolder metadata file, built shard by shard. The formats themselves, read
back with `webdataset` and `datasets` after a real run: tests/test_jobs_datasets.py."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from jobs.export import MetadataFile


def test_parquet_metadata_unifies_the_shards_types(tmp_path):
    """A label null in one shard and a string in the next, an int label that is a float later,
    a record field (strength) null throughout: one schema, every row, in order."""
    metadata = MetadataFile("parquet", str(tmp_path))
    metadata.add([{"file_name": "s0/a.png", "text": "a", "strength": None, "note": None, "score": 1}])
    metadata.add([])  # a shard without ok rows
    metadata.add([{"file_name": "s1/b.png", "text": "b", "strength": None, "note": "x", "score": 2.5}])
    table = pq.read_table(metadata.finish())
    assert table.to_pylist() == [
        {"file_name": "s0/a.png", "text": "a", "strength": None, "note": None, "score": 1.0},
        {"file_name": "s1/b.png", "text": "b", "strength": None, "note": "x", "score": 2.5},
    ]
    types = {f.name: str(f.type) for f in table.schema}
    assert types == {"file_name": "string", "text": "string", "strength": "double", "note": "string", "score": "double"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.parquet"]  # the pieces are gone


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_metadata_of_no_rows_is_an_empty_file_of_its_kind(tmp_path, kind):
    path = MetadataFile(kind, str(tmp_path)).finish()
    if kind == "jsonl":
        assert open(path).read() == ""
    else:
        assert pq.read_table(path).num_rows == 0


def test_jsonl_metadata_is_one_line_per_row(tmp_path):
    metadata = MetadataFile("jsonl", str(tmp_path))
    metadata.add([{"file_name": "s0/a.png", "text": "ü"}])
    metadata.add([{"file_name": "s1/b.png", "text": "b"}])
    lines = open(metadata.finish(), encoding="utf-8").read().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"file_name": "s0/a.png", "text": "ü"},
        {"file_name": "s1/b.png", "text": "b"},
    ]
