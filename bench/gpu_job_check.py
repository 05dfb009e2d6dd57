"""GPU job check: the job runner's worker on one CUDA device, without Ray, then reproduce.

`bench/gpu_check.py` measures the pipeline; this runs what a job's CUDA worker runs
(`jobs.worker.ShardWorker`: the weights loaded from a file, shards of a Parquet manifest with
txt2img and img2img rows at four strengths, images and records committed to a local output),
for each compile mode asked for, and reports: the worker's rows/s at steady state (the first
shard, which compiles, left out) against the bare pipeline on the same rows, what its records
say (decode batch, kernels), and `jobs.reproduce` verdicts for rows in the first, last and a
padded slot, remade from their records alone as `sdgen reproduce` would: once in this process
and once in a new one (`python -m jobs.reproduce OUT ID... --exact`, the user's case: a remake
days later, on a fresh CUDA context with its own kernel choices). Ray is not needed (the GPU
machine has none): the worker knows nothing of it.

Where a job falls behind the bare pipeline: every run first reports how the host's PNG encoding
(the writer's) scales on threads, how much it slows a Python-bound thread beside it (a Pillow
that held the GIL while compressing would serialise the writer with the thread that launches the
GPU work), and how long an fsync'd small write takes where the jobs write. `--profile` reports
the busiest functions of the launching thread in the worker's steady shards and in the bare run,
`--output-root /dev/shm` takes the disk out, and `--blocking-copies` puts back the
copies between host and GPU that wait for the GPU (`sdcore/devices.py`), for an A/B.

Run through `GPU_CHECK=bench/gpu_job_check.py bash bench/gpu_check.sh .whl` (same wheels as
gpu_check.py). CPU smoke run: `python bench/gpu_job_check.py --device cpu --weights builtin:tiny
--size 32 --rows 12 --shard-size 6 --batch 4 --steps 4 --compile none`.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import io
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # not installed on the GPU machine

from gpu_check import Report, attempt, timed  # noqa: E402 - needs the paths above

import jobs.worker  # noqa: E402
import jobs.writer  # noqa: E402
import sdcore.devices  # noqa: E402
from jobs.init_images import InitImageCache  # noqa: E402
from jobs.manifest import load_manifest  # noqa: E402
from jobs.output import Output  # noqa: E402
from jobs.reader import read_shards  # noqa: E402
from jobs.reproduce import Reproducer, find_records  # noqa: E402
from jobs.spec import SamplerSpec  # noqa: E402
from jobs.storage import LocalStorage, Storage  # noqa: E402
from jobs.worker import ShardWorker, WorkerConfig  # noqa: E402
from jobs.writer import encode_image  # noqa: E402
from sdcore import GenerationRequest  # noqa: E402
from sdcore.config import ModelConfig  # noqa: E402
from sdcore.weights import assemble, export_single_file, random_parts  # noqa: E402

STRENGTHS = (0.3, 0.5, 0.7, 0.9)
PROFILING = False  # --profile
PROFILE_ROWS = 14


def random_sd15_file(folder: Path, dtype: torch.dtype) -> str:
    """Random SD 1.5 weights as a single-file checkpoint (what a user points a job at)."""
    config = ModelConfig.sd15()
    pipe = assemble(config, random_parts(config, seed=0), source="random sd15", dtype=dtype, owned=True)
    path = folder / "sd15-random.safetensors"
    export_single_file(pipe, path)
    return str(path)


def write_manifest(folder: Path, rows: int, size: int) -> tuple[str, list[dict]]:
    """Half txt2img, half img2img at four strengths from small random pictures."""
    rng = np.random.default_rng(0)
    entries = []
    for k in range(rows):
        entry = {"id": f"r{k:04d}", "prompt": f"a photo of thing number {k}", "negative": "", "seed": 1000 + k}
        entry.update(strength=None, init_image=None)
        if k % 2:
            init = folder / "init" / f"{k:04d}.png"
            init.parent.mkdir(parents=True, exist_ok=True)
            picture = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(picture).resize((size, size), Image.BILINEAR).save(init)
            entry.update(strength=STRENGTHS[(k // 2) % len(STRENGTHS)], init_image=f"init/{init.name}")
        entries.append(entry)
    path = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(entries), path)
    return str(path), entries


def bare_rows_per_s(pipe, entries: list[dict], folder: Path, settings: dict, batch: int, decode_rows: int) -> float:
    """The pipeline alone on the same rows, shaped as the worker shapes them (after a warm-up)."""
    requests = []
    for entry in entries:
        init = Image.open(folder / entry["init_image"]).convert("RGB") if entry["init_image"] else None
        requests.append(
            GenerationRequest(
                entry["prompt"],
                seed=entry["seed"],
                negative=entry["negative"],
                init_image=init,
                strength=entry["strength"],
            )
        )
    shaped = dict(settings, fixed_batch=batch, decode_batch=decode_rows)  # as the worker runs them
    pipe.generate(requests[:batch], **shaped)
    pipe.clear_embedding_cache()  # the worker encoded these prompts: the bare run must too
    return len(requests) / timed(pipe.device, lambda: profiled("bare pipeline", pipe.generate, requests, **shaped))


PROFILES: list[tuple[str, pstats.Stats]] = []  # filled with --profile


def profiled(what: str, call, *args, **kwargs):
    """`call(*args, **kwargs)`, under cProfile (this thread only: the one that launches the GPU
    work) when --profile asked for it; the busiest functions are reported at the end."""
    if not PROFILING:
        return call(*args, **kwargs)
    profiler = cProfile.Profile()
    try:
        return profiler.runcall(call, *args, **kwargs)
    finally:
        PROFILES.append((what, pstats.Stats(profiler)))


def profile_report(report: Report) -> None:
    """Per profile: the busiest functions by own time (where the thread's time goes: launches,
    waits), then the job's and the pipeline's own functions by cumulative time (which step of a
    row's handling it goes to)."""
    for what, stats in PROFILES:
        for order, restriction, rows, label in (
            ("tottime", (), PROFILE_ROWS, "by own time"),
            ("cumulative", (r"jobs/|sdcore/pipeline",), 2 * PROFILE_ROWS, "in jobs/, sdcore/pipeline.py, cumulative"),
        ):
            text = io.StringIO()
            stats.stream = text
            stats.sort_stats(order).print_stats(*restriction, rows)
            heading = f"\n#### main thread, {what}: top {rows} {label}\n"
            report.add(heading, "```", text.getvalue().strip(), "```")
    PROFILES.clear()


VARIANTS = {  # --variants: the worker changed one way each, to find where a job loses to the bare pipeline
    "job": "the worker as it ships (its caches warm: these rows' prompts and init images seen before)",
    "job-cold": "the worker as it ships, its prompt and init-image caches emptied first (every row new, as in a job)",
    "prompts-cold": "the worker as it ships, its prompt cache emptied first",
    "images-cold": "the worker as it ships, its init-image cache emptied first",
    "note-sync": "the in-flight note as before (fsync'd, written on the launching thread as its chunk is taken)",
    "no-encode": "the writer keeps a few bytes per image instead of encoding a PNG",
    "no-checks": "no non-finite checks (the pipeline's stream without jobs.numerics' hooks)",
    "encode-processes": "the writer's PNG encoding in 4 worker processes (its threads only wait for them)",
    "shm": "the job's output on /dev/shm instead of the disk",
    "blocking-copies": "copies between host and GPU that wait for the GPU (sdcore.devices.ASYNC_COPIES off)",
    "give-out-now": "each decode's images read and given out at once (Pipeline.give_out_lag 0), not 2 forwards later",
    "start-in-slot-cold": "as job-cold, with rows started (prompts encoded, latents made) as their slots free up "
    "(Pipeline.prepare_ahead off), not a batch ahead while forwards run",
}


def patched(undo: contextlib.ExitStack, owner, name: str, value) -> None:
    """Set `owner.name` to `value` until `undo` closes."""
    undo.callback(setattr, owner, name, getattr(owner, name))
    setattr(owner, name, value)


def encode_elsewhere(image, fmt, parameters, quality=95) -> bytes:
    """jobs.writer.encode_image, run in a worker process (unpatched there)."""
    return jobs.writer.encode_image(image, fmt, parameters, quality)


def encoding_processes(undo: contextlib.ExitStack) -> None:
    """The writer's encoding sent to 4 spawned processes (no CUDA state forked), started first."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = undo.enter_context(ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")))
    warm = Image.new("RGB", (8, 8))
    list(pool.map(encode_elsewhere, [warm] * 8, ["png"] * 8, [""] * 8))

    def encode(image, fmt, parameters, quality=95):
        return pool.submit(encode_elsewhere, image, fmt, parameters, quality).result()

    patched(undo, jobs.writer, "encode_image", encode)


@contextlib.contextmanager
def variant(worker: ShardWorker, name: str, root: Path):
    """The worker changed as VARIANTS[name] says, writing to a fresh output (removed after)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/dev/shm" if name == "shm" else root))
    with contextlib.ExitStack() as undo:
        patched(undo, worker, "_output", Output(str(folder)))
        undo.callback(shutil.rmtree, folder, True)
        if name in ("job-cold", "prompts-cold", "start-in-slot-cold"):
            worker.pipe.clear_embedding_cache()
        if name in ("job-cold", "images-cold", "start-in-slot-cold"):
            worker.init_images = InitImageCache()
        if name == "note-sync":
            patched(undo, worker, "note_ahead", False)
            patched(undo, LocalStorage, "write_note", Storage.write)  # with its fsync
        elif name == "no-encode":
            patched(undo, jobs.writer, "encode_image", lambda image, fmt, parameters, quality=95: parameters.encode())
        elif name == "encode-processes":
            encoding_processes(undo)
        elif name == "no-checks":
            unchecked = lambda pipe, requests, **settings: pipe.generate_stream(requests, **settings)  # noqa: E731
            patched(undo, jobs.worker, "generate_finite", unchecked)
        elif name == "blocking-copies":
            patched(undo, sdcore.devices, "ASYNC_COPIES", False)
        elif name == "give-out-now":
            patched(undo, worker.pipe, "give_out_lag", 0)
        elif name == "start-in-slot-cold":
            patched(undo, worker.pipe, "prepare_ahead", False)
        yield


def py_spy_binary() -> str | None:
    """py-spy, on PATH or installed from a carried wheel (gpu_check.sh's --target folder)."""
    found = shutil.which("py-spy")
    candidates = [Path(entry) / "bin" / "py-spy" for entry in sys.path if entry]
    return found or next((str(path) for path in candidates if path.is_file()), None)


@contextlib.contextmanager
def sampled(path: Path | None):
    """py-spy sampling this process while the block runs, into `path` (raw collapsed stacks):
    every thread's stack at each sample, waiting or not (`--idle`)."""
    binary = py_spy_binary()
    if path is None or binary is None:
        yield None
        return
    command = [binary, "record", "--pid", str(os.getpid()), "--threads", "--format", "raw", "--rate", "200"]
    command += ["--nonblocking", "--idle", "-o", str(path)]
    spy = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # attached
    try:
        yield spy
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.log = spy.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.log = "py-spy did not stop"


def thread_group(name: str) -> str:
    """write-shard-00001_3 -> write: py-spy names threads as Python does."""
    return name.split("-")[0].split("_")[0]


def spy_summary(path: Path, what: str, rows: int = 12) -> list[str]:
    """Where the samples went: per kind of thread, then the main thread's innermost frames and
    its innermost frames in jobs/ or sdcore/."""
    per_thread: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].startswith("sampled ("):
            continue  # waiting for py-spy to attach, before the measured pass
        thread = frames[0].split(": ", 1)[-1]
        per_thread[thread_group(thread)] += int(count)
        if thread != "MainThread":
            continue
        leaves[frames[-1]] += int(count)
        project = [f for f in frames if "jobs/" in f or "sdcore/" in f]
        ours[project[-1] if project else "(outside jobs/ and sdcore/)"] += int(count)
    samples, total_main = per_thread.total() or 1, leaves.total()
    lines = [
        f"  - py-spy ({what}): samples per thread kind: "
        + ", ".join(f"{k} {v} ({v / samples:.0%})" for k, v in per_thread.most_common())
    ]
    for title, counts in (("innermost frames", leaves), ("innermost jobs/ or sdcore/ frames", ours)):
        lines.append(f"  - main thread ({total_main} samples), {title}:")
        lines += [f"    - {v / max(total_main, 1):.1%} {k}" for k, v in counts.most_common(rows)]
    return lines


