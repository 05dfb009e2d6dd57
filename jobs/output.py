"""The output layout and its resume state.

OUTPUT/
  job.json                    resolved spec, manifest + model fingerprints, versions
  images/SHARD/NAME.EXT       one image per ok row
  records/SHARD.parquet       one record per manifest row of the shard; written once, last:
                              the shard's completion marker
  summary.json                counts, timings, throughput (rewritten at the end of each run)
  partial/SHARD/*.parquet     records of finished rows of a shard not yet committed, saved every
                              batch_size rows (after their images); a rerun keeps them, so a
                              crash loses at most the rows in flight and the last unsaved ones.
                              Deleted once the shard's record file is written.
  index.html, report-page-N.html, report-pages.html, thumbs/SHARD/*.jpg
                              the HTML report (jobs/report.py)
  partial/SHARD/inflight.json the rows that may be generating now (written before the stream
                              takes each batch_size rows): after
                              a worker death, which rows were in flight (see worker.py)
"""

from __future__ import annotations

import io
import itertools
import json
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .reader import shard_sort_key
from .record import RECORD_SCHEMA, records_table
from .storage import Storage, StorageError, TransientStorageError, join_uri, open_storage

JOB_FILE = "job.json"
SUMMARY_FILE = "summary.json"
RECORDS_DIR = "records"
IMAGES_DIR = "images"
PARTIAL_DIR = "partial"
REPORT_FILE = "index.html"  # the report's first page (jobs/report.py)
REPORT_PAGES_FILE = "report-pages.html"  # the list of all its pages
THUMBS_DIR = "thumbs"


def report_page_key(page: int) -> str:
    """The report's page `page` (1-based): index.html, then report-page-2.html, ..."""
    return REPORT_FILE if page == 1 else f"report-page-{page}.html"


INFLIGHT_FILE = "inflight.json"


def table_bytes(table: pa.Table, *, scratch: bool = False) -> bytes:
    """`table` as Parquet: zstd-compressed for a file that stays (a shard's record file); plain,
    with no statistics or dictionaries, for a scratch file that the shard's commit makes obsolete
    (a saved batch, written every batch on the worker's own cores: compressed, it took ~3 of
    ~4 ms per batch, about 1% of a 2-core job's images, bench/RESULTS.md)."""
    sink = io.BytesIO()
    if scratch:
        pq.write_table(table, sink, compression="none", write_statistics=False, use_dictionary=False)
    else:
        pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


class DamagedFile(ValueError):
    """A file of the output's own (job.json, summary.json) that cannot be read as it was written."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri} is damaged: {reason}")


class DamagedRecords(ValueError):
    """A committed shard's record file that cannot be read. A rerun of the job redoes the shard
    (`jobs/runner.py`); until then status marks it `damaged`."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}; rerun the job to redo its shard")
        self.reason = reason


def _rows_problem(rows: list[int], start: int, stop: int) -> str | None:
    """Why a shard's record rows are not exactly one per manifest row in [start, stop), or None."""
    if len(rows) == stop - start and set(rows) == set(range(start, stop)):
        return None
    missing = len(set(range(start, stop)) - set(rows))
    extra = len(rows) - (stop - start - missing)
    return f"record file holds {len(rows)} record(s) for the shard's {stop - start} rows" + (
        f" ({missing} row(s) without a record{f', {extra} extra' if extra else ''})" if missing or extra else ""
    )


