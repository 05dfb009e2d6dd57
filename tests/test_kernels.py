"""sdcore/kernels.py: repeatable kernel choices, and an optional compiled UNet that is recorded and
remade the same way (a compiled UNet's fused kernels give other last bits than the eager one)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

import sdcore
from jobs.manifest import load_manifest
from jobs.output import Output
from jobs.reader import read_shards
from jobs.reproduce import Reproducer, find_records
from jobs.spec import SamplerSpec
from jobs.worker import ShardWorker, WorkerConfig
from sdcore.kernels import CudaGraphUNet, compile_unet, exact_kernels

from conftest import manifest_schema, small_rows, write_manifest


def test_exact_kernels_on_cpu_sets_nothing_and_says_so():
    assert exact_kernels("cpu") == {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def test_bad_compile_modes_are_refused(tiny_pipe):
    for mode in ("cuda-graphs", "reduce-overhead"):
        with pytest.raises(ValueError, match=f"CUDA graphs \\(compile mode {mode}\\) need a CUDA device, not cpu"):
            compile_unet(tiny_pipe, mode)
    with pytest.raises(ValueError, match="expected one of none, cuda-graphs, default, reduce-overhead, got 'fast'"):
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
        compile=True,
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


def one_eager_record(pipe, folder) -> Output:
    """An output holding one row's record and image, made by a worker on `pipe` (eager, CPU)."""
    manifest = load_manifest([str(write_manifest(folder / "m" / "m.parquet", small_rows(1), manifest_schema()))])
    config = WorkerConfig(weights="builtin:tiny", output=str(folder / "out"), sampler=SamplerSpec(steps=1))
    worker = ShardWorker(config, pipeline=pipe)
    for task in read_shards(manifest, 1):
        worker.run(task)
    output = Output(str(folder / "out"))
    output.write_job({"spec": {"image": {"quality": 95}}, "manifest": {"sources": []}})  # what reproduce reads
    return output


def test_eager_records_say_so(tiny_pipe, tmp_path):
    (record,) = one_eager_record(tiny_pipe, tmp_path).read_records("shard-00000").to_pylist()
    assert json.loads(record["kernels"]) == {**exact_kernels("cpu"), "compile": "none", "conv": "direct"}
    assert sdcore.exact_kernels is exact_kernels


def test_records_of_cuda_graphs_are_remade_eager_off_cuda(tiny_pipe, tmp_path):
    """CUDA graphs replay the eager kernels: a record made with them, remade where there is no
    CUDA device, runs the eager UNet (not a refused CUDA-only mode)."""
    output = one_eager_record(tiny_pipe, tmp_path)
    record = find_records(output, ["r000"], [])["id:r000"]
    kernels = {**json.loads(record.kernels), "compile": "cuda-graphs"}
    # as a CUDA worker with graphs would have written it (this machine has no CUDA device)
    record = dataclasses.replace(record, device="cuda", kernels=json.dumps(kernels))
    reproducer = Reproducer(output)
    result, _ = reproducer.compare(record, 40.0, exact=True)
    assert (result.verdict, result.passed) == ("identical", True), result.detail
    (pipe,) = reproducer._pipes.values()
    assert pipe.compile_mode == "none"


def unet_inputs(unet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small forward's inputs: two rows of 8x8 latents, their timesteps, a text context."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([10.0, 500.0]), context


def test_the_cuda_graph_wrapper_is_the_eager_unet_to_everything_but_its_replays(tiny_pipe):
    """What CPU can check of `CudaGraphUNet` (capture needs CUDA; bench/gpu_check.py checks its
    bits against eager there): it reads as the eager UNet (attributes, state dict keys, so
    fingerprints and exports are unchanged), hooks registered on it run at its own calls, and
    with autograd recording it runs the eager UNet."""
    inner = tiny_pipe.unet
    graphed = CudaGraphUNet(inner)
    assert graphed.conv_in is inner.conv_in and graphed.config is inner.config
    assert list(graphed.state_dict()) == list(inner.state_dict())
    seen = []
    handle = graphed.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape))
    x, t, context = unet_inputs(inner)
    with torch.enable_grad():
        out = graphed(x, t, context)
    handle.remove()
    assert seen == [x.shape]
    assert torch.equal(out, inner(x, t, context))


def test_a_shape_that_cannot_be_captured_runs_eagerly_with_a_warning(tiny_pipe):
    """Capturing fails here (no CUDA device): the job must not fail for an optimisation, so the
    shape runs eagerly, warned once, with the eager UNet's output."""
    inner = tiny_pipe.unet
    graphed = CudaGraphUNet(inner)
    x, t, context = unet_inputs(inner)
    with torch.inference_mode():
        with pytest.warns(RuntimeWarning, match=r"CUDA graph capture of the UNet failed for inputs \(2, 4, 8, 8\)"):
            first = graphed(x, t, context)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not warned again for the same shape
            second = graphed(x, t, context)
        eager = inner(x, t, context)
    assert torch.equal(first, eager) and torch.equal(second, eager)
