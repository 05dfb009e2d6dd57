"""jobs/retry.py: the one rule for retrying a failed shard."""

from __future__ import annotations

from jobs.retry import RetryPolicy


def test_a_shard_is_retried_until_max_attempts_then_given_up():
    lines = []
    policy = RetryPolicy(max_attempts=3, log=lines.append)
    assert policy.next_attempt("shard-00001", 1, "worker died: boom") == 2
    assert policy.next_attempt("shard-00001", 2, "RuntimeError: x") == 3
    assert policy.next_attempt("shard-00001", 3, "RuntimeError: x") is None
    assert lines == [
        "[sdgen] shard-00001 attempt 1 failed (worker died: boom); retrying",
        "[sdgen] shard-00001 attempt 2 failed (RuntimeError: x); retrying",
        "[sdgen] shard-00001 failed after 3 attempt(s): RuntimeError: x",
    ]


def test_one_attempt_means_no_retry():
    lines = []
    assert RetryPolicy(max_attempts=1, log=lines.append).next_attempt("shard-00000", 1, "E") is None
    assert lines == ["[sdgen] shard-00000 failed after 1 attempt(s): E"]
