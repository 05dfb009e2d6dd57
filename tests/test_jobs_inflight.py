"""jobs/inflight.py: the in-flight note, written a chunk ahead, names every row in the pipeline
at every moment (what the next attempt narrows a crashing row down from), with the real tiny
model and the note on local disk."""

from __future__ import annotations

import threading
import time

import pytest
from test_jobs_worker import one_shard

from jobs.inflight import InflightNotes
from jobs.output import Output
from jobs.spec import SamplerSpec
from jobs.storage import LocalStorage
from jobs.worker import ShardWorker, WorkerConfig

from conftest import init_image, small_rows

SHARD = "shard-00000"


class SlowNotes:
    """Local storage whose note writes take `delay` seconds (a slow disk or an S3 round trip),
    and whose `fail_at`-th note write fails."""

    def __init__(self, inner: LocalStorage, delay: float, fail_at: int | None = None):
        self.inner, self.delay, self.fail_at = inner, delay, fail_at
        self.notes = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write_note(self, key, data):
        self.notes += 1
        if self.notes == self.fail_at:
            raise OSError("connection reset while writing the in-flight note")
        time.sleep(self.delay)
        self.inner.write_note(key, data)


class Watched:
    """The tiny pipeline; each time its stream takes a row or gives one out, the rows in the
    pipeline are checked against the in-flight note on disk."""

    def __init__(self, pipe, output: Output, row_of_seed: dict[int, int]):
        self.pipe, self.output, self.row_of_seed = pipe, output, row_of_seed
        self.taken: list[int] = []  # rows in the order the stream took them
        self.in_pipeline: set[int] = set()
        self.checks = 0
        self.largest_note = 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def check(self) -> None:
        note = self.output.read_inflight(SHARD)
        named = set(note["rows"]) if note else set()
        missing = self.in_pipeline - named
        assert not missing, f"rows {sorted(missing)} in the pipeline, not in the note {sorted(named)}"
        self.checks += 1
        self.largest_note = max(self.largest_note, len(named))

    def generate_stream(self, requests, **settings):
        def taking(requests):
            for request in requests:
                row = self.row_of_seed[request.seed]
                self.taken.append(row)
                self.in_pipeline.add(row)
                self.check()
                yield request

        for index, image, placement in self.pipe.generate_stream(taking(requests), **settings):
            self.check()
            self.in_pipeline.discard(self.taken[index])
            yield index, image, placement


def mixed_rows(tmp_path, count: int) -> list[dict]:
    """txt2img rows and img2img rows at strengths that finish in 1 to 6 steps, so rows of an
    earlier chunk are still in the pipeline when later chunks are taken."""
    init_image(tmp_path / "m" / "init" / "a.png")
    rows = small_rows(count)
    for k, row in enumerate(rows):
        if k % 3:
            row.update(strength=(0.2, 0.95)[k % 2], init_image="init/a.png")
    return rows


def watched_worker(tmp_path, tiny_pipe, rows, storage_delay=0.0, fail_at=None, batch_size=2):
    out = tmp_path / "out"
    output = Output(str(out), storage=SlowNotes(LocalStorage(str(out)), storage_delay, fail_at))
    config = WorkerConfig(
        weights="builtin:tiny",
        output=str(out),
        sampler=SamplerSpec(name="ddim", steps=6, guidance_scale=5.0, width=32, height=32),
        dtype="float32",
        batch_size=batch_size,
        name="test-worker",
    )
    watched = Watched(tiny_pipe, Output(str(out)), {row["seed"]: k for k, row in enumerate(rows)})
    worker = ShardWorker(config, pipeline=watched)
    worker._output = output
    return worker, watched


@pytest.fixture(params=[False, True], ids=["started-in-slot", "started-ahead"])
def ahead_pipe(request, tiny_pipe):
    """The tiny pipeline starting rows as their slots take them (as on a CPU) or reading a batch
    ahead and starting it while forwards run (as on CUDA: `Pipeline.prepare_ahead`)."""
    tiny_pipe.prepare_ahead = request.param
    yield tiny_pipe
    tiny_pipe.prepare_ahead = None


