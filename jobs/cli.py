"""The `sdgen` command (a console script, `[project.scripts]` in pyproject.toml):

    sdgen run SPEC [--overwrite] [--address ADDR] [--dry-run] [--limit N] [--progress-every SECONDS]
    sdgen status OUTPUT [--all] [--json] [--errors]
    sdgen reproduce OUTPUT ID [ID ...] [options]
    sdgen make-manifest TEMPLATE.yaml|LIST.csv|LIST.jsonl OUT.parquet [--base-seed N] [--seeds-per-prompt K]
    sdgen report OUTPUT [--max-images N] [--page-size N]
    sdgen grid OUTPUT OUT.png [--rows FIELD] [--cols FIELD] [--where FIELD=VALUE] [--cell PX] [--per-cell N]
    sdgen export OUTPUT --format webdataset|imagefolder|parquet DEST [--metadata jsonl|parquet]

Each subcommand keeps the options, output and exit status of its script under jobs/ —
`python jobs/run.py`, `python jobs/status.py`, `python jobs/reproduce.py` run the same code —
so `sdgen` only picks the command and hands it the rest of the arguments. Each command's module
is imported only when chosen: `sdgen status` never imports Ray or torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .exit_codes import (
    INCOMPLETE,
    INFRASTRUCTURE,
    OK,
    REFUSED,
    RESUMABLE,
    TABLE,
    InfrastructureFault,
    finish,
    guarded,
    one_line,
)
from .redact import redact_text


def run_main(argv: Sequence[str], prog: str = "sdgen run") -> int:
    """`sdgen run`: the exit codes of `exit_codes.TABLE` (0 complete, 1 some shards failed,
    2 refused before any work, 3 stopped by an infrastructure fault, 130 interrupted). With
    --dry-run: 0 every row would generate, 1 some rows would be error records, 2 refused (e.g.
    weights missing)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run or resume an sdgen job (see jobs/README.md).",
        epilog=TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", help="job spec YAML (e.g. manifests/example.yaml)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="if OUTPUT holds a different job, delete its images and records and start again",
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)"
    )
    parser.add_argument(
        "--base-dir",
        default=None,
        metavar="DIR",
        help="relative paths in the spec are relative to DIR (default: the current directory); under "
        '`ray job submit` on a cluster on this machine, --base-dir "$PWD" makes them mean your checkout '
        "instead of Ray's temporary copy of the working dir",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the spec, manifest and output, print the plan, run nothing"
    )
    parser.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between progress lines (default 10)",
    )
    parser.add_argument(
        "--break-lease",
        action="store_true",
        help="take over the output's lease even if another run seems to hold it (only when you know it is gone)",
    )
    parser.add_argument("--debug", action="store_true", help="print a traceback for unexpected errors")
    parser.add_argument(
        "--limit", type=int, default=None, metavar="N", help="run only the first N rows, into OUTPUT-limitN (a trial)"
    )
    args = parser.parse_args(argv)
    return guarded(lambda: _run(args), args.debug, None if args.dry_run else RESUMABLE)


