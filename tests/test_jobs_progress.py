"""jobs/progress.py: progress lines from the distributor's snapshots."""

from __future__ import annotations

from jobs.progress import ProgressLog, ProgressState, duration, progress_line


def state(rows_done: int, elapsed: float = 10.0, shards_done: int = 1) -> ProgressState:
    return ProgressState(
        rows_done=rows_done,
        rows_total=40,
        shards_done=shards_done,
        shards_failed=0,
        shards_total=4,
        workers=2,
        elapsed=elapsed,
    )


def test_duration():
    assert [duration(s) for s in (0, 59.6, 61, 3723)] == ["0s", "1m00s", "1m01s", "1h02m03s"]


def test_progress_line_has_rate_and_eta():
    assert progress_line(state(10)) == (
        "[sdgen] 10/40 rows (25%) | 1.00 rows/s | ETA 30s | shards 1/4 done, 0 failed | 2 worker(s)"
    )
    assert "| 0.00 rows/s | ETA ? |" in progress_line(state(0, elapsed=0.0))


def test_a_line_only_when_rows_moved_or_a_shard_ended():
    lines = []
    progress = ProgressLog(lines.append, every=10.0)
    for rows in (0, 0, 5, 5, 5, 8):
        progress(state(rows))
    assert [line.split()[1] for line in lines] == ["0/40", "5/40", "8/40"]
    # The last rows streamed in before the last shard's result: its end still gets a line.
    progress(state(40, shards_done=3))
    progress(state(40, shards_done=4))
    progress(state(40, shards_done=4))
    assert [line.split("| ")[3] for line in lines[3:]] == ["shards 3/4 done, 0 failed ", "shards 4/4 done, 0 failed "]


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


# ---------------------------------------------------------------------------------------------
# The real `sdgen run` in a real pseudo-terminal, and piped


def run_in_terminal(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run `args` with stdin, stdout and stderr on a new pseudo-terminal (120x40), in its own
    session; returns (exit status, everything it wrote to the terminal)."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import termios
    import time

    from conftest import REPO, command_env, kill_session

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        args, cwd=REPO, env=command_env({"TERM": "xterm", "COLUMNS": "120"}), stdin=slave, stdout=slave,
        stderr=slave, start_new_session=True, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal has closed it
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            raise AssertionError(f"{args} timed out in a terminal:\n{b''.join(chunks).decode(errors='replace')}")
    finally:
        kill_session(proc.pid)
        os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_sdgen_run_shows_a_bar_in_a_terminal_and_lines_when_piped(tmp_path):
    """6 rows (one with an empty prompt: an error record) in 2 shards of the tiny model; the same
    job run in a pseudo-terminal and with its output piped. The manifest is JSON Lines, with
    per-row steps, size and guidance on one row (a JSONL manifest runs, its overrides recorded)."""
    import json

    from PIL import Image

    from jobs.output import Output

    from conftest import PYTHON, run_command, small_rows, spec_dict, write_spec

    rows = small_rows(6)
    rows[4]["prompt"] = ""
    rows[1].update(steps=2, width=48, height=40, guidance_scale=3.0)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    command = [PYTHON, "-m", "jobs.cli", "run"]
    terminal = write_spec(tmp_path / "t.yaml", spec_dict(str(manifest), str(tmp_path / "t")))
    code, shown = run_in_terminal([*command, str(terminal), "--progress-every", "0.5"])
    assert code == 0, shown
    assert "\r" in shown  # redrawn in place
    bars = [line.strip() for line in shown.replace("\r\n", "\n").replace("\n", "\r").split("\r") if " rows [" in line]
    final = bars[-1]
    assert "6/6 rows [" in final and "row/s]" in final and "<00:00" in final, final  # elapsed<ETA, rate
    assert "ok 5, error 1, shards 2/2" in final, final
    assert any("/6 rows [" in bar and "<" in bar and "ok " in bar for bar in bars[:-1]), bars  # while it ran
    assert "s/row" not in shown  # always rows/s, also below 1 row/s
    assert "[sdgen] 6/6 rows (100%)" not in shown  # no periodic lines in a terminal
    # The runner's lines are printed above the bar (it is cleared first), never glued to it.
    starts = [shown[i - 1] for i in range(1, len(shown)) if shown.startswith("[sdgen]", i)]
    assert starts and set(starts) <= {"\r", "\n"}, shown
    assert "[sdgen] shard-00001 done: 2 ok, 1 error" in shown
    assert "[sdgen] top error reasons (1 error rows" in shown

    piped_spec = write_spec(tmp_path / "p.yaml", spec_dict(str(manifest), str(tmp_path / "p")))
    piped = run_command([*command, str(piped_spec), "--progress-every", "0.5"])
    assert "[sdgen] 6/6 rows (100%) | " in piped.stdout and "rows/s | ETA " in piped.stdout
    assert "shards 2/2 done, 0 failed" in piped.stdout
    assert "\r" not in piped.stdout and " rows [" not in piped.stdout  # no bar
    for out in (tmp_path / "t", tmp_path / "p"):
        output = Output(str(out))
        tables = output.read_all_records(output.committed_shards())
        records = sorted((r for t in tables.values() for r in t.to_pylist()), key=lambda r: r["row"])
        assert [r["id"] for r in records] == [row["id"] for row in rows]
        assert [r["status"] for r in records] == ["ok"] * 4 + ["error", "ok"]
        settings = [(r["steps"], r["width"], r["height"], r["guidance_scale"]) for r in records]
        assert settings[1] == (2, 48, 40, 3.0) and set(settings[:1] + settings[2:]) == {(3, 32, 32, 7.5)}
        assert Image.open(out / records[1]["image_path"]).size == (48, 40)
