"""Progress a person reads: a live bar when the driver runs in a terminal, the periodic lines
(`progress.ProgressLog`, what `ray job logs -f` shows) otherwise.

The bar (tqdm) shows rows done / total, rows/s, elapsed and ETA, and the ok / error counts of
the committed shards, on one line of the terminal that is redrawn in place; the runner's other
lines are printed above it (`ProgressBar.lines` wraps the run's log so that a line clears the bar,
is printed, and the bar is redrawn under it, instead of being glued to the bar's line).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

from .progress import ProgressLog, ProgressState


class ProgressBar:
    """Called with the distributor's snapshots, like `ProgressLog`; `shard_done` adds a committed
    shard's ok / error counts."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.bar: Any = None
        self.ok = self.error = 0
        self.shards = ""

    def _open(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            unit="row",
            file=self.stream,
            dynamic_ncols=True,
            smoothing=0.1,
            # rate_noinv: always rows/s (tqdm's rate_fmt turns into s/row below 1 row/s)
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} rows [{elapsed}<{remaining}, {rate_noinv_fmt}]{postfix}",
        )

    def __call__(self, p: ProgressState) -> None:
        if self.bar is None:
            self._open(p.rows_total)
        self.shards = f"shards {p.shards_done}/{p.shards_total}" + (
            f", {p.shards_failed} failed" if p.shards_failed else ""
        )
        self.bar.n = p.rows_done
        self._postfix()

    def shard_done(self, result: Any) -> None:
        self.ok += result.ok
        self.error += result.error
        if self.bar is not None:
            self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"ok {self.ok}, error {self.error}, {self.shards}", refresh=False)
        self.bar.refresh()

    def lines(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """`log`, printing its lines above the bar while the bar is shown."""

        def write(line: str) -> None:
            if self.bar is None:
                log(line)
                return
            with self.bar.external_write_mode(file=self.stream):  # clear the bar, print, redraw
                log(line)

        return write

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_reporter(log: Callable[[str], None], every: float, stream: TextIO | None = None) -> Any:
    """A bar when `stream` (default stderr) is a terminal, else the periodic progress lines."""
    stream = stream or sys.stderr
    if stream.isatty():
        return ProgressBar(stream)
    return ProgressLog(log, every)


__all__ = ["ProgressBar", "progress_reporter"]