def spy_lines(spy, path: Path | None, what: str) -> list[str]:
    """The summary of a `sampled` block's samples, or why there are none."""
    if spy is None:
        return []
    if spy.returncode == 0 and path.exists():
        return spy_summary(path, what)
    return [f"  - py-spy ({what}) failed: {spy.log.strip()[-300:]}"]


def measure_variants(
    report: Report, args, worker: ShardWorker, tasks: list, root: Path, bare_before: float, measure_bare
) -> None:
    """Each variant's rows/s over the same steady shards, round-robin for `args.rounds` rounds
    (the GPU's and the host's drift spread over all), against the bare pipeline's before and
    after them; py-spy samples the first round of job-cold, start-in-slot-cold and give-out-now."""
    names = args.variants.split(",")
    rows = sum(task.num_rows for task in tasks)
    rates: dict[str, list[float]] = {name: [] for name in names}
    spies: list[str] = []
    for round_ in range(args.rounds):
        for name in names:
            spied = args.py_spy and round_ == 0 and name in ("job-cold", "start-in-slot-cold", "give-out-now")
            spy_path = Path(args.py_spy) / f"pyspy-{name}.txt" if spied else None
            with variant(worker, name, root), sampled(spy_path) as spy:
                seconds = timed(worker.pipe.device, lambda: [worker.run(task) for task in tasks])
            rates[name].append(rows / seconds)
            spies += spy_lines(spy, spy_path, name)
    bare_after = measure_bare()
    bare = (bare_before + bare_after) / 2
    report.add(
        f"- variants over {rows} rows in shards of {args.shard_size}, {args.rounds} rounds (rows/s; median / bare, "
        f"the bare pipeline's mean of {bare_before:.2f} before and {bare_after:.2f} after):"
    )
    for name in names:
        median = statistics.median(rates[name])
        each = ", ".join(f"{rate:.2f}" for rate in rates[name])
        report.add(f"  - {name}: {each}; median {median:.2f} = {median / bare:.2f}x bare — {VARIANTS[name]}")
    for line in spies:
        report.add(line)


