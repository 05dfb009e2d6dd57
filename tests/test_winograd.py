"""sdcore/winograd.py: 3x3 convolutions as Winograd F(2x2, 3x3), chosen per pipeline
(`set_conv_algorithm`), recorded with every image and remade by `reproduce`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import sdcore
from jobs.manifest import load_manifest
from jobs.output import Output
from jobs.reader import read_shards
from jobs.reproduce import Reproducer, find_records
from jobs.spec import SamplerSpec
from jobs.worker import ShardWorker, WorkerConfig
from sdcore import winograd
from sdcore.config import ModelConfig, UNetConfig
from sdcore.layers import Conv2d
from sdcore.request import GenerationRequest
from sdcore.weights import assemble, export_single_file, random_parts

from conftest import manifest_schema, small_rows, write_manifest


def conv_case(n, c, k, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(k, c, 3, 3, generator=gen) / (3 * c**0.5)  # outputs of order 1
    bias = torch.randn(k, generator=gen)
    return x, weight, bias


# (N, C, K, H, W): non-square, K != C, one tile row, tile rows split over several chunks
SHAPES = [(2, 8, 12, 6, 10), (1, 16, 16, 2, 2), (3, 32, 24, 16, 12), (4, 256, 256, 8, 8), (1, 64, 32, 40, 40)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_equals_the_direct_convolution_to_float_rounding(shape, with_bias):
    x, weight, bias = conv_case(*shape)
    bias = bias if with_bias else None
    exact = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    ours = winograd.conv3x3(x, winograd.transform_weight(weight), bias)
    direct = F.conv2d(x, weight, bias, padding=1)
    assert ours.shape == exact.shape and ours.dtype == torch.float32
    # The same size of rounding error as oneDNN's own kernel (measured 1-3e-6 for both).
    assert (ours.double() - exact).abs().max() < 2e-5
    assert (direct.double() - exact).abs().max() < 2e-5


def test_the_rule_names_the_convolutions_it_takes():
    assert winograd.eligible(torch.nn.Conv2d(256, 320, 3, padding=1))
    assert not winograd.eligible(torch.nn.Conv2d(255, 320, 3, padding=1))  # too few channels in
    assert not winograd.eligible(torch.nn.Conv2d(320, 128, 3, padding=1))  # too few out
    assert not winograd.eligible(torch.nn.Conv2d(320, 320, 3, stride=2, padding=1))
    assert not winograd.eligible(torch.nn.Conv2d(320, 320, 1))
    assert not winograd.eligible(torch.nn.Conv2d(320, 320, 3, padding=1, groups=2))
    assert not winograd.eligible(torch.nn.Conv2d(320, 320, 3, padding=1, padding_mode="reflect"))
    assert winograd.applies(torch.zeros(1, 4, 6, 8))
    assert not winograd.applies(torch.zeros(1, 4, 5, 8))  # odd height: no whole 2x2 tiles
    assert not winograd.applies(torch.zeros(1, 4, 6, 8, dtype=torch.float64))


def test_the_module_runs_winograd_only_where_switched_on_and_applicable():
    x, weight, bias = conv_case(2, 8, 8, 6, 6)
    conv = Conv2d(8, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        direct = F.conv2d(x, weight, bias, padding=1)
        assert torch.equal(conv(x), direct)  # off by default
        conv.use_winograd = True
        assert torch.equal(conv(x), winograd.conv3x3(x, winograd.transform_weight(weight), bias))
        assert not torch.equal(conv(x), direct)  # another algorithm: other last bits
        odd = x[:, :, :5]
        assert torch.equal(conv(odd), F.conv2d(odd, weight, bias, padding=1))  # falls back


def test_transformed_filters_follow_the_weight():
    x, weight, bias = conv_case(1, 8, 8, 4, 4)
    conv = Conv2d(8, 8, 3, padding=1)
    conv.use_winograd = True
    with torch.no_grad():
        conv.weight.copy_(weight)
        first = conv(x)
        conv.weight.mul_(2)  # in place
        assert torch.allclose(conv(x), F.conv2d(x, 2 * weight, bias=conv.bias, padding=1), atol=1e-5)
        conv.load_state_dict({"weight": weight, "bias": conv.bias.clone()})
        assert torch.equal(conv(x), first)
    conv.weight = torch.nn.Parameter(-weight)  # replaced
    with torch.no_grad():
        assert torch.allclose(conv(x), F.conv2d(x, -weight, bias=conv.bias, padding=1), atol=1e-5)


@pytest.mark.parametrize("chunk_tiles", [512, 5])  # whole images per chunk; rows split over chunks
def test_a_rows_bits_do_not_depend_on_its_neighbours(chunk_tiles, monkeypatch):
    """The fixed-shape contract (sdcore/pipeline.py): at one input shape, other rows leave a
    row's output bit-identical; only its position may matter."""
    monkeypatch.setattr(winograd, "CHUNK_TILES", chunk_tiles)
    x, weight, bias = conv_case(4, 256, 256, 8, 6)
    u = winograd.transform_weight(weight)
    reference = winograd.conv3x3(x, u, bias)
    others = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)) * 3
    for slot in range(4):
        mixed = others.clone()
        mixed[slot] = x[slot]
        assert torch.equal(winograd.conv3x3(mixed, u, bias)[slot], reference[slot]), slot


# A small model whose UNet has Winograd-eligible convolutions (256 channels); the VAE and text
# encoder stay the tiny config's.
WIDE = dataclasses.replace(
    ModelConfig.tiny(),
    unet=UNetConfig(
        block_out_channels=(256, 256),
        attention_levels=(True, False),
        layers_per_block=1,
        num_heads=4,
        cross_attention_dim=32,
    ),
)


