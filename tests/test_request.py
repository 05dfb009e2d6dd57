"""sdcore/request.py and sdcore/rules.py: the typed request `generate` takes, per-request settings,
and the shared limits (no torch needed to check them)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sdcore
from sdcore import GenerationRequest, rules

SETTINGS = dict(sampler="ddim", karras=False, steps=4, guidance_scale=5.0, width=32, height=32)


@pytest.fixture(scope="module")
def pipe():
    return sdcore.load_pipeline("builtin:tiny")


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.BILINEAR)


def same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_typed_request_and_mapping_give_the_same_image(pipe):
    typed = pipe.generate([GenerationRequest("a red circle", seed=3, negative="blue")], **SETTINGS)[0]
    mapping = pipe.generate([{"prompt": "a red circle", "seed": 3, "negative": "blue"}], **SETTINGS)[0]
    assert same(typed, mapping)


def test_per_request_settings_equal_separate_calls(pipe):
    """A request's own settings override the call's, and a mixed call gives each request the image
    a call with those settings as defaults gives it."""
    init = picture(1)
    mixed = [
        GenerationRequest("a", seed=1),
        GenerationRequest("b", seed=2, sampler="euler_a", steps=3),
        GenerationRequest("c", seed=3, init_image=init, strength=0.5, guidance_scale=1.0),
        GenerationRequest("d", seed=4, sampler="dpmpp_2m", karras=True, width=40, height=24),
    ]
    together = pipe.generate(mixed, **SETTINGS)
    for request, image in zip(mixed, together):
        own = {k: v for k, v in request.settings().items() if v is not None}
        alone = pipe.generate(
            [GenerationRequest(request.prompt, request.seed, init_image=request.init_image, strength=request.strength)],
            **{**SETTINGS, **own},
        )[0]
        assert same(image, alone), request
    assert together[3].size == (40, 24)
    assert not same(together[0], together[1])


def test_txt2img_request_drops_its_strength():
    assert GenerationRequest("x", seed=1, strength=0.3).strength is None
    assert GenerationRequest("x", seed=1, init_image=picture(0), strength=0.3).mode == "img2img"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompt": 3, "seed": 1}, "prompt: expected a string"),
        ({"prompt": "x", "seed": True}, "seed: expected an integer"),
        ({"prompt": "x", "seed": rules.MAX_SEED + 1}, "outside 0..2**63-1"),
        ({"prompt": "x", "seed": 1, "init_image": picture(0)}, "^strength: an img2img request"),
    ],
)
def test_bad_request_is_refused_when_made(fields, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace(".", r"\.")):
        GenerationRequest(**fields)


def test_resolve_applies_the_strength_rule_with_the_resolved_steps():
    request = GenerationRequest("x", seed=1, init_image=picture(0), strength=0.2)
    assert request.resolve({**SETTINGS, "steps": 10}).steps == 10  # int(10 * 0.2) = 2 steps run
    with pytest.raises(ValueError, match="leaves no denoising step"):
        request.resolve({**SETTINGS, "steps": 4})  # int(4 * 0.2) = 0
    with pytest.raises(ValueError, match="leaves no denoising step"):
        GenerationRequest("x", seed=1, init_image=picture(0), strength=0.2, steps=4).resolve({**SETTINGS, "steps": 10})


def test_rules_are_the_diffusers_rules():
    assert rules.img2img_steps(25, 0.6) == 15  # diffusers: int(25 * 0.6)
    assert rules.img2img_steps(10, 1.0) == 10
    assert rules.strength_problem(0.05, 10) and not rules.strength_problem(0.1, 10)
    assert rules.MAX_STEPS == 999 and rules.MAX_SEED == 2**63 - 1
    assert rules.size_problem(64) is None and rules.size_problem(60) and rules.size_problem(60, multiple=4) is None
    assert rules.karras_problem(True, "dpmpp_2m") is None and rules.karras_problem(True, "ddim")


def diffusers_steps(steps, strength):
    """How many steps diffusers' img2img pipeline denoises for `strength` as given, by its own
    `get_timesteps` (on a real DDIM scheduler)."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)
    _, denoised = StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=scheduler), steps, strength, "cpu"
    )
    return denoised


