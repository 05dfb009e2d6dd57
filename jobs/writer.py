"""Writer: commits a shard's images, then its records — nothing visible half-written.

`ShardWriter.write(record, image)` hands the image to a small thread pool that encodes and
commits it (a batch's images are encoded and uploaded in parallel) and keeps the record;
`checkpoint()`, after every `batch_size` finished rows (a "batch" here), hands the batch to a
saver thread that waits for its images, completes its records with their facts (path, sha256,
write time: `Record.with_image` returns a new record; the records given to `write` are never
changed) and saves them as a partial file.
`checkpoint()` returns at once, so the next batch is generated while this one is encoded and
saved; it waits only when more than `lag` batches are still unsaved (memory stays bounded: at
most `lag + 1` batches of images are held), and raises there if an earlier save failed.
`close()` waits for every save and image in order — the first failure is raised and nothing is
committed — then writes the shard's record file, the completion marker, in one piece.

An image write never replaces a committed image with other bytes, whatever the lease says:
each is created exclusively (local `link(2)`, S3 `If-None-Match: *`); when the key exists, equal
bytes are fine, bytes a record refers to are an `ImageConflict` (the shard fails, uncommitted),
and an orphan of a dead attempt is replaced only by a compare-and-swap on its tag.
"""

from __future__ import annotations

import hashlib
import io
import struct
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from PIL import Image, PngImagePlugin

from .output import Output
from .provenance import FORMAT_EXTENSIONS
from .record import Record, StoredImage

EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
TIFF_LONG, TIFF_UNDEFINED = 4, 7
UNICODE_PREFIX = b"UNICODE\0"  # EXIF's character-code prefix of a UTF-16 UserComment

# How an image's parameters are embedded (the record's `image_metadata`), so that reproduce
# writes a record's image as its job did, byte for byte:
#   1: JPEG/WebP EXIF as Pillow builds it, whose UserComment is typed BYTE (records without the
#      field). piexif, which A1111 reads EXIF with, returns such a comment as a tuple of ints,
#      and A1111's PNG Info then fails on it.
#   2: the UserComment typed UNDEFINED, as the EXIF spec and A1111 write it; a text longer than
#      a JPEG's 64 KB EXIF segment holds is cut (it failed the whole shard, every attempt).
# PNG is the same in both: a text chunk named "parameters", any length.
IMAGE_METADATA = 2
# A JPEG's APP1 segment holds 65533 bytes: "Exif\0\0", the TIFF header and two one-entry IFDs
# (44 bytes) and the comment, UTF-16 after its 8-byte prefix.
MAX_EXIF_COMMENT_CHARS = (65533 - 6 - 44 - len(UNICODE_PREFIX)) // 2


def _utf16_units(text: str) -> int:
    """The UTF-16 code units of `text` (a character beyond the BMP, e.g. an emoji, takes two)."""
    return len(text.encode("utf-16-be")) // 2


def _fit_exif_comment(parameters: str) -> str:
    """`parameters` cut to what a JPEG's EXIF holds (MAX_EXIF_COMMENT_CHARS UTF-16 code units):
    the prompt and negative prompt shortened (marked with "…"), the settings line (the last)
    kept whole. Cut between characters, never inside one."""
    if _utf16_units(parameters) <= MAX_EXIF_COMMENT_CHARS:
        return parameters
    head, newline, settings = parameters.rpartition("\n")
    if not newline:
        head, settings = parameters, ""
    tail = "…" + newline + settings
    room = MAX_EXIF_COMMENT_CHARS - _utf16_units(tail)
    if room < 0:  # a settings line alone over the limit: keep its start
        tail, room = "", MAX_EXIF_COMMENT_CHARS
        head = parameters
    kept, units = [], 0
    for character in head:
        units += 2 if ord(character) > 0xFFFF else 1
        if units > room:
            break
        kept.append(character)
    return "".join(kept) + tail