def host_checks(report: Report, size: int, folder: Path) -> None:
    """What the host's side of a job costs there: how PNG encoding (the writer's,
    `jobs.writer.encode_image`) scales on threads and what it does to a Python-bound thread
    beside it (the one that launches the GPU work: a Pillow that held the GIL while compressing
    would serialise the two), and how long one fsync'd small write takes where the job writes
    (the in-flight note is one per batch, on that same thread)."""
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))

    def encode(_=None) -> bytes:
        return encode_image(picture, "png", "parameters")

    rates = {}
    for threads in (1, 4):
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(encode, range(threads)))
            started = time.perf_counter()
            list(pool.map(encode, range(16)))
            rates[threads] = 16 / (time.perf_counter() - started)

    def python_loop() -> float:
        started, total = time.perf_counter(), 0
        for value in range(2_000_000):
            total += value
        return time.perf_counter() - started

    alone = python_loop()
    stop = threading.Event()

    def keep_encoding() -> None:
        while not stop.is_set():
            encode()

    encoders = [threading.Thread(target=keep_encoding) for _ in range(4)]
    for thread in encoders:
        thread.start()
    beside = python_loop()
    stop.set()
    for thread in encoders:
        thread.join()
    storage = LocalStorage(str(folder / "fsync-probe"))

    def note_ms(write) -> list[float]:
        times = []
        for index in range(10):
            started = time.perf_counter()
            write(f"note-{index}.json", b'{"rows": [1, 2, 3]}')
            times.append(1e3 * (time.perf_counter() - started))
            time.sleep(0.01)
        return times

    fsync_ms = note_ms(storage.write)
    stop.clear()
    image = encode()

    def keep_writing(thread: int) -> None:  # as the writer's pool commits images
        count = 0
        while not stop.is_set():
            storage.write(f"image-{thread}-{count}.png", image, exclusive=True)
            count += 1

    writers = [threading.Thread(target=keep_writing, args=(k,)) for k in range(4)]
    for thread in writers:
        thread.start()
    beside_ms, note_beside_ms = note_ms(storage.write), note_ms(storage.write_note)
    stop.set()
    for thread in writers:
        thread.join()
    shutil.rmtree(folder / "fsync-probe", ignore_errors=True)
    report.add(
        f"- host: Pillow {PIL.__version__}, {os.cpu_count()} CPUs; PNG encode of a noisy {size}x{size} image "
        f"{rates[1]:.1f} img/s on 1 thread, {rates[4]:.1f} on 4; a Python loop {beside / alone:.2f}x slower beside "
        f"4 encoding threads; a small fsync'd write under {folder}: median {statistics.median(fsync_ms):.2f} ms, "
        f"max {max(fsync_ms):.2f} ms; beside 4 threads writing PNGs: fsync'd median {statistics.median(beside_ms):.2f} "
        f"ms, max {max(beside_ms):.2f} ms, as a note (no fsync) median {statistics.median(note_beside_ms):.2f} ms, "
        f"max {max(note_beside_ms):.2f} ms"
    )


