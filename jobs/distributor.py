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
- `RayDistributor.run()` is a small event loop (`_ShardLoop`): it hands shards out one at a time
  to whichever worker is free, so a slow worker holds at most the shard it is on, and reacts to
  each event Ray reports (worker started or failed to start, a shard's rows done so far or its
  result, worker died, shard raised). A shard's call is a Ray streaming generator: its progress
  comes back with it, so a run has no actor but its workers. Whether a failed shard is tried
  again on another worker or given up (reported failed, not committed, retried by a rerun) is
  decided by `retry.RetryPolicy` alone.

The runner never imports Ray: it imports this module only once there is work to run, and gets
Ray's version for job.json from `ray_version()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from . import watchdog
from .cluster import ClusterLayout, check_reachable, submitted_with_working_dir
from .exit_codes import InfrastructureFault, install_sigterm
from .faults import inject_fault, worker_restarts
from .progress import Outcome, ProgressState
from .reader import ShardTask
from .retry import RetryPolicy, strikes_after
from .storage import StorageError, TransientStorageError
from .worker import ShardResult, ShardWorker, WorkerConfig, WorkerInfo, WorkerStartError

REPO_ROOT = Path(__file__).resolve().parent.parent
# Raised for a call to an actor that Ray is restarting (Ray >= 2.2x; older versions queue the call).
_ACTOR_UNAVAILABLE = getattr(ray.exceptions, "ActorUnavailableError", ())
RESTART_POLL_S = 1.0  # how soon to ask a restarting worker again whether it is ready
# Non-secret S3 settings that actors on other nodes should see like the driver does, and the
# fault-injection test hooks (set only by tests; they must reach the actors of a cluster that
# was started before they were set). Credentials are never forwarded: each node uses its own
# credentials chain.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "SDGEN_FAULT_KILL",
    "SDGEN_FAULT_CRASH_ROW",
)
# Ray lowers each worker process's priority by its `worker_niceness` (default 15, read by the
# worker itself at start from its environment) so that Ray's own daemons win the CPU. An sdgen
# worker is the job's whole compute: on a host whose cores all compute, the daemons' wake-ups
# then cut into it (0.95-0.99x the images of a worker at 0 in three trials inside one job,
# bench/RESULTS.md). So workers run at 0, as Ray's job supervisor runs its drivers; a value set
# in the driver's environment wins. An embedded Ray's processes inherit the driver's
# environment; on a cluster it goes in the actors' runtime env (a worker with its own runtime
# env cannot be one Ray started ahead: ~1 s more per worker start, so not used when embedded).
WORKER_NICENESS_ENV = "RAY_worker_niceness"


def connect(address: str | None = None, num_cpus: int | None = None) -> tuple[bool, str]:
    """Connect to Ray -> (embedded, description). `embedded` is True when this call started a
    local cluster for this run (shut it down with `disconnect`)."""
    if ray.is_initialized():
        return False, "the Ray session already open in this process"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
        ray.init(address=address, runtime_env=_code_runtime_env(), logging_level=logging.WARNING, log_to_driver=True)
        return False, f"the Ray cluster at {address}"
    # Embedded: workers are local processes and inherit this environment, so the repository
    # root on PYTHONPATH makes `jobs` and `sdcore` importable in them without any upload.
    paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")
    watchdog.guard()  # before Ray starts: a SIGKILLed driver's watchdog ends every Ray process after it
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    except BaseException:
        watchdog.release()
        raise
    install_sigterm()  # ray.init replaced it with one that aborts: SIGTERM must shut Ray down
    return True, "an embedded local Ray (no cluster address given)"


def describe_cluster() -> str:
    resources = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return f"{nodes} node(s), {int(resources.get('CPU', 0))} CPUs, {int(resources.get('GPU', 0))} GPUs"


