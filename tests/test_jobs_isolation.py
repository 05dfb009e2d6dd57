"""jobs/isolation.py: when a stream of rows fails, the rows it held are retried one by one and the
stream goes on with the rest; a failure of the worker is raised."""

from __future__ import annotations

import pytest
from PIL import Image

from jobs.isolation import generate_isolated


class FakeStream:
    """A stand-in for `Pipeline.generate_stream` over int rows with `slots` slots: it reads rows
    lazily (as a free slot takes them), finishes them in order and yields (index, image whose
    pixel is the row, slot). `fail(row)` may return an exception, raised when that row would
    finish. Records every call's rows as read."""

    def __init__(self, fail=lambda row: None, slots=2):
        self.fail, self.slots, self.calls = fail, slots, []

    def __call__(self, rows):
        taken = []
        self.calls.append(taken)
        source = iter(rows)
        in_flight = []  # (index, row, slot)
        for slot in range(self.slots):
            row = next(source, None)
            if row is not None:
                taken.append(row)
                in_flight.append((len(taken) - 1, row, slot))
        while in_flight:
            index, row, slot = in_flight.pop(0)
            error = self.fail(row)
            if error is not None:
                raise error
            yield index, Image.new("L", (1, 1), row), slot
            row = next(source, None)
            if row is not None:
                taken.append(row)
                in_flight.append((len(taken) - 1, row, slot))


def pixels(results):
    return {row: (o.image.getpixel((0, 0)) if o.image else None) for row, o in results}


def test_a_good_stream_is_one_call_reading_rows_as_slots_free():
    generate = FakeStream()
    rows_read = []

    def rows():
        for row in [1, 2, 3, 4, 5]:
            rows_read.append(row)
            yield row

    results = []
    for row, outcome in generate_isolated(generate, rows()):
        results.append((row, outcome))
        if row == 1:  # two slots: rows are read only as slots take them
            assert rows_read == [1, 2]
    assert generate.calls == [[1, 2, 3, 4, 5]]
    assert pixels(results) == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5}
    assert [o.placement for _, o in results] == [0, 1, 0, 1, 0]
    assert all(o.error is None and o.seconds >= 0 for _, o in results)


def test_a_bad_row_is_isolated_and_the_rest_go_on():
    retries = []
    generate = FakeStream(lambda row: ValueError("cursed") if row == 3 else None)
    results = list(generate_isolated(generate, [1, 2, 3, 4, 5, 6], before_retry=lambda: retries.append(1)))
    # stream 1 finished 1 and 2, failed while holding 3 and 4; they are retried alone; stream 2 takes 5, 6
    assert generate.calls == [[1, 2, 3, 4], [3], [4], [5, 6]] and retries == [1]
    assert pixels(results) == {1: 1, 2: 2, 3: None, 4: 4, 5: 5, 6: 6}
    outcome = dict(results)[3]
    assert isinstance(outcome.error, ValueError) and str(outcome.error) == "cursed"
    assert dict(results)[4].placement == 0  # retried alone: the slot of that call
    assert sorted(row for row, _ in results) == [1, 2, 3, 4, 5, 6]  # every row once


def test_every_row_failing_alike_with_a_worker_error_is_raised():
    with pytest.raises(RuntimeError, match="device lost"):
        list(generate_isolated(FakeStream(lambda row: RuntimeError("device lost")), [1, 2]))
    with pytest.raises(MemoryError):  # one row in flight: nothing to isolate
        list(generate_isolated(FakeStream(lambda row: MemoryError(), slots=1), [1]))


def test_a_stream_failing_before_it_takes_a_row_is_raised():
    def broken(rows):
        raise RuntimeError("no device")
        yield  # a generator, like Pipeline.generate_stream

    with pytest.raises(RuntimeError, match="no device"):
        list(generate_isolated(broken, [1, 2]))


def test_row_errors_are_never_raised():
    """ValueError/TypeError are about the request: every row gets an error outcome, the shard goes on."""
    results = list(generate_isolated(FakeStream(lambda row: TypeError("bad request")), [1, 2]))
    assert [type(o.error) for _, o in results] == [TypeError, TypeError]
    mixed = FakeStream(lambda row: ValueError("row") if row == 1 else RuntimeError("other"))
    assert {row: type(o.error) for row, o in generate_isolated(mixed, [1, 2])} == {1: ValueError, 2: RuntimeError}


def test_a_failure_reading_the_rows_is_raised_with_rows_in_flight():
    """An exception from the rows' source (a storage fault reading an init image, an in-flight
    note not written) is not a row's failure: it is raised even while rows are in flight, never
    isolated (which would retry the rows in flight and then end the stream with the rest of the
    rows never read)."""

    def rows():
        yield from [1, 2, 3, 4]
        raise OSError("connection reset while writing the in-flight note")

    generate = FakeStream(slots=3)
    given = []
    with pytest.raises(OSError, match="in-flight note"):
        for row, _ in generate_isolated(generate, rows()):
            given.append(row)
    # Row 2's slot asked for the next row while rows 3 and 4 were in flight (alone, each would
    # have been made): none is retried alone, none given out.
    assert len(generate.calls) == 1
    assert given == [1, 2]