def run_mode(report: Report, args, weights: str, manifest_path: str, entries: list[dict], mode: str) -> None:
    folder = Path(manifest_path).parent
    output = folder / f"out-{mode}"
    sampler = SamplerSpec(steps=args.steps, width=args.size, height=args.size, guidance_scale=7.5)
    dtype = "float16" if args.device == "cuda" else "float32"
    config = WorkerConfig(
        weights=weights,
        output=str(output),
        sampler=sampler,
        dtype=dtype,
        device=args.device,
        batch_size=args.batch,
        compile=mode in ("default", "reduce-overhead"),
        cuda_graphs=mode in ("cuda-graphs", "reduce-overhead"),
    )
    started = time.perf_counter()
    worker = ShardWorker(config)
    load_s = time.perf_counter() - started
    tasks = list(read_shards(load_manifest([manifest_path]), args.shard_size))
    shard_s = [timed(worker.pipe.device, lambda: worker.run(tasks[0]))]  # compiles / captures: left out
    spy_path = Path(args.py_spy) / "pyspy-first-pass.txt" if args.py_spy else None
    with sampled(spy_path) as spy:
        for task in tasks[1:]:
            run = lambda task=task: profiled(f"{mode} worker shard", worker.run, task)  # noqa: E731
            shard_s.append(timed(worker.pipe.device, run))
    steady_rows = args.rows - args.shard_size
    job_rate = steady_rows / sum(shard_s[1:])
    per_shard = ", ".join(f"{task.num_rows / seconds:.2f}" for task, seconds in zip(tasks[1:], shard_s[1:]))
    Output(str(output)).write_job(
        {"spec": {"image": {"quality": 95}}, "manifest": {"sources": [manifest_path]}}
    )  # what reproduce reads
    settings = dict(sampler="ddim", steps=args.steps, guidance_scale=7.5, width=args.size, height=args.size)

    def measure_bare() -> float:
        steady = entries[args.shard_size :]
        return bare_rows_per_s(worker.pipe, steady, folder, settings, args.batch, worker.decode_rows)

    bare = measure_bare()
    out = Output(str(output))
    records = [r for r in find_records(out, [e["id"] for e in entries], []).values()]
    last_decode_slot = max(r.decode_slot or 0 for r in records)  # None: decoded alone (a CPU smoke run)
    wanted = (  # the first UNet slot, the last, an img2img row, the last decode slot
        lambda r: r.batch_slot == 0,
        lambda r: r.batch_slot == args.batch - 1,
        lambda r: r.mode == "img2img",
        lambda r: (r.decode_slot or 0) == last_decode_slot,
    )
    chosen = {r.id: r for r in (next(r for r in records if test(r)) for test in wanted)}
    reproducer = Reproducer(out)
    verdicts = [reproducer.compare(r, 40.0, exact=True)[0].verdict for r in chosen.values()]
    statuses = {r.status for r in records}
    started = time.perf_counter()
    remake = subprocess.run(
        [sys.executable, "-m", "jobs.reproduce", str(output), *chosen, "--exact"],
        cwd=REPO,  # sdgen is not installed on the GPU machine: `-m` from the checkout finds it
        capture_output=True,
        text=True,
    )
    remake_s = time.perf_counter() - started
    lines = remake.stdout.strip().splitlines() or remake.stderr.strip().splitlines()[-3:]
    decode_rows = sorted({r.decode_rows for r in records if r.decode_rows is not None})  # None: error records
    report.add(
        f"- compile {mode}: worker start {load_s:.0f} s, first shard {shard_s[0]:.1f} s, then "
        f"{job_rate:.2f} rows/s (per shard: {per_shard}); bare pipeline {bare:.2f} rows/s "
        f"(job / bare {job_rate / bare:.2f}x); "
        f"{len(records)} records {sorted(statuses)}, decode_rows {decode_rows}, "
        f"kernels {records[0].kernels}; reproduce of {len(verdicts)} rows "
        f"({', '.join(f'{r.id} slot {r.batch_slot}/decode {r.decode_slot}' for r in chosen.values())}): "
        f"{', '.join(verdicts)}; in a new process (exit {remake.returncode}, {remake_s:.0f} s): " + "; ".join(lines)
    )
    for line in spy_lines(spy, spy_path, "the job's steady shards above"):
        report.add(line)
    if args.variants:
        measure_variants(report, args, worker, tasks[1:], folder, bare, measure_bare)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", default="random-sd15", help="random-sd15, or a path / builtin: name")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--compile", default="none,cuda-graphs,reduce-overhead", help="sdcore.kernels.compile_unet modes, one job each"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "GPU_RESULTS.md"))
    parser.add_argument("--output-root", default=None, help="where the jobs write (e.g. /dev/shm); default a temp dir")
    parser.add_argument("--profile", action="store_true", help="cProfile the launching thread (worker and bare)")
    parser.add_argument(
        "--blocking-copies", action="store_true", help="host-GPU copies that wait (sdcore.devices.ASYNC_COPIES)"
    )
    parser.add_argument("--variants", default="", help=f"after each mode's job, A/B of: {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of --variants")
    parser.add_argument("--py-spy", default=None, help="folder for py-spy samples (the job's steady shards, variants)")
    args = parser.parse_args()
    global PROFILING
    PROFILING = args.profile
    sdcore.devices.ASYNC_COPIES = not args.blocking_copies
    if args.py_spy:
        Path(args.py_spy).mkdir(parents=True, exist_ok=True)
    report = Report(args.out)
    folder = Path(tempfile.mkdtemp(prefix="gpu-job-check-", dir=args.output_root))
    started = time.monotonic()
    weights = args.weights
    if weights == "random-sd15":
        weights = random_sd15_file(folder, torch.float16 if args.device == "cuda" else torch.float32)
    manifest_path, entries = write_manifest(folder, args.rows, args.size)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report.add(
        f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} — job worker check "
        f"(bench/gpu_job_check.py), {name}, torch {torch.__version__}, {args.weights}, {args.size}x{args.size}, "
        f"DDIM {args.steps}, batch {args.batch}, {args.rows} rows (half img2img at {STRENGTHS}) in shards of "
        f"{args.shard_size}; jobs written under {folder}, host-GPU copies "
        f"{'blocking' if args.blocking_copies else 'asynchronous'}{', profiled' if args.profile else ''}\n"
    )
    attempt(report, "host checks", lambda: host_checks(report, args.size, folder))
    for mode in args.compile.split(","):
        attempt(
            report, f"compile {mode}", lambda mode=mode: run_mode(report, args, weights, manifest_path, entries, mode)
        )
        profile_report(report)
    report.add(f"\nTotal {time.monotonic() - started:.0f} s.")


if __name__ == "__main__":
    main()
