"""Reader: cut a manifest into shards with deterministic ids.

Shard i holds manifest rows [i * shard_size, (i + 1) * shard_size) and is named `shard-%05d`
(more digits past 99999 shards). The same manifest and shard_size always give the same shards,
which is what lets a rerun skip the committed ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa

from .manifest import Manifest


def shard_id(index: int) -> str:
    return f"shard-{index:05d}"


def shard_sort_key(name: str) -> tuple[int, str]:
    """Sort key putting shard ids in shard order: by their number, since as text `shard-100000`
    sorts between `shard-10000` and `shard-10001` (the ids grow a digit past 99999 shards).
    A name without a number after its last `-` sorts first, by its text."""
    number = name.rpartition("-")[2]
    return (int(number), name) if number.isascii() and number.isdigit() else (-1, name)


@dataclass(frozen=True)
class ShardTask:
    """One shard: its id, manifest row range, and the rows themselves (a pyarrow slice)."""

    shard_id: str
    index: int
    start: int  # first manifest row
    stop: int  # one past the last manifest row
    rows: pa.Table
    ids: tuple[str | None, ...]
    duplicates: dict[int, int] = field(default_factory=dict)  # row -> earlier row with its id
    bad_columns: dict[str, str] = field(default_factory=dict)
    cell_problems: dict[int, dict[str, str]] = field(default_factory=dict)  # row -> column -> problem

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def num_shards(num_rows: int, shard_size: int) -> int:
    return (num_rows + shard_size - 1) // shard_size


def shard_ranges(num_rows: int, shard_size: int) -> list[tuple[str, int, int]]:
    """[(shard_id, start, stop)] covering every row exactly once."""
    return [
        (shard_id(i), i * shard_size, min((i + 1) * shard_size, num_rows))
        for i in range(num_shards(num_rows, shard_size))
    ]


def shard_row_ranges(num_rows: int, shard_size: int) -> dict[str, tuple[int, int]]:
    """shard_id -> (start, stop): what a committed record file must cover, one record per row."""
    return {sid: (start, stop) for sid, start, stop in shard_ranges(num_rows, shard_size)}


def read_shards(
    manifest: Manifest, shard_size: int, skip: frozenset[str] | set[str] = frozenset()
) -> Iterator[ShardTask]:
    """The manifest's shards in order, leaving out the ids in `skip` (already committed)."""
    for index, (sid, start, stop) in enumerate(shard_ranges(manifest.num_rows, shard_size)):
        if sid in skip:
            continue
        yield ShardTask(
            shard_id=sid,
            index=index,
            start=start,
            stop=stop,
            rows=manifest.table.slice(start, stop - start),
            ids=tuple(manifest.ids[start:stop]),
            duplicates={r: f for r, f in manifest.duplicates.items() if start <= r < stop},
            bad_columns=dict(manifest.bad_columns),
            cell_problems={r: p for r, p in manifest.cell_problems.items() if start <= r < stop},
        )
