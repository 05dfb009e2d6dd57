"""Init images (img2img): read under caps, decoded, and kept in a small cache by the worker.

Bounded: only a regular file or an S3 object is read (a FIFO, device or folder is the row's
error, never a hang), at most `max_bytes` of it (S3 reads time out: `storage.s3_client`), and
an image over `max_pixels` is refused before its pixels are decoded. Manifests often reuse one
init image for many rows, so a worker keeps recently decoded images by URI, at most
`cache_bytes` of decoded pixels (least recently used goes first).

A permanent problem with an init image (missing, not a regular file, too large, not an image,
out of memory decoding it) is an `InitImageError` whose message names the image (redacted): the
row's error record. A transient one (`TransientStorageError`: S3 5xx, throttling, timeouts after
boto3's retries) is raised as it is: it fails the shard, which is retried, never committed as
errors (see `faults.py`).

The caps are settings of the worker's environment: `SDGEN_INIT_MAX_BYTES` (default 50 MB),
`SDGEN_INIT_MAX_PIXELS` (default 4096×4096) and `SDGEN_INIT_CACHE_BYTES` (default 256 MB).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, ImageOps

from sdcore.request import grey_to_8_bits, init_image_problem

from .storage import StorageError, TransientStorageError, read_uri, redact_uri

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
DEFAULT_CAPACITY = 64  # images, besides the byte budget


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


class InitImageError(Exception):
    """An init image that cannot be used (missing, unreadable, not an image, over a cap)."""


@dataclass(frozen=True)
class InitImage:
    image: Image.Image  # RGB, as the pipeline takes it
    sha256: str  # of the file's bytes: what the record holds and reproduce checks

    @property
    def nbytes(self) -> int:
        return self.image.width * self.image.height * 3


# How an init image file becomes RGB pixels; each record of an img2img row keeps the version it
# was made with (`init_decoding`), so that reproduce decodes its init image the same way.
#   1: PIL's convert("RGB") of the image as stored (records without `init_decoding`).
#   2: the EXIF orientation applied first, as diffusers' load_image and every image viewer do
#      (a phone photo stored sideways is used upright), and 16-bit greyscale (PNG mode I;16,
#      which convert("RGB") clipped to white) scaled to 8 bits. Other images: as in 1.
#      That scaling is sdcore's `grey_to_8_bits`, which the library applies to init images too.
# A job refuses what sdcore's `init_image_problem` refuses (modes I and F, 32-bit integer and
# float TIFFs, whose range of values is not fixed; images without pixels): the row's error
# record, as the library raises. Jobs before that converted modes I and F as in 1, clipped; their
# records still reproduce, because reproduce decodes without refusing (`refuse_ambiguous`).
INIT_DECODING = 2


def decode_init_image(
    data: bytes, max_pixels: int | None = None, decoding: int = INIT_DECODING, refuse_ambiguous: bool = False
) -> Image.Image:
    """An init image file's bytes -> an RGB image (the job's and reproduce's one decoding), the
    way `decoding` says (INIT_DECODING). With `max_pixels`, a larger image is refused from its
    header, before decoding. With `refuse_ambiguous` (a job's new rows), an image sdcore's
    `init_image_problem` refuses is an InitImageError."""
    if decoding not in (1, 2):
        raise ValueError(f"unknown init image decoding {decoding!r}; this sdgen knows 1 and 2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise InitImageError(f"{image.width}x{image.height} pixels, over the cap of {max_pixels}")
        image.load()
        if refuse_ambiguous and (problem := init_image_problem(image)):
            raise InitImageError(problem)
        if decoding >= 2:
            image = grey_to_8_bits(ImageOps.exif_transpose(image))  # SIXTEEN_BIT_GREY -> mode L
        return image.convert("RGB")


def read_init_image(uri: str, max_bytes: int | None = None, max_pixels: int | None = None) -> InitImage:
    """Read and decode the init image at `uri` under the caps; InitImageError naming it
    otherwise (TransientStorageError passes through)."""
    max_bytes = max_bytes or _env_int("SDGEN_INIT_MAX_BYTES", DEFAULT_MAX_BYTES)
    max_pixels = max_pixels or _env_int("SDGEN_INIT_MAX_PIXELS", DEFAULT_MAX_PIXELS)
    where = redact_uri(uri)
    try:
        data = read_uri(uri, max_bytes=max_bytes)
    except TransientStorageError:
        raise
    except FileNotFoundError:
        raise InitImageError(f"init_image not found: {where}") from None
    except (StorageError, OSError, ValueError) as exc:  # ValueError: e.g. a NUL byte in the path
        raise InitImageError(f"init_image {where}: cannot read ({str(exc)[:200]})") from None
    try:
        image = decode_init_image(data, max_pixels, refuse_ambiguous=True)
    except InitImageError as exc:
        raise InitImageError(f"init_image {where}: {exc}") from None
    except MemoryError:
        raise InitImageError(f"init_image {where}: out of memory decoding it") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for corrupt files
        # PIL names the in-memory buffer with its address ("<_io.BytesIO object at 0x...>"): drop
        # it, so that the same bad file gives the same error record in every run.
        detail = re.sub(r"<[^<>]* object at 0x[0-9a-f]+>", "the file", str(exc))[:200]
        raise InitImageError(f"init_image {where}: not a readable image ({type(exc).__name__}: {detail})") from None
    return InitImage(image, hashlib.sha256(data).hexdigest())


class InitImageCache:
    """Recently read init images by URI, at most `capacity` of them and `max_bytes` of decoded
    pixels (least recently used goes first). Failures are not cached."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, max_bytes: int | None = None):
        self.capacity = capacity
        self.max_bytes = max_bytes or _env_int("SDGEN_INIT_CACHE_BYTES", DEFAULT_CACHE_BYTES)
        self._images: OrderedDict[str, InitImage] = OrderedDict()
        self.nbytes = 0

    def get(self, uri: str) -> InitImage | None:
        cached = self._images.get(uri)
        if cached is not None:
            self._images.move_to_end(uri)
        return cached

    def load(self, uri: str) -> InitImage:
        cached = self.get(uri)
        if cached is not None:
            return cached
        return self.put(uri, read_init_image(uri))

    def put(self, uri: str, loaded: InitImage) -> InitImage:
        """Keep `loaded` (read by the caller) as `uri`'s image; returns it."""
        if loaded.nbytes <= self.max_bytes:
            self._images[uri] = loaded
            self.nbytes += loaded.nbytes
            while len(self._images) > self.capacity or self.nbytes > self.max_bytes:
                _, old = self._images.popitem(last=False)
                self.nbytes -= old.nbytes
        return loaded

    def __len__(self) -> int:
        return len(self._images)


class InitImagePrefetch:
    """Reads and decodes init images one batch (`batch_size` rows of the stream) ahead, on a
    background thread, so that the model never waits on storage: `submit(uris)` starts a batch's
    reads, its future gives uri -> (InitImage or InitImageError, seconds). The images a batch
    misses in the cache are read in parallel (`readers` at once: each is mostly a storage round trip); the cache is only
    used from the background thread. At most the batch being generated and the one after it are
    held (plus the bounded cache). Any other exception (a transient storage fault) is raised by
    the future: the shard fails."""

    def __init__(self, cache: InitImageCache, readers: int = 4):
        self.cache = cache
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="init-images")
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="init-read")

    @staticmethod
    def _read(uri: str) -> tuple[InitImage | InitImageError, float]:
        started = time.perf_counter()
        try:
            result: InitImage | InitImageError = read_init_image(uri)
        except InitImageError as exc:
            result = exc
        return result, time.perf_counter() - started

    def _load(self, uris: list[str]) -> dict[str, tuple[InitImage | InitImageError, float]]:
        loaded: dict[str, tuple[InitImage | InitImageError, float]] = {}
        misses = []
        for uri in uris:
            started = time.perf_counter()
            cached = self.cache.get(uri)
            if cached is None:
                misses.append(uri)
            else:
                loaded[uri] = (cached, time.perf_counter() - started)
        for uri, (result, seconds) in zip(misses, self._readers.map(self._read, misses)):
            if isinstance(result, InitImage):
                result = self.cache.put(uri, result)
            loaded[uri] = (result, seconds)
        return {uri: loaded[uri] for uri in uris}  # in the batch's order

    def submit(self, uris: Iterable[str | None]) -> Future[dict[str, tuple[InitImage | InitImageError, float]]]:
        """Start reading the distinct URIs among `uris` (None: a txt2img row), in order."""
        return self._thread.submit(self._load, list(dict.fromkeys(u for u in uris if u)))

    def close(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)
        self._readers.shutdown(wait=True)


__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_CAPACITY",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "InitImage",
    "InitImageCache",
    "InitImageError",
    "InitImagePrefetch",
    "decode_init_image",
    "read_init_image",
]
