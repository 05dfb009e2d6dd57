"""jobs/reproduce.py in-process: a record alone remakes its image; weights and init images are
checked by hash before anything is compared."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs.generation import generate_settings, generation_request, recorded_slots
from jobs.manifest import load_manifest
from jobs.output import Output
from jobs.reader import read_shards
from jobs.reproduce import Reproducer, find_records, main
from jobs.spec import SamplerSpec
from jobs.worker import ShardWorker, WorkerConfig

from conftest import init_image, manifest_schema, small_rows, write_manifest


def make_output(tmp, tiny_pipe, size=32, **worker_settings):
    """An output made by the worker (no Ray) from a model stored as a local file."""
    from sdcore.weights import export_single_file

    tmp.mkdir(parents=True, exist_ok=True)
    weights = tmp / "tiny.safetensors"
    export_single_file(tiny_pipe, weights)
    init_image(tmp / "m" / "init" / "a.png")
    rows = small_rows(3, img2img_every=2)
    manifest = load_manifest([str(write_manifest(tmp / "m" / "m.parquet", rows, manifest_schema()))])
    config = WorkerConfig(
        weights=str(weights),
        output=str(tmp / "out"),
        sampler=SamplerSpec(steps=2, width=size, height=size),
        dtype="float32",
        threads=1,
        **worker_settings,
    )
    worker = ShardWorker(config, pipeline=tiny_pipe)
    for task in read_shards(manifest, 3):
        worker.run(task)
    job = {"spec": {"image": {"quality": 95}}, "manifest": {"sources": [str(tmp / "m" / "m.parquet")]}}
    Output(str(tmp / "out")).write_job(job)
    return tmp


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_pipe):
    return make_output(tmp_path_factory.mktemp("reproduce"), tiny_pipe)


def record(made, rid):
    return find_records(Output(str(made / "out")), [rid], [])[f"id:{rid}"]


def test_find_records_by_id_and_row(made):
    found = find_records(Output(str(made / "out")), ["r001", "nope"], [2])
    assert set(found) == {"id:r001", "row:2"} and found["row:2"].id == "r002"


def test_identical_txt2img_and_img2img(made):
    from jobs.init_images import INIT_DECODING

    assert (record(made, "r000").init_decoding, record(made, "r001").init_decoding) == (None, INIT_DECODING)
    reproducer = Reproducer(Output(str(made / "out")))
    for rid in ("r000", "r001"):
        result, data = reproducer.compare(record(made, rid), 40.0, exact=True)
        assert (result.verdict, result.passed) == ("identical", True), result.detail
        assert data == (made / "out" / record(made, rid).image_path).read_bytes()


def test_batched_decodes_reproduce_in_their_decode_slots(tmp_path, tiny_pipe):
    """execution.decode_batch 2 on a CPU worker (auto would be 1 there): rows decoded two at a
    time, the shard's last one padded with a filler; every record keeps its decode slot and
    remakes identical, and the remake rebuilds the recorded decode: the row's latent in its slot
    of a decode of 2, a zero filler in the other. (Whether a decode's shape or slot changes the
    last bits depends on the host's kernels — on some CPUs it does at 64x64, on others not — so
    the rebuilt decode itself is what is checked.)"""
    made = make_output(tmp_path, tiny_pipe, size=64, decode_batch=2, batch_size=2)
    output = Output(str(made / "out"))
    records = [record(made, f"r{k:03d}") for k in range(3)]
    assert {(r.decode_rows, r.batch_rows) for r in records} == {(2, 2)}
    assert sorted(r.decode_slot for r in records) == [0, 0, 1]  # one decode of 2, one of 1 + filler
    reproducer = Reproducer(output)
    for found in records:
        decoder = reproducer.pipeline(found).vae.decoder
        decodes = []  # per decode: which of its latents hold a row (the rest are zero fillers)
        hook = decoder.register_forward_pre_hook(
            lambda module, args, decodes=decodes: decodes.append([bool(z.abs().sum()) for z in args[0]])
        )
        try:
            result, _ = reproducer.compare(found, 40.0, exact=True)
        finally:
            hook.remove()
        assert (result.verdict, result.passed) == ("identical", True), (found.id, result.detail)
        assert decodes == [[k == found.decode_slot for k in range(2)]], (found.id, decodes)


def test_a_row_whose_decode_goes_non_finite_costs_only_itself(tmp_path, tiny_pipe):
    """Batched decodes and a fault in one image's decode (as a float16 VAE can overflow): the
    decode that held it fails, its rows are retried one by one, and only that row becomes an
    error record; the others are committed and still reproduce identical."""
    clean = make_output(tmp_path / "clean", tiny_pipe, size=64, decode_batch=2, batch_size=2)
    victim = record(clean, "r000")
    seen = []
    capture = tiny_pipe.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        tiny_pipe.generate([generation_request(victim)], **generate_settings(victim), **recorded_slots(victim))
    finally:
        capture.remove()
    target = seen[0][victim.decode_slot]  # r000's final latent, as the decoder gets it

    def poison(module, args, output):
        for row, latent in enumerate(args[0]):  # close, not equal: a retried row sits in another slot
            if torch.allclose(latent, target, atol=1e-3):
                output[row] = float("nan")

    hook = tiny_pipe.vae.decoder.register_forward_hook(poison)
    try:
        made = make_output(tmp_path / "poisoned", tiny_pipe, size=64, decode_batch=2, batch_size=2)
    finally:
        hook.remove()
    records = {rid: record(made, rid) for rid in ("r000", "r001", "r002")}
    assert records["r000"].status == "error" and "(decoded pixels)" in records["r000"].error
    reproducer = Reproducer(Output(str(made / "out")))
    for rid in ("r001", "r002"):
        assert records[rid].status == "ok"
        result, _ = reproducer.compare(records[rid], 40.0, exact=True)
        assert (result.verdict, result.passed) == ("identical", True), (rid, result.detail)


def test_a_cpu_worker_decodes_each_image_alone_by_default(made):
    assert {(record(made, f"r{k:03d}").decode_rows, record(made, f"r{k:03d}").decode_slot) for k in range(3)} == {
        (1, 0)
    }


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


def test_the_same_tensors_built_into_another_architecture_are_refused(made, tmp_path):
    """A .ckpt of the tiny model's tensors without sdcore's config metadata loads with inferred
    attention heads: the same fingerprint, other images. job.json's config tells them apart."""
    import json

    ckpt = tmp_path / "tiny.ckpt"
    torch.save(load_file(str(made / "tiny.safetensors")), ckpt)
    copy = tmp_path / "out"
    shutil.copytree(made / "out", copy)
    output = Output(str(copy))
    job = output.read_job()
    job["model"] = {"config": json.loads(sdcore_config(made).to_json())}
    output.write_job(job)
    result, _ = Reproducer(output, weights=str(ckpt)).compare(record(made, "r000"), 40.0, False)
    assert result.verdict == "error" and "have the recorded fingerprint but build another architecture" in result.detail
    assert "unet.num_heads: 2 on disk, 8 now" in result.detail
    result, _ = Reproducer(output).compare(record(made, "r000"), 40.0, True)  # the job's own weights
    assert result.verdict == "identical", result.detail


