"""jobs/storage.py: local folders and S3 (moto server on loopback) behind one interface."""

from __future__ import annotations

import os

import pytest

from jobs.storage import (
    LocalStorage,
    S3Storage,
    StorageError,
    expand_uris,
    local_path,
    open_storage,
    read_uri,
    redact_uri,
    split_s3,
    uri_exists,
    write_uri,
)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    bucket, _, _ = request.getfixturevalue("s3")
    return open_storage(f"s3://{bucket}/some/prefix")


def test_write_read_list_delete(storage):
    assert storage.list() == []
    assert storage.write("records/a.parquet", b"one")
    assert storage.write("images/s/x.png", b"png")
    assert storage.read("records/a.parquet") == b"one"
    assert storage.exists("images/s/x.png") and not storage.exists("images/s/y.png")
    assert storage.list() == ["images/s/x.png", "records/a.parquet"]
    assert storage.list("records/") == ["records/a.parquet"]
    assert storage.write("records/a.parquet", b"two")  # plain writes replace
    assert storage.read("records/a.parquet") == b"two"
    storage.delete(["records/a.parquet", "never/there"])
    assert storage.list() == ["images/s/x.png"]
    with pytest.raises(FileNotFoundError) as info:
        storage.read("records/a.parquet")
    assert "records/a.parquet" in str(info.value)


def test_exclusive_write_never_replaces(storage):
    assert storage.write("records/s.parquet", b"first", exclusive=True) is True
    assert storage.write("records/s.parquet", b"second", exclusive=True) is False
    assert storage.read("records/s.parquet") == b"first"


def test_write_file_commits_a_local_file_whole(storage, tmp_path):
    source = tmp_path / "big.bin"
    data = bytes(range(256)) * 40_000  # 10 MB: a multipart upload on S3 (8 MB parts)
    source.write_bytes(data)
    storage.write_file("meta/metadata.jsonl", str(source))
    assert storage.read("meta/metadata.jsonl") == data and storage.list("meta/") == ["meta/metadata.jsonl"]
    source.write_bytes(b"replaced")
    storage.write_file("meta/metadata.jsonl", str(source))
    assert storage.read("meta/metadata.jsonl") == b"replaced"


def test_url_names_the_object(storage):
    url = storage.url("records/a.parquet")
    assert url.endswith("records/a.parquet")
    assert url.startswith("s3://") == isinstance(storage, S3Storage)


def test_local_commit_leaves_no_temp_files(tmp_path):
    storage = LocalStorage(str(tmp_path))
    storage.write("a/b.bin", b"x" * 1000)
    storage.write("a/b.bin", b"y", exclusive=True)
    assert sorted(os.listdir(tmp_path / "a")) == ["b.bin"]
    with pytest.raises(StorageError):
        storage.read("../escape")


def test_local_delete_prunes_empty_folders(tmp_path):
    storage = LocalStorage(str(tmp_path))
    storage.write("partial/shard-00000/a.parquet", b"x")
    storage.delete(["partial/shard-00000/a.parquet"])
    assert not (tmp_path / "partial").exists()


def test_single_uris_and_globs_local(tmp_path):
    write_uri(str(tmp_path / "m" / "a.parquet"), b"a")
    write_uri(f"file://{tmp_path}/m/b.parquet", b"b")
    assert read_uri(str(tmp_path / "m" / "b.parquet")) == b"b"
    assert uri_exists(str(tmp_path / "m" / "a.parquet"))
    assert expand_uris(str(tmp_path / "m" / "*.parquet")) == [
        str(tmp_path / "m" / "a.parquet"),
        str(tmp_path / "m" / "b.parquet"),
    ]
    assert expand_uris(str(tmp_path / "m" / "a.parquet")) == [str(tmp_path / "m" / "a.parquet")]


def test_single_uris_and_globs_s3(s3):
    bucket, client, _ = s3
    for key in ("m/part-1.parquet", "m/part-0.parquet", "m/other.txt", "n/part-2.parquet"):
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    assert expand_uris(f"s3://{bucket}/m/part-*.parquet") == [
        f"s3://{bucket}/m/part-0.parquet",
        f"s3://{bucket}/m/part-1.parquet",
    ]
    assert read_uri(f"s3://{bucket}/m/other.txt") == b"m/other.txt"
    assert not uri_exists(f"s3://{bucket}/m/nothing")
    with pytest.raises(FileNotFoundError, match="no such object"):
        read_uri(f"s3://{bucket}/m/nothing")
    with pytest.raises(FileNotFoundError, match="no such bucket"):
        read_uri("s3://no-such-bucket-here/x")


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        read_uri("https://example.com/a.png")