@pytest.mark.parametrize("steps, written", [(10, 0.7), (50, 0.58), (90, 0.7), (75, 0.84), (100, 0.29)])
def test_a_strength_counts_its_steps_in_its_own_type_as_diffusers_does(steps, written):
    """diffusers computes int(steps * strength) in the strength's type: np.float32(0.7) x 10 is
    7.0 in float32 (widened first, it was 6.99999988: one step too few), and np.float32(0.58) x 50
    rounds up to 29.0 where the Python float 0.58 gives 28.99999999 (and 75 x float32(0.84) one
    fewer). Reading a float32 as its decimal, as the library once did, got 28 there; diffusers
    given the same object, 29."""
    import torch

    given = [written, np.float32(written), np.float16(written), torch.tensor(written), torch.tensor(written).half()]
    for strength in given:
        expected = diffusers_steps(steps, strength)
        assert rules.img2img_steps(steps, strength) == expected, (strength, type(strength))
        request = GenerationRequest("x", seed=1, init_image=picture(0), strength=strength)
        resolved = request.resolve({**SETTINGS, "steps": steps})
        assert rules.img2img_steps(steps, resolved.strength) == expected
    if (steps, written) != (10, 0.7):  # pairs where float32 and the decimal count differently
        assert rules.img2img_steps(steps, np.float32(written)) != rules.img2img_steps(steps, written)


def test_a_0dim_torch_strength_and_guidance_are_taken_as_numbers(pipe):
    """torch.tensor(0.7) as strength or guidance: refused before ("expected a number"); now the
    same image as 0.7 (10 x float32(0.7) is 7.0: the same 7 steps), and the widened value written
    as a Python float (6.99999988: 6 steps) another."""
    import torch

    from sdcore import schedules

    settings = {**SETTINGS, "steps": 10}
    init = picture(2)

    def image(strength, guidance_scale):
        request = GenerationRequest("a red circle", seed=5, init_image=init, strength=strength)
        return pipe.generate([request], **{**settings, "guidance_scale": guidance_scale})[0]

    written = image(0.7, 7.0)
    assert same(image(torch.tensor(0.7), torch.tensor(7.0)), written)
    assert not same(image(0.699999988079071, 7.0), written)  # the widened value: one step fewer
    assert schedules.img2img_start_index(10, torch.tensor(0.7)) == 3 == schedules.img2img_start_index(10, 0.7)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        request = GenerationRequest("x", seed=1, init_image=init, strength=torch.tensor(0.5, dtype=dtype))
        resolved = request.resolve({**settings, "guidance_scale": torch.tensor(7.5, dtype=dtype)})
        assert resolved.guidance_scale == 7.5 and type(resolved.guidance_scale) is float
        assert rules.img2img_steps(10, resolved.strength) == 5
    for not_a_number in (torch.tensor([0.7]), torch.tensor(True)):
        with pytest.raises(ValueError, match="strength: expected a number"):
            GenerationRequest("x", seed=1, init_image=init, strength=not_a_number).resolve(settings)


def test_the_strength_a_too_small_strength_error_suggests_is_accepted():
    for steps in (3, 7, 12, 999):
        problem = rules.strength_problem(0.5 / steps, steps)
        least = float(problem.split("use strength >= ")[1].split()[0])
        assert rules.strength_problem(least, steps) is None, (steps, least)


def test_rules_import_no_torch():
    code = "import sys, sdcore.rules; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_request_naming_its_sampler_takes_the_calls_karras_only_where_it_applies():
    """The README's example: the call says dpmpp_2m with karras=True, one request says euler_a
    (no Karras sigmas). It raised `karras: ... only to dpmpp_2m`; a manifest row runs it."""
    defaults = {"sampler": "dpmpp_2m", "karras": True, "steps": 4, "guidance_scale": 7.5, "width": 32, "height": 32}
    assert GenerationRequest("a", seed=1, sampler="euler_a").resolve(defaults).karras is False
    assert GenerationRequest("a", seed=1, sampler="dpmpp_2m").resolve(defaults).karras is True
    assert GenerationRequest("a", seed=1).resolve(defaults).karras is True
    with pytest.raises(ValueError, match="karras: karras sigmas apply only to dpmpp_2m"):
        GenerationRequest("a", seed=1, sampler="euler_a", karras=True).resolve(defaults)  # asked for by the request