@pytest.fixture(scope="module")
def wide_pipe():
    return assemble(WIDE, random_parts(WIDE, seed=0), source="wide")


def test_pipelines_default_to_winograd_where_it_applies(wide_pipe, tiny_pipe):
    assert wide_pipe.conv_algorithm == "winograd-f2x3"
    assert tiny_pipe.conv_algorithm == "direct"  # no convolution of 256 channels: nothing ran it
    with pytest.raises(ValueError, match="expected one of winograd-f2x3, direct, got 'fft'"):
        sdcore.set_conv_algorithm(wide_pipe, "fft")
    assert wide_pipe.conv_algorithm == "winograd-f2x3"  # a refused name changes nothing


def test_a_pipeline_switched_to_direct_before_it_runs_never_transforms_its_filters(monkeypatch):
    """`execution.conv: direct` is for hosts short of memory: the transformed copy must never be
    made, not even once at load; switched back, it is made at the first forward."""
    made = []
    monkeypatch.setattr(winograd, "transform_weight", lambda w: made.append(w.shape) or w.new_zeros(16, *w.shape[:2]))
    pipe = assemble(WIDE, random_parts(WIDE, seed=0), source="wide")
    sdcore.set_conv_algorithm(pipe, "direct")
    settings = dict(sampler="ddim", steps=1, guidance_scale=5.0, width=64, height=64)
    pipe.generate([GenerationRequest("a red square", seed=1)], **settings)
    assert made == []
    sdcore.set_conv_algorithm(pipe, "winograd-f2x3")
    assert made == []  # not at the switch either
    pipe.generate([GenerationRequest("a red square", seed=1)], **settings)
    assert made and all(shape[0] >= winograd.MIN_CHANNELS for shape in made)


def test_the_two_algorithms_give_other_bits_and_each_repeats(wide_pipe):
    settings = dict(sampler="ddim", steps=2, guidance_scale=5.0, width=64, height=64, fixed_batch=2)
    rows = [GenerationRequest("a red square", seed=1), GenerationRequest("a blue circle", seed=2)]
    images = {}
    try:
        for name in ("direct", "winograd-f2x3", "direct", "winograd-f2x3"):
            sdcore.set_conv_algorithm(wide_pipe, name)
            made = [np.asarray(image) for image in wide_pipe.generate(rows, **settings)]
            if name in images:
                assert all(np.array_equal(a, b) for a, b in zip(images[name], made)), name
            images[name] = made
        raw = {}
        for name in ("direct", "winograd-f2x3"):
            sdcore.set_conv_algorithm(wide_pipe, name)
            with torch.inference_mode():
                gen = torch.Generator().manual_seed(0)
                latents, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
                raw[name] = wide_pipe.unet(latents, torch.tensor([10.0, 900.0]), context)
        assert not torch.equal(raw["direct"], raw["winograd-f2x3"])
        assert torch.allclose(raw["direct"], raw["winograd-f2x3"], rtol=1e-4, atol=1e-5)
    finally:
        sdcore.set_conv_algorithm(wide_pipe, "winograd-f2x3")


def test_records_name_the_conv_algorithm_and_reproduce_remakes_it(wide_pipe, tmp_path):
    """A job's records say how the convolutions ran; reproduce sets the same and reports
    identical; records without the field (older outputs) are remade with direct convolutions."""
    weights = tmp_path / "wide.safetensors"
    export_single_file(wide_pipe, weights)
    manifest = load_manifest([str(write_manifest(tmp_path / "m" / "m.parquet", small_rows(2), manifest_schema()))])
    records = {}
    for name in ("winograd-f2x3", "direct"):
        pipe = sdcore.load_pipeline(weights)  # Winograd by default; the worker sets the job's choice
        out = tmp_path / name
        config = WorkerConfig(
            weights=str(weights),
            output=str(out),
            sampler=SamplerSpec(steps=2, width=64, height=64),
            dtype="float32",
            batch_size=2,
            threads=1,
            conv_algorithm=name,  # execution.conv
        )
        worker = ShardWorker(config, pipeline=pipe)
        assert pipe.conv_algorithm == name
        for task in read_shards(manifest, 2):
            worker.run(task)
        output = Output(str(out))
        output.write_job({"spec": {"image": {"quality": 95}}, "manifest": {"sources": []}})
        records[name] = output.read_records("shard-00000").to_pylist()
        assert {json.loads(r["kernels"])["conv"] for r in records[name]} == {name}
        reproducer = Reproducer(output)
        for rid in ("r000", "r001"):
            record = find_records(output, [rid], [])[f"id:{rid}"]
            result, _ = reproducer.compare(record, 40.0, exact=True)
            assert (result.verdict, result.passed) == ("identical", True), (name, result.detail)
        (remade,) = reproducer._pipes.values()
        assert remade.conv_algorithm == name
        if name == "direct":  # an older record (no "conv" key): remade the direct way, identical
            kernels = json.loads(record.kernels)
            del kernels["conv"]
            older = dataclasses.replace(record, kernels=json.dumps(kernels))
            result, _ = Reproducer(output).compare(older, 40.0, exact=True)
            assert (result.verdict, result.passed) == ("identical", True), result.detail
    # the two jobs' images differ in their bits, so the recorded name is what makes them exact
    hashes = {name: {r["id"]: r["image_sha256"] for r in rs} for name, rs in records.items()}
    assert hashes["direct"] != hashes["winograd-f2x3"]