def read_table(data: bytes, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(pa.BufferReader(data), columns=columns)


class Output:
    """An output root (local folder or s3:// prefix) and the paths inside it."""

    def __init__(self, uri: str, storage: Storage | None = None):
        self.storage = storage or open_storage(uri)
        self.uri = self.storage.uri

    # -- paths
    @staticmethod
    def image_key(shard: str, name: str, extension: str) -> str:
        return f"{IMAGES_DIR}/{shard}/{name}.{extension}"

    @staticmethod
    def record_key(shard: str) -> str:
        return f"{RECORDS_DIR}/{shard}.parquet"

    @staticmethod
    def partial_prefix(shard: str) -> str:
        return f"{PARTIAL_DIR}/{shard}/"

    # -- job.json / summary.json
    def read_json(self, key: str) -> dict[str, Any] | None:
        """The JSON object in `key`; None when there is no such file; DamagedFile when it is not
        a JSON object (truncated, edited by hand)."""
        try:
            data = self.storage.read(key)
        except FileNotFoundError:
            return None
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DamagedFile(join_uri(self.uri, key), f"not JSON ({exc})") from None
        if not isinstance(value, dict):
            raise DamagedFile(join_uri(self.uri, key), f"a JSON {type(value).__name__}, not an object")
        return value

    def write_json(self, key: str, data: dict[str, Any]) -> None:
        self.storage.write(key, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())

    def read_job(self) -> dict[str, Any] | None:
        return self.read_json(JOB_FILE)

    def read_summary(self) -> dict[str, Any]:
        """summary.json, or {} when there is none or it is damaged: it is rewritten at the end of
        every run from the record files, so nothing is lost by reading past it."""
        try:
            return self.read_json(SUMMARY_FILE) or {}
        except DamagedFile:
            return {}

    def write_job(self, data: dict[str, Any]) -> None:
        self.write_json(JOB_FILE, data)

    # -- records
    def committed_shards(self) -> set[str]:
        """Shards whose record file exists (listed, not probed one by one)."""
        keys = self.storage.list(RECORDS_DIR + "/")
        return {
            k[len(RECORDS_DIR) + 1 : -len(".parquet")] for k in keys if k.endswith(".parquet") and k.count("/") == 1
        }

    def commit_records(self, shard: str, records: Iterable[dict[str, Any]]) -> bool:
        """Write the shard's record file once; False when it was already there (an earlier
        attempt's, committed after it was thought lost). Something else under its name (a
        folder, a file that is no record file) is an error naming it: taken for committed, the
        shard was redone by every run and never done."""
        if self.storage.write(self.record_key(shard), table_bytes(records_table(records)), exclusive=True):
            return True
        try:
            self.read_records(shard, ["row"])
        except TransientStorageError:
            raise  # the store, not the file
        except (DamagedRecords, StorageError, OSError) as exc:
            where = join_uri(self.uri, self.record_key(shard))
            why = exc.reason if isinstance(exc, DamagedRecords) else str(exc).replace(f"{where}: ", "")
            raise OSError(f"{where} exists but is not a readable record file ({why}); remove it and rerun") from None
        return False

    def read_records(self, shard: str, columns: list[str] | None = None) -> pa.Table:
        """The shard's record file; DamagedRecords when it is not a readable record file."""
        data = self.storage.read(self.record_key(shard))  # a storage fault is raised as such, not as damage
        return self.parse_records(shard, data, columns)

    def parse_records(self, shard: str, data: bytes, columns: list[str] | None = None) -> pa.Table:
        """The bytes of the shard's record file as a table; DamagedRecords when they are not one."""
        try:
            return read_table(data, columns)
        except pa.ArrowException as exc:
            raise DamagedRecords(
                join_uri(self.uri, self.record_key(shard)), f"unreadable record file ({exc})"
            ) from None

    def read_all_records(
        self,
        shards: Iterable[str],
        columns: list[str] | None = None,
        threads: int = 16,
        damaged: dict[str, str] | None = None,
    ) -> dict[str, pa.Table]:
        """shard -> its records, read in parallel (on S3 each file is one request's latency). A
        record file that cannot be read raises DamagedRecords or, given a `damaged` dict, is
        left out and noted there (shard -> why)."""

        def read(shard: str) -> pa.Table | DamagedRecords:
            try:
                return self.read_records(shard, columns)
            except DamagedRecords as exc:
                if damaged is None:
                    raise
                return exc

        shards = sorted(shards, key=shard_sort_key)
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
            tables = dict(zip(shards, pool.map(read, shards)))
        for shard, table in list(tables.items()):
            if isinstance(table, DamagedRecords):
                damaged[shard] = table.reason  # type: ignore[index] - a dict when this can happen
                del tables[shard]
        return tables  # type: ignore[return-value]

    def iter_records(
        self, shards: Iterable[str], columns: list[str] | None = None, threads: int = 8
    ) -> Iterator[tuple[str, pa.Table]]:
        """(shard, its records) in shard order, read ahead by at most `threads` files: memory
        holds a few shards' records however many shards there are."""
        pending = iter(sorted(shards, key=shard_sort_key))
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            window: deque[tuple[str, Future[pa.Table]]] = deque()
            for shard in itertools.islice(pending, max(1, threads)):
                window.append((shard, pool.submit(self.read_records, shard, columns)))
            while window:
                shard, future = window.popleft()
                following = next(pending, None)
                if following is not None:
                    window.append((following, pool.submit(self.read_records, following, columns)))
                yield shard, future.result()

    def count_records(
        self, shards: Iterable[str], ranges: Mapping[str, tuple[int, int]] | None = None
    ) -> dict[str, dict[str, Any]]:
        """shard -> {"ok": n, "error": n} for committed shards, with "damaged": why, when its
        record file cannot be read or (given the shards' manifest row `ranges`, start and stop)
        does not hold exactly one record per row of the shard.

        What the run's plan and summary and `status` report; it lives with the layout so that
        they read the counts the same way, and it reads only the `status` and `row` columns of
        each record file, keeping only the counts (memory flat in the number of rows)."""

        def count(shard: str) -> dict[str, Any]:
            try:
                table = self.read_records(shard, ["status", "row"])
            except DamagedRecords as exc:
                return {"ok": 0, "error": 0, "damaged": exc.reason}
            statuses = table.column("status")
            ok = pc.sum(pc.equal(statuses, "ok")).as_py() or 0
            counts: dict[str, Any] = {"ok": ok, "error": len(statuses) - ok}
            if ranges is not None and shard in ranges:
                problem = _rows_problem(table.column("row").to_pylist(), *ranges[shard])
                if problem:
                    counts["damaged"] = problem
            return counts

        shards = sorted(shards, key=shard_sort_key)
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(shards)))) as pool:
            return dict(zip(shards, pool.map(count, shards)))

    # -- partial records (every batch_size finished rows, before the shard commits)
    def write_partial(self, shard: str, records: list[dict[str, Any]]) -> None:
        first = min(r["row"] for r in records)
        key = f"{self.partial_prefix(shard)}{first:012d}-{uuid.uuid4().hex[:8]}.parquet"
        self.storage.write(key, table_bytes(records_table(records), scratch=True))

    def inflight_key(self, shard: str) -> str:
        return f"{self.partial_prefix(shard)}{INFLIGHT_FILE}"

    def write_inflight(self, shard: str, rows: list[int], alone: bool, attempt: int) -> None:
        """Before a batch is generated: rows that may be in flight until the next note, whether
        it is one row run alone after an earlier death, and the attempt (read back by the next
        attempt if the worker dies; `jobs.inflight`). Not fsync'd: it guards against the death
        of the worker process, which the page cache outlives."""
        data = {"rows": rows, "alone": alone, "attempt": attempt}
        self.storage.write_note(self.inflight_key(shard), json.dumps(data).encode())

    def read_inflight(self, shard: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.storage.read(self.inflight_key(shard)))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # damaged: as if absent (at worst a crashing row is narrowed down again)
        ok = isinstance(data, dict) and isinstance(data.get("rows"), list)
        return data if ok and all(isinstance(r, int) for r in data["rows"]) else None

    def partial_files(self, shard: str | None = None) -> list[str]:
        """Every file under partial/ (of one shard): saved batches and the in-flight note."""
        return self.storage.list(self.partial_prefix(shard) if shard else PARTIAL_DIR + "/")

    def partial_keys(self, shard: str | None = None) -> list[str]:
        prefix = self.partial_prefix(shard) if shard else PARTIAL_DIR + "/"
        return [k for k in self.storage.list(prefix) if k.endswith(".parquet")]

    def read_partials(self, shard: str) -> dict[int, dict[str, Any]]:
        """row -> record, from every partial file of the shard (first one wins). A partial file
        that cannot be read (damaged: empty, truncated) is passed over, so its rows are made
        again instead of failing the shard on every attempt."""
        found: dict[int, dict[str, Any]] = {}
        for key in self.partial_keys(shard):
            try:
                data = self.storage.read(key)
            except FileNotFoundError:
                continue
            try:
                table = read_table(data)
            except pa.ArrowException:
                continue  # its rows are generated again; the shard's commit deletes the file
            if table.schema.names != RECORD_SCHEMA.names:
                continue  # from another sdgen version: regenerate instead of guessing
            for record in table.to_pylist():
                found.setdefault(record["row"], record)
        return found

    def clear_partials(self, shard: str) -> None:
        self.storage.delete_tree(self.partial_prefix(shard))

    # -- overwrite
    def clear(self) -> None:
        """Remove everything a previous job left: its report's pages first (they link to all the
        rest), then the markers, so a crash here leaves no committed shard without its images;
        then the images and the thumbnails."""
        self.delete_report_pages(1)
        self.storage.delete([REPORT_PAGES_FILE])
        for prefix in (RECORDS_DIR + "/", PARTIAL_DIR + "/", IMAGES_DIR + "/", THUMBS_DIR + "/"):
            self.storage.delete(self.storage.list(prefix))
        self.storage.delete([SUMMARY_FILE, JOB_FILE])

    def delete_report_pages(self, first: int) -> None:
        """Delete the report's pages from `first` on (they are numbered without gaps)."""
        page = first
        while self.storage.exists(report_page_key(page)):
            self.storage.delete([report_page_key(page)])
            page += 1