def test_one_request_where_a_list_goes_and_a_device_torch_lacks_are_named(pipe):
    with pytest.raises(TypeError, match="requests: expected a list of GenerationRequest .* got one GenerationRequest"):
        pipe.generate(GenerationRequest("a", seed=1), sampler="ddim", steps=2, guidance_scale=5, width=32, height=32)
    with pytest.raises(ValueError, match="device 'tpu': not a torch device"):
        sdcore.load_pipeline("builtin:tiny", device="tpu")
    import torch

    if torch.cuda.is_available():
        assert sdcore.load_pipeline("builtin:tiny", device="cuda").device.type == "cuda"
    else:  # the CPU machines CI runs on: torch's own AssertionError before
        with pytest.raises(ValueError, match="device cuda: this torch has no CUDA device"):
            sdcore.load_pipeline("builtin:tiny", device="cuda")


def test_integer_settings_take_numpy_and_0dim_torch_integers_and_resolve_to_plain_values():
    """steps=torch.tensor(4), width=torch.tensor(32), seed=torch.tensor(3) and karras=np.bool_
    were refused ("expected an integer ... got tensor(4)") while torch.tensor(0.7) was a strength;
    the resolved request holds plain Python ints and bools."""
    import torch

    request = GenerationRequest("x", seed=torch.tensor(3), init_image=picture(0), strength=0.5)
    assert request.seed == 3 and type(request.seed) is int
    given = {
        "sampler": "dpmpp_2m",
        "karras": np.bool_(True),
        "steps": torch.tensor(4),
        "guidance_scale": torch.tensor(5),
        "width": torch.tensor(32, dtype=torch.int32),
        "height": np.int64(32),
    }
    resolved = request.resolve(given)
    assert resolved.settings() == {**SETTINGS, "sampler": "dpmpp_2m", "karras": True}
    assert [type(getattr(resolved, name)) for name in ("karras", "steps", "guidance_scale", "width", "height")] == [
        bool, int, float, int, int,
    ]  # fmt: skip
    assert GenerationRequest("x", seed=1, karras=torch.tensor(False)).resolve(SETTINGS).karras is False
    assert rules.steps_problem(np.uint8(4)) is None and rules.seed_problem(np.int64(7)) is None
    for not_an_integer in (torch.tensor(4.0), torch.tensor([4]), torch.tensor(True), np.bool_(True), 4.0):
        assert rules.steps_problem(not_an_integer), not_an_integer
    assert rules.karras_problem(np.int64(1), "dpmpp_2m")  # an integer is no boolean
    with pytest.raises(ValueError, match="width: 36 is not a multiple of 8"):
        request.resolve({**given, "width": torch.tensor(36)})


def test_a_call_may_leave_out_the_settings_every_request_sets(pipe):
    """generate required all five call settings even when every request set its own."""
    own = {k: v for k, v in SETTINGS.items() if k != "karras"}
    alone = pipe.generate([GenerationRequest("a", seed=1, **own)])[0]
    assert same(alone, pipe.generate([GenerationRequest("a", seed=1)], **own)[0])
    placed = pipe.generate_placed([{"prompt": "a", "seed": 1, **own}], fixed_batch=1)
    assert same(placed[0][0], alone)
    streamed = list(pipe.generate_stream([GenerationRequest("a", seed=1, **own)]))
    assert same(streamed[0][1], alone)
    with pytest.raises(ValueError, match="request 1: no value for steps, width"):
        pipe.generate([GenerationRequest("a", seed=1, **own), GenerationRequest("b", seed=2, sampler="ddim")],
                      guidance_scale=5.0, height=32)  # fmt: skip


def test_a_device_without_data_or_compute_is_refused_at_load():
    """device="meta" loaded, and generate then failed with NotImplementedError."""
    with pytest.raises(ValueError, match="device meta: tensors there have shapes but no data"):
        sdcore.load_pipeline("builtin:tiny", device="meta")
    import importlib.util

    if importlib.util.find_spec("torch_xla") is None:  # a device type this torch has no backend for
        with pytest.raises(ValueError, match="device xla: cannot compute there"):
            sdcore.load_pipeline("builtin:tiny", device="xla")
