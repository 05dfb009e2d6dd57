"""jobs/distributor.py on a real local Ray, with stand-in workers (no model): dynamic hand-out,
retries after a worker dies, failed shards, start errors."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from jobs.manifest import load_manifest
from jobs.reader import read_shards
from jobs.worker import ShardResult, WorkerConfig, WorkerInfo, WorkerStartError

from conftest import small_rows, write_manifest


@pytest.fixture(scope="module", autouse=True)
def pickle_this_module_by_value(ray_local):
    # The stand-in workers below live in this test module, which Ray's workers cannot import.
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray_local.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


class StandIn:
    """A worker without a model. Behaviour is chosen through files in `config.output`."""

    def __init__(self, config: WorkerConfig):
        self.folder = Path(config.output)
        if (self.folder / "fail-start").exists():
            raise ValueError("weights not found: /nowhere/model.safetensors")
        self.slow = False
        try:  # the first worker to start is the slow one
            os.close(os.open(self.folder / "slow-taken", os.O_CREAT | os.O_EXCL))
            self.slow = (self.folder / "one-slow").exists()
        except FileExistsError:
            pass
        self.name = f"{'slow' if self.slow else 'fast'}-{os.getpid()}"

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.name, "f" * 64, "float32", "cpu", "stand-in", {"torch": "0"})

    def shard_steps(self, task, attempt=1, after_death=False):
        (self.folder / f"after-death-{task.shard_id}-{attempt}").write_text(str(after_death))
        crash_marker = self.folder / f"crashed-{task.shard_id}"
        if (self.folder / f"crash-{task.shard_id}").exists() and not crash_marker.exists():
            crash_marker.touch()
            os._exit(1)  # the actor process dies mid-shard
        if (self.folder / f"die-for-good-{task.shard_id}").exists():
            (self.folder / "fail-start").touch()  # the restarted worker cannot load its model
            os._exit(1)
        if (self.folder / f"raise-{task.shard_id}").exists():
            raise RuntimeError(f"cannot write {task.shard_id}")
        if (self.folder / "halfway").exists():  # a long shard: its rows done so far, then a pause
            yield task.num_rows // 2
            time.sleep(1.5)
        time.sleep(2.0 if self.slow else 0.05)
        yield task.num_rows
        rows = task.num_rows
        return ShardResult(task.shard_id, rows, rows, 0, rows, 0, True, attempt, 0.0, self.name)


def tasks_for(tmp_path, shards: int):
    manifest = load_manifest([str(write_manifest(tmp_path / "m.parquet", small_rows(shards * 2)))])
    return list(read_shards(manifest, 2))


def distribute(tmp_path, tasks, workers=2, max_attempts=3, on_ready=None, on_progress=lambda p: None):
    from jobs.distributor import RayDistributor

    lines = []
    distributor = RayDistributor("cpu", workers, max_attempts, log=lines.append)
    ready = []
    try:
        distributor.start(WorkerConfig(weights="builtin:tiny", output=str(tmp_path)), StandIn)
        outcome = distributor.run(tasks, on_ready or ready.append, on_progress=on_progress, progress_every=0.5)
    finally:
        distributor.shutdown()
    return outcome, lines, ready


def test_shards_go_to_whichever_worker_is_free(tmp_path):
    (tmp_path / "one-slow").touch()
    tasks = tasks_for(tmp_path, 8)
    outcome, _, ready = distribute(tmp_path, tasks)
    assert sorted(outcome.results) == [t.shard_id for t in tasks] and not outcome.failed
    by_worker = {}
    for result in outcome.results.values():
        by_worker.setdefault(result.worker.split("-")[0], []).append(result.shard_id)
    # The slow worker takes 2 s a shard: it gets one (maybe two), the fast one does the rest.
    assert len(by_worker.get("slow", [])) <= 2 and len(by_worker["fast"]) >= 6
    assert len(ready) == 1  # on_ready: once, for the first worker


def test_rows_of_a_shard_in_flight_count_as_its_worker_streams_them(tmp_path):
    (tmp_path / "halfway").touch()
    tasks = tasks_for(tmp_path, 2)  # two shards of 2 rows, one worker: each pauses at 1 row done
    states = []
    outcome, _, _ = distribute(tmp_path, tasks, workers=1, on_progress=states.append)
    assert sorted(outcome.results) == [t.shard_id for t in tasks]
    seen = {(s.rows_done, s.shards_done) for s in states}
    assert (1, 0) in seen and (3, 1) in seen  # mid-shard, before its result came back
    assert states[-1].rows_done == 4


def test_a_dead_worker_restarts_and_its_shard_is_retried(tmp_path):
    (tmp_path / "crash-shard-00001").touch()
    tasks = tasks_for(tmp_path, 3)
    outcome, lines, _ = distribute(tmp_path, tasks, workers=1)
    assert sorted(outcome.results) == ["shard-00000", "shard-00001", "shard-00002"] and not outcome.failed
    assert outcome.results["shard-00001"].attempt == 2
    assert any("shard-00001 attempt 1 failed (worker died" in line for line in lines)
    # The retry after the death is told so (the worker then narrows down a crashing row).
    assert (tmp_path / "after-death-shard-00001-2").read_text() == "True"
    assert (tmp_path / "after-death-shard-00000-1").read_text() == "False"


def test_a_shard_that_keeps_failing_is_reported_not_committed(tmp_path):
    (tmp_path / "raise-shard-00001").touch()
    outcome, lines, _ = distribute(tmp_path, tasks_for(tmp_path, 3), max_attempts=2)
    assert sorted(outcome.results) == ["shard-00000", "shard-00002"]
    assert list(outcome.failed) == ["shard-00001"]
    assert "RuntimeError: cannot write shard-00001" in outcome.failed["shard-00001"]
    assert any("failed after 2 attempt(s)" in line for line in lines)
    # An attempt after one that raised is not "after a death": no row is blamed for an exception.
    assert (tmp_path / "after-death-shard-00001-2").read_text() == "False"


def test_workers_that_cannot_start_give_one_clear_error(tmp_path):
    (tmp_path / "fail-start").touch()
    with pytest.raises(WorkerStartError, match="weights not found: /nowhere/model.safetensors"):
        distribute(tmp_path, tasks_for(tmp_path, 2))


def test_workers_lost_after_work_was_committed_fail_the_rest_not_the_job(tmp_path):
    """The only worker commits a shard, dies, and cannot start again: the shards left are
    failed (exit 1, a summary written, a rerun resumes), not a refusal "before any work" (2)."""
    (tmp_path / "die-for-good-shard-00001").touch()
    outcome, lines, _ = distribute(tmp_path, tasks_for(tmp_path, 3), workers=1)
    assert sorted(outcome.results) == ["shard-00000"]
    assert sorted(outcome.failed) == ["shard-00001", "shard-00002"]
    assert "no live workers left (ValueError: weights not found" in outcome.failed["shard-00002"]


def test_on_ready_can_stop_the_job_before_any_shard(tmp_path):
    def refuse(info):
        raise RuntimeError(f"output holds a different job (model {info.model_fingerprint[:4]})")

    with pytest.raises(RuntimeError, match="different job"):
        distribute(tmp_path, tasks_for(tmp_path, 2), on_ready=refuse)


def test_no_more_workers_start_than_there_are_shards(tmp_path):
    """`workers: 100000` for 2 shards created 100,000 actors and hung at shutdown."""
    from jobs.distributor import RayDistributor

    lines = []
    distributor = RayDistributor("cpu", 50, 3, log=lines.append)
    tasks = tasks_for(tmp_path, 2)
    try:
        distributor.start(WorkerConfig(weights="builtin:tiny", output=str(tmp_path)), StandIn, shards=len(tasks))
        assert len(distributor.actors) == 2
        outcome = distributor.run(tasks, lambda info: None, progress_every=0.5)
    finally:
        distributor.shutdown()
    assert sorted(outcome.results) == ["shard-00000", "shard-00001"]
    assert "[sdgen] note: 50 workers asked for, 2 shard(s) to run: starting 2" in lines


def test_plan_divides_the_cpus(ray_local):
    from jobs.distributor import RayDistributor

    assert RayDistributor("auto", "auto").plan()[:2] == ("cpu", 1)
    device, workers, options, threads = RayDistributor("auto", 2).plan()
    assert (device, workers, options, threads) == ("cpu", 2, {"num_cpus": 1}, 2)  # threads: not cores / workers
    assert RayDistributor("cpu", 2, cpu_threads=3).plan()[3] == 3
    device, workers, options, threads = RayDistributor("cuda", "auto").plan()
    assert (device, options) == ("cuda", {"num_gpus": 1, "num_cpus": 1})
