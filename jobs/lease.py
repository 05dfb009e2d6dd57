"""One writer per output: the run's lease on its output.

A run takes the lease before it writes anything to the output, renews it while it runs (a
heartbeat thread) and releases it at the end. The lease is one small JSON object, `lease.json`
at the output's root, created exclusively (local: `link(2)` of a temp file, which fails if the
file exists; S3: `PUT` with `If-None-Match: *`). It names its holder (host, pid, start time) and
when it was last renewed. Every later change is a compare-and-swap on the object's tag (S3: its
ETag, with `If-Match`; local: the sha256 of its bytes, checked and replaced under an flock of the folder):
renewing and releasing only touch the lease this run last wrote, and taking over a stale lease
only replaces that stale lease, so two runs can never both hold it.

A run whose lease is taken over finds out at its next renewal (`lost` is set) and stops at its
next `check()`: the job's shard loop checks at every turn (at least once a second), and the
summary and report are only written after a check. The check is a plain flag read on the
run's own thread: no signal to the main thread, whose delivery some process states swallow.

A second run finds the object and is refused at once (`LeaseHeld`, naming the holder). A lease
whose holder stopped renewing it (a crashed or killed driver) expires `ttl` seconds after its
last renewal, and the next run takes it over; on the same host a lease whose pid is no longer
alive is stale at once. `break_lease=True` (`sdgen run --break-lease`) takes it over regardless,
for the impatient who know the holder is gone.

Expiry compares the wall clocks of the holder and of the next run: hosts sharing an output
should keep their clocks in sync (NTP), well within the ttl.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .exit_codes import one_line
from .faults import env_number
from .storage import Storage, StorageError, TransientStorageError, is_s3, local_path, open_storage, redact_uri

LEASE_FILE = "lease.json"
DEFAULT_TTL_S = 120.0  # a lease not renewed for this long is stale


MIN_TTL_S = 0.2
# A holder whose renewals have all failed for this share of the ttl stops: another run may take a
# lease over once a whole ttl has passed since its last renewal, and the holder must be gone by
# then (its shard loop checks at least once a second).
STOP_AFTER_TTL_SHARE = 0.75


def lease_ttl() -> float:
    """The lease's time to live: `$SDGEN_LEASE_TTL` seconds, default 120 (SettingError naming the
    variable for a value that is not a finite number >= 0.2)."""
    return env_number("SDGEN_LEASE_TTL", DEFAULT_TTL_S, least=MIN_TTL_S)


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease (the message names it)."""


class OutputUnusable(StorageError):
    """The output cannot be written at all (missing bucket, access denied, read-only folder)."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over by another run while it was running."""


