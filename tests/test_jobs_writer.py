"""jobs/writer.py: images carry their parameters; images are committed before the records."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from jobs.output import Output
from jobs.writer import ShardWriter, encode_image, read_parameters

PARAMS = "a cat\nNegative prompt: dog\nSteps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 32x32, Model hash: abc"


def picture(color=(10, 200, 30)):
    return Image.new("RGB", (32, 32), color)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encoded_images_carry_parameters_and_are_deterministic(fmt):
    data = encode_image(picture(), fmt, PARAMS)
    assert data == encode_image(picture(), fmt, PARAMS)
    assert read_parameters(data) == PARAMS
    assert Image.open(io.BytesIO(data)).format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]


def test_png_parameters_are_a_text_chunk_named_parameters():
    data = encode_image(picture(), "png", PARAMS)
    image = Image.open(io.BytesIO(data))
    assert image.text["parameters"] == PARAMS
    assert b"tEXtparameters\x00" in data or b"iTXtparameters\x00" in data


class RecordingStorage:
    """Wraps a storage and remembers the order of writes."""

    def __init__(self, inner):
        self.inner, self.order = inner, []
        self.uri = inner.uri

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write(self, key, data, *, exclusive=False):
        self.order.append(key)
        return self.inner.write(key, data, exclusive=exclusive)


def test_shard_writer_commits_images_then_partials_then_records(tmp_path):
    from jobs.storage import LocalStorage

    storage = RecordingStorage(LocalStorage(str(tmp_path)))
    output = Output(str(tmp_path), storage=storage)
    writer = ShardWriter(output, "shard-00000")
    for i in range(3):
        writer.write({"row": i, "id": f"i{i}", "name": f"i{i}", "status": "ok"}, picture((i, i, i)), PARAMS)
    writer.write({"row": 3, "id": "bad", "status": "error", "error": "prompt is missing"})
    writer.checkpoint()
    writer.write({"row": 4, "id": "i4", "name": "i4", "status": "ok"}, picture(), PARAMS)
    assert writer.close() is True

    order = storage.order
    images = [k for k in order if k.startswith("images/")]
    assert len(images) == 4 and order[-1] == "records/shard-00000.parquet"
    partial = next(i for i, k in enumerate(order) if k.startswith("partial/"))
    assert all(order.index(f"images/shard-00000/i{i}.png") < partial for i in range(3))
    assert output.partial_keys("shard-00000") == []  # cleared after the commit

    records = output.read_records("shard-00000").to_pylist()
    assert [r["row"] for r in records] == [0, 1, 2, 3, 4]
    for r in records:
        if r["status"] == "ok":
            data = (tmp_path / r["image_path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == r["image_sha256"]
            assert r["image_uri"] == str(tmp_path / r["image_path"]) and r["image_format"] == "png"
        else:
            assert r["image_path"] is None and r["error"] == "prompt is missing"


def test_a_second_commit_of_the_same_shard_is_refused(tmp_path):
    output = Output(str(tmp_path))
    first = ShardWriter(output, "shard-00001")
    first.write({"row": 0, "id": "a", "status": "error", "error": "x"})
    assert first.close() is True
    second = ShardWriter(output, "shard-00001")
    second.write({"row": 0, "id": "a", "status": "error", "error": "y"})
    assert second.close() is False
    assert output.read_records("shard-00001").column("error").to_pylist() == ["x"]


def test_failed_image_write_fails_the_shard_and_commits_nothing(tmp_path):
    from jobs.storage import LocalStorage

    class Broken(RecordingStorage):
        def write(self, key, data, *, exclusive=False):
            if key.startswith("images/"):
                raise OSError("disk full")
            return super().write(key, data, exclusive=exclusive)

    output = Output(str(tmp_path), storage=Broken(LocalStorage(str(tmp_path))))
    writer = ShardWriter(output, "shard-00000")
    writer.write({"row": 0, "id": "a", "name": "a", "status": "ok"}, picture(), PARAMS)
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert output.committed_shards() == set()
