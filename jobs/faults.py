"""Transient or permanent: the one place that tells them apart.

A *transient* fault is worth trying again: S3 5xx, `SlowDown` and other throttling, connection
resets, timeouts, a stalled endpoint. Every storage read and write (`storage.Storage`, the weights
download) goes through `retrying`: bounded exponential backoff with full jitter, `Backoff` from
`$SDGEN_STORAGE_ATTEMPTS` (tries in all, default 8), `$SDGEN_STORAGE_BACKOFF_S` (first delay's
cap, default 0.5 s) and `$SDGEN_STORAGE_BACKOFF_CAP_S` (largest delay, default 20 s); boto3's own
retries are off, so the count is exact. A permanent fault is raised at once, never retried. A
transient fault that outlasts the tries is a `TransientStorageError`. That error must never become
a committed error record: an init image that cannot be read for a transient reason fails the
row's *shard* (the distributor retries it on the next free worker, and a shard that still fails is
left uncommitted, so a rerun retries it), not the row; before any work (manifest, weights, the
output's lease) it stops the run as an infrastructure fault (exit 3), not a refusal.

A *permanent* fault is final: a missing key or bucket, access denied, a file that is not an
image, an image over the caps. For an init image it is the row's error record; for the output it
stops the job before generation (`lease.py` takes the lease with the run's first write).

`infrastructure_faults()` wraps the part of a run after work started: a storage or Ray fault
escaping from there is an `InfrastructureFault` (exit 3), not a "refused before any work" (2).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from .exit_codes import InfrastructureFault, one_line
from .redact import redact_text

TRANSIENT_CODES = frozenset(
    {
        "500",
        "502",
        "503",
        "504",
        "429",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestTimeout",
        "RequestTimeoutException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "BandwidthLimitExceeded",
        "PriorRequestNotComplete",
    }
)
TRANSIENT_ERRNOS = frozenset({errno.EINTR, errno.EAGAIN, errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT})


T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (a boto3/botocore/urllib3/socket error, or storage's
    `TransientStorageError`) is worth trying again later."""
    from .storage import TransientStorageError

    if isinstance(exc, TransientStorageError):
        return True
    try:
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )
    except ImportError:  # pragma: no cover - boto3 is a dependency
        ClientError = ()  # type: ignore[assignment]  # noqa: N806
        transient_types: tuple = ()
    else:
        transient_types = (
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )
    if transient_types and isinstance(exc, transient_types):
        return True
    if ClientError and isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(error.get("Code", ""))
        if code in ("NotImplemented", "501") or int(status) == 501:
            return False  # a feature the store lacks: trying again changes nothing
        return code in TRANSIENT_CODES or int(status) >= 500 or int(status) == 429
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    name = type(exc).__name__  # urllib3's ProtocolError etc. without importing urllib3
    return name in {"ProtocolError", "ReadTimeoutError", "NewConnectionError", "ConnectTimeoutError"}


class SettingError(ValueError):
    """A bad value in an `SDGEN_*` environment setting (the message names it)."""


