"""The embedded Ray goes when its driver goes, even when the driver is killed with SIGKILL.

Ray ties its head processes (GCS, raylet) to the driver that started them, but not all of
theirs: after a SIGKILL of the driver, Ray's dashboard and runtime-env agents were seen living
on. So `guard()` (called by `distributor.connect` just before it starts an embedded Ray) starts
a small watchdog process. It holds the read end of a pipe whose only write end is the driver's;
it notes the driver's descendants that started after it (Ray's processes: the driver starts no
others), once a second while Ray starts and every few seconds after (each scan reads all of
/proc: on a host whose cores all compute, a scan a second is CPU taken from the job); and when
the pipe reaches end-of-file — the driver is gone, however it died — it SIGKILLs every noted
process still alive (pid and start time both matching, so a reused pid is never hit), and any
process those left behind started, then exits. A clean end (`release()`, after `ray.shutdown()`)
writes one byte first: the watchdog exits without killing.

Linux only (it reads /proc); elsewhere `guard()` does nothing.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

# A scan a second while Ray starts its processes, then one every SCAN_LATER_S: a worker Ray
# restarts later is the raylet's child, which the kill pass finds from the (noted) raylet even
# when no scan has seen it yet.
SCAN_EVERY_S = 1.0
SETTLE_S = 60.0
SCAN_LATER_S = 5.0
QUIT = b"q"

_guard: tuple[subprocess.Popen, int] | None = None  # (the watchdog, our end of its pipe)


def guard() -> None:
    """Start the watchdog for this process (once)."""
    global _guard
    if _guard is not None or not os.path.isdir("/proc/self"):
        return
    read_end, write_end = os.pipe()  # both non-inheritable: Ray's children never hold our end
    watchdog = subprocess.Popen(
        # -I: the standard library only, whatever the driver's environment and sys.path
        [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid())],
        stdin=read_end,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )
    os.close(read_end)
    _guard = (watchdog, write_end)


def release() -> None:
    """After a clean shutdown: stop the watchdog without it killing anything."""
    global _guard
    if _guard is None:
        return
    watchdog, write_end = _guard
    _guard = None
    try:
        os.write(write_end, QUIT)
    finally:
        os.close(write_end)
    try:
        watchdog.wait(timeout=5)
    except subprocess.TimeoutExpired:
        watchdog.kill()


# --------------------------------------------------------------------------------- the watchdog


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every live process."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] in ("Z", "X"):
            continue
        found[int(entry)] = (int(fields[1]), int(fields[19]))
    return found


def _descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = set(), list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def watch(driver: int) -> None:
    """Run the watchdog for `driver` (this process's stdin is the pipe)."""
    me = os.getpid()
    born = _processes().get(me, (0, 0))[1]
    noted: dict[int, int] = {}  # pid -> start time
    settled_at = time.monotonic() + SETTLE_S
    while True:
        table = _processes()
        for pid in _descendants({driver}, table):
            if pid != me and table[pid][1] >= born:
                noted[pid] = table[pid][1]
        every = SCAN_EVERY_S if time.monotonic() < settled_at else SCAN_LATER_S
        ready, _, _ = select.select([0], [], [], every)
        if ready:
            if os.read(0, 1) == QUIT:
                return  # a clean end: Ray was shut down by the driver
            break  # end of file: the driver died
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        table = _processes()
        alive = {pid for pid, start in noted.items() if pid in table and table[pid][1] == start}
        alive |= {pid for pid in _descendants(alive, table) if pid != me}  # started by those left
        if not alive:
            return
        for pid in alive:
            noted.setdefault(pid, table[pid][1])
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.2)


if __name__ == "__main__":
    # Ctrl-C in a terminal reaches the whole process group: the driver shuts Ray down itself
    # then (and releases the watchdog); the watchdog stays until the driver is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    watch(int(sys.argv[1]))
