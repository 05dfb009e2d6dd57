"""jobs/spec.py: the YAML job spec is validated before any work, errors name their key."""

from __future__ import annotations

import re

import pytest

from jobs.spec import JobSpec, SpecError, load_spec, parse_spec

from conftest import spec_dict, write_spec

BASE = {"manifest": "m.parquet", "output": "out", "model": {"weights": "builtin:tiny"}}


def errors_of(data) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return str(info.value)


def test_minimal_spec_gets_defaults(tmp_path):
    spec = parse_spec(
        {"manifest": "m.parquet", "output": "out", "model": {"weights": "builtin:tiny"}}, base_dir=tmp_path
    )
    assert isinstance(spec, JobSpec)
    assert spec.manifest == (str(tmp_path / "m.parquet"),)
    assert spec.output == str(tmp_path / "out")
    assert spec.model.dtype == "auto"
    assert (spec.sampler.name, spec.sampler.steps, spec.sampler.width) == ("ddim", 25, 512)
    assert (spec.execution.workers, spec.execution.batch_size, spec.execution.shard_size) == ("auto", 8, 1000)
    assert spec.execution.batch_invariant is False  # fixed-shape exact batches by default
    assert spec.execution.compile_mode("cpu") == "none"  # an eager UNet unless asked for
    assert spec.execution.compile_mode("cuda") == "cuda-graphs"  # its kernels replayed from graphs
    assert spec.execution.conv == "winograd-f2x3"  # the faster CPU convolutions unless asked for
    assert spec.execution.decode_batch == "auto"  # batch_size on CUDA workers, 1 on CPU ones
    assert spec.image.format == "png"


@pytest.mark.parametrize(
    "execution, device, mode",
    [
        ({"compile": True}, "cpu", "default"),
        ({"compile": True}, "cuda", "reduce-overhead"),  # cuda_graphs auto: the compiled kernels in graphs
        ({"compile": True, "cuda_graphs": False}, "cuda", "default"),
        ({"cuda_graphs": False}, "cuda", "none"),
        ({"cuda_graphs": True}, "cuda", "cuda-graphs"),  # the eager kernels, replayed
        ({"cuda_graphs": True, "compile": True}, "cuda", "reduce-overhead"),
        ({"cuda_graphs": "auto"}, "cuda", "cuda-graphs"),
        ({"cuda_graphs": "auto"}, "cpu", "none"),  # auto: graphs on CUDA workers only
        ({"cuda_graphs": "auto", "compile": True}, "cpu", "default"),
    ],
)
def test_compile_switches(tmp_path, execution, device, mode):
    data = {"manifest": "m.parquet", "output": "out", "model": {"weights": "w"}, "execution": execution}
    assert parse_spec(data, base_dir=tmp_path).execution.compile_mode(device) == mode


def test_decode_batch_takes_auto_or_a_count(tmp_path):
    data = {"manifest": "m.parquet", "output": "out", "model": {"weights": "w"}, "execution": {"decode_batch": 16}}
    assert parse_spec(data, base_dir=tmp_path).execution.decode_batch == 16
    data["execution"] = {"decode_batch": 1, "batch_invariant": True}  # one decode per image: invariant
    assert parse_spec(data, base_dir=tmp_path).execution.decode_batch == 1


def test_the_spec_md_example_is_valid(tmp_path):
    text = """
name: example
manifest: manifests/example.parquet
output: outputs/example
model:
  weights: builtin:tiny
  dtype: auto
sampler:
  name: ddim
  steps: 25
  guidance_scale: 7.5
  width: 512
  height: 512
execution:
  workers: auto
  batch_size: 8
  shard_size: 1000
image:
  format: png
"""
    path = tmp_path / "x.yaml"
    path.write_text(text)
    spec = load_spec(path)
    assert spec.name == "example"
    assert spec.to_dict()["sampler"] == {
        "name": "ddim",
        "steps": 25,
        "guidance_scale": 7.5,
        "width": 512,
        "height": 512,
        "karras": False,
    }


