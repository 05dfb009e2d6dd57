"""jobs/weights.py: s3:// weights are downloaded once per machine into a keyed cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.weights import download_s3_weights, resolve_weights


def test_builtin_and_local_pass_through(tmp_path):
    assert resolve_weights("builtin:tiny") == "builtin:tiny"
    file = tmp_path / "m.safetensors"
    file.write_bytes(b"x")
    assert resolve_weights(str(file)) == str(file)
    with pytest.raises(FileNotFoundError, match="weights not found"):
        resolve_weights(str(tmp_path / "none.safetensors"))


def test_single_file_is_cached_by_uri_and_etag(s3, tmp_path):
    bucket, client, _ = s3
    client.put_object(Bucket=bucket, Key="models/m.safetensors", Body=b"weights-v1")
    first = download_s3_weights(f"s3://{bucket}/models/m.safetensors", root=tmp_path)
    assert Path(first).name == "m.safetensors" and Path(first).read_bytes() == b"weights-v1"
    mtime = Path(first).stat().st_mtime_ns
    again = download_s3_weights(f"s3://{bucket}/models/m.safetensors", root=tmp_path)
    assert again == first and Path(again).stat().st_mtime_ns == mtime  # not downloaded twice
    client.put_object(Bucket=bucket, Key="models/m.safetensors", Body=b"weights-v2")
    changed = download_s3_weights(f"s3://{bucket}/models/m.safetensors", root=tmp_path)
    assert changed != first and Path(changed).read_bytes() == b"weights-v2"


def test_diffusers_folder_prefix(s3, tmp_path):
    bucket, client, _ = s3
    for key in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json"):
        client.put_object(Bucket=bucket, Key=f"models/sd/{key}", Body=key.encode())
    folder = Path(download_s3_weights(f"s3://{bucket}/models/sd", root=tmp_path))
    assert folder.name == "sd"
    assert (folder / "unet" / "config.json").read_bytes() == b"unet/config.json"
    assert (folder / "vae" / "config.json").exists()


def test_diffusers_folder_at_a_buckets_root(s3, tmp_path):
    """s3://bucket names a folder too: every key used to lose its first character (unet/ -> net/)."""
    _, client, _ = s3
    client.create_bucket(Bucket="root-model")
    for key in ("model_index.json", "unet/config.json", "vae/config.json"):
        client.put_object(Bucket="root-model", Key=key, Body=key.encode())
    folder = Path(download_s3_weights("s3://root-model", root=tmp_path))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["model_index.json", "unet/config.json", "vae/config.json"]
    assert (folder / "unet" / "config.json").read_bytes() == b"unet/config.json"
    # With or without a trailing "/", the same URI: one download.
    assert download_s3_weights("s3://root-model/", root=tmp_path) == str(folder)


def test_missing_s3_weights(s3, tmp_path):
    bucket, _, _ = s3
    with pytest.raises(FileNotFoundError, match="no such object or prefix"):
        download_s3_weights(f"s3://{bucket}/models/none.safetensors", root=tmp_path)


def test_s3_weights_load_in_sdcore(s3, tmp_path, tiny_pipe):
    """A single-file checkpoint on S3 loads with the same fingerprint as its source."""
    import sdcore
    from sdcore.weights import export_single_file

    bucket, client, _ = s3
    file = tmp_path / "tiny.safetensors"
    export_single_file(tiny_pipe, file)
    client.upload_file(str(file), bucket, "models/tiny.safetensors")
    local = download_s3_weights(f"s3://{bucket}/models/tiny.safetensors", root=tmp_path / "cache")
    assert sdcore.load_pipeline(local).fingerprint == tiny_pipe.fingerprint
