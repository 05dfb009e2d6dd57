"""jobs/worker.py with the real tiny model (no Ray): one shard -> images + one record per row."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from jobs.manifest import load_manifest
from jobs.output import Output
from jobs.reader import read_shards
from jobs.spec import SamplerSpec
from jobs.worker import ShardWorker, WorkerConfig
from jobs.writer import read_parameters

from conftest import init_image, manifest_schema, small_rows, write_manifest

SAMPLER = SamplerSpec(name="ddim", steps=2, guidance_scale=7.5, width=32, height=32)


def make_worker(tiny_pipe, output, batch_size=2, pipeline=None, batch_invariant=True):
    config = WorkerConfig(
        weights="builtin:tiny",
        output=str(output),
        sampler=SAMPLER,
        dtype="float32",
        batch_size=batch_size,
        batch_invariant=batch_invariant,
        name="test-worker",
    )
    return ShardWorker(config, pipeline=pipeline or tiny_pipe)


def one_shard(tmp_path, rows, name="m"):
    manifest = load_manifest([str(write_manifest(tmp_path / name / "m.parquet", rows, manifest_schema()))])
    (task,) = list(read_shards(manifest, len(rows)))
    return task


def img2img_row(row_id, strength, init):
    return {"id": row_id, "prompt": "x", "negative": "", "seed": 1, "strength": strength, "init_image": init}


@pytest.fixture
def mixed_task(tmp_path):
    init_image(tmp_path / "m" / "init" / "a.png")
    (tmp_path / "m" / "init" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    rows = small_rows(4, img2img_every=2)  # rows 1 and 3 are img2img from init/a.png
    rows += [
        {"id": "no-prompt", "prompt": None, "negative": "", "seed": 1, "strength": None, "init_image": None},
        img2img_row("zero-strength", 0.0, "init/a.png"),
        img2img_row("big-strength", 1.5, "init/a.png"),
        img2img_row("missing-init", 0.5, "init/none.png"),
        img2img_row("corrupt-init", 0.5, "init/corrupt.png"),
        {"id": "r000", "prompt": "dup", "negative": "", "seed": 9, "strength": None, "init_image": None},
    ]
    return one_shard(tmp_path, rows)


def test_a_shard_with_good_and_bad_rows(tmp_path, tiny_pipe, mixed_task):
    worker = make_worker(tiny_pipe, tmp_path / "out")
    progress = []
    result = worker.run(mixed_task, progress=progress.append)
    assert (result.rows, result.ok, result.error, result.committed) == (10, 4, 6, True)
    assert progress[-1] == 10 and progress == sorted(progress)

    output = Output(str(tmp_path / "out"))
    records = {r["id"] if r["row"] != 9 else "dup": r for r in output.read_records("shard-00000").to_pylist()}
    assert len(records) == 10
    errors = {k: r["error"] for k, r in records.items() if r["status"] == "error"}
    assert "prompt is missing" in errors["no-prompt"]
    assert "strength: 0 outside (0, 1]" in errors["zero-strength"]
    assert "strength: 1.5 outside (0, 1]" in errors["big-strength"]
    assert "init_image not found" in errors["missing-init"] and "init/none.png" in errors["missing-init"]
    assert "not a readable image" in errors["corrupt-init"]
    assert "duplicate id 'r000' (first used by manifest row 0)" in errors["dup"]

    init_sha = hashlib.sha256((tmp_path / "m" / "init" / "a.png").read_bytes()).hexdigest()
    for rid in ("r000", "r001", "r002", "r003"):
        r = records[rid]
        assert r["status"] == "ok" and r["error"] is None
        data = (tmp_path / "out" / r["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["image_sha256"]
        assert Image.open(io.BytesIO(data)).size == (32, 32)
        params = read_parameters(data)
        assert params.startswith(r["prompt"]) and f"Seed: {r['seed']}" in params and "Size: 32x32" in params
        assert f"Model hash: {tiny_pipe.fingerprint[:10]}" in params
        for key in (
            "model_fingerprint",
            "dtype",
            "device",
            "torch_version",
            "sdcore_version",
            "worker",
            "started_at",
            "time_generate_s",
            "time_write_s",
            "sampler",
            "steps",
            "guidance_scale",
        ):
            assert r[key] is not None, key
        assert r["model_fingerprint"] == tiny_pipe.fingerprint and r["worker"] == "test-worker"
        assert r["attempt"] == 1 and r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["batch_invariant"] is True
    assert records["r001"]["mode"] == "img2img" and records["r001"]["init_image_sha256"] == init_sha
    img2img_image = (tmp_path / "out" / records["r001"]["image_path"]).read_bytes()
    assert "Denoising strength: 0.75" in read_parameters(img2img_image)
    assert records["r000"]["mode"] == "txt2img" and records["r000"]["init_image_sha256"] is None


def test_images_do_not_depend_on_batch_size(tmp_path, tiny_pipe):
    init_image(tmp_path / "m" / "init" / "a.png")
    task = one_shard(tmp_path, small_rows(5, img2img_every=3))
    shas = []
    for batch_size in (1, 3):
        out = tmp_path / f"out-{batch_size}"
        make_worker(tiny_pipe, out, batch_size=batch_size).run(task)
        shas.append({r["id"]: r["image_sha256"] for r in Output(str(out)).read_records("shard-00000").to_pylist()})
    assert shas[0] == shas[1] and None not in shas[0].values()


def test_batched_forward_mode_is_recorded_and_close(tmp_path, tiny_pipe):
    """batch_invariant=False runs fixed-shape forwards of batch_size rows (recorded per row); the
    images equal the one-row-per-forward ones up to float noise."""
    task = one_shard(tmp_path, small_rows(4))
    pixels = {}
    for invariant in (True, False):
        out = tmp_path / f"out-{invariant}"
        make_worker(tiny_pipe, out, batch_size=4, batch_invariant=invariant).run(task)
        records = Output(str(out)).read_records("shard-00000").to_pylist()
        assert {r["batch_invariant"] for r in records} == {invariant}
        assert [(r["batch_rows"], r["batch_slot"]) for r in records] == (
            [(1, 0)] * 4 if invariant else [(4, 0), (4, 1), (4, 2), (4, 3)]
        )
        pixels[invariant] = [np.asarray(Image.open(out / r["image_path"]), dtype=np.int16) for r in records]
    for exact, batched in zip(pixels[True], pixels[False]):
        assert np.abs(exact - batched).max() <= 2


class Failing:
    """The tiny pipeline, failing in chosen ways: `crash_after` rows finished, a row with
    `bad_seed` (when it is taken into a forward), or `always`."""

    def __init__(self, pipe, *, crash_after=None, bad_seed=None, always=None):
        self.pipe, self.crash_after, self.bad_seed, self.always = pipe, crash_after, bad_seed, always
        self.finished = 0  # rows whose images were made

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate_stream(self, rows, **kwargs):  # what the worker calls
        if self.always is not None:
            raise self.always

        def checked(rows):
            for row in rows:
                if row.seed == self.bad_seed:
                    raise ValueError(f"seed {self.bad_seed} is cursed")
                yield row

        for result in self.pipe.generate_stream(checked(rows), **kwargs):
            if self.crash_after is not None and self.finished >= self.crash_after:
                raise KeyboardInterrupt("simulated crash")  # not an Exception: nothing catches it
            self.finished += 1
            yield result


def test_a_crash_loses_at_most_the_batch_in_flight(tmp_path, tiny_pipe):
    task = one_shard(tmp_path, small_rows(6))
    out = tmp_path / "out"
    crashing = make_worker(tiny_pipe, out, batch_size=2, pipeline=Failing(tiny_pipe, crash_after=4))
    with pytest.raises(KeyboardInterrupt):
        crashing.run(task)
    output = Output(str(out))
    assert output.committed_shards() == set()
    saved = output.read_partials("shard-00000")
    assert sorted(saved) == [0, 1, 2, 3]  # saved every 2 finished rows; the rows in flight were lost
    mtimes = {r: (out / saved[r]["image_path"]).stat().st_mtime_ns for r in saved}

    counting = Failing(tiny_pipe)
    result = make_worker(tiny_pipe, out, batch_size=2, pipeline=counting).run(task)
    assert (result.reused, result.generated, result.ok, result.attempt) == (4, 2, 6, 2)
    assert counting.finished == 2  # only the lost rows were generated again
    records = output.read_records("shard-00000").to_pylist()
    assert [r["row"] for r in records] == list(range(6))
    assert [r["attempt"] for r in records] == [1, 1, 1, 1, 2, 2]
    assert {r: (out / saved[r]["image_path"]).stat().st_mtime_ns for r in saved} == mtimes
    assert output.partial_keys() == []


def test_a_saved_row_whose_image_is_gone_or_changed_is_made_again(tmp_path, tiny_pipe):
    """After a crash, a saved batch's record is kept only with its image: one image deleted and
    one overwritten since are made again (the same bytes), never committed as ok without them.
    A damaged saved batch (an empty file, as a full disk leaves) is passed over likewise."""
    task = one_shard(tmp_path, small_rows(6))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        make_worker(tiny_pipe, out, batch_size=2, pipeline=Failing(tiny_pipe, crash_after=4)).run(task)
    output = Output(str(out))
    saved = output.read_partials("shard-00000")
    assert sorted(saved) == [0, 1, 2, 3]
    before = {r: (out / saved[r]["image_path"]).read_bytes() for r in saved}
    (out / saved[0]["image_path"]).unlink()
    (out / saved[1]["image_path"]).write_bytes(b"not the image")
    later_batch = sorted(output.partial_keys("shard-00000"))[-1]  # rows 2 and 3 (named by first row)
    (out / later_batch).write_bytes(b"")
    assert sorted(output.read_partials("shard-00000")) == [0, 1]

    counting = Failing(tiny_pipe)
    result = make_worker(tiny_pipe, out, batch_size=2, pipeline=counting).run(task)
    assert (result.reused, result.generated, result.ok) == (0, 6, 6)
    records = {r["row"]: r for r in output.read_records("shard-00000").to_pylist()}
    for row in range(6):
        data = (out / records[row]["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == records[row]["image_sha256"]
        if row in before:
            assert data == before[row]  # made again bit for bit


def test_a_shard_streams_its_rows_done_and_a_stream_closed_early_commits_nothing(tmp_path, tiny_pipe):
    # What the Ray actor streams to the driver: rows done at the start and after each saved batch.
    task = one_shard(tmp_path, small_rows(6))
    out = tmp_path / "out"
    steps = make_worker(tiny_pipe, out, batch_size=2).shard_steps(task)
    assert [next(steps) for _ in range(3)] == [0, 0, 2]
    steps.close()  # the stream dropped mid-shard (the driver stopped): nothing is committed
    output = Output(str(out))
    assert output.committed_shards() == set() and sorted(output.read_partials("shard-00000")) == [0, 1]

    steps = make_worker(tiny_pipe, out, batch_size=2).shard_steps(task)
    counts = []
    while True:
        try:
            counts.append(next(steps))
        except StopIteration as end:
            result = end.value
            break
    assert counts == [2, 2, 4, 6, 6]  # the saved batch is kept: a rerun starts at 2 rows done
    assert (result.reused, result.generated, result.ok, result.committed) == (2, 4, 6, True)
    assert output.committed_shards() == {"shard-00000"}


def test_a_failing_row_does_not_take_its_batch_with_it(tmp_path, tiny_pipe):
    task = one_shard(tmp_path, small_rows(3))
    bad_seed = 1001
    failing = Failing(tiny_pipe, bad_seed=bad_seed)
    result = make_worker(tiny_pipe, tmp_path / "out", batch_size=3, pipeline=failing).run(task)
    assert (result.ok, result.error) == (2, 1)
    records = Output(str(tmp_path / "out")).read_records("shard-00000").to_pylist()
    bad = [r for r in records if r["status"] == "error"]
    assert bad[0]["seed"] == bad_seed and "generation failed: ValueError: seed 1001 is cursed" in bad[0]["error"]


def test_a_failure_on_every_row_fails_the_shard_instead_of_committing_errors(tmp_path, tiny_pipe):
    task = one_shard(tmp_path, small_rows(3))
    failing = Failing(tiny_pipe, always=RuntimeError("CUDA error: device lost"))
    worker = make_worker(tiny_pipe, tmp_path / "out", pipeline=failing)
    with pytest.raises(RuntimeError, match="device lost"):
        worker.run(task)
    assert Output(str(tmp_path / "out")).committed_shards() == set()


def test_worker_info(tiny_pipe, tmp_path):
    info = make_worker(tiny_pipe, tmp_path).info()
    assert info.model_fingerprint == tiny_pipe.fingerprint and info.device == "cpu" and info.dtype == "float32"
    assert info.versions["sdcore"] and info.worker == "test-worker"


def test_only_a_worker_death_can_blame_a_row(tmp_path, tiny_pipe):
    """The in-flight note names row 1, run alone when its worker died: after a worker death
    (the distributor says so) that row is its own error record and the others are generated;
    after a failure that raised (a transient storage fault, say) the note blames nobody."""
    task = one_shard(tmp_path, small_rows(3))
    for after_death, errors in ((False, []), (True, [1])):
        out = tmp_path / f"out-{after_death}"
        Output(str(out)).write_inflight("shard-00000", [1], True, 2)
        result = make_worker(tiny_pipe, out, batch_size=2).run(task, 3, after_death=after_death)
        records = Output(str(out)).read_records("shard-00000").to_pylist()
        assert [r["row"] for r in records if r["status"] == "error"] == errors
        assert (result.ok, result.error) == (3 - len(errors), len(errors))
        if errors:
            assert "died while generating this row, in its batch and then alone (attempt 2)" in records[1]["error"]
        assert Output(str(out)).partial_files() == []  # the note goes with the commit


class Watching:
    """The tiny pipeline; before its first stream hands back its first image it waits (up to a
    guard timeout) for `event`, and notes whether it came: set by a read of the next batch's init
    image, it can only come while the first rows generate if that image is read ahead (the stream
    takes no new row before a slot is free)."""

    def __init__(self, pipe, event):
        self.pipe, self.event, self.calls, self.saw_next_read = pipe, event, 0, None

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate_stream(self, rows, **kwargs):
        self.calls += 1
        for finished, result in enumerate(self.pipe.generate_stream(rows, **kwargs)):
            if self.calls == 1 and finished == 0:  # the first rows are done, none taken since
                self.saw_next_read = self.event.wait(timeout=60)  # a guard against hanging, not a speed check
            yield result


def test_init_images_are_read_a_batch_ahead_each_once_for_its_own_rows(tmp_path, tiny_pipe, monkeypatch):
    import threading

    import jobs.init_images

    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for k, color in enumerate(colors):
        init_image(tmp_path / "m" / "init" / f"{k}.png", color=color)
    # Six img2img rows in batches of 2: init images 0, 1 | 2, 3 | 0, 1 (the last two from the cache).
    task = one_shard(tmp_path, [img2img_row(f"r{i}", 0.75, f"init/{i % 4}.png") for i in range(6)])
    reads = []
    next_batch_read = threading.Event()
    read = jobs.init_images.read_init_image

    def counting_read(uri, *args, **kwargs):
        reads.append(uri.rsplit("/", 1)[-1])
        if uri.endswith("/2.png"):
            next_batch_read.set()
        return read(uri, *args, **kwargs)

    monkeypatch.setattr(jobs.init_images, "read_init_image", counting_read)
    watching = Watching(tiny_pipe, next_batch_read)
    result = make_worker(tiny_pipe, tmp_path / "out", batch_size=2, pipeline=watching).run(task)

    assert (result.ok, result.error) == (6, 0)
    assert watching.saw_next_read is True  # batch 2's image was read while batch 1 generated
    assert sorted(reads) == ["0.png", "1.png", "2.png", "3.png"]  # each image read once
    records = Output(str(tmp_path / "out")).read_records("shard-00000").to_pylist()
    assert [r["row"] for r in records] == list(range(6))  # one record per row
    for r in records:  # each row got its own init image
        expected = hashlib.sha256((tmp_path / "m" / "init" / f"{r['row'] % 4}.png").read_bytes()).hexdigest()
        assert r["init_image_sha256"] == expected and r["init_image"] == f"init/{r['row'] % 4}.png"


def test_a_failed_background_image_write_fails_the_shard_and_commits_nothing(tmp_path, tiny_pipe):
    from jobs.storage import LocalStorage

    class Broken:
        """Local storage whose write of one image of the second batch fails."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def write(self, key, data, *, exclusive=False):
            if key.endswith("/r002.png"):
                raise OSError("connection reset while uploading")
            return self.inner.write(key, data, exclusive=exclusive)

    task = one_shard(tmp_path, small_rows(6))
    out = tmp_path / "out"
    worker = make_worker(tiny_pipe, out, batch_size=2)
    worker._output = Output(str(out), storage=Broken(LocalStorage(str(out))))
    with pytest.raises(OSError, match="connection reset while uploading"):
        worker.run(task)
    output = Output(str(out))
    assert output.committed_shards() == set()
    saved = output.read_partials("shard-00000")
    # The failed batch (rows 2, 3) was not saved; the saved batches' images are all there.
    assert {0, 1} <= set(saved) and not {2, 3} & set(saved)
    for r in saved.values():
        assert hashlib.sha256((out / r["image_path"]).read_bytes()).hexdigest() == r["image_sha256"]
    retried = make_worker(tiny_pipe, out, batch_size=2).run(task)  # storage works again
    assert (retried.ok, retried.reused, retried.generated) == (6, len(saved), 6 - len(saved))
    assert [r["row"] for r in output.read_records("shard-00000").to_pylist()] == list(range(6))


