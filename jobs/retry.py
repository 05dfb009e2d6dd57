"""Retry policy: the one place that decides whether a failed shard is tried again.

A shard attempt fails when its worker dies (process crash, out of memory, node lost) or when
the worker's `run` raises (a storage error, a failure that hit every row of a batch). Both end
here: the shard is tried again, on whichever worker is free next, until `max_attempts` tries
have failed; then it is given up — reported failed, left uncommitted, and retried by the next
rerun of the job. Keeping the rule out of the distributor's event loop (as img2dataset keeps
its `retrier` apart from its distributors) lets the loop only react to events, and lets the rule
be tested without Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _print_line(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    log: Callable[[str], None] = _print_line

    def next_attempt(self, shard_id: str, attempt: int, error: str) -> int | None:
        """After attempt number `attempt` of a shard failed with `error`: the number of the
        attempt to run next, or None when the shard is given up. Logs the decision."""
        if attempt < self.max_attempts:
            self.log(f"[sdgen] {shard_id} attempt {attempt} failed ({error}); retrying")
            return attempt + 1
        self.log(f"[sdgen] {shard_id} failed after {attempt} attempt(s): {error}")
        return None


__all__ = ["RetryPolicy"]
