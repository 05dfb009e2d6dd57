"""What a run has done: the distributor's `Outcome`, its `ProgressState` snapshots, and the
progress lines made from them.

Plain data, no Ray: the distributor fills these in, the runner reads them (and builds an empty
`Outcome` when every shard was already committed, without starting Ray).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .worker import ShardResult


@dataclass
class Outcome:
    """The result of `RayDistributor.run`."""

    results: dict[str, ShardResult] = field(default_factory=dict)  # shard -> its committed result
    failed: dict[str, str] = field(default_factory=dict)  # shard -> last error (given up)
    workers_ready: int = 0  # workers alive and loaded at the end
    first_ready_at: float | None = None  # time.monotonic() when the first worker was ready


@dataclass
class ProgressState:
    rows_done: int  # rows of this run's shards that are finished (committed or in flight)
    rows_total: int  # rows of this run's shards
    shards_done: int
    shards_failed: int
    shards_total: int
    workers: int
    elapsed: float  # since the first worker was ready


def duration(seconds: float) -> str:
    """`1h02m03s`, `2m03s`, `3s`: for ETAs and wall times in log lines."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(p: ProgressState) -> str:
    rate = p.rows_done / p.elapsed if p.elapsed > 0 else 0.0
    eta = duration((p.rows_total - p.rows_done) / rate) if rate > 0 else "?"
    pct = 100.0 * p.rows_done / p.rows_total if p.rows_total else 100.0
    return (
        f"[sdgen] {p.rows_done}/{p.rows_total} rows ({pct:.0f}%) | {rate:.2f} rows/s | ETA {eta} | "
        f"shards {p.shards_done}/{p.shards_total} done, {p.shards_failed} failed | {p.workers} worker(s)"
    )


class ProgressLog:
    """Turns the distributor's snapshots (every `every` seconds, and after each shard) into log
    lines: one when rows moved or a shard ended, else one a minute, so a long shard still shows
    life without repeating the same line every few seconds. A shard's rows stream in before its
    result, so the last rows can be counted a moment before the last shard is: that shard's end
    still gets its line."""

    def __init__(self, log: Callable[[str], None], every: float = 10.0):
        self.log = log
        self.quiet_for = max(60.0, every)
        self.last_counts: tuple[int, int, int] | None = None
        self.last_at = 0.0

    def __call__(self, p: ProgressState) -> None:
        counts = (p.rows_done, p.shards_done, p.shards_failed)
        if counts == self.last_counts and time.monotonic() - self.last_at < self.quiet_for:
            return
        self.last_counts, self.last_at = counts, time.monotonic()
        self.log(progress_line(p))


__all__ = ["Outcome", "ProgressLog", "ProgressState", "duration", "progress_line"]