def test_every_problem_is_reported_with_its_key():
    message = errors_of(
        {
            "manifest": "m.parquet",
            "output": "out",
            "model": {"weights": "builtin:tiny", "dtype": "float64"},
            "sampler": {"name": "plms", "steps": 0, "width": 500, "guidance_scale": "high", "karras": "yes"},
            "execution": {"workers": 0, "batch_size": True, "shard_size": 1.5, "colour": 1, "batch_invariant": "no"},
            "image": {"format": "gif"},
            "extra": 1,
        }
    )
    for needle in [
        "extra: unknown key",
        "model.dtype: expected one of auto, float32, float16, bfloat16, got 'float64'",
        "sampler.name: unknown sampler 'plms'; expected one of ddpm, ddim, euler_a, dpmpp_2m",
        "sampler.steps: expected an integer in 1..999, got 0",
        "sampler.width: 500 is not a multiple of 8",
        "sampler.guidance_scale: expected a finite number >= 0, got 'high'",
        "sampler.karras: expected true or false, got 'yes'",
        "execution.workers: expected 'auto' or an integer >= 1, got 0",
        "execution.batch_size: expected an integer in 1..4096, got True",
        "execution.shard_size: expected an integer >= 1, got 1.5",
        "execution.colour: unknown key",
        "execution.batch_invariant: expected true or false, got 'no'",
        "image.format: expected one of png, jpeg, webp, got 'gif'",
    ]:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"output": "o", "model": {"weights": "w"}}, "manifest: required key is missing"),
        ({"manifest": "m.parquet", "model": {"weights": "w"}}, "output: required key is missing"),
        ({"manifest": "m.parquet", "output": "o"}, "model: required section is missing"),
        ({"manifest": "m.parquet", "output": "o", "model": {}}, "model.weights: required key is missing"),
        ({"manifest": "m.txt", "output": "o", "model": {"weights": "w"}}, "not a .parquet/.csv/.tsv/.jsonl file"),
        ({"manifest": [], "output": "o", "model": {"weights": "w"}}, "manifest: expected a path/URI"),
        ({"manifest": "m.parquet", "output": "o", "model": "tiny"}, "model: expected a mapping"),
        (
            {
                "manifest": "m.parquet",
                "output": "o",
                "model": {"weights": "w"},
                "sampler": {"name": "ddim", "karras": True},
            },
            "sampler.karras: karras sigmas apply only to dpmpp_2m",
        ),
        (
            {"manifest": "m.parquet", "output": "o", "model": {"weights": "w"}, "execution": {"compile": "yes"}},
            "execution.compile: expected true or false",
        ),
        (
            {"manifest": "m.parquet", "output": "o", "model": {"weights": "w"}, "execution": {"cuda_graphs": "yes"}},
            "execution.cuda_graphs: expected true, false or auto, got 'yes'",
        ),
        (
            {
                "manifest": "m.parquet",
                "output": "o",
                "model": {"weights": "w"},
                "execution": {"cuda_graphs": True, "device": "cpu"},
            },
            "execution.cuda_graphs: CUDA graphs need CUDA workers, but execution.device is cpu",
        ),
        (
            {"manifest": "m.parquet", "output": "o", "model": {"weights": "w"}, "execution": {"conv": "winograd"}},
            "execution.conv: expected one of winograd-f2x3, direct",
        ),
        (
            {"manifest": "m.parquet", "output": "o", "model": {"weights": "w"}, "execution": {"decode_batch": 0}},
            "execution.decode_batch: expected 'auto' or an integer >= 1, got 0",
        ),
        (
            {
                "manifest": "m.parquet",
                "output": "o",
                "model": {"weights": "w"},
                "execution": {"decode_batch": 4, "batch_invariant": True},
            },
            "execution.decode_batch: 4 decodes per VAE forward contradicts batch_invariant: true",
        ),
    ],
)
def test_missing_and_wrong_keys(data, needle):
    assert needle in errors_of(data)


