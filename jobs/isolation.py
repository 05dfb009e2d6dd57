"""Batch-failure isolation: one bad row must not take its batch with it, and a broken worker must
not turn a whole shard into error records.

`generate_isolated` runs a batch through `generate`; if the batch fails, it retries the rows one
by one, so each row gets its own image or its own exception. When every row then failed with an
exception that is not about the row (anything but ValueError/TypeError, which sdcore raises for
a bad request: e.g. a lost device, out of memory at batch size 1), the worker is at fault, not
the rows: the first such exception is raised, and the distributor retries the shard elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from PIL import Image

R = TypeVar("R")  # one row's request, as `generate` takes it
ROW_ERRORS = (ValueError, TypeError)  # a problem of the row's request, not of the worker


@dataclass(frozen=True)
class RowOutcome:
    """One row's result: its image, or the exception that stopped it."""

    image: Image.Image | None
    error: Exception | None
    seconds: float  # this row's share of the generate() time
    placement: Any = None  # where the row sat in its UNet forwards (sdcore.pipeline.Placement)


def generate_isolated(
    generate: Callable[[list[R]], list[tuple[Image.Image, Any]]],
    requests: Sequence[R],
    before_retry: Callable[[], None] = lambda: None,
) -> list[RowOutcome]:
    """One outcome per request, in order. `generate` returns (image, placement) per request
    (`Pipeline.generate_placed`). `before_retry` runs once before a failed batch is retried row
    by row (e.g. to release GPU memory)."""
    requests = list(requests)
    started = time.perf_counter()
    try:
        images = generate(requests)
    except Exception as batch_error:  # noqa: BLE001 - isolate the failing row(s)
        if len(requests) == 1:
            outcomes = [RowOutcome(None, batch_error, time.perf_counter() - started)]
        else:
            before_retry()
            outcomes = [_generate_one(generate, request) for request in requests]
        _raise_if_systemic(outcomes)
        return outcomes
    share = (time.perf_counter() - started) / len(requests)
    return [RowOutcome(image, None, share, placement) for image, placement in images]


def _generate_one(generate: Callable[[list[R]], list[tuple[Image.Image, Any]]], request: R) -> RowOutcome:
    started = time.perf_counter()
    try:
        image, placement = generate([request])[0]
    except Exception as exc:  # noqa: BLE001 - the row's own failure, recorded
        return RowOutcome(None, exc, time.perf_counter() - started)
    return RowOutcome(image, None, time.perf_counter() - started, placement)


def _raise_if_systemic(outcomes: list[RowOutcome]) -> None:
    """Raise when every row failed with an exception that is not about the row."""
    systemic = [o.error for o in outcomes if o.error is not None and not isinstance(o.error, ROW_ERRORS)]
    if outcomes and len(systemic) == len(outcomes):
        raise systemic[0]


__all__ = ["ROW_ERRORS", "RowOutcome", "generate_isolated"]
