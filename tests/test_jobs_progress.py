"""jobs/progress.py: progress lines from the distributor's snapshots."""

from __future__ import annotations

from jobs.progress import ProgressLog, ProgressState, duration, progress_line


def state(rows_done: int, elapsed: float = 10.0) -> ProgressState:
    return ProgressState(
        rows_done=rows_done, rows_total=40, shards_done=1, shards_failed=0, shards_total=4, workers=2, elapsed=elapsed
    )


def test_duration():
    assert [duration(s) for s in (0, 59.6, 61, 3723)] == ["0s", "1m00s", "1m01s", "1h02m03s"]


def test_progress_line_has_rate_and_eta():
    assert progress_line(state(10)) == (
        "[sdgen] 10/40 rows (25%) | 1.00 rows/s | ETA 30s | shards 1/4 done, 0 failed | 2 worker(s)"
    )
    assert "| 0.00 rows/s | ETA ? |" in progress_line(state(0, elapsed=0.0))


def test_a_line_only_when_rows_moved():
    lines = []
    progress = ProgressLog(lines.append, every=10.0)
    for rows in (0, 0, 5, 5, 5, 8):
        progress(state(rows))
    assert [line.split()[1] for line in lines] == ["0/40", "5/40", "8/40"]


def test_progress_bar_in_a_terminal_lines_otherwise():
    import io

    from jobs.progressbar import ProgressBar, progress_reporter

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress_reporter(print, 10, io.StringIO()), ProgressLog)
    stream = Terminal()
    bar = progress_reporter(print, 10, stream)
    assert isinstance(bar, ProgressBar)
    bar(
        ProgressState(rows_done=0, rows_total=100, shards_done=0, shards_failed=0, shards_total=4, workers=1, elapsed=0)
    )

    class Result:
        ok, error = 23, 2

    bar.shard_done(Result())
    bar(
        ProgressState(
            rows_done=25, rows_total=100, shards_done=1, shards_failed=0, shards_total=4, workers=1, elapsed=5
        )
    )
    bar.close()
    shown = stream.getvalue().split("\r")[-1]
    assert "25/100 rows" in shown and "row/s" in shown and "ok 23, error 2, shards 1/4" in shown
    assert "<" in shown  # elapsed<remaining: the ETA
