"""jobs/writer.py: images carry their parameters; images are committed before the records."""

from __future__ import annotations

import copy
import hashlib
import io
import struct
from datetime import datetime, timezone

import pytest
from PIL import Image

from jobs.output import Output
from jobs.record import RecordBuilder
from jobs.storage import LocalStorage
from jobs.writer import MAX_EXIF_COMMENT_CHARS, ShardWriter, encode_image, read_parameters

PARAMS = "a cat\nNegative prompt: dog\nSteps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 32x32, Model hash: abc"
BUILDER = RecordBuilder(
    sampler="ddim",
    karras=False,
    model_weights="builtin:tiny",
    model_fingerprint="ab" * 32,
    dtype="float32",
    device="cpu",
    device_name="x86_64",
    threads=1,
    batch_invariant=True,
    batch_rows=1,
    torch_version="2.13.0",
    sdcore_version="0.1.0",
    sdgen_version="0.1.0",
    worker="test",
)


def picture(color=(10, 200, 30)):
    return Image.new("RGB", (32, 32), color)


def record(row, row_id, error=None):
    """A row's record as the worker hands it to the writer (no image fields yet)."""
    fields = {
        "row": row,
        "id": row_id,
        "prompt": "a cat",
        "negative": "",
        "seed": 1,
        "steps": 3,
        "guidance_scale": 7.5,
        "width": 32,
        "height": 32,
    }
    return BUILDER.build(fields, shard="shard-00000", attempt=1, started_at=datetime.now(timezone.utc), error=error)


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


def user_comment_type(data: bytes) -> int:
    """The TIFF type of the EXIF UserComment entry in a JPEG/WebP's EXIF block."""
    exif = Image.open(io.BytesIO(data)).info["exif"]
    tiff = exif[6:] if exif.startswith(b"Exif\x00\x00") else exif
    order = ">" if tiff[:2] == b"MM" else "<"
    entry = tiff.index(struct.pack(f"{order}H", 0x9286))
    return struct.unpack(f"{order}H", tiff[entry + 2 : entry + 4])[0]


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_the_exif_user_comment_is_typed_as_a1111_reads_it(fmt):
    """UNDEFINED (7), as the EXIF spec says and piexif (which A1111 reads with) expects: Pillow's
    own Exif types it BYTE (1), which piexif returns as a tuple of ints and A1111 fails on.
    Records made before keep the old embedding (metadata 1) so they reproduce byte for byte."""
    assert user_comment_type(encode_image(picture(), fmt, PARAMS)) == 7
    old = encode_image(picture(), fmt, PARAMS, metadata=1)
    assert user_comment_type(old) == 1 and read_parameters(old) == PARAMS


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_parameters_longer_than_a_jpeg_exif_holds_are_cut_keeping_the_settings(fmt):
    """A 33K-character prompt made Pillow refuse the JPEG ("EXIF data is too long"): the whole
    shard failed on every attempt. The record keeps the prompt whole."""
    settings = "Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 32x32"
    long = "a cat " * 7000 + "\nNegative prompt: dog\n" + settings
    text = read_parameters(encode_image(picture(), fmt, long))
    assert len(text) == MAX_EXIF_COMMENT_CHARS < len(long)
    assert text.startswith("a cat a cat") and text.endswith("…\n" + settings)
    # Emoji take two UTF-16 units each: counted so, and never cut in half.
    emoji = read_parameters(encode_image(picture(), fmt, "😀" * 20000 + "\n" + settings))
    assert len(emoji.encode("utf-16-be")) // 2 <= MAX_EXIF_COMMENT_CHARS
    assert emoji.endswith("😀…\n" + settings)


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
    storage = RecordingStorage(LocalStorage(str(tmp_path)))
    output = Output(str(tmp_path), storage=storage)
    writer = ShardWriter(output, "shard-00000")
    for i in range(3):
        writer.write(record(i, f"i{i}"), picture((i, i, i)), name=f"i{i}", parameters=PARAMS)
    writer.write(record(3, "bad", error="prompt is missing"))
    writer.checkpoint()
    writer.write(record(4, "i4"), picture(), name="i4", parameters=PARAMS)
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
    first.write(record(0, "a", error="x"))
    assert first.close() is True
    second = ShardWriter(output, "shard-00001")
    second.write(record(0, "a", error="y"))
    assert second.close() is False
    assert output.read_records("shard-00001").column("error").to_pylist() == ["x"]


def test_failed_image_write_fails_the_shard_and_commits_nothing(tmp_path):
    class Broken(RecordingStorage):
        def write(self, key, data, *, exclusive=False):
            if key.startswith("images/"):
                raise OSError("disk full")
            return super().write(key, data, exclusive=exclusive)

    output = Output(str(tmp_path), storage=Broken(LocalStorage(str(tmp_path))))
    writer = ShardWriter(output, "shard-00000")
    writer.write(record(0, "a"), picture(), name="a", parameters=PARAMS)
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert output.committed_shards() == set()


