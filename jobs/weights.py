"""Weights locations: `builtin:NAME`, local paths, and s3:// downloaded once into a local cache.

An s3:// URI names one object (`.safetensors`/`.ckpt`) or a prefix holding a diffusers folder.
The cache entry is keyed by the redacted URI plus the objects' ETags and sizes, so a changed
object is downloaded again; concurrent workers on one machine take a file lock and download it
once. Each object is streamed to its file and retried on transient faults like every storage
call (`faults.retrying`). The cache lives in `$SDGEN_CACHE_DIR`, else `$XDG_CACHE_HOME/sdgen`, else `~/.cache/sdgen`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from pathlib import Path

from sdcore import rules

from .storage import S3Storage, is_s3, local_path, redact_uri, s3_objects, split_s3

COMPLETE = ".complete"


def cache_dir() -> Path:
    if os.environ.get("SDGEN_CACHE_DIR"):
        return Path(os.environ["SDGEN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdgen"


def resolve_weights(weights: str) -> str:
    """A value `sdcore.load_pipeline` accepts: builtin names and local paths as they are, s3://
    downloaded (once) into the cache."""
    if weights.startswith("builtin:"):
        return weights
    if is_s3(weights):
        return download_s3_weights(weights)
    path = Path(local_path(weights)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    return str(path)


def weights_here_problem(weights: str) -> str | None:
    """What makes `weights` unusable on this machine, found without loading or downloading them:
    what `sdcore.rules.weights_problem` sees on its face, or a local path (read as
    `resolve_weights` reads it) that is not here. builtin: and s3:// are checked where they load."""
    problem = rules.weights_problem(weights)
    if problem or weights.startswith("builtin:") or is_s3(weights):
        return problem
    path = Path(local_path(weights)).expanduser()
    return None if path.exists() else f"not found: {path}"


def download_s3_weights(uri: str, root: Path | None = None) -> str:
    objects = s3_objects(uri)
    bucket, key = split_s3(uri)
    single = len(objects) == 1 and objects[0]["key"] == key
    prefix = key.rstrip("/")  # "" for a folder at the bucket's root
    # The identity leaves out a trailing "/": s3://b/model and s3://b/model/ share one download.
    identity = redact_uri(uri).rstrip("/") + "\n" + "\n".join(f"{o['key']} {o['size']} {o['etag']}" for o in objects)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:20]
    root = (root or cache_dir()) / "weights"
    root.mkdir(parents=True, exist_ok=True)
    entry = root / digest
    name = key.rstrip("/").rsplit("/", 1)[-1] or bucket
    target = entry / name
    with open(root / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (entry / COMPLETE).exists():
            return str(target)
        if entry.exists():
            shutil.rmtree(entry)
        staging = root / f".{digest}.{uuid.uuid4().hex[:8]}"
        bucket_storage = S3Storage(f"s3://{bucket}")  # its downloads are retried (faults.retrying)
        try:
            for obj in objects:
                if single:
                    dest = staging / name
                else:
                    relative = obj["key"][len(prefix) + 1 :] if prefix else obj["key"]
                    if not relative or relative.endswith("/"):
                        continue
                    dest = staging / name / relative
                dest.parent.mkdir(parents=True, exist_ok=True)
                bucket_storage.download(obj["key"], dest)
            (staging / COMPLETE).write_text(identity)
            os.replace(staging, entry)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return str(target)