def cluster_layout() -> ClusterLayout:
    """The driver's node and every alive node's resources (for `cluster.check_output_shared`)."""
    nodes = {n["NodeID"]: dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")}
    return ClusterLayout(driver_node=ray.get_runtime_context().get_node_id(), nodes=nodes)


def disconnect(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()
        watchdog.release()


def _code_runtime_env() -> dict[str, Any] | None:
    """How actors on a cluster get `jobs` and `sdcore`: under `ray job submit --working-dir .`
    they are in the job's working dir; otherwise they are uploaded with the job as py_modules
    (local folders can only be given to `ray.init`, not to one actor)."""
    if submitted_with_working_dir():
        return None
    import sdcore

    return {"py_modules": [str(Path(__file__).resolve().parent), str(Path(sdcore.__file__).resolve().parent)]}


def _actor_runtime_env(embedded: bool) -> dict[str, Any] | None:
    """Non-secret S3 settings of the driver, for actors on other nodes, and on a cluster the
    workers' niceness (an embedded Ray's workers inherit it from the driver)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if not embedded:
        env[WORKER_NICENESS_ENV] = os.environ.get(WORKER_NICENESS_ENV, "0")
    return {"env_vars": env} if env else None


class _WorkerActor:
    """Holds one worker; a failing constructor is reported by `info()`, not by dying (so a bad
    weights path is one clear message, not a restart loop)."""

    def __init__(self, factory: Callable[[WorkerConfig], Any], config: WorkerConfig):
        self.error = None
        self.worker = None
        if config.name is None:  # host:pid@node IP: which node of the cluster made a record
            config = replace(config, name=f"{socket.gethostname()}:{os.getpid()}@{ray.util.get_node_ip_address()}")
        try:
            self.worker = factory(config)
        except Exception as exc:  # noqa: BLE001 - reported through info()
            self.error = f"{type(exc).__name__}: {exc}"
            # Those say all in their message (bad weights: CheckpointError is a ValueError).
            if not isinstance(exc, (StorageError, FileNotFoundError, ValueError)):
                traceback.print_exc()  # the details, in the driver's log (log_to_driver)

    def info(self) -> tuple[str | None, WorkerInfo | None]:
        return (self.error, None) if self.worker is None else (None, self.worker.info())

    @ray.method(num_returns="streaming")
    def run(self, task: ShardTask, attempt: int, after_death: bool = False) -> Iterator[int | ShardResult]:
        """One shard, streamed to the driver: the rows done so far (ints, after each saved batch)
        and last its `ShardResult`. The progress travels with the shard's own call, so it needs
        no separate actor (an idle Ray worker process wakes ~170 times a second: on a host whose
        cores all compute, that is taken from the UNet)."""
        inject_fault(task.shard_id, attempt)  # test hook ($SDGEN_FAULT_KILL); nothing otherwise
        result = yield from self.worker.shard_steps(task, attempt, after_death=after_death)
        yield result


def _short_error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None and not isinstance(cause, ray.exceptions.RayError):
        return f"{type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


class RayDistributor:
    def __init__(
        self,
        device: str = "auto",
        workers: int | str = "auto",
        max_attempts: int = 3,
        log: Callable[[str], None] = print,
        cpu_threads: int | str = "auto",
        embedded: bool = False,
    ):
        self.device_request = device
        self.embedded = embedded  # on the Ray `connect` started for this run
        self.cpu_threads = cpu_threads
        self.workers_request = workers
        self.retry = RetryPolicy(max_attempts, log)
        self.log = log
        self.actors: list[Any] = []

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
            if workers > gpus:
                self.log(
                    f"[sdgen] note: {workers} workers asked for, the cluster has {gpus} GPU(s) now; "
                    f"{workers - gpus} wait for a free GPU (a node still to come), the job runs on those that start"
                )
            return device, workers, {"num_gpus": 1, "num_cpus": 1}, None
        node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        largest = max(node_cpus or [1]) or 1
        total = int(resources.get("CPU", 1)) or 1
        share = max(1, min(total // workers, largest))
        if workers > total:
            self.log(
                f"[sdgen] note: {workers} workers asked for, the cluster has {total} CPUs; "
                "extra workers wait for free CPUs"
            )
        threads = self.cpu_threads if self.cpu_threads != "auto" else largest
        return device, workers, {"num_cpus": share}, threads

    # -------------------------------------------------------------------------- running

    def start(
        self, config: WorkerConfig, factory: Callable[[WorkerConfig], Any] = ShardWorker, shards: int | None = None
    ) -> str:
        """Start the workers: no more than `shards`, the shards to run (a worker more would only
        load the model, hold a GPU or CPUs, and wait; `workers: 100000` for 2 shards created
        100,000 actors and hung at shutdown)."""
        device, workers, options, threads = self.plan()
        if shards is not None and workers > shards:
            self.log(f"[sdgen] note: {workers} workers asked for, {shards} shard(s) to run: starting {shards}")
            workers = max(1, shards)
        config = replace(config, device=device, threads=threads)
        threads_note = f", {threads} torch thread(s)" if threads else ""
        self.log(
            f"[sdgen] starting {workers} worker(s) on {device} "
            f"({', '.join(f'{k}={v}' for k, v in options.items())}{threads_note} each)"
        )
        # A dead worker (killed, OOM, segfault) is restarted by Ray, enough times for a shard
        # that kills its worker on every attempt to be given up without losing the worker.
        actor_cls = ray.remote(_WorkerActor).options(
            max_restarts=worker_restarts(self.retry.max_attempts),
            max_task_retries=0,
            runtime_env=_actor_runtime_env(self.embedded),
            **options,
        )
        self.actors = [actor_cls.remote(factory, replace(config, name=None)) for _ in range(workers)]
        return device

    def run(
        self,
        tasks: Iterable[ShardTask],
        on_ready: Callable[[WorkerInfo], None],
        on_result: Callable[[ShardResult], None] = lambda r: None,
        on_progress: Callable[[ProgressState], None] = lambda p: None,
        progress_every: float = 10.0,
        check: Callable[[], None] = lambda: None,
    ) -> Outcome:
        """Run every task; `on_ready(info)` is called once, for the first worker ready (it may
        raise to abort before any shard is handed out); `on_result` after each shard committed;
        `on_progress` every `progress_every` seconds and after each shard; `check` at every turn
        of the loop, at least once a second (it raises to stop the run: the caller's `shutdown`
        then stops the workers)."""
        return _ShardLoop(self, tasks, on_ready, on_result, on_progress, progress_every, check).run()

    def shutdown(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):  # the actor is already gone: nothing left to stop
                ray.kill(actor)
        self.actors = []


class _ShardLoop:
    """One `RayDistributor.run`: wait for the next Ray event, react to it, repeat until every
    shard is committed or given up.

    Workers move between `starting` (loading the model; a restarted one comes back here),
    `restarting` (Ray is still bringing a dead one back), `idle` and `inflight` (running one
    shard). The events: a worker started or failed to start, a shard done, a worker died
    mid-shard, a shard raised. A failed attempt goes to the distributor's `RetryPolicy`, which
    decides between another attempt and giving up.
    """

    def __init__(
        self,
        distributor: RayDistributor,
        tasks: Iterable[ShardTask],
        on_ready: Callable[[WorkerInfo], None],
        on_result: Callable[[ShardResult], None],
        on_progress: Callable[[ProgressState], None],
        progress_every: float,
        check: Callable[[], None],
    ):
        self.check = check
        self.retry, self.log = distributor.retry, distributor.log
        self.on_ready, self.on_result, self.on_progress = on_ready, on_result, on_progress
        self.progress_every = progress_every
        self.queue: deque[tuple[ShardTask, int]] = deque((task, 1) for task in tasks)  # (task, attempt)
        self.sizes = {task.shard_id: task.num_rows for task, _ in self.queue}
        self.outcome = Outcome()
        self.reference: WorkerInfo | None = None  # the first ready worker: the others must match its model
        self.starting: dict[Any, Any] = {actor.info.remote(): actor for actor in distributor.actors}
        self.restarting: list[tuple[float, Any]] = []  # (when to ask again, actor)
        self.idle: list[Any] = []
        # a shard's stream (ObjectRefGenerator) -> (actor, task, attempt)
        self.inflight: dict[Any, tuple[Any, ShardTask, int]] = {}
        self.rows_done: dict[str, int] = {}  # shard in flight -> rows done, as last streamed
        self.most_rows_done: dict[str, int] = {}  # shard -> the most rows done any attempt streamed
        self.strikes: dict[str, int] = {}  # shard -> its failed attempts that count (`strikes_after`)
        self.died: set[str] = set()  # shards whose last attempt ended in a worker death
        self.start_errors: list[str] = []
        self.last_report = self.waiting_since = time.monotonic()

    def run(self) -> Outcome:
        while self.queue or self.inflight:
            self.check()
            if not (self.starting or self.restarting or self.idle or self.inflight):
                self._no_workers_left()
                break
            self._ask_restarting()
            self._hand_out()
            ready = self._wait()
            for ref in ready:
                if ref in self.starting:
                    self._worker_started(self.starting.pop(ref), ref)
                else:
                    self._shard_returned(ref)
            if not ready:
                self._still_waiting()
            self._report()
        return self.outcome

    def _wait(self) -> list[Any]:
        """The next finished call (a worker's `info`) or streamed item (a shard's progress or
        result), or none within a second."""
        refs = [*self.starting, *self.inflight]
        if not refs:  # only restarting workers: nothing to wait on but the clock
            time.sleep(RESTART_POLL_S / 4)
            return []
        ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
        return ready

    def _hand_out(self) -> None:
        """One shard to each idle worker: shards go out one at a time, so a slow worker holds
        at most the shard it is on."""
        while self.idle and self.queue:
            actor = self.idle.pop()
            task, attempt = self.queue.popleft()
            after_death = task.shard_id in self.died  # the worker then narrows down a crashing row
            self.died.discard(task.shard_id)
            self.inflight[actor.run.remote(task, attempt, after_death)] = (actor, task, attempt)

    # -------------------------------------------------------------------------- worker events

    def _worker_started(self, actor: Any, ref: Any) -> None:
        try:
            error, info = ray.get(ref)
        except _ACTOR_UNAVAILABLE:
            self._worker_restarting(actor)
            return
        except ray.exceptions.RayError as exc:
            error, info = _short_error(exc), None
        if error is not None:
            self._worker_failed_to_start(actor, error)
        elif self._same_model(actor, info):
            self.outcome.workers_ready += 1
            self.idle.append(actor)

    def _same_model(self, actor: Any, info: WorkerInfo) -> bool:
        """The first ready worker sets the job's model (`on_ready` may still refuse it); a later
        one with other weights is not used."""
        if self.reference is None:
            self.reference = info
            self.on_ready(info)  # may raise: nothing has been handed out yet
            self.outcome.first_ready_at = time.monotonic()
            return True
        if info.model_fingerprint == self.reference.model_fingerprint:
            return True
        self.log(
            f"[sdgen] worker {info.worker} loaded different weights "
            f"(fingerprint {info.model_fingerprint[:12]}); not used"
        )
        ray.kill(actor)
        return False

    def _worker_restarting(self, actor: Any) -> None:
        """Asked too soon after it died: Ray is still restarting the worker (its constructor
        reloads the model). Not a start failure: ask again in a moment."""
        self.restarting.append((time.monotonic() + RESTART_POLL_S, actor))

    def _ask_restarting(self) -> None:
        now = time.monotonic()
        due = [actor for when, actor in self.restarting if when <= now]
        self.restarting = [(when, actor) for when, actor in self.restarting if when > now]
        for actor in due:
            self.starting[actor.info.remote()] = actor

    def _worker_failed_to_start(self, actor: Any, error: str) -> None:
        self.start_errors.append(error)
        self.log(f"[sdgen] a worker failed to start: {error}")
        ray.kill(actor)

    def _no_workers_left(self) -> None:
        """No worker starting, idle or busy: raise if none ever started (a bad weights path is
        one clear error), else give up the shards still queued."""
        reason = "; ".join(dict.fromkeys(self.start_errors)) or "every worker died"
        if self.outcome.first_ready_at is None and self.start_errors:  # (workers_ready counts the living)
            if all(e.startswith(f"{TransientStorageError.__name__}:") for e in self.start_errors):
                # The weights' store did not answer (after the retries): not a bad job.
                raise InfrastructureFault(f"stopped by a storage fault while loading the model: {reason}")
            raise WorkerStartError(reason)
        for task, _ in self.queue:
            self.outcome.failed[task.shard_id] = f"no live workers left ({reason})"

    def _still_waiting(self) -> None:
        if not self.outcome.workers_ready and time.monotonic() - self.waiting_since > 60:
            self.waiting_since = time.monotonic()
            self.log(
                f"[sdgen] waiting for workers to start ({len(self.starting) + len(self.restarting)} pending: "
                "loading the model, or waiting for free GPUs/CPUs on the cluster)"
            )

    # -------------------------------------------------------------------------- shard events

    def _shard_returned(self, stream: Any) -> None:
        """The next item of a shard's stream: rows done so far, or the end (result or error)."""
        actor, task, attempt = self.inflight[stream]
        try:
            item = ray.get(next(stream))
        except ray.exceptions.RayActorError as exc:
            self._worker_died(actor, task, attempt, exc, saved_new_rows=self._shard_ended(stream))
        except (ray.exceptions.RayError, StopIteration) as exc:  # StopIteration: ended without a result
            self._shard_raised(actor, task, attempt, exc, saved_new_rows=self._shard_ended(stream))
        else:
            if isinstance(item, ShardResult):
                self._shard_ended(stream)
                self._shard_done(actor, task, item)
            else:
                self.rows_done[task.shard_id] = item

    def _shard_ended(self, stream: Any) -> bool:
        """Forget a shard's stream; returns whether the attempt saved rows no earlier attempt
        had (it streamed more rows done than any before it: every streamed count is of rows
        whose records were saved)."""
        _, task, _ = self.inflight.pop(stream)
        rows_done = self.rows_done.pop(task.shard_id, 0)
        most_before = self.most_rows_done.get(task.shard_id, 0)
        self.most_rows_done[task.shard_id] = max(most_before, rows_done)
        return rows_done > most_before

    def _shard_done(self, actor: Any, task: ShardTask, result: ShardResult) -> None:
        self.outcome.results[task.shard_id] = result
        self.on_result(result)
        self.idle.append(actor)
        self._report(force=True)

    def _worker_died(self, actor: Any, task: ShardTask, attempt: int, exc: BaseException, saved_new_rows: bool) -> None:
        """The worker process died (crash, OOM, node lost): Ray restarts it (reloading the
        model) and it rejoins through `starting`; the shard goes to the next free worker."""
        self.died.add(task.shard_id)
        self._attempt_failed(task, attempt, f"worker died: {_short_error(exc)}", True, saved_new_rows)
        self.outcome.workers_ready -= 1
        self.starting[actor.info.remote()] = actor

    def _shard_raised(
        self, actor: Any, task: ShardTask, attempt: int, exc: BaseException, saved_new_rows: bool
    ) -> None:
        self._attempt_failed(task, attempt, _short_error(exc), False, saved_new_rows)
        self.idle.append(actor)

    def _attempt_failed(self, task: ShardTask, attempt: int, error: str, died: bool, saved_new_rows: bool) -> None:
        strikes = strikes_after(self.strikes.get(task.shard_id, 0), died, saved_new_rows)
        self.strikes[task.shard_id] = strikes
        next_attempt = self.retry.next_attempt(task.shard_id, attempt, error, died, strikes)
        if next_attempt is None:
            self.outcome.failed[task.shard_id] = error
        else:
            self.queue.append((task, next_attempt))

    # -------------------------------------------------------------------------- progress

    def _report(self, force: bool = False) -> None:
        """A `ProgressState` to `on_progress`: after each shard, else every `progress_every` s.
        Rows of shards in flight count as far as their workers have streamed them."""
        now = time.monotonic()
        if not force and now - self.last_report < self.progress_every:
            return
        self.last_report = now
        rows_done = sum(r.rows for r in self.outcome.results.values())
        rows_done += sum(min(self.rows_done.get(t.shard_id, 0), t.num_rows) for _, t, _ in self.inflight.values())
        first_ready = self.outcome.first_ready_at
        self.on_progress(
            ProgressState(
                rows_done=rows_done,
                rows_total=sum(self.sizes.values()),
                shards_done=len(self.outcome.results),
                shards_failed=len(self.outcome.failed),
                shards_total=len(self.sizes),
                workers=self.outcome.workers_ready,
                elapsed=now - first_ready if first_ready else 0.0,
            )
        )


def ray_version() -> str:
    """Ray's version, for job.json (the runner does not import Ray itself)."""
    return ray.__version__


__all__ = ["RayDistributor", "WorkerStartError", "connect", "describe_cluster", "disconnect", "ray_version"]