def test_decode_batch_from_the_spec_reaches_the_worker(tmp_path):
    """execution.decode_batch -> WorkerConfig; auto resolves per device when the worker starts:
    the batch size on CUDA, one image per decode on CPU and in the batch-invariant mode."""
    import dataclasses

    from jobs.runner import worker_config
    from jobs.spec import parse_spec
    from jobs.worker import _decode_rows

    data = {"manifest": "m.parquet", "output": "out", "model": {"weights": "w"}, "execution": {"batch_size": 6}}
    config = worker_config(parse_spec(data, base_dir=tmp_path))
    assert config.decode_batch == "auto"
    assert (_decode_rows(config, "cuda"), _decode_rows(config, "cpu")) == (6, 1)
    assert _decode_rows(dataclasses.replace(config, batch_invariant=True), "cuda") == 1
    data["execution"]["decode_batch"] = 3
    assert _decode_rows(worker_config(parse_spec(data, base_dir=tmp_path)), "cpu") == 3


def test_a_shard_with_a_row_left_without_a_record_is_not_committed(tmp_path, tiny_pipe):
    """Whatever went wrong upstream (here the generation loses the shard's last row), a shard
    whose rows do not all have a record fails instead of committing without them."""
    rows = small_rows(4)
    worker = make_worker(tiny_pipe, tmp_path / "out")
    generate = worker._generate

    def losing_the_last_row(requests, *args, **kwargs):
        return generate(requests[:-1], *args, **kwargs)

    worker._generate = losing_the_last_row
    with pytest.raises(RuntimeError, match="1 row\\(s\\) got no record; not committed"):
        worker.run(one_shard(tmp_path, rows))
    assert Output(str(tmp_path / "out")).committed_shards() == set()


