"""Batch-failure isolation: one bad row must not take its batch with it, and a broken worker must
not turn a whole shard into error records.

`generate_isolated` streams rows through `generate` (continuous batching: rows enter and leave
the UNet's slots one by one, see `sdcore.Pipeline.generate_stream`). If the stream fails, the rows
it had taken and not finished are retried one by one, so each gets its own image or its own
exception, and the stream goes on with the rows not yet taken. When every retried row then failed
with an exception that is not about the row (anything but ValueError/TypeError, which sdcore
raises for a bad request: e.g. a lost device, out of memory at batch size 1), the worker is at
fault, not the rows: the first such exception is raised, and the distributor retries the shard
elsewhere. An exception raised while *reading* the next row (the caller's rows: an init image's
storage fault, an in-flight note that could not be written) is not a row's failure either, and
it ends the rows' source: it is raised as it is, whatever rows are in flight; isolating it would
retry the rows in flight and then find no more rows to read, leaving the rest of the shard
without records.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image

R = TypeVar("R")  # one row, as the caller has it
ROW_ERRORS = (ValueError, TypeError)  # a problem of the row's request, not of the worker

# generate(rows) -> (index into the rows it was given, image, placement) per row, as each finishes
Generate = Callable[[Iterable[R]], Iterator[tuple[int, Image.Image, Any]]]


@dataclass(frozen=True)
class RowOutcome:
    """One row's result: its image, or the exception that stopped it."""

    image: Image.Image | None
    error: Exception | None
    seconds: float  # this row's share of the generation time
    placement: Any = None  # where the row sat in its UNet forwards (sdcore.pipeline.Placement)


def generate_isolated(
    generate: Generate, rows: Iterable[R], before_retry: Callable[[], None] = lambda: None
) -> Iterator[tuple[R, RowOutcome]]:
    """(row, outcome) for every row of `rows`, in completion order. `rows` is read lazily, as the
    generator takes them. `before_retry` runs before failed rows are retried one by one (e.g. to
    release GPU memory). A row's `seconds` is the time since the previous row finished."""
    source = iter(rows)
    while True:
        taken: dict[int, R] = {}  # rows this stream has read and not finished, by its index
        unreadable: list[Exception] = []  # what reading `source` raised
        last = time.perf_counter()
        try:
            for index, image, placement in generate(_feed(source, taken, unreadable)):
                now = time.perf_counter()
                yield taken.pop(index), RowOutcome(image, None, now - last, placement)
                last = time.perf_counter()
            return
        except Exception as error:  # noqa: BLE001 - isolate the failing row(s)
            if unreadable:  # the rows' source failed, not a row: nothing more can be read
                raise unreadable[0] from None
            unfinished = list(taken.values())
            if not unfinished:  # it failed holding no row: nothing a row could have caused
                raise
            if len(unfinished) == 1:
                outcomes = [RowOutcome(None, error, time.perf_counter() - last)]
            else:
                before_retry()
                outcomes = [_generate_one(generate, row) for row in unfinished]
            _raise_if_systemic(outcomes)
            yield from zip(unfinished, outcomes)
        # then a new stream over the rows not taken yet


def _feed(source: Iterator[R], taken: dict[int, R], unreadable: list[Exception]) -> Iterator[R]:
    """The rows of `source`, each noted in `taken` under its index in this stream as it is read;
    an exception reading `source` is noted in `unreadable` before it goes on up."""
    index = 0
    while True:
        try:
            row = next(source)
        except StopIteration:
            return
        except Exception as exc:
            unreadable.append(exc)
            raise
        taken[index] = row
        index += 1
        yield row


def _generate_one(generate: Generate, row: R) -> RowOutcome:
    started = time.perf_counter()
    try:
        [(_, image, placement)] = list(generate([row]))
    except Exception as exc:  # noqa: BLE001 - the row's own failure, recorded
        return RowOutcome(None, exc, time.perf_counter() - started)
    return RowOutcome(image, None, time.perf_counter() - started, placement)


def _raise_if_systemic(outcomes: list[RowOutcome]) -> None:
    """Raise when every row failed with an exception that is not about the row."""
    systemic = [o.error for o in outcomes if o.error is not None and not isinstance(o.error, ROW_ERRORS)]
    if outcomes and len(systemic) == len(outcomes):
        raise systemic[0]


__all__ = ["ROW_ERRORS", "RowOutcome", "generate_isolated"]
