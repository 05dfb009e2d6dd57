"""No secrets: userinfo and signature parameters leave every URI stored or printed."""

from __future__ import annotations

from datetime import datetime, timezone

from jobs.redact import redact_text
from jobs.storage import StorageError, _s3_error


def test_redact_text_strips_userinfo_and_secret_parameters():
    text = (
        'Could not connect to the endpoint URL: "http://AKIA:s3cr3t@10.0.0.1:9000/b/k?X-Amz-Signature=abc123'
        '&X-Amz-Credential=AKIA%2F2024&X-Amz-Security-Token=tok&partNumber=1" token=xyz password=hunter2'
    )
    clean = redact_text(text)
    for secret in ("s3cr3t", "AKIA:", "abc123", "AKIA%2F2024", "=tok", "xyz", "hunter2"):
        assert secret not in clean, (secret, clean)
    assert "10.0.0.1:9000/b/k" in clean and "partNumber=1" in clean


def test_botocore_errors_lose_their_secrets():
    from botocore.exceptions import EndpointConnectionError

    exc = EndpointConnectionError(endpoint_url="http://user:pa55word@127.0.0.1:1/bucket/key?Signature=zzz")
    err = _s3_error(exc, "s3://user:pa55word@bucket/key?X-Amz-Signature=qq")
    assert isinstance(err, StorageError)
    assert "pa55word" not in str(err) and "zzz" not in str(err) and "qq" not in str(err)


def test_records_store_the_manifest_init_image_without_credentials():
    from jobs.record import RecordBuilder

    builder = RecordBuilder(
        sampler="ddim", karras=False, model_weights="builtin:tiny", model_fingerprint="f", dtype="float32",
        device="cpu", device_name="cpu", threads=1, batch_invariant=True, batch_rows=1, torch_version="t",
        sdcore_version="s", sdgen_version="v", worker="w",
    )  # fmt: skip
    for raw in ("s3://AKIA:secret@bucket/i.png", "s3://bucket/i.png?X-Amz-Signature=secret&X-Amz-Credential=secret"):
        record = builder.build(
            {"row": 0, "id": "a", "init_image": raw, "init_image_uri": raw},
            shard="shard-00000",
            attempt=1,
            started_at=datetime.now(timezone.utc),
            error="x",
        )
        assert "secret" not in str(record.as_dict()), record.as_dict()


def test_a_secret_key_holding_a_slash_is_redacted_too():
    """Half of AWS's secret keys hold a `/`, which ended urlsplit's host there: the key id and
    the secret stayed in records, reports and messages."""
    from jobs.storage import redact_uri, split_s3

    uri = "s3://AKIAHUNTDTESTKEY:Super/SecretKey+123@hunt/sdgen/init/red.png"
    assert redact_uri(uri) == "s3://hunt/sdgen/init/red.png"
    assert split_s3(uri) == ("hunt", "sdgen/init/red.png")
    clean = redact_text(f"init_image {uri}: not found")
    assert clean == "init_image s3://hunt/sdgen/init/red.png: not found"
    # A path's own `@` and `:` are not userinfo: no `:` comes before its first `/`.
    for kept in ("s3://bucket/a@b.png", "s3://bucket/a:b@c.png", "file:///x/a@b.png", "/local/a:b@c.png"):
        assert redact_uri(kept) == kept and redact_text(kept) == kept
