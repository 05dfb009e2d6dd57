"""Local folders and S3 behind one small interface.

A `Storage` is a folder-like root (a local directory or `s3://bucket/prefix`) holding objects
named by `/`-separated keys. Every write is whole: locally a temp file in the same directory,
fsync'd, then renamed over the final name; on S3 one PUT of the complete bytes. A write with
`exclusive=True` never replaces an existing object (local: `link(2)` of the temp file; S3:
`If-None-Match: *`) and reports whether it won. `write_note` is the same whole write without the
local fsync, for notes that only need to outlive the process that writes them.

S3 goes through boto3 with its standard configuration: the credentials chain, `AWS_ENDPOINT_URL`
(or `AWS_ENDPOINT_URL_S3`), the region settings. Credentials never appear in anything this
module returns or raises: `redact_uri` strips userinfo (and secret parameters) from URIs.

An S3 URI carries its key verbatim, as the AWS CLI reads it: `s3://bkt/exp#1?v` is the key
`exp#1?v` of bucket `bkt` (`#` and `?` are legal in keys, not a fragment or a query), and a
`file://` URI's path likewise runs to its end (percent-escapes decoded). `split_s3` and
`local_path` parse the URI as given; `redact_uri` is only for showing or storing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import glob as globlib
import hashlib
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

from .redact import redact_params, redact_text, strip_userinfo, without_userinfo

TEMP_MARK = ".tmp-"


class StorageError(RuntimeError):
    """An object could not be read or written (message names the redacted URI)."""


class TransientStorageError(StorageError):
    """A fault worth trying again later (5xx, throttling, reset, timeout); raised to callers once
    it outlasted `faults.retrying`'s tries: never a row's permanent result (see `faults.py`)."""


class TooLargeError(StorageError):
    """An object over the size cap the caller gave (a permanent fault)."""


# An S3 object's Content-Type, from its name: a browser shows an image or a report page served
# from the bucket instead of downloading it (the report links to the images).
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".json": "application/json",
    ".jsonl": "application/jsonl",
    ".parquet": "application/vnd.apache.parquet",
    ".tar": "application/x-tar",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
}


def content_type(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    suffix = name[name.rfind(".") :].lower() if "." in name else ""
    return CONTENT_TYPES.get(suffix, "application/octet-stream")


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def redact_uri(uri: str) -> str:
    """`uri` as it may be shown or stored: without userinfo; plain paths are returned unchanged.

    An s3:// or file:// URI keeps the rest verbatim (its key or path may hold `#` and `?`), only
    the values of secret-looking parameters after a `?` replaced (a presigned query pasted onto
    it); any other URI (http...) loses its query string and fragment. The userinfo goes first, as
    text (`redact.strip_userinfo`): a secret key holding a `/` (half of AWS's do) ends urlsplit's
    host there and would be kept as the path."""
    uri = strip_userinfo(str(uri))
    if "://" not in uri:
        return uri
    if uri.startswith(("s3://", "file://")):
        head, mark, tail = uri.partition("?")
        return head + mark + redact_params(tail)
    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def local_path(uri: str) -> str:
    """A local path for `uri` (plain path or file://); raises for other schemes. A file:// URI's
    path runs to its end: a `#` or `?` there is part of the file name, not a fragment or query."""
    uri = str(uri)
    if uri.startswith("file://"):
        host, slash, path = uri[len("file://") :].partition("/")
        if host not in ("", "localhost"):
            raise StorageError(f"file:// URI with a host is not supported: {redact_uri(uri)}")
        return unquote(slash + path)  # percent-encoded, as Path.as_uri() writes spaces, `#`, `?`, non-ASCII
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {redact_uri(uri)!r}: expected a local path, file:// or s3://")
    return uri


# Bucket names: lowercase letters, digits, `.` and `-` (older buckets also `_` and capitals).
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key). The key is everything after `s3://bucket/`, verbatim
    (`#`, `?`, `%`, spaces and all: S3 URIs carry no query, fragment or escapes), less leading
    `/`s; userinfo before the bucket (`s3://KEY:SECRET@bucket/...`) is dropped."""
    text = without_userinfo(str(uri))
    bucket, _, key = text[len("s3://") :].partition("/")
    if not text.startswith("s3://") or not _BUCKET.fullmatch(bucket):
        raise StorageError(f"not an s3://bucket/key URI: {redact_uri(uri)!r}")
    return bucket, key.lstrip("/")


def join_uri(base: str, relative: str) -> str:
    """`relative` resolved against the folder `base` (a local folder or an s3:// prefix)."""
    if is_s3(base):
        return base.rstrip("/") + "/" + relative.lstrip("/")
    return os.path.join(base, relative)


def parent_uri(uri: str) -> str:
    if is_s3(uri):
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(local_path(uri)))


# ---------------------------------------------------------------------------------------------
# boto3


_CLIENT_LOCK = threading.Lock()
_CLIENTS: dict[int, object] = {}


def s3_client():
    """One boto3 S3 client per process, from boto3's standard configuration."""
    pid = os.getpid()
    with _CLIENT_LOCK:
        client = _CLIENTS.get(pid)
        if client is None:
            import boto3
            from botocore.config import Config

            # Transient faults (5xx, SlowDown, throttling, resets, timeouts) are retried by
            # `faults.retrying` around every call, not by boto3 (one try each, so the count is
            # exact); a stalled endpoint times out.
            config = Config(
                retries={"mode": "standard", "total_max_attempts": 1},
                connect_timeout=float(os.environ.get("SDGEN_S3_TIMEOUT", 20)),
                read_timeout=float(os.environ.get("SDGEN_S3_TIMEOUT", 20)),
            )
            client = boto3.session.Session().client("s3", config=config)
            _CLIENTS.clear()
            _CLIENTS[pid] = client
        return client


def reset_clients() -> None:
    """Forget the cached client (after changing AWS_* settings in this process)."""
    with _CLIENT_LOCK:
        _CLIENTS.clear()


def _s3_error(exc: Exception, uri: str) -> Exception:
    """A boto3 exception as FileNotFoundError / StorageError naming the redacted URI."""
    from botocore.exceptions import ClientError, NoCredentialsError

    from .faults import is_transient

    if isinstance(exc, (StorageError, FileNotFoundError)):
        return exc
    if is_transient(exc):
        return TransientStorageError(f"{redact_uri(uri)}: transient S3 fault: {_describe(exc)}")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{redact_uri(uri)}: no AWS credentials found (boto3 credential chain)")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return FileNotFoundError(f"{redact_uri(uri)}: no such object")
        if code == "NoSuchBucket":
            return FileNotFoundError(f"{redact_uri(uri)}: no such bucket")
        message = redact_text(exc.response.get("Error", {}).get("Message", ""))
        return StorageError(f"{redact_uri(uri)}: S3 error {code} {message}".rstrip())
    return StorageError(f"{redact_uri(uri)}: {_describe(exc)}")


def _describe(exc: Exception) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return redact_text(f"S3 error {error.get('Code', '')} {error.get('Message', '')}".rstrip())
    return f"{type(exc).__name__}: {redact_text(str(exc))[:300]}"


# ---------------------------------------------------------------------------------------------
# The interface


class Storage:
    """A folder of objects. Keys are relative, `/`-separated.

    Every public call is retried on transient faults (`faults.retrying`: bounded exponential
    backoff with jitter, `$SDGEN_STORAGE_ATTEMPTS` tries); a permanent fault (missing key or
    bucket, access denied, over a cap, not a regular file) is raised at once. Subclasses
    implement the underscored methods, one try each."""

    uri: str  # redacted, for messages and records

    def url(self, key: str) -> str:
        raise NotImplementedError

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; FileNotFoundError when absent. With `max_bytes`, only a regular
        file or an object is read (a FIFO or device is refused, not waited on), and one larger
        than `max_bytes` is a TooLargeError."""
        return self._retrying(lambda: self._read(key, max_bytes), key)

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and its tag (S3: the ETag; local: the sha256 of the bytes), for a
        later `write_tagged(..., if_match=tag)`."""
        return self._retrying(lambda: self._read_tagged(key), key)

    def write(self, key: str, data: bytes, *, exclusive: bool = False) -> bool:
        """Commit `data` whole under `key`. With `exclusive`, returns False (and writes nothing)
        when the key already exists; otherwise always True."""
        return self.write_tagged(key, data, exclusive=exclusive) is not None

    def write_note(self, key: str, data: bytes) -> None:
        """`write` for a note that must outlive the process writing it, not the machine (the
        worker's in-flight note): whole and atomically replaced as every write, but a local file
        is not fsync'd — the page cache outlives a process, and an fsync beside a job's image
        writes waits for their data too (on ext4, one journal commit). S3: a plain `write`."""
        self.write(key, data)

    def write_tagged(
        self, key: str, data: bytes, *, exclusive: bool = False, if_match: str | None = None
    ) -> str | None:
        """`write`, conditionally: with `exclusive` only if the key is absent (S3
        `If-None-Match: *`), with `if_match` only if the object there now has that tag (S3
        `If-Match`: a compare-and-swap). Returns the new object's tag, or None when the condition
        did not hold (nothing written)."""
        if exclusive and if_match is not None:
            raise ValueError("write_tagged: exclusive and if_match exclude each other")
        return self._retrying(lambda: self._write(key, data, exclusive, if_match), key)

    def write_file(self, key: str, path: str) -> None:
        """Commit the local file `path` whole under `key`, streamed (never held in memory)."""
        self._retrying(lambda: self._write_file(key, path), key)

    def exists(self, key: str) -> bool:
        return self._retrying(lambda: self._exists(key), key)

    def list(self, prefix: str = "") -> list[str]:
        """All keys under `prefix` (recursively), sorted; temp files are never listed."""
        return self._retrying(lambda: self._list(prefix), prefix)

    def delete(self, keys: Iterable[str]) -> None:
        """Remove keys that exist; missing keys are ignored."""
        keys = list(keys)
        if keys:
            self._retrying(lambda: self._delete(keys), keys[0])

    def delete_tree(self, prefix: str) -> None:
        """Remove every object under `prefix` (a folder-like prefix ending in `/`); locally, the
        temp files of writes that a dead process never finished go too."""
        self.delete(self.list(prefix))

    def delete_tagged(self, key: str, if_match: str) -> bool:
        """Remove `key` only if the object there has the tag `if_match` (S3 `If-Match`); False
        when it is absent or another object is there (nothing removed)."""
        return self._retrying(lambda: self._delete_if(key, if_match), key)

    def _retrying(self, call, key: str):
        from .faults import retrying

        try:
            what = self.url(key) if key else self.uri
        except StorageError:
            what = self.uri
        return retrying(call, what)

    # One try each, in the subclasses.
    def _read(self, key: str, max_bytes: int | None) -> bytes:
        raise NotImplementedError

    def _read_tagged(self, key: str) -> tuple[bytes, str]:
        raise NotImplementedError

    def _write(self, key: str, data: bytes, exclusive: bool, if_match: str | None) -> str | None:
        raise NotImplementedError

    def _exists(self, key: str) -> bool:
        raise NotImplementedError

    def _list(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def _delete(self, keys: list[str]) -> None:
        raise NotImplementedError

    def _delete_if(self, key: str, if_match: str) -> bool:
        raise NotImplementedError


def content_tag(data: bytes) -> str:
    """A local object's tag: the sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


class LocalStorage(Storage):
    def __init__(self, root: str):
        self.root = Path(local_path(root)).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        parts = [p for p in key.split("/") if p]
        if key.startswith("/") or ".." in parts:
            raise StorageError(f"key {key!r} escapes {self.uri}")
        return self.root.joinpath(*parts)

    def url(self, key: str) -> str:
        return str(self._path(key))

    def _read(self, key: str, max_bytes: int | None) -> bytes:
        try:
            if max_bytes is None:
                return self._path(key).read_bytes()
            return _read_regular_file(self._path(key), max_bytes)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url(key)}: no such file") from None
        except IsADirectoryError:
            raise StorageError(f"{self.url(key)}: is a directory") from None

    def _read_tagged(self, key: str) -> tuple[bytes, str]:
        data = self._read(key, None)
        return data, content_tag(data)

    def write_note(self, key: str, data: bytes) -> None:
        self._retrying(lambda: self._write(key, data, False, None, sync=False), key)

    def _write(self, key: str, data: bytes, exclusive: bool, if_match: str | None, sync: bool = True) -> str | None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp(path)
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                if sync:
                    os.fsync(handle.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)  # atomic, and fails if `path` exists
                except FileExistsError:
                    return None
            elif if_match is not None:
                if not self._swap(path, tmp, if_match):
                    return None
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return content_tag(data)

    def _write_file(self, key: str, path: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp(target)
        try:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _temp(self, path: Path) -> Path:
        return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def _swap(self, path: Path, tmp: Path | None, if_match: str) -> bool:
        """Put `tmp` at `path` (None: remove `path`) only if `path` holds the bytes tagged
        `if_match`. Conditional changes in one folder take turns on an exclusive `flock` of the
        folder, so a check and its change are one step; the file itself is replaced with
        `rename(2)` and is never absent meanwhile, so exclusive creates (`link(2)`, no lock)
        cannot slip in. (Across hosts this needs a file system whose flock spans them.)"""
        try:
            folder = os.open(path.parent, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                return False
            if content_tag(current) != if_match:
                return False
            if tmp is None:
                path.unlink()
            else:
                os.replace(tmp, path)
            return True
        finally:
            os.close(folder)  # releases the lock

    def _delete_if(self, key: str, if_match: str) -> bool:
        return self._swap(self._path(key), None, if_match)

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        keys = []
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                if TEMP_MARK in name and name.startswith("."):
                    continue
                keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def delete_tree(self, prefix: str) -> None:
        base = self._path(prefix)
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                if TEMP_MARK in name and name.startswith("."):  # a dead writer's (listing skips them)
                    Path(dirpath, name).unlink(missing_ok=True)
        super().delete_tree(prefix)
        for dirpath, _, _ in sorted(os.walk(base), key=lambda entry: -len(entry[0])):
            with contextlib.suppress(OSError):  # only empty folders go
                os.rmdir(dirpath)

    def _delete(self, keys: list[str]) -> None:
        parents = set()
        for key in keys:
            path = self._path(key)
            try:
                path.unlink()
                parents.add(path.parent)
            except FileNotFoundError:
                pass
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            while parent != self.root and self.root in parent.parents:
                try:
                    parent.rmdir()  # only empty folders go
                except OSError:
                    break
                parent = parent.parent


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    """At most `max_bytes` of a regular file. Opened with O_NONBLOCK so a FIFO never blocks the
    open; anything but a regular file (FIFO, device, socket, folder) is refused."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise StorageError(f"{path}: {kind}")
        if info.st_size > max_bytes:
            raise TooLargeError(f"{path}: {info.st_size} bytes, over the cap of {max_bytes}")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise TooLargeError(f"{path}: over the cap of {max_bytes} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _precondition_failed(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412


class S3Storage(Storage):
    def __init__(self, uri: str):
        self.bucket, prefix = split_s3(uri)
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _get(self, key: str, max_bytes: int | None) -> tuple[bytes, str]:
        try:
            response = s3_client().get_object(Bucket=self.bucket, Key=self._key(key))
            if max_bytes is not None:
                size = int(response.get("ContentLength") or 0)
                if size > max_bytes:
                    response["Body"].close()
                    raise TooLargeError(f"{self.url(key)}: {size} bytes, over the cap of {max_bytes}")
                data = response["Body"].read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise TooLargeError(f"{self.url(key)}: over the cap of {max_bytes} bytes")
            else:
                data = response["Body"].read()
            return data, str(response.get("ETag", ""))
        except Exception as exc:  # noqa: BLE001 - re-raised with a clean message
            raise _s3_error(exc, self.url(key)) from None

    def _read(self, key: str, max_bytes: int | None) -> bytes:
        return self._get(key, max_bytes)[0]

    def _read_tagged(self, key: str) -> tuple[bytes, str]:
        return self._get(key, None)

    def _write(self, key: str, data: bytes, exclusive: bool, if_match: str | None) -> str | None:
        from botocore.exceptions import ClientError

        kwargs = {"Bucket": self.bucket, "Key": self._key(key), "Body": data, "ContentType": content_type(key)}
        if exclusive:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        conditional = exclusive or if_match is not None
        try:
            response = s3_client().put_object(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if conditional and _precondition_failed(exc):
                return None
            if if_match is not None and code in ("NoSuchKey", "404"):
                return None  # nothing there to match
            if exclusive and code in ("NotImplemented", "501"):
                # An S3-compatible store without conditional writes: check, then put.
                if self._exists(key):
                    return None
                return self._write(key, data, False, None)
            raise _s3_error(exc, self.url(key)) from None
        except Exception as exc:  # noqa: BLE001
            raise _s3_error(exc, self.url(key)) from None
        return str(response.get("ETag", ""))

    def _write_file(self, key: str, path: str) -> None:
        """One upload (multipart when large): the object appears only when it is complete."""
        try:
            s3_client().upload_file(path, self.bucket, self._key(key), ExtraArgs={"ContentType": content_type(key)})
        except Exception as exc:  # noqa: BLE001 - re-raised with a clean message
            raise _s3_error(exc, self.url(key)) from None

    def _exists(self, key: str) -> bool:
        try:
            s3_client().head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as exc:  # noqa: BLE001
            err = _s3_error(exc, self.url(key))
            if isinstance(err, FileNotFoundError):
                return False
            raise err from None

    def _list(self, prefix: str) -> list[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        try:
            paginator = s3_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    keys.append(obj["Key"][strip:])
        except Exception as exc:  # noqa: BLE001
            raise _s3_error(exc, self.url(prefix)) from None
        return sorted(keys)

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            try:
                s3_client().delete_objects(Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True})
            except Exception as exc:  # noqa: BLE001
                raise _s3_error(exc, self.uri) from None

    def _delete_if(self, key: str, if_match: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            s3_client().delete_object(Bucket=self.bucket, Key=self._key(key), IfMatch=if_match)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if _precondition_failed(exc) or code in ("NoSuchKey", "404"):
                return False
            raise _s3_error(exc, self.url(key)) from None
        except Exception as exc:  # noqa: BLE001
            raise _s3_error(exc, self.url(key)) from None
        return True

    def download(self, key: str, dest: Path) -> None:
        """Stream one object into the local file `dest` (written whole: temp + rename), retried
        like every other call (a retry starts the object again)."""

        def once() -> None:
            tmp = dest.with_name(f".{dest.name}{TEMP_MARK}{uuid.uuid4().hex[:8]}")
            try:
                response = s3_client().get_object(Bucket=self.bucket, Key=self._key(key))
                with open(tmp, "wb") as handle:
                    for chunk in response["Body"].iter_chunks(1 << 20):
                        handle.write(chunk)
                os.replace(tmp, dest)
            except Exception as exc:  # noqa: BLE001 - re-raised with a clean message
                raise _s3_error(exc, self.url(key)) from None
            finally:
                if tmp.exists():
                    tmp.unlink()

        self._retrying(once, key)


def open_storage(uri: str) -> Storage:
    """The Storage rooted at `uri` (local folder, file:// or s3://bucket/prefix)."""
    return S3Storage(uri) if is_s3(uri) else LocalStorage(uri)


# ---------------------------------------------------------------------------------------------
# Single objects by URI


def _split(uri: str) -> tuple[Storage, str]:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise StorageError(f"{redact_uri(uri)}: names a folder, not an object")
        return S3Storage(f"s3://{bucket}"), key
    path = Path(local_path(uri)).expanduser().absolute()
    return LocalStorage(str(path.parent)), path.name


def read_uri(uri: str, max_bytes: int | None = None) -> bytes:
    """The bytes of one object (local path, file:// or s3://); see `Storage.read`."""
    storage, key = _split(uri)
    return storage.read(key, max_bytes)


def write_uri(uri: str, data: bytes) -> None:
    storage, key = _split(uri)
    storage.write(key, data)


def uri_exists(uri: str) -> bool:
    storage, key = _split(uri)
    return storage.exists(key)


def s3_objects(uri: str) -> list[dict]:
    """[{key, size, etag}] for the object at `uri`, or every object under it as a folder
    (retried like every storage call)."""
    from .faults import retrying

    return retrying(lambda: _s3_objects(uri), redact_uri(uri))


def _s3_objects(uri: str) -> list[dict]:
    bucket, key = split_s3(uri)
    client = s3_client()
    try:
        head = client.head_object(Bucket=bucket, Key=key) if key and not key.endswith("/") else None
    except Exception as exc:  # noqa: BLE001
        err = _s3_error(exc, uri)
        if not isinstance(err, FileNotFoundError):
            raise err from None
        head = None
    if head is not None:
        return [{"key": key, "size": head["ContentLength"], "etag": head.get("ETag", "")}]
    prefix = key.rstrip("/") + "/" if key else ""
    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                objects.append({"key": obj["Key"], "size": obj["Size"], "etag": obj.get("ETag", "")})
    except Exception as exc:  # noqa: BLE001
        raise _s3_error(exc, uri) from None
    if not objects:
        raise FileNotFoundError(f"{redact_uri(uri)}: no such object or prefix")
    return objects


def expand_uris(pattern: str) -> list[str]:
    """A glob (`*`, `?`, `[...]`) over local paths or S3 keys -> the sorted matching URIs.

    A pattern without glob characters is returned as-is (existence is checked by the reader).
    """
    if not any(ch in pattern for ch in "*?["):
        return [pattern]
    if is_s3(pattern):
        bucket, key = split_s3(pattern)
        literal = key[: min(key.index(ch) for ch in "*?[" if ch in key)]
        storage = S3Storage(f"s3://{bucket}")
        return [f"s3://{bucket}/{k}" for k in storage.list(literal) if fnmatch.fnmatchcase(k, key)]
    return sorted(globlib.glob(local_path(pattern), recursive=True))