def exif_user_comment(text: str) -> bytes:
    """EXIF (as Pillow's `exif=` takes it) holding only a UserComment: big-endian TIFF, IFD0 with
    one entry pointing to the Exif IFD, whose one entry is the comment, typed UNDEFINED."""
    comment = UNICODE_PREFIX + text.encode("utf-16-be")
    exif_ifd = 8 + 18  # after the TIFF header and IFD0 (count, one 12-byte entry, next offset)
    data = exif_ifd + 18
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8)
    ifd0 = struct.pack(">HHHII", 1, EXIF_IFD, TIFF_LONG, 1, exif_ifd) + struct.pack(">I", 0)
    ifd = struct.pack(">HHHII", 1, EXIF_USER_COMMENT, TIFF_UNDEFINED, len(comment), data) + struct.pack(">I", 0)
    return b"Exif\x00\x00" + tiff + ifd0 + ifd + comment


def encode_image(
    image: Image.Image, fmt: str, parameters: str, quality: int = 95, metadata: int = IMAGE_METADATA
) -> bytes:
    """Image bytes carrying `parameters` where SD tools look for them: a PNG text chunk named
    "parameters", or for JPEG/WebP the EXIF UserComment (as A1111 writes them), embedded the
    way `metadata` says (IMAGE_METADATA). Deterministic: the same pixels and parameters give the
    same bytes."""
    buffer = io.BytesIO()
    image = image.convert("RGB")
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    elif fmt in ("jpeg", "webp"):
        if metadata >= 2:
            exif_bytes = exif_user_comment(_fit_exif_comment(parameters))
        else:
            exif = Image.Exif()
            exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = UNICODE_PREFIX + parameters.encode("utf-16-be")
            exif_bytes = exif.tobytes()
        save = {"quality": quality, "exif": exif_bytes}
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
    if isinstance(comment, bytes) and comment.startswith(UNICODE_PREFIX):
        return comment[len(UNICODE_PREFIX) :].decode("utf-16-be")
    return None


class ImageConflict(RuntimeError):
    """An image write found a committed image with other bytes at its key (never replaced)."""