@pytest.mark.parametrize("delay", [0.0, 0.05])
def test_every_row_in_the_pipeline_is_named_by_a_written_note(tmp_path, ahead_pipe, delay):
    """With instant note writes and with slow ones (a write still under way when the next chunk
    is due: the worker must wait for it), the note on disk names every row in the pipeline, at
    every take and every finish; it names at most three chunks' rows (four when the pipeline
    reads a batch ahead)."""
    rows = mixed_rows(tmp_path, 9)
    worker, watched = watched_worker(tmp_path, ahead_pipe, rows, storage_delay=delay)
    result = worker.run(one_shard(tmp_path, rows))
    assert (result.ok, result.committed) == (9, True)
    assert sorted(watched.taken) == list(range(9)) and watched.checks == 18
    assert watched.largest_note <= (4 if ahead_pipe.prepare_ahead else 3) * 2
    assert Output(str(tmp_path / "out")).partial_files() == []  # no note lands after the commit


def test_rows_of_earlier_chunks_are_in_flight_when_later_chunks_are_taken(tmp_path, ahead_pipe):
    """The case the note ahead must cover (else the test above proves little): when a chunk is
    taken, rows of an earlier chunk are still in the pipeline."""
    rows = mixed_rows(tmp_path, 9)
    worker, watched = watched_worker(tmp_path, ahead_pipe, rows)
    overlaps = []
    original = watched.check

    def check():
        original()
        chunk = len(watched.taken) and (watched.taken[-1] // 2)
        overlaps.append(any(row // 2 < chunk for row in watched.in_pipeline))

    watched.check = check
    worker.run(one_shard(tmp_path, rows))
    assert any(overlaps)


@pytest.mark.parametrize("fail_at", [2, 3, 4])
def test_a_note_that_cannot_be_written_fails_the_shard(tmp_path, ahead_pipe, fail_at):
    """Whichever note fails (written ahead, on its thread), the shard fails and nothing is
    committed, also when rows are in flight as the failure is found (with rows started ahead,
    always): the rows in flight are not retried as if one of them had failed."""
    rows = mixed_rows(tmp_path, 9)
    worker, _ = watched_worker(tmp_path, ahead_pipe, rows, fail_at=fail_at)
    with pytest.raises(OSError, match="in-flight note"):
        worker.run(one_shard(tmp_path, rows))
    assert Output(str(tmp_path / "out")).committed_shards() == set()


def test_notes_name_the_next_chunk_only_when_written_ahead(tmp_path):
    output = Output(str(tmp_path))
    notes = InflightNotes(output, SHARD, alone=False, attempt=3)
    notes.before_taking([0, 1], set(), [2, 3])  # the first note: written before returning
    assert output.read_inflight(SHARD) == {"rows": [0, 1, 2, 3], "alone": False, "attempt": 3}
    notes.before_taking([2, 3], {1}, [4])
    notes.wait()
    assert output.read_inflight(SHARD)["rows"] == [1, 2, 3, 4]
    notes.close()

    plain = InflightNotes(output, SHARD, alone=True, attempt=4, ahead=False)
    plain.before_taking([7], {5}, [8])
    assert output.read_inflight(SHARD) == {"rows": [5, 7], "alone": True, "attempt": 4}
    plain.close()


def test_a_note_is_written_whole_without_an_fsync(tmp_path, monkeypatch):
    """The note guards against the worker process dying (the page cache outlives it), so it
    skips the fsync that every other write makes, and which on a busy disk waits for the
    images written beside it."""
    import jobs.storage

    storage = LocalStorage(str(tmp_path))
    synced = []
    real_fsync = jobs.storage.os.fsync
    monkeypatch.setattr(jobs.storage.os, "fsync", lambda fd: synced.append(threading.get_ident()) or real_fsync(fd))
    storage.write_note("partial/s/note.json", b'{"rows": [1]}')
    storage.write_note("partial/s/note.json", b'{"rows": [2, 3]}')  # replaced whole
    assert synced == [] and storage.read("partial/s/note.json") == b'{"rows": [2, 3]}'
    storage.write("partial/s/image.png", b"png")
    assert len(synced) == 1
    assert [k for k in storage.list("partial/")] == ["partial/s/image.png", "partial/s/note.json"]


def test_a_committed_shard_leaves_no_note_a_dead_worker_was_writing(tmp_path):
    """A worker that dies while its note is being written leaves the temp file of that write
    (never listed as a key); clearing the shard's partial files removes it with the rest."""
    output = Output(str(tmp_path))
    output.write_inflight(SHARD, [1, 2], False, 1)
    folder = tmp_path / "partial" / SHARD
    (folder / ".inflight.json.tmp-999999-deadbeef").write_bytes(b'{"rows": [')
    assert output.partial_files(SHARD) == [f"partial/{SHARD}/inflight.json"]
    output.clear_partials(SHARD)
    assert not folder.exists()