def sdcore_config(made):
    import sdcore

    return sdcore.load_pipeline(str(made / "tiny.safetensors")).config


def test_weights_argument_that_cannot_be_used_is_refused_at_once(made, tmp_path, capsys):
    """A --weights that names nothing is a bad argument (exit 2), not a mismatch (exit 1)."""
    out = str(made / "out")
    for weights, needle in [
        (str(tmp_path / "none.safetensors"), "--weights: not found: "),
        ("builtin:nah", "unknown built-in model 'nah'"),
    ]:
        assert main([out, "r000", "--weights", weights]) == 2
        assert needle in capsys.readouterr().err


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
    assert main([str(made / "out"), "missing-id"]) == 2  # a bad argument, not a mismatch (see below)
    with pytest.raises(SystemExit):
        main([str(made / "out")])
    assert torch.get_num_threads() >= 1


def test_an_id_or_row_with_no_record_is_a_bad_argument(made, capsys):
    """`sdgen reproduce OUTPUT nosuchid` exited 1, the code of an image that differs; the table
    says bad arguments are 2, refused before any work: nothing is remade, every unknown key named."""
    from conftest import PYTHON, run_command

    out = str(made / "out")
    result = run_command([PYTHON, "-m", "jobs.cli", "reproduce", out, "nosuchid"], check=False)
    assert result.returncode == 2, result.stdout  # run_command: stdout and stderr together
    assert result.stdout.strip() == f"error: id nosuchid: no such record in {out}"
    assert main([out, "r000", "nosuchid", "--row", "99"]) == 2
    said = capsys.readouterr()
    assert "id nosuchid: no such record" in said.err and "row 99: no such record" in said.err
    assert "r000" not in said.out + said.err  # refused before remaking the one that exists


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
