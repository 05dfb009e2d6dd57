"""jobs/reproduce.py in-process: a record alone remakes its image; weights and init images are
checked by hash before anything is compared."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs.manifest import load_manifest
from jobs.output import Output
from jobs.reader import read_shards
from jobs.reproduce import Reproducer, find_records, main
from jobs.spec import SamplerSpec
from jobs.worker import ShardWorker, WorkerConfig

from conftest import init_image, manifest_schema, small_rows, write_manifest


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_pipe):
    """An output made by the worker (no Ray) from a model stored as a local file."""
    from sdcore.weights import export_single_file

    tmp = tmp_path_factory.mktemp("reproduce")
    weights = tmp / "tiny.safetensors"
    export_single_file(tiny_pipe, weights)
    init_image(tmp / "m" / "init" / "a.png")
    rows = small_rows(3, img2img_every=2)
    manifest = load_manifest([str(write_manifest(tmp / "m" / "m.parquet", rows, manifest_schema()))])
    config = WorkerConfig(
        weights=str(weights),
        output=str(tmp / "out"),
        sampler=SamplerSpec(steps=2, width=32, height=32),
        dtype="float32",
        threads=1,
    )
    worker = ShardWorker(config, pipeline=tiny_pipe)
    for task in read_shards(manifest, 3):
        worker.run(task)
    job = {"spec": {"image": {"quality": 95}}, "manifest": {"sources": [str(tmp / "m" / "m.parquet")]}}
    Output(str(tmp / "out")).write_job(job)
    return tmp


def record(made, rid):
    return find_records(Output(str(made / "out")), [rid], [])[f"id:{rid}"]


def test_find_records_by_id_and_row(made):
    found = find_records(Output(str(made / "out")), ["r001", "nope"], [2])
    assert set(found) == {"id:r001", "row:2"} and found["row:2"].id == "r002"


def test_identical_txt2img_and_img2img(made):
    reproducer = Reproducer(Output(str(made / "out")))
    for rid in ("r000", "r001"):
        result, data = reproducer.compare(record(made, rid), 40.0, exact=True)
        assert (result.verdict, result.passed) == ("identical", True), result.detail
        assert data == (made / "out" / record(made, rid).image_path).read_bytes()


def test_other_weights_are_refused_by_fingerprint(made, tmp_path):
    state = load_file(str(made / "tiny.safetensors"))
    key = min(state)
    state[key] = state[key] + 1e-3
    other = tmp_path / "other.safetensors"
    from safetensors import safe_open

    with safe_open(str(made / "tiny.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    save_file(state, str(other), metadata=metadata)
    result, _ = Reproducer(Output(str(made / "out")), weights=str(other)).compare(record(made, "r000"), 40.0, False)
    assert result.verdict == "error" and "not the weights that made this image" in result.detail


def test_moved_weights_and_init_image(made, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(made, moved)
    (made / "tiny.safetensors").rename(made / "tiny.hidden")
    (made / "m" / "init" / "a.png").rename(made / "m" / "init" / "a.hidden")
    try:
        output = Output(str(made / "out"))
        rec = record(made, "r001")
        result, _ = Reproducer(output).compare(rec, 40.0, False)
        assert result.verdict == "error" and "pass --weights" in result.detail
        with_weights = Reproducer(output, weights=str(moved / "tiny.safetensors"))
        result, _ = with_weights.compare(rec, 40.0, False)
        assert result.verdict == "error" and "init image with the recorded sha256 not found" in result.detail
        wrong = init_image(tmp_path / "wrong.png", color=(0, 0, 255))
        moved_weights = str(moved / "tiny.safetensors")
        result, _ = Reproducer(output, weights=moved_weights, init_image=str(wrong)).compare(rec, 40.0, False)
        assert "different sha256" in result.detail
        right = Reproducer(output, weights=moved_weights, init_image=str(moved / "m" / "init" / "a.png"))
        assert right.compare(rec, 40.0, True)[0].verdict == "identical"
    finally:
        (made / "tiny.hidden").rename(made / "tiny.safetensors")
        (made / "m" / "init" / "a.hidden").rename(made / "m" / "init" / "a.png")


def test_cli(made, capsys):
    assert main([str(made / "out"), "r002", "--save-dir", str(made / "again")]) == 0
    assert "row 2 id 'r002': identical" in capsys.readouterr().out
    stored = (made / "out" / record(made, "r002").image_path).read_bytes()
    assert (made / "again" / "r002.png").read_bytes() == stored
    assert main([str(made / "out"), "missing-id"]) == 1
    with pytest.raises(SystemExit):
        main([str(made / "out")])
    assert torch.get_num_threads() >= 1


def test_a_tampered_or_deleted_stored_image_fails(made, capsys):
    path = made / "out" / record(made, "r000").image_path
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"tampered")
        assert main([str(made / "out"), "r000"]) == 1
        assert "does not match its recorded sha256" in capsys.readouterr().out
        path.unlink()
        assert main([str(made / "out"), "r000"]) == 1
        assert "is missing" in capsys.readouterr().out
    finally:
        path.write_bytes(original)
    assert main([str(made / "out"), "r000"]) == 0