def test_not_a_mapping_and_bad_yaml(tmp_path):
    assert "expected a mapping at the top level" in errors_of(["a"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="cannot read job spec"):
        load_spec(tmp_path / "missing.yaml")


def test_manifest_list_glob_and_s3_paths_kept(tmp_path):
    spec = parse_spec(
        {
            "manifest": ["a.parquet", "s3://b/m/*.parquet"],
            "output": "s3://b/out/",
            "model": {"weights": "s3://b/w.safetensors"},
        },
        base_dir=tmp_path,
    )
    assert spec.manifest == (str(tmp_path / "a.parquet"), "s3://b/m/*.parquet")
    assert spec.output == "s3://b/out"
    assert spec.model.weights == "s3://b/w.safetensors"


def test_identity_leaves_out_locations_workers_and_batch(tmp_path):
    a = parse_spec(spec_dict("a.parquet", "out1"), base_dir=tmp_path)
    b = parse_spec(
        spec_dict("elsewhere/a.parquet", "out2", name="other", execution={"workers": 4, "batch_size": 7}),
        base_dir=tmp_path,
    )
    assert a.identity() == b.identity()
    c = parse_spec(spec_dict("a.parquet", "out1", sampler={"steps": 4}), base_dir=tmp_path)
    assert c.identity() != a.identity()
    d = parse_spec(spec_dict("a.parquet", "out1", execution={"shard_size": 4}), base_dir=tmp_path)
    assert d.identity() != a.identity()


def test_credentials_are_redacted_in_the_resolved_spec(tmp_path):
    spec = parse_spec(
        {
            "manifest": "s3://key:secret@b/m.parquet?token=abc",
            "output": "s3://b/o",
            "model": {"weights": "builtin:tiny"},
        }
    )
    text = str(spec.to_dict())
    assert "secret" not in text and "abc" not in text  # `?token=...` is part of the key: its value goes


def test_spec_takes_its_limits_from_sdcore_rules():
    """The spec accepts exactly what the pipeline runs: names, step and size limits come from
    sdcore.rules (one home), and checking a spec never imports torch."""
    import subprocess
    import sys

    from sdcore import rules

    for name in rules.SAMPLERS:
        assert parse_spec({**BASE, "sampler": {"name": name, "steps": rules.MAX_STEPS}}).sampler.name == name
    for bad in ({"steps": rules.MAX_STEPS + 1}, {"width": rules.MAX_SIZE + rules.SIZE_MULTIPLE}, {"name": "plms"}):
        with pytest.raises(SpecError):
            parse_spec({**BASE, "sampler": bad})
    code = "import sys, jobs.spec, jobs.manifest; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_weights_that_cannot_be_are_refused_by_the_spec_check(tmp_path):
    """Found before Ray starts (it used to take every worker ~15 s to say so)."""
    listed = tmp_path / "prompts.csv"
    listed.write_text("prompt\n")
    for weights, needle in [
        ("builtin:nope", "model.weights: unknown built-in model 'nope'; available: tiny, shapes"),
        ("s3://", "model.weights: 's3://' names no bucket"),
        (str(listed), "prompts.csv: unknown weights layout"),
    ]:
        with pytest.raises(SpecError, match=re.escape(needle)):
            parse_spec(spec_dict("m.parquet", "out", model={"weights": weights}))
    # A local path the driver lacks may be on the workers' machines: left to them (and to
    # `sdgen run`, which refuses it before an embedded Ray starts).
    parse_spec(spec_dict("m.parquet", "out", model={"weights": str(tmp_path / "elsewhere.safetensors")}))


def test_an_embedded_run_refuses_weights_missing_here_before_ray_starts(tmp_path, monkeypatch):
    from jobs.cluster import check_local_weights

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = parse_spec(spec_dict("m.parquet", "out", model={"weights": str(tmp_path / "none.safetensors")}))
    with pytest.raises(SpecError, match="model.weights: not found: .*none.safetensors"):
        check_local_weights(spec, address=None)
    check_local_weights(spec, address="10.0.0.1:6379")  # a cluster's workers may hold it


def test_load_spec_uses_file_stem_as_default_name(tmp_path):
    path = write_spec(tmp_path / "my-job.yaml", {k: v for k, v in spec_dict("m.parquet", "o").items() if k != "name"})
    assert load_spec(path).name == "my-job"


def test_load_spec_base_dir_anchors_relative_paths(tmp_path, monkeypatch):
    """`sdgen run SPEC --base-dir DIR`: relative paths mean DIR, not the current directory (under
    `ray job submit`, Ray's temporary copy of the working dir)."""
    path = tmp_path / "job.yaml"
    path.write_text("manifest: m.parquet\noutput: out\nmodel: {weights: w.safetensors}\n")
    monkeypatch.chdir(tmp_path)
    assert load_spec(path).output == str(tmp_path / "out")
    spec = load_spec(path, base_dir="/data/checkout")
    assert (spec.manifest, spec.output, spec.model.weights) == (
        ("/data/checkout/m.parquet",),
        "/data/checkout/out",
        "/data/checkout/w.safetensors",
    )
    assert spec.execution.shared_output is False
