"""jobs/storage.py: local folders and S3 (moto server on loopback) behind one interface."""

from __future__ import annotations

import os

import pytest

from jobs.storage import (
    LocalStorage,
    S3Storage,
    StorageError,
    expand_uris,
    open_storage,
    read_uri,
    redact_uri,
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
    assert redact_uri("s3://AKIA:secret@bucket/key?X-Amz-Signature=abc") == "s3://bucket/key"
    assert redact_uri("https://user:pw@host/p?q=1#f") == "https://host/p"
    assert redact_uri("/plain/path") == "/plain/path"


def test_s3_errors_do_not_leak_credentials(s3, monkeypatch):
    bucket, _, env = s3
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(FileNotFoundError) as info:
        read_uri(f"s3://{bucket}/missing")
    assert env["AWS_SECRET_ACCESS_KEY"] not in str(info.value)