@dataclass(frozen=True)
class Backoff:
    """How storage calls are retried: `attempts` tries in all; before try k+1 a random delay
    in [0, min(cap_s, base_s * 2**(k-1))] (exponential backoff, full jitter)."""

    attempts: int = 8
    base_s: float = 0.5
    cap_s: float = 20.0

    @classmethod
    def from_env(cls) -> Backoff:
        """From `$SDGEN_STORAGE_ATTEMPTS`, `$SDGEN_STORAGE_BACKOFF_S`, `$SDGEN_STORAGE_BACKOFF_CAP_S`
        (SettingError naming the variable for a bad value)."""
        return cls(
            attempts=int(env_number("SDGEN_STORAGE_ATTEMPTS", cls.attempts, whole=True, least=1)),
            base_s=env_number("SDGEN_STORAGE_BACKOFF_S", cls.base_s),
            cap_s=env_number("SDGEN_STORAGE_BACKOFF_CAP_S", cls.cap_s),
        )

    def delay(self, tries_done: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after `tries_done` failed tries."""
        bound = min(self.cap_s, self.base_s * 2 ** (tries_done - 1))
        return (rng or random).uniform(0, bound)


def env_number(name: str, default: float, *, whole: bool = False, least: float = 0) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = None
    if value is None or not value >= least or value != value or value == float("inf"):
        kind = "a whole number" if whole else "a number of seconds"
        raise SettingError(f"${name}: expected {kind} >= {least:g}, got {one_line(raw, 40)!r}")
    return value


def retrying(call: Callable[[], T], what: str, backoff: Backoff | None = None, sleep=time.sleep) -> T:
    """`call()`, tried again after each transient fault (`is_transient`) with `backoff`
    (default `Backoff.from_env()`); a permanent fault is raised at once. A transient fault on
    the last try is a `TransientStorageError` naming `what` (a redacted URI) and the tries."""
    from .storage import TransientStorageError

    backoff = backoff or Backoff.from_env()
    for tries in range(1, backoff.attempts + 1):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if tries == backoff.attempts:
                detail = str(exc) if isinstance(exc, TransientStorageError) else f"{type(exc).__name__}: {exc}"
                detail = detail if what in detail else f"{what}: {detail}"
                raise TransientStorageError(
                    f"{one_line(redact_text(detail), 400)} (gave up after {tries} tries)"
                ) from None
            sleep(backoff.delay(tries))
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def infrastructure_faults() -> Iterator[None]:
    """Storage and Ray faults raised inside become `InfrastructureFault` (exit 3)."""
    from .storage import StorageError

    try:
        yield
    except (StorageError, OSError) as exc:
        raise InfrastructureFault(f"stopped by a storage fault: {one_line(redact_text(str(exc)))}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("ray"):
            raise InfrastructureFault(f"stopped by a Ray fault: {type(exc).__name__}: {one_line(exc)}") from None
        raise


def worker_restarts(max_attempts: int) -> int:
    """How often Ray restarts a dead worker: enough for every shard attempt of a poison shard
    (`max_attempts`) plus as many unrelated deaths (node lost, OOM), and at least 8: narrowing
    down rows that kill their worker takes two deaths per row (`jobs.retry`), so one worker
    finds four such rows before it is lost. (A worker lost so is not replaced: the shards left
    fail, "no live workers left", and a rerun goes on from the rows saved.)"""
    return max(8, 2 * max_attempts)


def inject_fault(shard: str, attempt: int) -> None:
    """Test hook of the fault-injection suite: `$SDGEN_FAULT_KILL` is a comma list of
    `SHARD` or `SHARD@ATTEMPT`; a worker starting a listed shard attempt kills its own process
    with SIGKILL — a real worker death, as an OOM kill or a segfault would be. Unset (always, in
    production): nothing happens."""
    import os

    wanted = os.environ.get("SDGEN_FAULT_KILL")
    if not wanted:
        return
    for item in wanted.split(","):
        name, _, when = item.strip().partition("@")
        if name == shard and (not when or int(when) == attempt):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def inject_row_fault(row_ids: list[str | None]) -> None:
    """Test hook: `$SDGEN_FAULT_CRASH_ROW` is a comma list of row ids; a worker about to
    generate a batch holding one of them kills its own process with SIGSEGV (a crash inside
    generation, as a native library's segfault would be). Unset: nothing happens."""
    wanted = os.environ.get("SDGEN_FAULT_CRASH_ROW")
    if wanted and set(wanted.split(",")) & {str(i) for i in row_ids}:
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)


__all__ = [
    "TRANSIENT_CODES",
    "Backoff",
    "SettingError",
    "infrastructure_faults",
    "inject_fault",
    "inject_row_fault",
    "is_transient",
    "retrying",
    "worker_restarts",
]