@dataclass(frozen=True)
class LeaseInfo:
    token: str
    host: str
    pid: int
    started_at: str
    renewed_at: float  # unix time of the last renewal
    ttl: float

    @classmethod
    def parse(cls, data: bytes) -> LeaseInfo | None:
        try:
            d = json.loads(data)
            return cls(
                str(d["token"]), str(d["host"]), int(d["pid"]), str(d["started_at"]), float(d["renewed_at"]),
                float(d["ttl"]),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None

    def to_bytes(self) -> bytes:
        return (json.dumps(self.__dict__, indent=2) + "\n").encode()

    def holder(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started_at}"

    def stale_reason(self, now: float | None = None) -> str | None:
        """Why this lease no longer protects anything (None: it is live)."""
        now = time.time() if now is None else now
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        if now - self.renewed_at > self.ttl:
            return f"not renewed for {now - self.renewed_at:.0f}s (ttl {self.ttl:.0f}s)"
        return None


def _steady_clock() -> float:
    """Seconds on a clock that only goes forward and keeps counting while the machine is
    suspended (CLOCK_BOOTTIME; time.monotonic where there is none)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) holds nothing.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def read_lease(storage: Storage) -> LeaseInfo | None:
    """The output's lease (None when there is none, or it is unreadable)."""
    try:
        data = storage.read(LEASE_FILE)
    except FileNotFoundError:
        return None
    return LeaseInfo.parse(data)


class OutputLease:
    """A held lease; `release()` (or leaving the `with` block) gives it back.

    `tag` is the tag (S3: ETag) of the lease object as this run last wrote it: renewing and
    releasing are conditional on it, so a run whose lease was taken over can never overwrite or
    delete the new holder's lease; it finds out and stops (`LeaseLost`)."""

    def __init__(self, storage: Storage, info: LeaseInfo, log: Callable[[str], None], tag: str = ""):
        self.storage = storage
        self.info = info
        self.log = log
        self.tag = tag
        self.lost: str | None = None  # why the lease was lost, once it is
        self.taken_over = False  # lost to another run (else lost by not being renewed in time)
        # When the lease as last written was stamped (`renewed_at`, taken before its write, which
        # may take long: others count the ttl from the stamp), on a clock a stopped or suspended
        # process does not stop.
        self._renewed = _steady_clock() - max(0.0, time.time() - info.renewed_at)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ taking it

    @classmethod
    def acquire(
        cls,
        output_uri: str,
        *,
        break_lease: bool = False,
        log: Callable[[str], None] = print,
        ttl: float | None = None,
        storage: Storage | None = None,
    ) -> OutputLease:
        """Take the output's lease; LeaseHeld when a live run holds it (unless `break_lease`).

        A stale lease is replaced conditionally (S3 `If-Match` on the ETag read; locally a
        compare-and-swap under an flock of the folder): of several runs taking over the same stale lease at once,
        exactly one wins and the others are refused, naming it."""
        storage = storage or open_storage(output_uri)
        ttl = lease_ttl() if ttl is None else ttl
        mine = LeaseInfo(
            token=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            renewed_at=time.time(),
            ttl=ttl,
        )
        data = mine.to_bytes()
        for _ in range(3):
            tag = _put(storage, data, exclusive=True)
            if tag is not None:
                return cls(storage, mine, log, tag)
            try:
                current, current_tag = storage.read_tagged(LEASE_FILE)
            except FileNotFoundError:
                continue  # released between our write and our read: try again
            held = LeaseInfo.parse(current)
            if held is None:
                # Unreadable (a foreign or damaged file): only replaced when told.
                if not break_lease:
                    raise LeaseHeld(
                        f"output {storage.uri} has an unreadable {LEASE_FILE}; if no run is using the output, "
                        "pass --break-lease"
                    )
                reason, holder = "unreadable", "an unreadable lease"
            else:
                reason = "broken by --break-lease" if break_lease else held.stale_reason()
                if reason is None:
                    raise LeaseHeld(
                        f"output {storage.uri} is in use by another run ({held.holder()}; lease renewed "
                        f"{time.time() - held.renewed_at:.0f}s ago, expires after {held.ttl:.0f}s without "
                        "renewal). Wait for it to finish, or pass --break-lease if it is gone."
                    )
                holder = held.holder()
            tag = _put(storage, data, if_match=current_tag)  # only if it is still that stale lease
            if tag is not None:
                log(f"[sdgen] taking over the lease of {holder}: {reason}")
                return cls(storage, mine, log, tag)
            # Another run replaced it first: look again (it now holds a live lease).
        raise LeaseHeld(f"output {storage.uri}: could not take the lease (another run is taking it at the same time)")

    # ------------------------------------------------------------------ keeping it

    def start_heartbeat(self, every: float | None = None) -> None:
        """Renew the lease every `every` seconds (default ttl/4) on a daemon thread; if another
        run took it over, `lost` says so and `check()` raises from then on."""
        every = self.info.ttl / 4 if every is None else every
        self._thread = threading.Thread(target=self._beat, args=(every,), name="sdgen-lease", daemon=True)
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.renew()
            except LeaseLost as exc:
                self.lost, self.taken_over = str(exc), True
                self.log(f"[sdgen] error: {exc}")
                return
            except Exception as exc:  # noqa: BLE001 - a storage blip: try again at the next beat
                self.log(f"[sdgen] warning: could not renew the output lease ({type(exc).__name__}: {exc})")

    def renew(self) -> None:
        """Write the lease again with a new renewal time, only if the object there is still the
        one this run last wrote (conditional on its tag); LeaseLost otherwise."""
        stamped = _steady_clock()
        renewed = LeaseInfo(**{**self.info.__dict__, "renewed_at": time.time()})
        tag = _put(self.storage, renewed.to_bytes(), if_match=self.tag)
        if tag is None:
            try:
                held = read_lease(self.storage)
            except Exception:  # noqa: BLE001 - who holds it is only for the message
                held = None
            who = held.holder() if held else "nobody"
            raise LeaseLost(f"the output lease of {self.storage.uri} was taken over (now held by {who})")
        self.info, self.tag = renewed, tag
        self._renewed = stamped

    def check(self) -> None:
        """LeaseLost if another run took the lease over (seen by the heartbeat), or if it has not
        been renewed for STOP_AFTER_TTL_SHARE of its ttl (renewals failing, or this process
        stopped): soon another run may take it over, so this one must stop writing first.
        Called by the run before each step that writes to the output."""
        unrenewed = _steady_clock() - self._renewed
        if not self.lost and unrenewed > STOP_AFTER_TTL_SHARE * self.info.ttl:
            self.lost = (
                f"the output lease of {self.storage.uri} was not renewed for {unrenewed:.1f}s (ttl "
                f"{self.info.ttl:g}s): stopping before another run may take it over"
            )
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (conditional on its tag)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.taken_over:
            return  # the new holder's: left alone
        try:  # conditional on our tag: a lease not renewed in time is deleted only if still ours
            self.storage.delete_tagged(LEASE_FILE, self.tag)
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            self.log(f"[sdgen] warning: could not release the output lease ({type(exc).__name__}: {exc})")

    def __enter__(self) -> OutputLease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _put(storage: Storage, data: bytes, **condition: Any) -> str | None:
    """A conditional write of the lease; its new tag, or None when the condition failed. A
    write that failed its condition only because it had already succeeded (a retried request
    whose first answer was lost) counts as done."""
    tag = storage.write_tagged(LEASE_FILE, data, **condition)
    if tag is not None:
        return tag
    try:
        current, current_tag = storage.read_tagged(LEASE_FILE)
    except FileNotFoundError:
        return None
    return current_tag if current == data else None


def live_lease(storage: Storage) -> LeaseInfo | None:
    """The output's lease when a live run holds it (for `status`)."""
    held = read_lease(storage)
    return held if held is not None and held.stale_reason() is None else None


@contextlib.contextmanager
def held_output(output_uri: str, *, break_lease: bool = False, log: Callable[[str], None] = print):
    """Hold the output's lease for the block: taken first (a permanent output fault — missing
    bucket, access denied, read-only folder — is `OutputUnusable` here, before any work), renewed
    by a heartbeat, released at the end. If another run takes it over meanwhile, the lease's
    `check()` raises `LeaseLost`: the block calls it before each step that writes."""
    new_folder = _new_local_folder(output_uri)
    try:
        lease = OutputLease.acquire(output_uri, break_lease=break_lease, log=log)
    except (LeaseHeld, TransientStorageError):
        raise  # a transient fault that outlasted its retries: exit 3, not "unusable"
    except (OSError, StorageError) as exc:
        raise OutputUnusable(f"output {redact_uri(output_uri)} cannot be written: {one_line(exc)}") from None
    lease.start_heartbeat()
    try:
        yield lease
    finally:
        lease.release()
        if new_folder is not None:
            _remove_if_empty(new_folder)


def _new_local_folder(output_uri: str) -> Path | None:
    """The output folder when it is local and does not exist yet: a run refused before any work
    (e.g. by a cluster check after the lease is taken) then leaves nothing behind."""
    if is_s3(output_uri):
        return None
    folder = Path(local_path(output_uri))
    return None if folder.exists() else folder


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds when empty: a run that wrote anything keeps its output
    except OSError:
        pass


__all__ = [
    "LEASE_FILE",
    "LeaseHeld",
    "LeaseInfo",
    "LeaseLost",
    "OutputLease",
    "OutputUnusable",
    "held_output",
    "live_lease",
    "read_lease",
]
