"""The in-flight note: which rows a worker may be generating, kept where the next attempt of its
shard can read it if the worker process dies (`ShardWorker._after_a_death` narrows a row that
kills its worker down from it).

The rule it keeps: while any row is in the pipeline, a note already written names it. A worker
takes a stream's rows a chunk (`batch_size` rows) at a time; before it takes chunk k, the note
must name chunk k and every row still in flight. Writing that note then and waiting for it put a
storage round trip between two UNet forwards every batch: an fsync'd local write (which on ext4
waits for the image data written beside it) or an S3 PUT, with the GPU idle meanwhile.

So `InflightNotes` writes each note one chunk ahead, on a background thread: the note written
when chunk k is taken names the rows in flight then, chunk k and chunk k+1. When chunk k+1 is
taken, that note must be written (the worker waits for it, normally long done); the rows in
flight from then until the next note is written are among those it names. The note names more
rows than are ever in flight at once (up to three chunks' worth, not two; four on CUDA, where the
pipeline reads a batch ahead: `sdcore.pipeline.PREPARE_AHEAD`), so after a death a few more rows
are retried one by one before the rest run batched again; nothing else changes.
The first note of a stream is written before its first chunk is taken, as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from .output import Output


class InflightNotes:
    """The in-flight notes of one stream of a shard. `ahead=False`: each note written when its
    chunk is taken, naming only that chunk and the rows in flight (for benchmarks)."""

    def __init__(self, output: Output, shard: str, alone: bool, attempt: int, *, ahead: bool = True):
        self.output = output
        self.shard = shard
        self.alone = alone
        self.attempt = attempt
        self.ahead = ahead
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"inflight-{shard}")
        self._written: Future[None] | None = None  # the last note, still being written
        self._first = True

    def _write(self, rows: set[int]) -> None:
        self.output.write_inflight(self.shard, sorted(rows), self.alone, self.attempt)

    def before_taking(self, chunk: Iterable[int], in_flight: set[int], following: Iterable[int] = ()) -> None:
        """Called before the rows of `chunk` are taken; `in_flight`: the rows taken and not
        finished, `following`: the next chunk's rows. Returns once a written note names `chunk`
        and `in_flight`; raises the storage error of a note that could not be written."""
        rows = in_flight | set(chunk)
        if not self.ahead:
            self._write(rows)
            return
        self.wait()  # the note written ahead names this chunk
        rows |= set(following)
        if self._first:
            self._first = False
            self._write(rows)
        else:
            self._written = self._thread.submit(self._write, rows)

    def wait(self) -> None:
        """Wait for the note being written (raises its storage error)."""
        written, self._written = self._written, None
        if written is not None:
            written.result()

    def close(self) -> None:
        """Let a note being written finish (it must not land after the shard commits and clears
        its partial files); its error, if any, is left to `wait`."""
        self._thread.shutdown(wait=True)


__all__ = ["InflightNotes"]