def test_a_storage_fault_reading_later_rows_fails_the_shard_with_rows_in_flight(tmp_path, tiny_pipe, monkeypatch):
    """A transient storage fault on a later batch's init image (after the retries) fails the
    shard, to be retried, even when it is found with two rows in flight. It used to be taken
    for a failure of those rows: they were remade one by one, no further row could be read, and
    the shard was committed with 3 of its 9 rows."""
    import jobs.init_images
    from jobs.storage import TransientStorageError

    init_image(tmp_path / "m" / "init" / "a.png")
    init_image(tmp_path / "m" / "init" / "unreachable.png")
    rows = small_rows(9)
    rows[0].update(strength=0.2, init_image="init/a.png")  # 1 step: its slot frees first
    rows[3].update(strength=0.5, init_image="init/unreachable.png")  # the second batch's
    read = jobs.init_images.read_init_image

    def faulty_read(uri, *args, **kwargs):
        if uri.endswith("unreachable.png"):
            raise TransientStorageError(f"{uri}: 503 SlowDown (after the retries)")
        return read(uri, *args, **kwargs)

    monkeypatch.setattr(jobs.init_images, "read_init_image", faulty_read)
    config = WorkerConfig(
        weights="builtin:tiny",
        output=str(tmp_path / "out"),
        sampler=SamplerSpec(name="ddim", steps=6, guidance_scale=5.0, width=32, height=32),
        dtype="float32",
        batch_size=3,
        name="test-worker",
    )
    with pytest.raises(TransientStorageError, match="SlowDown"):
        ShardWorker(config, pipeline=tiny_pipe).run(one_shard(tmp_path, rows))
    assert Output(str(tmp_path / "out")).committed_shards() == set()


def test_a_csv_cell_that_cannot_be_read_fails_its_row_in_the_worker(tmp_path, tiny_pipe):
    """The cell's problem reaches the worker's row check: the row is an error record naming
    the cell, not a row generated with the spec's steps in place of the unreadable ones."""
    (tmp_path / "m.csv").write_text("id,prompt,seed,steps\na,a circle,1,3\nb,a square,2,ten\nc,a line,3,\n")
    manifest = load_manifest([str(tmp_path / "m.csv")])
    (task,) = list(read_shards(manifest, 3))
    result = make_worker(tiny_pipe, tmp_path / "out").run(task)
    assert (result.ok, result.error) == (2, 1)
    records = Output(str(tmp_path / "out")).read_records(task.shard_id).to_pylist()
    # The error record's steps is null (the row's cell was unusable), not the spec's 2.
    expected = [("a", "ok", 3), ("b", "error", None), ("c", "ok", 2)]
    assert [(r["id"], r["status"], r["steps"]) for r in records] == expected
    assert records[1]["error"] == "steps: 'ten' is not an integer"
