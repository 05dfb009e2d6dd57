#!/usr/bin/env python
"""Run (or resume) a generation job: `python jobs/run.py SPEC.yaml [options]`, the same as
`sdgen run SPEC.yaml [options]` (see jobs/cli.py for the options and exit status).

This file stays a script, not only the `sdgen` console entry point, because it is how a job
runs on a cluster: `ray job submit --working-dir . -- python jobs/run.py SPEC.yaml`.
"""

import os
import sys

if __name__ == "__main__":
    # `python jobs/run.py` puts this folder, jobs/, first on sys.path. It is replaced by the
    # repository root, for two reasons:
    # - `jobs` and `sdcore` must be imported from the checkout this file is in: under
    #   `ray job submit --working-dir .` that is the uploaded working dir, which must win over
    #   any installed copy of sdgen on the cluster;
    # - Ray gives its workers the driver's script folder (sys.argv[0]'s) when that folder is on
    #   the driver's sys.path; jobs/ there would make every module in it (spec, output, ...)
    #   importable as a top-level module on every worker, shadowing packages of those names.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.join(root, "jobs"):
        sys.path[0] = root
    elif root not in sys.path:  # run with -P / PYTHONSAFEPATH: nothing to replace
        sys.path.insert(0, root)

    from jobs.cli import run_main
    from jobs.exit_codes import finish

    finish(run_main(sys.argv[1:], prog="jobs/run.py"))