def test_redact_uri_strips_credentials():
    # An S3 key is kept whole (`?` is part of it): only the secret value after it goes.
    assert redact_uri("s3://AKIA:secret@bucket/key?X-Amz-Signature=abc") == "s3://bucket/key?X-Amz-Signature=REDACTED"
    assert redact_uri("https://user:pw@host/p?q=1#f") == "https://host/p"
    assert redact_uri("/plain/path") == "/plain/path"


def test_split_s3_takes_the_key_verbatim():
    """`#` and `?` are legal in S3 keys (the AWS CLI reads them as part of the key): a URI
    parsed as a URL lost them, and `s3://bkt/exp#1` wrote under `exp/`."""
    assert split_s3("s3://bkt/exp#1") == ("bkt", "exp#1")
    assert split_s3("s3://bkt/exp#2/") == ("bkt", "exp#2/")
    assert split_s3("s3://bkt3/m#1.parquet") == ("bkt3", "m#1.parquet")
    assert split_s3("s3://bkt/init/a#1?v=2&x.png") == ("bkt", "init/a#1?v=2&x.png")
    assert split_s3("s3://bkt/a%20b c.png") == ("bkt", "a%20b c.png")  # no escapes in S3 URIs
    assert split_s3("s3://AKIA:Se/cret@bkt/a#b?c") == ("bkt", "a#b?c")  # userinfo dropped, key kept
    assert split_s3("s3://bkt") == ("bkt", "") and split_s3("s3://bkt/") == ("bkt", "")
    for bad in ("s3://", "s3:///key", "s3://bkt?x/key", "https://bkt/key"):
        with pytest.raises(StorageError, match="not an s3://bucket/key URI"):
            split_s3(bad)
    # Shown or stored, the URI keeps its key too (records' init_image_uri is read back by reproduce).
    assert redact_uri("s3://AKIA:secret@bkt/init/a#1?v=2.png") == "s3://bkt/init/a#1?v=2.png"
    assert redact_uri("file:///data/a#1?v=2.png") == "file:///data/a#1?v=2.png"


def test_hash_and_question_mark_in_names_just_work(s3, tmp_path):
    bucket, client, _ = s3
    client.put_object(Bucket=bucket, Key="exp", Body=b"the cut key")
    write_uri(f"s3://{bucket}/exp#1/init/a#1?v=2.png", b"img")
    assert read_uri(f"s3://{bucket}/exp#1/init/a#1?v=2.png") == b"img"
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["exp", "exp#1/init/a#1?v=2.png"]
    assert open_storage(f"s3://{bucket}/exp#1").list() == ["init/a#1?v=2.png"]
    assert open_storage(f"s3://{bucket}/exp#2").list() == []
    assert not uri_exists(f"s3://{bucket}/exp#2")
    assert expand_uris(f"s3://{bucket}/exp#1/init/*.png") == [f"s3://{bucket}/exp#1/init/a#1?v=2.png"]
    # Local names, as plain paths and as file:// URIs (bare, or percent-escaped as as_uri() writes).
    path = tmp_path / "exp#1" / "a#1?v=2.png"
    write_uri(str(path), b"local")
    assert local_path(f"file://{path}") == str(path) == local_path(path.as_uri())
    assert read_uri(f"file://{path}") == read_uri(path.as_uri()) == read_uri(str(path)) == b"local"
    assert open_storage(f"file://{tmp_path}/exp#1").list() == ["a#1?v=2.png"]


def test_s3_errors_do_not_leak_credentials(s3, monkeypatch):
    bucket, _, env = s3
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(FileNotFoundError) as info:
        read_uri(f"s3://{bucket}/missing")
    assert env["AWS_SECRET_ACCESS_KEY"] not in str(info.value)


# --------------------------------------------------------------------------- retries (faults.retrying)


