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


def test_a_shard_whose_worker_dies_gets_three_attempts_whatever_max_attempts_says():
    """Batch, then the rows in flight alone, then the row that died alone is blamed: finding a
    row that kills its worker takes three attempts."""
    policy = RetryPolicy(max_attempts=1, log=lambda line: None)
    assert policy.next_attempt("shard-00000", 1, "worker died: boom", died=True) == 2
    assert policy.next_attempt("shard-00000", 2, "worker died: boom", died=True) == 3
    assert policy.next_attempt("shard-00000", 3, "worker died: boom", died=True) is None
    assert policy.next_attempt("shard-00000", 1, "RuntimeError: x") is None  # a raise: max_attempts
    assert RetryPolicy(max_attempts=5, log=lambda line: None).next_attempt("s", 4, "worker died", died=True) == 5
