"""Distributor: the only module that knows about Ray.

- `connect()` joins the cluster named by `--address` / `RAY_ADDRESS` (set by `ray job submit`),
  or starts an embedded local Ray for this run. It never attaches to some other local cluster it
  merely finds on the machine. Actors import `jobs` and `sdcore` from the job's working dir
  (`ray job submit --working-dir .`), from PYTHONPATH (embedded), or from py_modules uploaded
  with the job (any other connection).
- `RayDistributor.start()` starts `workers` actors, each building its worker (loading the model)
  once in its constructor: one GPU each where the cluster has GPUs, else an equal share of the
  CPUs. Workers are used as soon as each is ready, so a job on a half-scheduled cluster still
  runs.
- `RayDistributor.run()` hands shards out one at a time to whichever worker is free, so a slow
  worker holds at most the shard it is on. A shard whose worker dies or raises is retried on
  another (up to `max_attempts`); one that keeps failing is reported failed, not committed, and a
  rerun retries it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import ray

from .reader import ShardTask
from .worker import ShardResult, ShardWorker, WorkerConfig, WorkerInfo, WorkerStartError

REPO_ROOT = Path(__file__).resolve().parent.parent
# Non-secret S3 settings that actors on other nodes should see like the driver does.
# (Credentials are never forwarded: each node uses its own credentials chain.)
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def connect(address: str | None = None, num_cpus: int | None = None) -> tuple[bool, str]:
    """Connect to Ray -> (embedded, description). `embedded` is True when this call started a
    local cluster for this run (shut it down with `disconnect`)."""
    if ray.is_initialized():
        return False, "the Ray session already open in this process"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, runtime_env=_code_runtime_env(), logging_level=logging.WARNING, log_to_driver=True)
        return False, f"the Ray cluster at {address}"
    # Embedded: workers are local processes and inherit this environment, so the repository
    # root on PYTHONPATH makes `jobs` and `sdcore` importable in them without any upload.
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    return True, "an embedded local Ray (no cluster address given)"


def describe_cluster() -> str:
    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return f"{nodes} node(s), {int(resources.get('CPU', 0))} CPUs, {int(resources.get('GPU', 0))} GPUs"


def disconnect(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()


def _code_runtime_env() -> dict[str, Any] | None:
    """How actors on a cluster get `jobs` and `sdcore`: under `ray job submit --working-dir .`
    they are in the job's working dir; otherwise they are uploaded with the job as py_modules
    (local folders can only be given to `ray.init`, not to one actor)."""
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job manager
    if injected:
        try:
            if (json.loads(injected).get("runtime_env") or {}).get("working_dir"):
                return None
        except ValueError:
            pass
    import sdcore

    return {"py_modules": [str(Path(__file__).resolve().parent), str(Path(sdcore.__file__).resolve().parent)]}


def _actor_runtime_env() -> dict[str, Any] | None:
    """Non-secret S3 settings of the driver, for actors on other nodes."""
    forwarded = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    return {"env_vars": forwarded} if forwarded else None


class _WorkerActor:
    """Holds one worker; a failing constructor is reported by `info()`, not by dying (so a bad
    weights path is one clear message, not a restart loop)."""

    def __init__(self, factory: Callable[[WorkerConfig], Any], config: WorkerConfig):
        self.error = None
        self.worker = None
        try:
            self.worker = factory(config)
        except Exception as exc:  # noqa: BLE001 - reported through info()
            self.error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()  # the details, in the driver's log (log_to_driver)

    def info(self) -> tuple[str | None, WorkerInfo | None]:
        return (self.error, None) if self.worker is None else (None, self.worker.info())

    def run(self, task: ShardTask, attempt: int, progress: Any) -> ShardResult:
        def report(done: int) -> None:
            progress.update.remote(task.shard_id, done)

        return self.worker.run(task, attempt, report)


class _Progress:
    """Rows done per shard in flight, as last reported by the workers."""

    def __init__(self) -> None:
        self.done: dict[str, int] = {}

    def update(self, shard: str, done: int) -> None:
        self.done[shard] = done

    def snapshot(self) -> dict[str, int]:
        return dict(self.done)


@dataclass
class Outcome:
    results: dict[str, ShardResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # shard -> last error
    workers_ready: int = 0


@dataclass
class ProgressState:
    rows_done: int  # rows of this run's shards that are finished (committed or in flight)
    rows_total: int  # rows of this run's shards
    shards_done: int
    shards_failed: int
    shards_total: int
    workers: int
    elapsed: float  # since the first worker was ready


def _short_error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None and not isinstance(cause, ray.exceptions.RayError):
        return f"{type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


class RayDistributor:
    def __init__(self, device: str = "auto", workers: int | str = "auto", max_attempts: int = 3,
                 log: Callable[[str], None] = print, cpu_threads: int | str = "auto"):
        self.device_request = device
        self.cpu_threads = cpu_threads
        self.workers_request = workers
        self.max_attempts = max_attempts
        self.log = log
        self.actors: list[Any] = []
        self.progress_actor = None

    # -------------------------------------------------------------------------- placement

    def plan(self) -> tuple[str, int, dict[str, Any], int | None]:
        """(device, number of workers, actor options, torch threads) for this cluster.

        GPU: one GPU per worker. CPU: the cores are divided among the workers for scheduling,
        but every worker runs the same number of torch threads (`cpu_threads`, default the CPUs
        of the largest node): CPU results depend on the thread count, and images must not
        depend on the number of workers.
        """
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        device = self.device_request
        if device == "auto":
            device = "cuda" if gpus > 0 else "cpu"
        workers = self.workers_request
        if workers == "auto":
            workers = max(1, gpus) if device == "cuda" else 1
        if device == "cuda":
            return device, workers, {"num_gpus": 1, "num_cpus": 1}, None
        node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        largest = max(node_cpus or [1]) or 1
        total = int(resources.get("CPU", 1)) or 1
        share = max(1, min(total // workers, largest))
        if workers > total:
            self.log(f"[sdgen] note: {workers} workers asked for, the cluster has {total} CPUs; "
                     "extra workers wait for free CPUs")
        threads = self.cpu_threads if self.cpu_threads != "auto" else largest
        return device, workers, {"num_cpus": share}, threads

    # -------------------------------------------------------------------------- running

    def start(self, config: WorkerConfig, factory: Callable[[WorkerConfig], Any] = ShardWorker) -> str:
        device, workers, options, threads = self.plan()
        config = replace(config, device=device, threads=threads)
        threads_note = f", {threads} torch thread(s)" if threads else ""
        self.log(f"[sdgen] starting {workers} worker(s) on {device} "
                 f"({', '.join(f'{k}={v}' for k, v in options.items())}{threads_note} each)")
        actor_cls = ray.remote(_WorkerActor).options(
            max_restarts=2, max_task_retries=0, runtime_env=_actor_runtime_env(), **options
        )
        self.actors = [actor_cls.remote(factory, replace(config, name=None)) for _ in range(workers)]
        self.progress_actor = ray.remote(_Progress).options(num_cpus=0).remote()
        return device

    def run(
        self,
        tasks: Iterable[ShardTask],
        on_ready: Callable[[WorkerInfo], None],
        on_result: Callable[[ShardResult], None] = lambda r: None,
        on_progress: Callable[[ProgressState], None] = lambda p: None,
        progress_every: float = 10.0,
    ) -> Outcome:
        """Run every task; `on_ready(info)` is called once, for the first worker ready (it may
        raise to abort before any shard is handed out)."""
        queue = deque((task, 1) for task in tasks)
        sizes = {task.shard_id: task.num_rows for task, _ in queue}
        outcome = Outcome()
        reference: WorkerInfo | None = None
        starting = {actor.info.remote(): actor for actor in self.actors}
        idle: list[Any] = []
        inflight: dict[Any, tuple[Any, ShardTask, int]] = {}
        start_errors: list[str] = []
        first_ready_at: float | None = None
        last_report = time.monotonic()
        waiting_since = time.monotonic()

        def report(force: bool = False) -> None:
            nonlocal last_report
            now = time.monotonic()
            if not force and now - last_report < progress_every:
                return
            last_report = now
            live = ray.get(self.progress_actor.snapshot.remote()) if inflight else {}
            done_rows = sum(r.rows for r in outcome.results.values())
            done_rows += sum(min(live.get(t.shard_id, 0), t.num_rows) for _, t, _ in inflight.values())
            on_progress(ProgressState(
                rows_done=done_rows,
                rows_total=sum(sizes.values()),
                shards_done=len(outcome.results),
                shards_failed=len(outcome.failed),
                shards_total=len(sizes),
                workers=outcome.workers_ready,
                elapsed=now - first_ready_at if first_ready_at else 0.0,
            ))

        while queue or inflight:
            if not starting and not idle and not inflight:
                reason = "; ".join(dict.fromkeys(start_errors)) or "every worker died"
                if outcome.workers_ready == 0 and start_errors:
                    raise WorkerStartError(reason)
                for task, _ in queue:
                    outcome.failed[task.shard_id] = f"no live workers left ({reason})"
                break
            while idle and queue:
                actor = idle.pop()
                task, attempt = queue.popleft()
                inflight[actor.run.remote(task, attempt, self.progress_actor)] = (actor, task, attempt)

            ready, _ = ray.wait(list(starting) + list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        error, info = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        error, info = _short_error(exc), None
                    if error is not None:
                        start_errors.append(error)
                        self.log(f"[sdgen] a worker failed to start: {error}")
                        ray.kill(actor)
                        continue
                    if reference is None:
                        reference = info
                        on_ready(info)  # may raise: nothing has been handed out yet
                        first_ready_at = time.monotonic()
                    elif info.model_fingerprint != reference.model_fingerprint:
                        self.log(f"[sdgen] worker {info.worker} loaded different weights "
                                 f"(fingerprint {info.model_fingerprint[:12]}); not used")
                        ray.kill(actor)
                        continue
                    outcome.workers_ready += 1
                    idle.append(actor)
                    continue
                actor, task, attempt = inflight.pop(ref)
                try:
                    result: ShardResult = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    # The worker process died (crash, OOM, node lost): it restarts (reloading the
                    # model) and rejoins through `starting`; the shard goes to the next free worker.
                    self._retry(queue, outcome, task, attempt, f"worker died: {_short_error(exc)}")
                    outcome.workers_ready -= 1
                    starting[actor.info.remote()] = actor
                    continue
                except ray.exceptions.RayError as exc:
                    self._retry(queue, outcome, task, attempt, _short_error(exc))
                    idle.append(actor)
                    continue
                outcome.results[task.shard_id] = result
                on_result(result)
                idle.append(actor)
                report(force=True)
            if not ready and not outcome.workers_ready and time.monotonic() - waiting_since > 60:
                waiting_since = time.monotonic()
                self.log(f"[sdgen] waiting for workers to start ({len(starting)} pending: "
                         "loading the model, or waiting for free GPUs/CPUs on the cluster)")
            report()
        return outcome

    def _retry(self, queue: deque, outcome: Outcome, task: ShardTask, attempt: int, error: str) -> None:
        if attempt < self.max_attempts:
            self.log(f"[sdgen] {task.shard_id} attempt {attempt} failed ({error}); retrying")
            queue.append((task, attempt + 1))
        else:
            self.log(f"[sdgen] {task.shard_id} failed after {attempt} attempt(s): {error}")
            outcome.failed[task.shard_id] = error

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self.progress_actor is not None:
            try:
                ray.kill(self.progress_actor)
            except Exception:  # noqa: BLE001
                pass
            self.progress_actor = None


__all__ = ["RayDistributor", "WorkerStartError", "connect", "describe_cluster", "disconnect"]
