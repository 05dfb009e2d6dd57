"""The worker's storage overlap, measured: one shard through `ShardWorker` with init images read
a batch ahead, images encoded and saved a batch behind and the in-flight note written a chunk
ahead (the default), against the same worker with the note written when its chunk is due (as
before jobs/inflight.py), with all three off (the plain sequential loop), and against the bare
pipeline on the same rows.

Storage latency is simulated (a sleep before each image/record write and each init-image read,
as an S3 request costs), so the figures show how much of it the overlap hides. Half the rows are
img2img at strength 1.0 (same forwards as txt2img), each from its own init image. Rounds are
interleaved (the four in turn, rotating), medians reported; results are appended to
bench/RESULTS.md.

    python bench/worker_io.py [--latency-ms 50] [--size 64] [--rows 32] [--batch 8] [--steps 20]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from side_by_side import cpu_model, git_commit, prompt  # noqa: E402

import jobs.init_images as init_images  # noqa: E402 - needs the path above
import sdcore  # noqa: E402
from jobs.manifest import load_manifest  # noqa: E402
from jobs.output import Output  # noqa: E402
from jobs.reader import read_shards  # noqa: E402
from jobs.spec import SamplerSpec  # noqa: E402
from jobs.storage import LocalStorage  # noqa: E402
from jobs.worker import ShardWorker, WorkerConfig  # noqa: E402
from sdcore import GenerationRequest  # noqa: E402


class SlowStorage:
    """A storage whose every write first waits `latency` seconds (an object store's round trip)."""

    def __init__(self, inner, latency: float):
        self.inner, self.latency = inner, latency

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write(self, key, data, *, exclusive=False):
        time.sleep(self.latency)
        return self.inner.write(key, data, exclusive=exclusive)

    def write_note(self, key, data):
        time.sleep(self.latency)
        self.inner.write_note(key, data)


def make_manifest(folder: Path, rows: int, size: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    columns: dict[str, list] = {"id": [], "prompt": [], "seed": [], "init_image": [], "strength": []}
    for i in range(rows):
        img2img = i % 2 == 1
        if img2img:
            image = Image.new("RGB", (size, size), "white")
            ImageDraw.Draw(image).ellipse((i % 8, i % 8, size - 8, size - 8), fill=(40 * (i % 6), 90, 200))
            image.save(folder / f"init{i}.png")
        columns["id"].append(f"row-{i:04d}")
        columns["prompt"].append(prompt(i))
        columns["seed"].append(7000 + i)
        columns["init_image"].append(f"init{i}.png" if img2img else None)
        columns["strength"].append(1.0 if img2img else None)
    path = folder / "manifest.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS.md"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    latency = args.latency_ms / 1000
    work = Path(tempfile.mkdtemp(prefix="worker-io-"))
    manifest = load_manifest([str(make_manifest(work, args.rows, args.size))])
    (task,) = list(read_shards(manifest, args.rows))
    pipe = sdcore.load_pipeline("builtin:shapes")
    sampler = SamplerSpec(name="ddim", steps=args.steps, guidance_scale=7.5, width=args.size, height=args.size)
    config = WorkerConfig(
        weights="builtin:shapes", output=str(work), sampler=sampler, batch_size=args.batch, threads=args.threads
    )

    read_uri = init_images.read_uri

    def slow_read(uri, **kwargs):
        time.sleep(latency)
        return read_uri(uri, **kwargs)

    init_images.read_uri = slow_read

    def worker_run(overlap: bool, note_ahead: bool | None = None) -> float:
        worker = ShardWorker(config, pipeline=pipe)
        worker.read_ahead, worker.write_lag = overlap, 1 if overlap else 0
        worker.note_ahead = overlap if note_ahead is None else note_ahead
        out = Path(tempfile.mkdtemp(dir=work))
        worker._output = Output(str(out), storage=SlowStorage(LocalStorage(str(out)), latency))
        start = time.perf_counter()
        result = worker.run(task)
        assert result.ok == args.rows, result
        return args.rows / (time.perf_counter() - start)

    from PIL import Image

    requests = [
        GenerationRequest(
            prompt(i),
            seed=7000 + i,
            init_image=Image.open(work / f"init{i}.png").convert("RGB") if i % 2 else None,
            strength=1.0 if i % 2 else None,
        )
        for i in range(args.rows)
    ]

    def bare() -> float:
        start = time.perf_counter()
        for i in range(0, args.rows, args.batch):
            pipe.generate_placed(
                requests[i : i + args.batch],
                sampler="ddim",
                steps=args.steps,
                guidance_scale=7.5,
                width=args.size,
                height=args.size,
                batch_invariant=False,
                fixed_batch=args.batch,
            )
        return args.rows / (time.perf_counter() - start)

    variants = {
        "bare": bare,
        "overlap": lambda: worker_run(True),
        "overlap, note written when due": lambda: worker_run(True, note_ahead=False),
        "sequential": lambda: worker_run(False),
    }
    bare()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rates[name].append(variants[name]())
        print(f"round {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:.3f}" for n in names), flush=True)
    med = {n: statistics.median(v) for n, v in rates.items()}

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"\n## {when} — worker storage overlap (`bench/worker_io.py`), commit {git_commit()}\n\n"
        f"{cpu_model()}, {os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}, threads "
        f"{args.threads}; builtin:shapes {args.size}x{args.size}, DDIM {args.steps}, batch {args.batch}, one shard "
        f"of {args.rows} rows (half img2img, one init image each), {args.latency_ms:g} ms simulated latency per "
        f"storage write and init-image read; {args.rounds} interleaved rounds, medians; load average "
        f"{os.getloadavg()[0]:.1f}. {args.note}\n\n"
        "| | rows/s | / bare |\n|---|---|---|\n"
        + "".join(f"| {name} | {med[name]:.3f} | {med[name] / med['bare']:.3f}x |\n" for name in names)
    )
    print(text)
    with open(args.out, "a") as handle:
        handle.write(text)


if __name__ == "__main__":
    main()