@pytest.fixture
def proxied(s3, moto_endpoint, monkeypatch):
    """An S3Storage reached through the fault proxy: 4 tries, short backoff, 1 s timeouts."""
    from faultproxy import FaultProxy

    from jobs import storage

    bucket, _, _ = s3
    with FaultProxy(moto_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("SDGEN_STORAGE_ATTEMPTS", "4")
        monkeypatch.setenv("SDGEN_STORAGE_BACKOFF_S", "0.01")
        monkeypatch.setenv("SDGEN_STORAGE_BACKOFF_CAP_S", "0.05")
        monkeypatch.setenv("SDGEN_S3_TIMEOUT", "1")
        storage.reset_clients()
        yield open_storage(f"s3://{bucket}/p"), proxy, bucket
    storage.reset_clients()


def _hits(proxy, method: str, path: str) -> int:
    return sum(1 for m, p in proxy.requests if m == method and p.split("?")[0].endswith(path))


def test_transient_faults_are_ridden_through(proxied):
    """Three faults of each transient kind in a row on a write and on a read (4 tries): the
    call succeeds, after exactly four requests."""
    from faultproxy import Rule

    storage, proxy, _ = proxied
    for kind, count in (("500", 3), ("503", 3), ("slowdown", 3), ("reset", 3), ("stall", 1)):
        proxy.add(Rule(kind, method="PUT", path=f"/p/{kind}", count=count, stall_s=2))
        assert storage.write(kind, b"data-" + kind.encode())
        proxy.add(Rule(kind, method="GET", path=f"/p/{kind}", count=count, stall_s=2))
        assert storage.read(kind) == b"data-" + kind.encode()
        assert _hits(proxy, "PUT", f"/p/{kind}") == count + 1, kind
        assert _hits(proxy, "GET", f"/p/{kind}") == count + 1, kind
    storage.write("listed/a", b"a")
    proxy.add(Rule("503", method="GET", path="list-type=2", count=2))  # a listing too
    assert storage.list("listed/") == ["listed/a"]
    assert sum(1 for m, p in proxy.requests if m == "GET" and "list-type=2" in p) == 3


def test_a_fault_that_outlasts_the_tries_is_a_transient_storage_error(proxied):
    from faultproxy import Rule

    from jobs.storage import TransientStorageError

    storage, proxy, bucket = proxied
    proxy.add(Rule("503", method="GET", path="/p/gone"))
    with pytest.raises(TransientStorageError, match=r"p/gone.*gave up after 4 tries"):
        storage.read("gone")
    assert _hits(proxy, "GET", "/p/gone") == 4


def test_permanent_faults_are_not_retried(proxied):
    from faultproxy import Rule

    from jobs.storage import TooLargeError, TransientStorageError

    storage, proxy, bucket = proxied
    storage.write("secret", b"x")
    storage.write("big", b"0123456789")
    proxy.add(Rule("denied", method="GET", path="/p/secret"))
    with pytest.raises(StorageError, match="AccessDenied") as info:
        storage.read("secret")
    assert not isinstance(info.value, TransientStorageError)
    with pytest.raises(FileNotFoundError):
        storage.read("missing")
    with pytest.raises(TooLargeError):
        storage.read("big", max_bytes=4)
    with pytest.raises(FileNotFoundError, match="no such bucket"):
        open_storage("s3://no-such-bucket-sdgen/p").read("x")
    for path in ("/p/secret", "/p/missing", "/p/big"):
        assert _hits(proxy, "GET", path) == 1, path  # once: a permanent fault is final


def test_backoff_settings_are_bounded_and_checked(monkeypatch):
    import random

    from jobs.faults import Backoff, SettingError, retrying

    monkeypatch.setenv("SDGEN_STORAGE_ATTEMPTS", "5")
    monkeypatch.setenv("SDGEN_STORAGE_BACKOFF_S", "0.25")
    monkeypatch.setenv("SDGEN_STORAGE_BACKOFF_CAP_S", "1")
    backoff = Backoff.from_env()
    assert backoff == Backoff(attempts=5, base_s=0.25, cap_s=1.0)
    rng = random.Random(0)
    for tries, bound in ((1, 0.25), (2, 0.5), (3, 1.0), (8, 1.0)):
        delays = [backoff.delay(tries, rng) for _ in range(200)]
        assert all(0 <= d <= bound for d in delays) and max(delays) > bound * 0.8  # jitter over [0, bound]
    slept: list[float] = []
    calls = []

    def flaky():
        calls.append(1)
        raise ConnectionResetError("reset by peer")

    from jobs.storage import TransientStorageError

    with pytest.raises(TransientStorageError, match="gave up after 5 tries"):
        retrying(flaky, "thing", sleep=slept.append)
    assert len(calls) == 5 and len(slept) == 4
    for name, value in (("SDGEN_STORAGE_ATTEMPTS", "0"), ("SDGEN_STORAGE_ATTEMPTS", "two"),
                        ("SDGEN_STORAGE_BACKOFF_S", "-1"), ("SDGEN_STORAGE_BACKOFF_CAP_S", "nan")):  # fmt: skip
        monkeypatch.setenv(name, value)
        with pytest.raises(SettingError, match=rf"\${name}: expected"):
            Backoff.from_env()
        monkeypatch.delenv(name)
