"""sdcore/kernels.py: repeatable kernel choices, and an optional compiled UNet that is recorded and
remade the same way (a compiled UNet's fused kernels give other last bits than the eager one)."""

from __future__ import annotations

import json

import pytest
import torch

import sdcore
from jobs.manifest import load_manifest
from jobs.output import Output
from jobs.reader import read_shards
from jobs.reproduce import Reproducer, find_records
from jobs.spec import SamplerSpec
from jobs.worker import ShardWorker, WorkerConfig
from sdcore.kernels import compile_unet, exact_kernels

from conftest import manifest_schema, small_rows, write_manifest


def test_exact_kernels_on_cpu_sets_nothing_and_says_so():
    assert exact_kernels("cpu") == {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def test_bad_compile_modes_are_refused(tiny_pipe):
    with pytest.raises(ValueError, match="CUDA graphs .* need a CUDA device"):
        compile_unet(tiny_pipe, "reduce-overhead")
    with pytest.raises(ValueError, match="expected one of none, default, reduce-overhead, got 'fast'"):
        compile_unet(tiny_pipe, "fast")
    compile_unet(tiny_pipe, "none")
    assert tiny_pipe.compile_mode == "none" and isinstance(tiny_pipe.unet, sdcore.pipeline.UNet2DConditionModel)


def test_a_compiled_unet_is_recorded_and_reproduce_compiles_it_too(tmp_path):
    rows = small_rows(2)
    manifest = load_manifest([str(write_manifest(tmp_path / "m" / "m.parquet", rows, manifest_schema()))])
    config = WorkerConfig(
        weights="builtin:tiny",
        output=str(tmp_path / "out"),
        sampler=SamplerSpec(steps=2, width=32, height=32),
        dtype="float32",
        batch_size=2,
        threads=1,
        compile_mode="default",
    )
    try:
        worker = ShardWorker(config)  # loads its own pipeline, then compiles its UNet
        assert worker.pipe.compile_mode == "default"
        for task in read_shards(manifest, 2):
            worker.run(task)
        output = Output(str(tmp_path / "out"))
        output.write_job({"spec": {"image": {"quality": 95}}, "manifest": {"sources": []}})
        records = output.read_records("shard-00000").to_pylist()
        assert {json.loads(r["kernels"])["compile"] for r in records} == {"default"}
        reproducer = Reproducer(output)
        for rid in ("r000", "r001"):
            record = find_records(output, [rid], [])[f"id:{rid}"]
            result, _ = reproducer.compare(record, 40.0, exact=True)
            assert (result.verdict, result.passed) == ("identical", True), result.detail
        (pipe,) = reproducer._pipes.values()
        assert pipe.compile_mode == "default"  # remade with a compiled UNet, as recorded
    finally:
        torch._dynamo.reset()


def test_eager_records_say_so(tiny_pipe, tmp_path):
    rows = small_rows(1)
    manifest = load_manifest([str(write_manifest(tmp_path / "m" / "m.parquet", rows, manifest_schema()))])
    config = WorkerConfig(weights="builtin:tiny", output=str(tmp_path / "out"), sampler=SamplerSpec(steps=1))
    worker = ShardWorker(config, pipeline=tiny_pipe)
    for task in read_shards(manifest, 1):
        worker.run(task)
    (record,) = Output(str(tmp_path / "out")).read_records("shard-00000").to_pylist()
    assert json.loads(record["kernels"]) == {**exact_kernels("cpu"), "compile": "none", "conv": "direct"}
    assert sdcore.exact_kernels is exact_kernels
