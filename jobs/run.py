#!/usr/bin/env python
"""Run (or resume) a generation job: `python jobs/run.py SPEC.yaml [--overwrite]`.

Connects to the Ray cluster named by --address or RAY_ADDRESS (set by `ray job submit`), else
starts an embedded local one. Rerunning the same command on the same output resumes.
Exit status: 0 every shard committed (rows may still be error records), 1 some shards failed
(rerun to retry them), 2 the spec, manifest or output was refused before any work.
"""

import os
import sys

# Runnable as a plain script from anywhere: the repository root replaces this folder on sys.path
# (so `jobs` is a package, and Ray does not put this folder on its workers' paths).
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
    sys.path[0] = os.path.dirname(_HERE)
elif os.path.dirname(_HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="jobs/run.py",
        description="Run or resume an sdgen job (see jobs/README.md).",
    )
    parser.add_argument("spec", help="job spec YAML (e.g. manifests/example.yaml)")
    parser.add_argument("--overwrite", action="store_true",
                        help="if OUTPUT holds a different job, delete its images and records and start again")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the spec, manifest and output, print the plan, run nothing")
    parser.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between progress lines (default 10)")
    args = parser.parse_args(argv)

    from jobs.worker import WorkerStartError
    from jobs.manifest import ManifestError
    from jobs.runner import JobConflict, run_job
    from jobs.spec import SpecError
    from jobs.storage import StorageError

    try:
        summary = run_job(args.spec, overwrite=args.overwrite, address=args.address,
                          dry_run=args.dry_run, progress_every=args.progress_every)
    except (SpecError, ManifestError, JobConflict, WorkerStartError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted: committed shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    if args.dry_run:
        return 0
    return 0 if summary["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
