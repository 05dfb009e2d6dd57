"""jobs/output.py: layout, committed shards, partial records, overwrite."""

from __future__ import annotations

import pyarrow.parquet as pq

from jobs.output import Output


def test_layout_keys():
    assert Output.image_key("shard-00002", "cat", "png") == "images/shard-00002/cat.png"
    assert Output.record_key("shard-00002") == "records/shard-00002.parquet"
    assert Output.partial_prefix("shard-00002") == "partial/shard-00002/"


def test_committed_shards_and_partials(tmp_path):
    output = Output(str(tmp_path))
    assert output.committed_shards() == set() and output.read_job() is None
    assert output.commit_records("shard-00000", [{"row": 0, "id": "a", "status": "ok"}])
    output.write_partial("shard-00001", [{"row": 3, "id": "d", "status": "ok", "attempt": 1}])
    output.write_partial(
        "shard-00001",
        [
            {"row": 4, "id": "e", "status": "error", "attempt": 1},
            {"row": 3, "id": "d-again", "status": "ok", "attempt": 2},
        ],
    )
    assert output.committed_shards() == {"shard-00000"}
    partials = output.read_partials("shard-00001")
    assert sorted(partials) == [3, 4]
    assert len(output.partial_keys()) == 2
    output.clear_partials("shard-00001")
    assert output.partial_keys() == [] and output.read_partials("shard-00001") == {}


def test_a_commit_over_something_that_is_no_record_file_names_it(tmp_path):
    """A folder (or junk) under a record file's name was taken for an earlier attempt's commit:
    the shard was redone by every run and never done, with no word of why."""
    import pytest

    output = Output(str(tmp_path))
    records = [{"row": 0, "id": "a", "status": "ok"}]
    assert output.commit_records("shard-00000", records)
    assert not output.commit_records("shard-00000", records)  # an earlier attempt's: fine
    (tmp_path / "records" / "shard-00001.parquet").mkdir()
    with pytest.raises(OSError, match="records/shard-00001.parquet exists but is not a readable record file"):
        output.commit_records("shard-00001", records)
    (tmp_path / "records" / "shard-00002.parquet").write_bytes(b"junk")
    with pytest.raises(OSError, match="shard-00002.parquet exists but is not a readable record file \\(unreadable"):
        output.commit_records("shard-00002", records)


def test_partials_are_plain_scratch_and_record_files_compressed(tmp_path):
    """A saved batch is rewritten into the shard's record file at its commit, so it is written
    cheaply (no compression, statistics or dictionaries: it is written every batch on the
    worker's cores); the record file, which stays, is zstd-compressed."""
    output = Output(str(tmp_path))
    rows = [{"row": r, "id": f"r{r}", "status": "ok", "prompt": "a red circle " * 20} for r in range(8)]
    output.write_partial("shard-00000", rows)
    output.commit_records("shard-00000", rows)
    (partial,) = output.partial_keys("shard-00000")
    partial_meta = pq.ParquetFile(tmp_path / partial).metadata.row_group(0)
    record_meta = pq.ParquetFile(tmp_path / Output.record_key("shard-00000")).metadata.row_group(0)
    columns = range(partial_meta.num_columns)
    assert {partial_meta.column(c).compression for c in columns} == {"UNCOMPRESSED"}
    assert not any(partial_meta.column(c).is_stats_set for c in columns)
    assert {record_meta.column(c).compression for c in columns} == {"ZSTD"}
    assert [r["id"] for r in output.read_partials("shard-00000").values()] == [f"r{r}" for r in range(8)]


def test_job_json_roundtrip_and_clear(tmp_path):
    output = Output(str(tmp_path))
    output.write_job({"name": "x", "identity": {"a": 1}})
    assert output.read_job() == {"name": "x", "identity": {"a": 1}}
    output.storage.write("images/shard-00000/a.png", b"png")
    output.commit_records("shard-00000", [{"row": 0, "id": "a", "status": "ok"}])
    for key in ("index.html", "report-page-2.html", "report-page-3.html", "report-pages.html", "thumbs/s/a.jpg"):
        output.storage.write(key, b"the previous job's report")
    output.clear()
    assert output.storage.list() == []


def test_iter_records_streams_in_shard_order(tmp_path):
    output = Output(str(tmp_path))
    for i in range(7):
        output.commit_records(f"shard-{i:05d}", [{"row": i, "id": str(i), "status": "ok"}])
    shards = [f"shard-{i:05d}" for i in (3, 0, 6, 1, 2, 5, 4)]
    seen = [(s, t.column("row").to_pylist()) for s, t in output.iter_records(shards, ["row"], threads=2)]
    assert seen == [(f"shard-{i:05d}", [i]) for i in range(7)]


def test_count_records_per_committed_shard(tmp_path):
    output = Output(str(tmp_path))
    output.commit_records(
        "shard-00000", [{"row": 0, "id": "a", "status": "ok"}, {"row": 1, "id": "b", "status": "error", "error": "x"}]
    )
    output.commit_records("shard-00001", [{"row": 2, "id": "c", "status": "ok"}])
    assert output.count_records(output.committed_shards()) == {
        "shard-00000": {"ok": 1, "error": 1},
        "shard-00001": {"ok": 1, "error": 0},
    }
    assert output.count_records([]) == {}