def _run(args: argparse.Namespace) -> int:
    # Imported after parsing, so that --help and usage errors come at once.
    from .faults import Backoff, SettingError
    from .lease import LeaseHeld, LeaseLost, lease_ttl
    from .manifest import ManifestError
    from .runner import JobConflict, run_job
    from .spec import SpecError, load_spec
    from .storage import StorageError, TransientStorageError
    from .worker import WorkerStartError

    try:
        Backoff.from_env()  # a bad $SDGEN_STORAGE_* or $SDGEN_LEASE_TTL is refused before anything starts
        lease_ttl()
        summary = run_job(
            load_spec(args.spec, base_dir=args.base_dir) if args.base_dir else args.spec,
            overwrite=args.overwrite,
            address=args.address,
            dry_run=args.dry_run,
            progress_every=args.progress_every,
            break_lease=args.break_lease,
            limit=args.limit,
        )
    except (InfrastructureFault, LeaseLost) as exc:
        print(f"error: {one_line(exc, 2000)}", file=sys.stderr, flush=True)
        print(RESUMABLE, file=sys.stderr, flush=True)
        return INFRASTRUCTURE
    except TransientStorageError as exc:  # before any work: the manifest, weights, lease or job.json
        print(
            f"error: stopped by a storage fault before any work: {one_line(redact_text(str(exc)), 2000)}; "
            "rerun the same command when the store answers",
            file=sys.stderr,
            flush=True,
        )
        return INFRASTRUCTURE
    except (
        SettingError,
        SpecError,
        ManifestError,
        JobConflict,
        WorkerStartError,
        StorageError,
        LeaseHeld,
        OSError,
    ) as exc:
        print(f"error: {one_line(redact_text(str(exc)), 4000)}", file=sys.stderr, flush=True)
        return REFUSED
    if args.dry_run:
        return INCOMPLETE if summary["rows"]["bad"] else OK  # some rows would become error records
    return OK if summary["complete"] else INCOMPLETE


def status_main(argv: Sequence[str]) -> int:
    from .status import main

    return main(list(argv), prog="sdgen status")


def reproduce_main(argv: Sequence[str]) -> int:
    from .reproduce import main

    return main(list(argv), prog="sdgen reproduce")


def _last_line_of_defence(
    main: Callable[[list[str]], int], argv: Sequence[str], on_interrupt: str | None = None
) -> int:
    """A command that names its own expected errors (exit 2) still must not print a traceback
    for one it did not foresee: `guarded` makes it one line (exit 3); `--debug`, taken out of
    the arguments here, shows the traceback."""
    argv = list(argv)
    debug = "--debug" in argv
    return guarded(lambda: main([a for a in argv if a != "--debug"]), debug, on_interrupt)


def make_manifest_main(argv: Sequence[str]) -> int:
    from .templates import main

    return _last_line_of_defence(main, argv)


def export_main(argv: Sequence[str]) -> int:
    from .export import main

    return _last_line_of_defence(main, argv, on_interrupt=RESUMABLE)  # an export resumes too


def grid_main(argv: Sequence[str]) -> int:
    from .grid import main

    return _last_line_of_defence(main, argv)


def report_main(argv: Sequence[str]) -> int:
    from .report import main

    return _last_line_of_defence(main, argv)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "run": (run_main, "run or resume a job from its spec (YAML); rerun to resume"),
    "status": (status_main, "show an output's progress: shards done / running / failed / pending, row counts"),
    "reproduce": (reproduce_main, "regenerate images from their records and compare them with the stored ones"),
    "make-manifest": (make_manifest_main, "expand a prompt template (YAML) or convert CSV/TSV/JSONL into a manifest"),
    "report": (report_main, "(re)build OUTPUT/index.html: counts, throughput, errors, contact sheet"),
    "grid": (grid_main, "lay out a sweep's images as one labelled grid (rows x columns of fields or labels)"),
    "export": (export_main, "export the ok rows as WebDataset shards, a Hugging Face imagefolder or Parquet"),
}


def _parser() -> argparse.ArgumentParser:
    """The top level, for `sdgen --help` and usage errors; a command parses its own arguments."""
    parser = argparse.ArgumentParser(
        prog="sdgen",
        description="Distributed, reproducible Stable Diffusion 1.x batch generation (see jobs/README.md).",
        epilog="`sdgen COMMAND --help` shows a command's options.\n\n" + TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdgen {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`sdgen COMMAND ARGS...`: the command's exit status (2 for a usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        command, _ = COMMANDS[argv[0]]
        return command(argv[1:])
    parser = _parser()
    parser.parse_args(argv)  # no command first: prints the help, the version or a usage error, and exits
    parser.print_usage(sys.stderr)  # the command was not first (e.g. after `--`)
    return 2


def console() -> None:
    """The `sdgen` console script: `main`, then `exit_codes.finish` (no interpreter teardown)."""
    finish(main())


if __name__ == "__main__":
    console()
