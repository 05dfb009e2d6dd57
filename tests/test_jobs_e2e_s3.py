"""End to end on S3: a moto server on loopback, reached over real HTTP by boto3. Manifest, init
images, weights and outputs are all s3://; the real commands run as subprocesses."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from conftest import PYTHON, init_image, manifest_schema, run_command, small_rows, spec_dict, write_manifest, write_spec


def test_a_job_entirely_on_s3(s3, tmp_path, tiny_pipe):
    from sdcore.weights import export_single_file

    bucket, client, env = s3
    # Inputs: manifest + init image (relative to the manifest) + weights, uploaded to the bucket.
    init = init_image(tmp_path / "init" / "a.png")
    client.upload_file(str(init), bucket, "in/init/a.png")
    rows = small_rows(5, img2img_every=2)  # rows 1 and 3 are img2img from init/a.png
    rows.append(
        {"id": "lost", "prompt": "x", "negative": "", "seed": 1, "strength": 0.5, "init_image": "init/missing.png"}
    )
    manifest = write_manifest(tmp_path / "m.parquet", rows, manifest_schema())
    client.upload_file(str(manifest), bucket, "in/m.parquet")
    export_single_file(tiny_pipe, tmp_path / "tiny.safetensors")
    client.upload_file(str(tmp_path / "tiny.safetensors"), bucket, "models/tiny.safetensors")

    spec = spec_dict(
        f"s3://{bucket}/in/m.parquet",
        f"s3://{bucket}/out",
        model={"weights": f"s3://{bucket}/models/tiny.safetensors"},
        execution={"workers": 1, "batch_size": 2, "shard_size": 4},
    )
    spec_path = write_spec(tmp_path / "job.yaml", spec)
    cache = {"SDGEN_CACHE_DIR": str(tmp_path / "cache")}
    result = run_command([PYTHON, "jobs/run.py", str(spec_path)], env={**env, **cache}, timeout=400)
    assert "complete: 5 ok, 1 error, 0 missing of 6 rows" in result.stdout  # row 5: missing init image
    assert env["AWS_SECRET_ACCESS_KEY"] not in result.stdout

    def get(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"])
    assert "out/job.json" in keys and "out/summary.json" in keys
    assert [k for k in keys if k.startswith("out/records/")] == [
        "out/records/shard-00000.parquet",
        "out/records/shard-00001.parquet",
    ]
    assert not [k for k in keys if k.startswith("out/partial/")]
    records = []
    for key in ("out/records/shard-00000.parquet", "out/records/shard-00001.parquet"):
        records += pq.read_table(pa.BufferReader(get(key))).to_pylist()
    assert [r["row"] for r in records] == list(range(6))
    init_sha = hashlib.sha256(init.read_bytes()).hexdigest()
    for r in records:
        if r["id"] == "lost":
            assert r["status"] == "error" and f"init_image not found: s3://{bucket}/in/init/missing.png" in r["error"]
            continue
        assert r["status"] == "ok" and r["image_uri"] == f"s3://{bucket}/out/{r['image_path']}"
        data = get(f"out/{r['image_path']}")
        assert hashlib.sha256(data).hexdigest() == r["image_sha256"]
        # Served from the bucket, a browser shows it (the report links to it) instead of downloading it.
        assert client.head_object(Bucket=bucket, Key=f"out/{r['image_path']}")["ContentType"] == "image/png"
        assert Image.open(io.BytesIO(data)).text["parameters"].startswith(r["prompt"])
        assert r["model_weights"] == f"s3://{bucket}/models/tiny.safetensors"
        assert r["model_fingerprint"] == tiny_pipe.fingerprint
        if r["mode"] == "img2img":
            assert r["init_image_uri"] == f"s3://{bucket}/in/init/a.png" and r["init_image_sha256"] == init_sha
    assert client.head_object(Bucket=bucket, Key="out/job.json")["ContentType"] == "application/json"
    job = get("out/job.json").decode()
    assert env["AWS_SECRET_ACCESS_KEY"] not in job and env["AWS_ACCESS_KEY_ID"] not in job
    assert json.loads(job)["manifest"]["sources"] == [f"s3://{bucket}/in/m.parquet"]

    status = run_command([PYTHON, "jobs/status.py", f"s3://{bucket}/out"], env=env)
    assert "2 done" in status.stdout and "5 ok, 1 error" in status.stdout
    again = run_command([PYTHON, "jobs/reproduce.py", f"s3://{bucket}/out", "r000", "r001"], env={**env, **cache})
    assert again.stdout.count(": identical: sha256") == 2, again.stdout


def test_keys_holding_hash_and_question_mark_are_used_verbatim(s3, tmp_path):
    """`#` and `?` are part of an S3 key (as the AWS CLI reads `s3://bucket/key`): URIs parsed as
    URLs lost them, so `output: s3://bkt/exp#1` wrote under `exp/` (and `--overwrite` of
    `s3://bkt/exp#2` deleted that job), and the init image `.../init/a#1?v=2.png` was looked up,
    and reported not found, as `.../init/a`."""
    from jobs.output import Output

    bucket, client, env = s3
    init = init_image(tmp_path / "a.png")
    client.upload_file(str(init), bucket, "in/init/a#1?v=2.png")
    rows = small_rows(2, img2img_every=2, init="init/a#1?v=2.png")  # row 1: img2img, relative to the manifest
    manifest = write_manifest(tmp_path / "m.parquet", rows, manifest_schema())
    client.upload_file(str(manifest), bucket, "in/m#1.parquet")
    output = f"s3://{bucket}/exp#1"
    spec_path = write_spec(tmp_path / "job.yaml", spec_dict(f"s3://{bucket}/in/m#1.parquet", output))
    result = run_command([PYTHON, "jobs/run.py", str(spec_path)], env=env, timeout=400)
    assert "complete: 2 ok, 0 error, 0 missing of 2 rows" in result.stdout, result.stdout

    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    written = [k for k in keys if not k.startswith("in/")]
    assert written and all(k.startswith("exp#1/") for k in written), keys
    assert "exp#1/job.json" in written and "exp#1/records/shard-00000.parquet" in written
    data = client.get_object(Bucket=bucket, Key="exp#1/records/shard-00000.parquet")["Body"].read()
    records = pq.read_table(pa.BufferReader(data)).to_pylist()
    assert [(r["id"], r["status"], r["mode"]) for r in records] == [
        ("r000", "ok", "txt2img"),
        ("r001", "ok", "img2img"),
    ]
    assert records[1]["init_image_uri"] == f"s3://{bucket}/in/init/a#1?v=2.png"
    assert records[1]["init_image_sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()
    assert all(r["image_uri"] == f"{output}/{r['image_path']}" for r in records)
    job = json.loads(client.get_object(Bucket=bucket, Key="exp#1/job.json")["Body"].read())
    assert job["spec"]["output"] == output and job["manifest"]["sources"] == [f"s3://{bucket}/in/m#1.parquet"]
    assert Output(f"s3://{bucket}/exp#2").read_job() is None  # another output, not this job's

    # The record's init image URI is read back as it is: the img2img row reproduces.
    again = run_command([PYTHON, "jobs/reproduce.py", output, "r001"], env=env)
    assert "row 1 id 'r001': identical" in again.stdout, again.stdout
