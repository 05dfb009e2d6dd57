"""jobs/reader.py: deterministic shards covering every row exactly once."""

from __future__ import annotations

from jobs.manifest import load_manifest
from jobs.reader import read_shards, shard_id, shard_ranges

from conftest import small_rows, write_manifest


def test_shard_ids_are_deterministic_and_sortable():
    assert shard_id(0) == "shard-00000"
    assert shard_id(123) == "shard-00123"
    assert sorted(shard_id(i) for i in (2, 10, 100000)) == ["shard-00002", "shard-00010", "shard-100000"]


def test_ranges_cover_every_row_once():
    for rows, size in [(1, 1), (10, 3), (9, 3), (5, 100)]:
        ranges = shard_ranges(rows, size)
        covered = [r for _, start, stop in ranges for r in range(start, stop)]
        assert covered == list(range(rows))
        assert all(stop - start <= size for _, start, stop in ranges)
    assert shard_ranges(10, 3)[-1] == ("shard-00003", 9, 10)


def test_read_shards_slices_rows_and_skips_committed(tmp_path):
    rows = small_rows(7)
    rows[5]["id"] = "r001"  # a duplicate of row 1
    manifest = load_manifest([str(write_manifest(tmp_path / "m.parquet", rows))])
    tasks = list(read_shards(manifest, 3))
    assert [t.shard_id for t in tasks] == ["shard-00000", "shard-00001", "shard-00002"]
    assert [t.rows.column("id").to_pylist() for t in tasks] == [
        ["r000", "r001", "r002"],
        ["r003", "r004", "r001"],
        ["r006"],
    ]
    assert tasks[1].duplicates == {5: 1} and tasks[0].duplicates == {}
    assert tasks[1].ids == ("r003", "r004", "r001")
    again = list(read_shards(manifest, 3, skip={"shard-00001"}))
    assert [t.shard_id for t in again] == ["shard-00000", "shard-00002"]
    assert again[1].start == 6 and again[1].num_rows == 1
