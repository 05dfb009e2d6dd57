"""Init images (img2img): read, decoded and kept in a small LRU cache by the worker.

Manifests often reuse one init image for many rows, so a worker keeps the last `capacity` decoded
images by URI. A problem with an init image is an `InitImageError` whose message names the image
(redacted) and becomes the row's error record; it never fails the shard.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image

from .storage import StorageError, read_uri, redact_uri

DEFAULT_CAPACITY = 64


class InitImageError(Exception):
    """An init image that cannot be used (missing, unreadable, not an image)."""


@dataclass(frozen=True)
class InitImage:
    image: Image.Image  # RGB, as the pipeline takes it
    sha256: str  # of the file's bytes: what the record holds and reproduce checks


def decode_init_image(data: bytes) -> Image.Image:
    """An init image file's bytes -> an RGB image (the job's and reproduce's one decoding)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def read_init_image(uri: str) -> InitImage:
    """Read and decode the init image at `uri`; InitImageError naming it otherwise."""
    try:
        data = read_uri(uri)
    except FileNotFoundError:
        raise InitImageError(f"init_image not found: {redact_uri(uri)}") from None
    except (StorageError, OSError) as exc:
        raise InitImageError(f"init_image {redact_uri(uri)}: cannot read ({exc})") from None
    try:
        image = decode_init_image(data)
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for corrupt files
        raise InitImageError(
            f"init_image {redact_uri(uri)}: not a readable image ({type(exc).__name__}: {exc})"
        ) from None
    return InitImage(image, hashlib.sha256(data).hexdigest())


class InitImageCache:
    """The last `capacity` init images read, by URI (least recently used goes first). Failures
    are not cached: a row naming a missing image tries again."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self._images: OrderedDict[str, InitImage] = OrderedDict()

    def load(self, uri: str) -> InitImage:
        cached = self._images.get(uri)
        if cached is not None:
            self._images.move_to_end(uri)
            return cached
        loaded = read_init_image(uri)
        self._images[uri] = loaded
        if len(self._images) > self.capacity:
            self._images.popitem(last=False)
        return loaded

    def __len__(self) -> int:
        return len(self._images)


__all__ = ["DEFAULT_CAPACITY", "InitImage", "InitImageCache", "InitImageError", "decode_init_image", "read_init_image"]
