"""Transient or permanent: the one place that tells them apart.

A *transient* fault is worth trying again: S3 5xx, `SlowDown` and other throttling, connection
resets, timeouts, a stalled endpoint. boto3 already retries those with bounded exponential backoff
and full jitter (`storage.s3_client`: standard retry mode); once it gives up, `storage` raises
`TransientStorageError`. That error must never become a committed error record: an init image that
cannot be read for a transient reason fails the row's *shard* (the distributor retries it on the
next free worker, and a shard that still fails is left uncommitted, so a rerun retries it), not
the row.

A *permanent* fault is final: a missing key or bucket, access denied, a file that is not an
image, an image over the caps. For an init image it is the row's error record; for the output it
stops the job before generation (`lease.py` takes the lease with the run's first write).

`infrastructure_faults()` wraps the part of a run after work started: a storage or Ray fault
escaping from there is an `InfrastructureFault` (exit 3), not a "refused before any work" (2).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

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


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (a boto3/botocore/urllib3/socket error) is worth trying again later."""
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
        return str(error.get("Code", "")) in TRANSIENT_CODES or int(status) >= 500 or int(status) == 429
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    name = type(exc).__name__  # urllib3's ProtocolError etc. without importing urllib3
    return name in {"ProtocolError", "ReadTimeoutError", "NewConnectionError", "ConnectTimeoutError"}


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
    (`max_attempts`) plus as many unrelated deaths (node lost, OOM)."""
    return max(4, 2 * max_attempts)


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


__all__ = ["TRANSIENT_CODES", "infrastructure_faults", "inject_fault", "is_transient", "worker_restarts"]
