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
        ({"prompt": "x", "seed": 1, "init_image": picture(0)}, "needs a strength"),
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


def test_a_float32_strength_counts_steps_as_its_decimal_and_diffusers_do():
    """np.float32(0.7) is 0.699999988 once widened: int(10 * that) ran 6 steps where diffusers,
    computing in float32, runs 7 (and the user wrote 0.7)."""
    assert rules.img2img_steps(10, np.float32(0.7)) == 7 == int(np.float32(10) * np.float32(0.7))
    request = GenerationRequest("x", seed=1, init_image=picture(0), strength=np.float32(0.7))
    assert request.resolve({**SETTINGS, "steps": 10}).strength == 0.7


def test_a_0dim_torch_strength_and_guidance_read_as_their_decimal_as_numpy_float32_does(pipe):
    """torch.tensor(0.7) is float32 too: through the library call it was refused ("expected a
    number"), and where it was read (samplers' start index) it was widened to 0.699999988, so
    int(10 * strength) ran 6 steps, not 7. float16/bfloat16 read likewise; a float64 as it is."""
    import torch

    from sdcore import schedules

    settings = {**SETTINGS, "steps": 10}
    init = picture(2)

    def image(strength, guidance_scale):
        request = GenerationRequest("a red circle", seed=5, init_image=init, strength=strength)
        return pipe.generate([request], **{**settings, "guidance_scale": guidance_scale})[0]

    written = image(0.7, 7.1)
    assert same(image(torch.tensor(0.7), torch.tensor(7.1)), written)
    assert not same(image(0.699999988079071, 7.1), written)  # the widened value: one step fewer
    assert schedules.img2img_start_index(10, torch.tensor(0.7)) == 3 == schedules.img2img_start_index(10, 0.7)

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        request = GenerationRequest("x", seed=1, init_image=init, strength=torch.tensor(0.7, dtype=dtype))
        resolved = request.resolve({**settings, "guidance_scale": torch.tensor(7.1, dtype=dtype)})
        assert (resolved.strength, resolved.guidance_scale) == (0.7, 7.1), dtype
        assert type(resolved.strength) is float and type(resolved.guidance_scale) is float
    for value in (0.7, 0.1, 1 / 3, 7.5, 1e-3):  # the decimal numpy prints for its float32
        assert rules.as_float(torch.tensor(value)) == rules.as_float(np.float32(value)), value
    wide = torch.tensor(0.699999988079071, dtype=torch.float64)
    assert GenerationRequest("x", seed=1, init_image=init, strength=wide).resolve(settings).strength == wide.item()
    for not_a_number in (torch.tensor([0.7]), torch.tensor(True)):
        with pytest.raises(ValueError, match="strength: expected a number"):
            GenerationRequest("x", seed=1, init_image=init, strength=not_a_number).resolve(settings)
    with pytest.raises(ValueError, match="guidance_scale: expected a finite number >= 0"):
        GenerationRequest("x", seed=1).resolve({**settings, "guidance_scale": torch.tensor(-1.0)})


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
