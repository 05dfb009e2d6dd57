"""Where the driver runs, and whether the job's local paths are safe there.

Two ways a job's files can silently end up somewhere the user will never see them:

- Under `ray job submit --working-dir .` the driver's current directory is Ray's temporary copy
  of the working dir (`.../runtime_resources/working_dir_files/...` in the Ray session's temp
  folder), which Ray deletes. A relative `output`, `manifest` or `model.weights` resolves there
  (the images would vanish with the copy; the inputs would be the uploaded copies, not the
  user's). `temporary_path_problems` names each such path; the runner refuses the job before any
  work (`ClusterPathError`, exit 2).
- A local `output` on a cluster whose workers run on other nodes than the driver: every node
  would write to its own disk, and the driver could not see what the workers committed.
  `unshared_output_problem` refuses it unless the spec says the folder is on storage every node
  mounts (`execution.shared_output: true`, e.g. NFS/EFS).

Nothing here imports Ray: the distributor describes the cluster (`ClusterLayout`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .exit_codes import InfrastructureFault
from .spec import JobSpec, SpecError
from .storage import is_s3, redact_uri

FIX = (
    "write an absolute path on storage every node can read (and, for the output, write), or "
    "s3://bucket/prefix; on a cluster that runs on this machine, `python jobs/run.py SPEC --base-dir "
    '"$PWD"` (on the `ray job submit` line) makes relative paths mean your checkout'
)


class ClusterPathError(SpecError):
    """A path of the job is unsafe where the job runs (refused before any work, exit 2)."""


class ClusterAddressError(SpecError):
    """A cluster address the run cannot use (refused before connecting, exit 2)."""


def check_local_weights(spec: JobSpec, address: str | None) -> None:
    """An embedded run's workers are this machine's processes, so a local weights path must exist
    here: refused (SpecError) before Ray starts rather than by every worker after it. On a
    cluster the workers' machines may hold a path the driver's does not; they check it."""
    from .weights import weights_here_problem

    problem = None if address or os.environ.get("RAY_ADDRESS") else weights_here_problem(spec.model.weights)
    if problem:
        raise SpecError(f"model.weights: {problem}")


def check_address(address: str | None) -> None:
    """Refuse a Ray Client address (`ray://`, given or in $RAY_ADDRESS): the driver would run
    here, holding the whole job on this machine's connection and writing its summary and report
    to this machine's disk, and Ray Client cannot carry streamed actor calls (how each shard's
    progress comes back)."""
    address = address or os.environ.get("RAY_ADDRESS") or ""
    if address.strip().lower().startswith("ray://"):
        raise ClusterAddressError(
            f"{address}: a Ray Client address; sdgen's driver must run on the cluster. Submit the job "
            "instead: ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/run.py SPEC"
        )
    if address.strip().lower().startswith(("http://", "https://")):
        raise ClusterAddressError(
            f"{address}: the address of Ray's job API (the dashboard), which `ray job submit` takes; a "
            "driver joins the cluster at HEAD:6379 (or `auto` on a cluster node). Submit the job: ray job "
            f"submit --address {address.strip()} --working-dir . -- python jobs/run.py SPEC"
        )


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT cluster address must answer before `ray.init` is called: against a cluster
    that is not running, ray.init retries for minutes, printing only Ray's own warnings.
    InfrastructureFault (exit 3) when nothing listens there within `timeout` seconds."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or not host:
        return  # `auto`, `local` or another form Ray resolves itself
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=max(0.1, deadline - time.monotonic())):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise InfrastructureFault(
                    f"no Ray cluster answers at {address} ({exc.strerror or exc}); start it (ray start --head) "
                    "or unset RAY_ADDRESS for an embedded local Ray"
                ) from None
            time.sleep(0.5)


def submitted_with_working_dir() -> bool:
    """Whether Ray's job manager started this process with a `working_dir` runtime env (`ray job
    submit --working-dir ...`): then the code and relative paths live in Ray's temporary copy."""
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job manager
    if not injected:
        return False
    try:
        return bool((json.loads(injected).get("runtime_env") or {}).get("working_dir"))
    except ValueError:
        return False


def job_working_dir() -> Path | None:
    """Ray's temporary copy of the working dir when this process is a `ray job submit`
    entrypoint with a working dir (its current directory), else None."""
    cwd = Path.cwd()
    if submitted_with_working_dir():
        return cwd
    parts = cwd.parts
    if "runtime_resources" in parts and any(p.startswith("working_dir_files") for p in parts):
        return cwd
    return None


def _local_paths(spec: JobSpec) -> list[tuple[str, str]]:
    """(key, path) of the spec's local paths (resolved: absolute)."""
    paths = [("manifest", m) for m in spec.manifest] + [("output", spec.output), ("model.weights", spec.model.weights)]
    return [(key, uri) for key, uri in paths if not (is_s3(uri) or uri.startswith("builtin:"))]


def temporary_path_problems(spec: JobSpec, working_dir: Path | None) -> list[str]:
    """One line per local path of the spec inside Ray's temporary working dir copy."""
    if working_dir is None:
        return []
    root = working_dir.resolve()
    problems = []
    for key, uri in _local_paths(spec):
        path = Path(uri)
        try:
            inside = path.resolve().is_relative_to(root) or path.is_relative_to(working_dir)
        except OSError:
            inside = False
        if inside:
            shown = os.path.relpath(path, working_dir)
            problems.append(
                f"{key}: {shown!r} resolves inside Ray's temporary copy of the working dir ({working_dir}), "
                "which Ray deletes after the job" + (": the images would vanish" if key == "output" else "")
            )
    return problems


def check_paths_where_submitted(spec: JobSpec) -> None:
    """Refuse (ClusterPathError) a job whose local paths lie in `ray job submit`'s temporary
    working dir copy. No Ray, no cluster: the check is on the driver's own directory."""
    problems = temporary_path_problems(spec, job_working_dir())
    if problems:
        raise ClusterPathError(
            "this job runs under `ray job submit`, in a temporary folder:\n  "
            + "\n  ".join(problems)
            + f"\nInstead, {FIX}."
        )


@dataclass(frozen=True)
class ClusterLayout:
    """What the placement rules need to know of a cluster (made by the distributor)."""

    driver_node: str  # the driver's node id
    nodes: dict[str, dict[str, float]]  # alive node id -> its total resources


def workers_elsewhere(layout: ClusterLayout, device: str) -> list[str]:
    """Node ids other than the driver's that can host a worker of `device` (cpu | cuda | auto), plus
    the marker "(nodes not up yet)" when the driver's own node cannot host one (e.g. a CPU:0
    head on an autoscaling cluster: every worker will run on a node still to come)."""
    if device == "auto":  # as the distributor resolves it: cuda when the cluster has GPUs
        device = "cuda" if any(res.get("GPU", 0) > 0 for res in layout.nodes.values()) else "cpu"
    resource = "GPU" if device == "cuda" else "CPU"
    others = [n for n, res in layout.nodes.items() if n != layout.driver_node and res.get(resource, 0) > 0]
    if layout.nodes.get(layout.driver_node, {}).get(resource, 0) <= 0:
        others.append("(nodes not up yet)")
    return others


def unshared_output_problem(spec: JobSpec, layout: ClusterLayout, device: str) -> str | None:
    """Why a local output is unsafe on this cluster, or None."""
    if is_s3(spec.output) or spec.execution.shared_output:
        return None
    others = workers_elsewhere(layout, device)
    if not others:
        return None
    return (
        f"output: {redact_uri(spec.output)!r} is a local folder, and workers may run on {len(others)} other "
        "node(s) than the driver: each node would write to its own disk. Use s3://bucket/prefix, or, if the "
        "folder is on storage every node mounts (NFS, EFS, ...), say so with `execution.shared_output: true`."
    )


def check_output_shared(spec: JobSpec, layout: ClusterLayout, device: str) -> None:
    problem = unshared_output_problem(spec, layout, device)
    if problem:
        raise ClusterPathError(problem)


__all__ = [
    "ClusterAddressError",
    "ClusterLayout",
    "ClusterPathError",
    "check_address",
    "check_output_shared",
    "check_paths_where_submitted",
    "check_reachable",
    "job_working_dir",
    "submitted_with_working_dir",
    "temporary_path_problems",
    "unshared_output_problem",
    "workers_elsewhere",
]