def test_the_writer_does_not_change_the_records_it_is_given(tmp_path):
    """Image facts reach the committed record through a new record; the given one is unchanged."""
    output = Output(str(tmp_path))
    writer = ShardWriter(output, "shard-00000")
    given = [record(0, "a"), record(1, "b", error="prompt is missing")]
    before = copy.deepcopy(given)
    writer.write(given[0], picture(), name="a", parameters=PARAMS)
    writer.write(given[1])
    writer.checkpoint()
    assert writer.close() is True
    assert given == before and given[0].image_path is None and given[0].time_write_s is None
    committed = output.read_records("shard-00000").to_pylist()
    assert committed[0]["image_path"] == "images/shard-00000/a.png" and committed[0]["time_write_s"] >= 0
    assert committed[0]["prompt"] == given[0].prompt and committed[1]["image_path"] is None


def test_kept_records_are_committed_as_they_are_and_not_saved_again(tmp_path):
    storage = RecordingStorage(LocalStorage(str(tmp_path)))
    output = Output(str(tmp_path), storage=storage)
    saved = record(0, "a", error="from an earlier attempt")
    writer = ShardWriter(output, "shard-00000")
    writer.keep(saved)
    writer.checkpoint()
    assert not [k for k in storage.order if k.startswith("partial/")]
    writer.write(record(1, "b"), picture(), name="b", parameters=PARAMS)
    writer.checkpoint()
    assert writer.close() is True
    partials = [k for k in storage.order if k.startswith("partial/")]
    assert len(partials) == 1 and partials[0].startswith("partial/shard-00000/000000000001-")
    committed = output.read_records("shard-00000").to_pylist()
    assert [r["row"] for r in committed] == [0, 1] and committed[0]["error"] == "from an earlier attempt"


def test_an_image_needs_a_name(tmp_path):
    writer = ShardWriter(Output(str(tmp_path)), "shard-00000")
    with pytest.raises(ValueError, match="row 0: an image needs a file name"):
        writer.write(record(0, "a"), picture())
    writer.abort()


def test_an_image_write_never_replaces_a_committed_image_with_other_bytes(output_uri):
    from jobs.writer import ImageConflict

    output = Output(output_uri)
    storage = output.storage

    def write(shard_rows, color, *, close=True, checkpoint=False):
        writer = ShardWriter(output, "shard-00000", lag=0)  # checkpoint() returns once saved
        for row, name in shard_rows:
            writer.write(record(row, name), picture(color), name=name, parameters=PARAMS)
        if checkpoint:
            writer.checkpoint()
        return writer.close() if close else writer

    # A batch saved in a partial file (row 0) is referenced: other bytes are refused there.
    write([(0, "a")], (1, 1, 1), close=False, checkpoint=True)
    saved = storage.read("images/shard-00000/a.png")
    with pytest.raises(ImageConflict, match="committed image with other bytes"):
        write([(0, "a")], (9, 9, 9))
    assert storage.read("images/shard-00000/a.png") == saved
    # An orphan (no record names it: its attempt died before saving its batch) is replaced.
    storage.write("images/shard-00000/b.png", b"left by a dead attempt")
    # The same bytes as already there (an earlier attempt of the same row): fine.
    assert write([(0, "a"), (1, "b")], (1, 1, 1)) is True
    records = {r["id"]: r for r in output.read_records("shard-00000").to_pylist()}
    for name in ("a", "b"):
        data = storage.read(records[name]["image_path"])
        assert hashlib.sha256(data).hexdigest() == records[name]["image_sha256"]
    committed = storage.read("images/shard-00000/b.png")
    # Committed (the shard's record file names it): other bytes are refused, the image kept.
    with pytest.raises(ImageConflict):
        write([(1, "b")], (7, 7, 7))
    assert storage.read("images/shard-00000/b.png") == committed


def test_checkpoint_saves_behind_and_a_failed_background_write_is_raised_not_committed(tmp_path):
    import threading

    gate = threading.Event()

    class Gated(RecordingStorage):
        def write(self, key, data, *, exclusive=False):
            if key.startswith("images/"):
                if not gate.wait(timeout=60):  # a guard against hanging, not a speed check
                    raise TimeoutError("checkpoint waited for its own batch")
                if key.endswith("/b.png"):
                    raise OSError("disk full")
            return super().write(key, data, exclusive=exclusive)

    storage = Gated(LocalStorage(str(tmp_path)))
    output = Output(str(tmp_path), storage=storage)
    writer = ShardWriter(output, "shard-00000", lag=1)
    writer.write(record(0, "a"), picture(), name="a", parameters=PARAMS)
    writer.checkpoint()  # returns while batch 1's image is still being written
    assert storage.order == []
    writer.write(record(1, "b"), picture(), name="b", parameters=PARAMS)
    gate.set()
    writer.checkpoint()  # batch 1 saved; batch 2's image write fails in the background
    assert output.partial_keys("shard-00000") != []
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert output.committed_shards() == set()
    assert sorted(output.read_partials("shard-00000")) == [0]