class ShardWriter:
    """Writes one shard's images and records into an Output."""

    def __init__(
        self,
        output: Output,
        shard: str,
        image_format: str = "png",
        quality: int = 95,
        threads: int = 4,
        lag: int = 1,
    ):
        self.output = output
        self.shard = shard
        self.format = image_format
        self.extension = FORMAT_EXTENSIONS[image_format]
        self.quality = quality
        self.lag = lag  # batches that may still be saving when checkpoint() returns
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"write-{shard}")
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"save-{shard}")
        # Written since the last checkpoint, each with its image commit (None: no image).
        self._pending: list[tuple[Record, Future[StoredImage] | None]] = []
        self._saving: deque[Future[list[Record]]] = deque()  # checkpointed batches, in order
        self._complete: list[Record] = []  # the shard's records so far, image facts filled in

    def _commit_image(self, image: Image.Image, name: str, parameters: str) -> StoredImage:
        """Encode and write one image (on the pool); its facts for the record."""
        started = time.perf_counter()
        data = encode_image(image, self.format, parameters, self.quality)
        key = self.output.image_key(self.shard, name, self.extension)
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.output.storage.write(key, data, exclusive=True):  # S3: If-None-Match: *
            self._replace_uncommitted(key, data, sha256)
        return StoredImage(
            path=key,
            uri=self.output.storage.url(key),
            sha256=sha256,
            format=self.format,
            seconds=time.perf_counter() - started,
            metadata=IMAGE_METADATA,
        )

    def _replace_uncommitted(self, key: str, data: bytes, sha256: str) -> None:
        """`key` already holds an image. The same bytes (an earlier attempt's write of this
        row): nothing to do. Other bytes referenced by a record — the shard's committed record
        file or a saved batch — are never replaced (ImageConflict). Other bytes that no record
        refers to (an attempt that died before saving its batch, on other hardware) are replaced,
        only if still exactly those bytes (compare-and-swap on their tag)."""
        storage = self.output.storage
        try:
            existing, tag = storage.read_tagged(key)
        except FileNotFoundError:  # removed since: write it as new
            if storage.write(key, data, exclusive=True):
                return
            existing, tag = storage.read_tagged(key)
        if hashlib.sha256(existing).hexdigest() == sha256:
            return
        if self._referenced(key):
            raise ImageConflict(
                f"{storage.url(key)}: a committed image with other bytes is there; not overwritten "
                "(another run writing this output, or a damaged resume state)"
            )
        if storage.write_tagged(key, data, if_match=tag) is None:
            raise ImageConflict(f"{storage.url(key)}: changed by someone else while being written; not overwritten")

    def _referenced(self, key: str) -> bool:
        """Whether a record of this shard (committed, or saved in a partial file) names `key`."""
        output = self.output
        if output.storage.exists(output.record_key(self.shard)):
            paths = output.read_records(self.shard, columns=["image_path"]).column("image_path").to_pylist()
            if key in paths:
                return True
        return any(r.get("image_path") == key for r in output.read_partials(self.shard).values())

    def write(self, record: Record, image: Image.Image | None = None, *, name: str = "", parameters: str = "") -> None:
        """Keep `record`; with an image, commit it as `images/SHARD/NAME.EXT` (asynchronously),
        carrying `parameters`. The record gets the image's facts when its batch is saved."""
        future = None
        if image is not None:
            if not name:
                raise ValueError(f"row {record.row}: an image needs a file name")
            future = self._pool.submit(self._commit_image, image, name, parameters)
        self._pending.append((record, future))

    def keep(self, record: Record) -> None:
        """Keep a record saved in a partial file by an earlier attempt: it goes into the shard's
        record file as it is, and is not saved again."""
        self._complete.append(record)

    @staticmethod
    def _settle(pending: list[tuple[Record, Future[StoredImage] | None]]) -> list[Record]:
        """Wait for the images; the records, completed with their facts (raises if a write failed)."""
        return [record if future is None else record.with_image(future.result()) for record, future in pending]

    def _save(self, pending: list[tuple[Record, Future[StoredImage] | None]]) -> list[Record]:
        """On the saver thread: one batch's records, once its images are committed, as a partial file."""
        settled = self._settle(pending)
        self.output.write_partial(self.shard, [r.as_dict() for r in settled])
        return settled

    def _collect(self, keep_unsaved: int) -> None:
        """Wait for the oldest saves until at most `keep_unsaved` remain (raises a failed save's error)."""
        while len(self._saving) > keep_unsaved:
            self._complete.extend(self._saving.popleft().result())

    def checkpoint(self) -> None:
        """Save the records since the last checkpoint as a partial file once their images are
        committed, on the saver thread. Returns once at most `lag` batches are unsaved, so a
        crash loses at most the batch being generated and the `lag` batches before it; an
        exception (a failed batch) still saves every checkpointed batch (`abort`)."""
        pending, self._pending = self._pending, []
        if pending:
            self._saving.append(self._saver.submit(self._save, pending))
        self._collect(self.lag)

    def close(self) -> bool:
        """Wait for every save and image, then write the record file. False if the shard was
        already committed (by an earlier attempt that was thought lost). Raises if any write
        failed: nothing is committed then."""
        try:
            self._collect(0)
            self._complete.extend(self._settle(self._pending))
            self._pending = []
        finally:
            self._shutdown()
        committed = self.output.commit_records(self.shard, [r.as_dict() for r in self._complete])
        self.output.clear_partials(self.shard)
        return committed

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=True)
        self._saver.shutdown(wait=True)

    def abort(self) -> None:
        """After a failure: let the image writes and batch saves already queued finish (they
        are whole objects either way), commit nothing more."""
        self._pool.shutdown(wait=True)  # the saver waits on these images
        self._saver.shutdown(wait=True)
