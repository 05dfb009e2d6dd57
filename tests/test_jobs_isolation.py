"""jobs/isolation.py: a failed batch is retried row by row; a failure of the worker is raised."""

from __future__ import annotations

import pytest
from PIL import Image

from jobs.isolation import generate_isolated


class FakeGenerate:
    """Makes one (image, placement) per request (an int); `fail(requests)` returns an exception to
    raise. The placement is the request's position in the call, as a fixed-shape batch has it."""

    def __init__(self, fail=lambda requests: None):
        self.fail, self.calls = fail, []

    def __call__(self, requests):
        self.calls.append(list(requests))
        error = self.fail(requests)
        if error is not None:
            raise error
        return [(Image.new("L", (1, 1), r), slot) for slot, r in enumerate(requests)]


def test_a_good_batch_is_one_call_with_the_time_shared():
    generate = FakeGenerate()
    outcomes = generate_isolated(generate, [1, 2, 3])
    assert generate.calls == [[1, 2, 3]]
    assert [o.image.getpixel((0, 0)) for o in outcomes] == [1, 2, 3] and all(o.error is None for o in outcomes)
    assert len({o.seconds for o in outcomes}) == 1
    assert [o.placement for o in outcomes] == [0, 1, 2]


def test_a_bad_row_is_isolated_and_its_neighbours_keep_their_images():
    retries = []
    generate = FakeGenerate(lambda requests: ValueError("cursed") if 2 in requests else None)
    outcomes = generate_isolated(generate, [1, 2, 3], before_retry=lambda: retries.append(1))
    assert generate.calls == [[1, 2, 3], [1], [2], [3]] and retries == [1]
    assert [o.image is None for o in outcomes] == [False, True, False]
    assert [o.placement for o in outcomes] == [0, None, 0]  # retried alone: the slot of that call
    assert isinstance(outcomes[1].error, ValueError) and str(outcomes[1].error) == "cursed"


def test_every_row_failing_alike_with_a_worker_error_is_raised():
    with pytest.raises(RuntimeError, match="device lost"):
        generate_isolated(FakeGenerate(lambda requests: RuntimeError("device lost")), [1, 2])
    with pytest.raises(MemoryError):  # a batch of one row: nothing to isolate
        generate_isolated(FakeGenerate(lambda requests: MemoryError()), [1])


def test_row_errors_are_never_raised():
    """ValueError/TypeError are about the request: every row gets an error outcome, the shard goes on."""
    outcomes = generate_isolated(FakeGenerate(lambda requests: TypeError("bad request")), [1, 2])
    assert [type(o.error) for o in outcomes] == [TypeError, TypeError]
    mixed = FakeGenerate(lambda requests: ValueError("row") if 1 in requests else RuntimeError("other"))
    assert [type(o.error) for o in generate_isolated(mixed, [1, 2])] == [ValueError, RuntimeError]
