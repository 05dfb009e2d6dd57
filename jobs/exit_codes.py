"""Exit codes: one table for every command (`sdgen run|status|reproduce`, and the scripts under
jobs/), shown in the README and in each command's `--help`.

Also the command's last line of defence: `guarded(main)` turns any exception that escapes a
command into one `error:` line and an exit code instead of a traceback (`--debug` re-raises),
SIGTERM into the same clean shutdown as Ctrl-C, and `finish(code)` leaves the process without
running C++ static destructors (see its docstring).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

OK = 0  # run: every shard committed; status: complete; reproduce: every image matches
INCOMPLETE = 1  # run: some shards failed (rerun resumes); status: not complete; reproduce: a mismatch
REFUSED = 2  # refused before any work: bad spec / manifest / arguments, output held or unusable
INFRASTRUCTURE = 3  # stopped mid-run by an infrastructure fault (storage lost, lease lost, Ray down)
INTERRUPTED = 130  # Ctrl-C or SIGTERM; committed work is kept, rerun resumes

TABLE = """\
exit codes (every sdgen command):
  0    complete (run: every shard committed, rows may be error records; status: job complete;
       reproduce: every image regenerated identically or within tolerance, stored image intact)
  1    incomplete (run: some shards failed, rerun resumes them; status: job not complete;
       reproduce: an image differs, or the stored image is missing or does not match its sha256)
  2    refused before any work (bad spec, manifest or arguments; output in use, unwritable or
       holding another job; no sdgen output there)
  3    stopped mid-run by an infrastructure fault (storage unreachable, lease lost, Ray lost),
       or before any work by storage unreachable after its retries; committed work is kept,
       rerun resumes
  130  interrupted (Ctrl-C or SIGTERM); committed work is kept, rerun resumes"""


class InfrastructureFault(RuntimeError):
    """A fault of the environment after work started (exit 3); the message is one line."""


def _interrupt(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    # Once: the `finally` blocks this unwinds through shut the embedded Ray down and release the
    # lease, and a second Ctrl-C inside `ray.shutdown()` cut it short, whose exit path then
    # ended the process with status 1 instead of 130. So further ones are ignored (the command
    # ends as soon as its cleanup does; `kill -9` still ends it at once, and the watchdog then
    # ends every Ray process of the run).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def install_sigterm() -> dict[int, Any]:
    """Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt in the main thread, once, so `finally`
    blocks run (the embedded Ray is shut down) alike; further ones are ignored while they run.
    Returns the handlers it replaced (none off the main thread), for `restore_signals`."""
    before: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            before[sig] = signal.signal(sig, _interrupt)
    except ValueError:  # not the main thread (e.g. called from a test's thread)
        pass
    return before


def restore_signals(handlers: dict[int, Any]) -> None:
    """Put back the handlers `install_sigterm` replaced: a command run in-process (a test, a
    notebook) leaves Ctrl-C working as it found it, even after it ignored a second one."""
    for sig, handler in handlers.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def one_line(text: object, limit: int = 300) -> str:
    """`text` as at most `limit` characters, for messages (a value can be huge: a YAML alias
    bomb, a manifest cell)."""
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


RESUMABLE = "committed work is kept; rerun the same command to resume"


def guarded(main: Callable[[], int], debug: bool, on_interrupt: str | None = None) -> int:
    """Run a command's body: an unexpected exception is one line and exit 3 (a traceback only
    with --debug); Ctrl-C/SIGTERM is exit 130, saying `on_interrupt` (e.g. RESUMABLE) after
    "interrupted" when the command has something to say of what it leaves."""
    handlers = install_sigterm()
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted" + (f": {on_interrupt}" if on_interrupt else ""), file=sys.stderr, flush=True)
        return INTERRUPTED
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the last line of defence
        if debug:
            raise
        from .redact import redact_text

        print(
            f"error: {type(exc).__name__}: {one_line(redact_text(str(exc)))} (rerun with --debug for the traceback)",
            file=sys.stderr,
            flush=True,
        )
        return INFRASTRUCTURE
    finally:
        restore_signals(handlers)


def finish(code: int) -> None:
    """Leave the process with `code` at once, after flushing stdout/stderr.

    Why not `sys.exit`: at interpreter exit, C++ static destructors run while native threads
    (pyarrow's and torch's thread pools) may still be alive; now and then one is destroyed while
    running, and libstdc++ aborts the process ("terminate called without an active exception",
    SIGABRT, exit 134) after the command printed its correct output. Every command has flushed
    and released what it holds (lease, Ray) by the time it returns its code, so nothing is lost
    by skipping the interpreter's teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - a closed pipe: nothing more to say
            pass
    os._exit(code)


__all__ = [
    "RESUMABLE",
    "INCOMPLETE",
    "INFRASTRUCTURE",
    "INTERRUPTED",
    "OK",
    "REFUSED",
    "TABLE",
    "InfrastructureFault",
    "finish",
    "guarded",
    "install_sigterm",
    "one_line",
]
