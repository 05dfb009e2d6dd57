"""jobs/generation.py: the generate call made from a record remakes the worker's image exactly."""

from __future__ import annotations

import dataclasses

import pytest

from jobs.generation import generate_settings, generation_request, recorded_slots
from jobs.init_images import read_init_image
from jobs.manifest import load_manifest
from jobs.output import Output
from jobs.provenance import a1111_parameters
from jobs.reader import read_shards
from jobs.record import Record
from jobs.reproduce import Reproducer
from jobs.spec import SamplerSpec
from jobs.worker import ShardWorker, WorkerConfig
from jobs.writer import encode_image

from conftest import init_image, manifest_schema, small_rows, write_manifest

SAMPLERS = [("ddim", False), ("euler_a", False), ("dpmpp_2m", True)]


@pytest.fixture(scope="module", params=SAMPLERS, ids=lambda s: s[0] + ("-karras" if s[1] else ""))
def made(request, tmp_path_factory, tiny_pipe):
    """Records and images made by the worker, batched (rows 1 and 3 are img2img)."""
    name, karras = request.param
    tmp = tmp_path_factory.mktemp(f"generation-{name}")
    init_image(tmp / "m" / "init" / "a.png")
    rows = small_rows(5, img2img_every=2)
    manifest = load_manifest([str(write_manifest(tmp / "m" / "m.parquet", rows, manifest_schema()))])
    sampler = SamplerSpec(name=name, karras=karras, steps=4, guidance_scale=7.5, width=32, height=32)
    config = WorkerConfig(
        weights="builtin:tiny", output=str(tmp / "out"), sampler=sampler, dtype="float32", batch_size=3
    )
    worker = ShardWorker(config, pipeline=tiny_pipe)
    for task in read_shards(manifest, 5):
        worker.run(task)
    output = Output(str(tmp / "out"))
    records = [Record.from_dict(values) for values in output.read_records("shard-00000").to_pylist()]
    return output, records


def test_the_record_remakes_the_workers_image(made, tiny_pipe):
    output, records = made
    assert [r.mode for r in records] == ["txt2img", "img2img", "txt2img", "img2img", "txt2img"]
    for record in records:
        init = read_init_image(record.init_image_uri).image if record.mode == "img2img" else None
        request = generation_request(record, init)
        image = tiny_pipe.generate([request], **generate_settings(record), **recorded_slots(record))[0]
        data = encode_image(image, record.image_format, a1111_parameters(record))
        assert data == output.storage.read(record.image_path), (record.id, record.sampler)


def test_reproduce_says_identical(made):
    output, records = made
    reproducer = Reproducer(output)
    for record in records:
        result, _ = reproducer.compare(record, 40.0, exact=True)
        assert (result.verdict, result.passed) == ("identical", True), (record.id, result.detail)


def test_the_settings_and_request_come_from_the_record(made):
    _, records = made
    txt2img, img2img = records[0], records[1]
    settings = generate_settings(txt2img)
    assert settings == {
        "sampler": txt2img.sampler,
        "karras": txt2img.karras,
        "steps": 4,
        "guidance_scale": 7.5,
        "width": 32,
        "height": 32,
        "batch_invariant": False,
        "fixed_batch": 3,  # the worker's batch size: every forward ran 3 rows
    }
    # Continuous batching over 3 slots: rows 0-2 take them; img2img row 1 (strength 0.75: 3 of 4
    # steps) finishes first and row 3 takes slot 1; rows 0 and 2 finish next, row 4 takes slot 0.
    assert [(r.batch_rows, r.batch_slot) for r in records] == [(3, 0), (3, 1), (3, 2), (3, 1), (3, 0)]
    # A CPU worker decodes each image alone (execution.decode_batch auto): one latent, slot 0.
    assert recorded_slots(txt2img) == {"slots": [0], "decode_batch": 1, "decode_slots": [0]}
    request = generation_request(txt2img)
    assert (request.prompt, request.negative, request.seed, request.init_image, request.strength) == (
        txt2img.prompt,
        "",
        txt2img.seed,
        None,
        None,
    )
    # The request carries the row's own settings (rows of other settings share forwards)
    assert request.settings() == {k: v for k, v in settings.items() if k in request.settings()}
    with pytest.raises(ValueError, match="img2img record needs an init image"):
        generation_request(img2img)
    with pytest.raises(ValueError, match="txt2img record needs no init image"):
        generation_request(txt2img, read_init_image(img2img.init_image_uri).image)
    assert generation_request(dataclasses.replace(txt2img, negative=None)).negative == ""
