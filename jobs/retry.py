"""Retry policy: the one place that decides whether a failed shard is tried again.

A shard attempt fails when its worker dies (process crash, out of memory, node lost) or when
the worker's `run` raises (a storage error, a failure that hit every row of a batch). Both end
here: the shard is tried again, on whichever worker is free next, until `max_attempts` tries
have failed; then it is given up — reported failed, left uncommitted, and retried by the next
rerun of the job. A worker death counts like that only while it finds nothing new: one after an
attempt that saved rows no earlier attempt had (a row that killed its worker, written as its
error record, counts) clears the count, so a shard with several such rows is narrowed down row by
row in one run; each clears at most once per row, so the tries stay bounded.

Keeping the rule out of the distributor's event loop (as img2dataset keeps its `retrier` apart
from its distributors) lets the loop only react to events, and lets the rule be tested without
Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _print_line(line: str) -> None:
    print(line, flush=True)


# Attempts a shard whose worker dies gets, whatever `max_attempts` says: a row that kills its
# worker is found in three (the batch it was in dies; the rows in flight then run alone, and it
# dies alone; the next attempt writes it as an error record instead of generating it:
# `ShardWorker._after_a_death`). With fewer, every rerun stopped one attempt short of the last.
# The next such row of the shard dies in that third attempt's batches: the attempt saved the
# first row's error record, so its death counts as the first of three again (`strikes`).
DEATH_ATTEMPTS = 3


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    log: Callable[[str], None] = _print_line

    def next_attempt(
        self, shard_id: str, attempt: int, error: str, died: bool = False, strikes: int | None = None
    ) -> int | None:
        """After attempt number `attempt` of a shard failed with `error` (`died`: its worker
        process died): the number of the attempt to run next, or None when the shard is given
        up. `strikes`: the failed attempts that count against the shard, this one included
        (`attempt` when not given; see `strikes_after`). Logs the decision."""
        counted = attempt if strikes is None else strikes
        if counted < (max(self.max_attempts, DEATH_ATTEMPTS) if died else self.max_attempts):
            self.log(f"[sdgen] {shard_id} attempt {attempt} failed ({error}); retrying")
            return attempt + 1
        self.log(f"[sdgen] {shard_id} failed after {attempt} attempt(s): {error}")
        return None


def strikes_after(strikes: int, died: bool, saved_new_rows: bool) -> int:
    """The failed attempts that count against a shard after one more failed, `strikes`
    before it. A worker death in an attempt that saved rows no earlier attempt had saved
    counts as the first: narrowing down a row that kills its worker ends with that row's error
    record saved, and the shard's next such row must get its own three attempts."""
    return 1 if died and saved_new_rows else strikes + 1


__all__ = ["RetryPolicy", "strikes_after"]
