"""Writer: commits a shard's images, then its records — nothing visible half-written.

`ShardWriter.write(record, image)` encodes and commits the image (on a small thread pool, so a
batch's images are encoded and uploaded in parallel) and keeps the record; `checkpoint()`, after
each batch, waits for the batch's images and saves its records as a partial file; `close()`
waits for every image, then writes the shard's record file — the completion marker — in one
piece.
"""

from __future__ import annotations

import hashlib
import io
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from PIL import Image, PngImagePlugin

from .output import Output
from .provenance import FORMAT_EXTENSIONS

EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286


def encode_image(image: Image.Image, fmt: str, parameters: str, quality: int = 95) -> bytes:
    """Image bytes carrying `parameters` where SD tools look for them: a PNG text chunk named
    "parameters", or for JPEG/WebP the EXIF UserComment (as A1111 writes them). Deterministic:
    the same pixels and parameters give the same bytes."""
    buffer = io.BytesIO()
    image = image.convert("RGB")
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    elif fmt in ("jpeg", "webp"):
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        save = {"quality": quality, "exif": exif.tobytes()}
        if fmt == "webp":
            save["method"] = 4
        image.save(buffer, format=fmt.upper(), **save)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buffer.getvalue()


def read_parameters(data: bytes) -> str | None:
    """The "parameters" text of an image written by `encode_image` (None if it has none)."""
    image = Image.open(io.BytesIO(data))
    if "parameters" in image.info:
        return image.info["parameters"]
    comment = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(b"UNICODE\0"):
        return comment[8:].decode("utf-16-be")
    return None


class ShardWriter:
    """Writes one shard's images and records into an Output."""

    def __init__(self, output: Output, shard: str, image_format: str = "png", quality: int = 95, threads: int = 4):
        self.output = output
        self.shard = shard
        self.format = image_format
        self.extension = FORMAT_EXTENSIONS[image_format]
        self.quality = quality
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"write-{shard}")
        self._pending: list[tuple[dict[str, Any], Future | None]] = []  # not yet checkpointed
        self._records: list[dict[str, Any]] = []
        self._futures: list[Future] = []

    def _commit_image(self, record: dict[str, Any], image: Image.Image, parameters: str) -> None:
        started = time.perf_counter()
        data = encode_image(image, self.format, parameters, self.quality)
        key = self.output.image_key(self.shard, record["name"], self.extension)
        self.output.storage.write(key, data)
        record.update(
            image_path=key,
            image_uri=self.output.storage.url(key),
            image_sha256=hashlib.sha256(data).hexdigest(),
            image_format=self.format,
            time_write_s=time.perf_counter() - started,
        )

    def write(self, record: dict[str, Any], image: Image.Image | None = None, parameters: str | None = None) -> None:
        """Keep `record`; with an image, commit it (asynchronously) and fill the image fields.
        A record with `"reused": True` came from a partial file and is kept as it is."""
        future = None
        if image is not None:
            future = self._pool.submit(self._commit_image, record, image, parameters or "")
            self._futures.append(future)
        self._pending.append((record, future))
        self._records.append(record)

    def checkpoint(self) -> None:
        """Save the records since the last checkpoint as a partial file, once their images are
        committed. It returns only when that is done, so a crash after it loses nothing of
        this batch: at most the batch being generated is ever lost."""
        batch = [(r, f) for r, f in self._pending if not r.get("reused")]
        self._pending = []
        for _, future in batch:
            if future is not None:
                future.result()
        if batch:
            self.output.write_partial(self.shard, [_clean(r) for r, _ in batch])

    def close(self) -> bool:
        """Wait for every image, then write the record file. False if the shard was already
        committed (by an earlier attempt that was thought lost). Raises if any write failed."""
        try:
            for f in self._futures:
                f.result()
        finally:
            self._pool.shutdown(wait=True)
        committed = self.output.commit_records(self.shard, [_clean(r) for r in self._records])
        self.output.clear_partials(self.shard)
        return committed

    def abort(self) -> None:
        """After a failure: let the image writes already queued finish (they are whole
        objects either way), commit nothing more."""
        self._pool.shutdown(wait=True)


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("name", "reused")}
