"""jobs/retry.py: the one rule for retrying a failed shard."""

from __future__ import annotations

from jobs.retry import RetryPolicy, strikes_after


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


def test_a_death_after_new_rows_were_saved_counts_as_the_first_again():
    """Two rows that kill their worker in one shard: the third attempt saves the first one's
    error record, then dies on the second row's batch. That death must not give the shard up:
    it starts the count again, and the second row is narrowed down in two more attempts."""
    policy = RetryPolicy(max_attempts=3, log=lambda line: None)
    strikes, attempt = 0, 1
    for saved_new_rows in (False, False, True, False):  # batch, alone, new error record + batch, alone
        strikes = strikes_after(strikes, died=True, saved_new_rows=saved_new_rows)
        attempt = policy.next_attempt("shard-00000", attempt, "worker died", died=True, strikes=strikes)
        assert attempt is not None
    assert attempt == 5
    # Deaths that save nothing new still give the shard up: the third in a row.
    strikes = strikes_after(strikes, died=True, saved_new_rows=False)
    assert strikes == 3
    assert policy.next_attempt("shard-00000", attempt, "worker died", died=True, strikes=strikes) is None
    # A raise is never cleared by saved rows: max_attempts of them in a row give the shard up.
    assert strikes_after(1, died=False, saved_new_rows=True) == 2
