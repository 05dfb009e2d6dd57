"""Whole images: sdcore's pipeline against diffusers' StableDiffusion(Img2Img)Pipeline on the same
random weights and seeds, for every sampler; batch independence; bad input."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

import sdcore
from sdcore.config import ModelConfig
from sdcore.layers import GroupNorm
from sdcore.pipeline import Placement
from sdcore.tokenizer import PromptTruncatedWarning, get_tokenizer, tokenize

from tests.reference import SD15_SCHEDULER_CONFIG, save_diffusers_folder

MAX_PIXEL_DIFF = 2  # out of 255
SCHEDULERS = {
    ("ddpm", False): (DDPMScheduler, {}),
    ("ddim", False): (DDIMScheduler, {}),
    ("euler_a", False): (EulerAncestralDiscreteScheduler, {}),
    ("dpmpp_2m", False): (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    ("dpmpp_2m", True): (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}


def init_image(seed: int, size=(64, 48)) -> Image.Image:
    """A smooth random picture (random noise would be an unusually hard VAE input)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A diffusers-format folder (as users download them) holding small random weights."""
    folder = tmp_path_factory.mktemp("tiny-diffusers")
    save_diffusers_folder(ModelConfig.tiny(), 7, folder)
    return folder


@pytest.fixture(scope="module")
def ours(model_folder):
    return sdcore.load_pipeline(model_folder)


@pytest.fixture(scope="module")
def reference(model_folder):
    txt2img = StableDiffusionPipeline.from_pretrained(
        model_folder, safety_checker=None, requires_safety_checker=False, tokenizer=get_tokenizer()
    )
    txt2img.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**txt2img.components)
    img2img.set_progress_bar_config(disable=True)
    return txt2img, img2img


def max_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize("sampler, karras", list(SCHEDULERS))
def test_txt2img_and_img2img_match_diffusers(ours, reference, sampler, karras):
    txt2img, img2img = reference
    cls, extra = SCHEDULERS[(sampler, karras)]
    scheduler = cls.from_config({**SD15_SCHEDULER_CONFIG, **extra})
    steps = 6
    settings = dict(sampler=sampler, steps=steps, guidance_scale=7.5, width=64, height=48, karras=karras)

    txt2img.scheduler = scheduler
    expected = txt2img(
        "a red circle at the top left",
        negative_prompt="blurry",
        num_inference_steps=steps,
        guidance_scale=7.5,
        width=64,
        height=48,
        generator=torch.Generator("cpu").manual_seed(1234),
    ).images[0]
    got = ours.generate([{"prompt": "a red circle at the top left", "negative": "blurry", "seed": 1234}], **settings)[0]
    assert max_diff(expected, got) <= MAX_PIXEL_DIFF

    img2img.scheduler = cls.from_config({**SD15_SCHEDULER_CONFIG, **extra})
    start = init_image(5)
    expected = img2img(
        "a blue star",
        image=start,
        strength=0.7,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(99),
    ).images[0]
    row = {"prompt": "a blue star", "seed": 99, "strength": 0.7, "init_image": start}
    got = ours.generate([row], **settings)[0]
    assert max_diff(expected, got) <= MAX_PIXEL_DIFF


def test_no_guidance_matches_diffusers(ours, reference):
    """guidance_scale <= 1 runs the conditional branch only, as diffusers does."""
    txt2img, _ = reference
    txt2img.scheduler = DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    expected = txt2img(
        "a square",
        num_inference_steps=4,
        guidance_scale=1.0,
        width=32,
        height=32,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    got = ours.generate(
        [{"prompt": "a square", "seed": 3}], sampler="ddim", steps=4, guidance_scale=1.0, width=32, height=32
    )[0]
    assert max_diff(expected, got) <= MAX_PIXEL_DIFF


MIXED_ROWS = [
    {"prompt": "a red circle", "seed": 1},
    {"prompt": "a green square", "negative": "dark", "seed": 2},
    {"prompt": "a blue star", "seed": 3, "strength": 0.5, "init_image": init_image(1)},
    {"prompt": "a red circle", "seed": 4, "strength": 0.8, "init_image": init_image(2)},
    {"prompt": "a yellow triangle", "seed": 2**63 - 1, "strength": 1.0, "init_image": init_image(3)},
]


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a"])  # the two that draw noise every step
def test_row_image_independent_of_batch(ours, sampler):
    settings = dict(sampler=sampler, steps=5, guidance_scale=6.0, width=64, height=48)
    batch = ours.generate(MIXED_ROWS, **settings)
    reversed_batch = ours.generate(MIXED_ROWS[::-1], **settings)[::-1]
    for row, in_batch, in_reversed in zip(MIXED_ROWS, batch, reversed_batch):
        alone = ours.generate([row], **settings)[0]
        assert np.array_equal(np.asarray(alone), np.asarray(in_batch))
        assert np.array_equal(np.asarray(alone), np.asarray(in_reversed))
    # different seeds really give different images
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[1]))


def test_repeated_prompts_are_encoded_once(ours):
    ours.clear_embedding_cache()
    rows = [{"prompt": "a cat", "seed": s} for s in range(3)]
    ours.generate(rows, sampler="ddim", steps=2, guidance_scale=5.0, width=32, height=32)
    assert set(ours._embeddings) == {"a cat", ""}


def test_the_prompt_cache_is_bounded_in_bytes(ours, monkeypatch):
    from sdcore import pipeline

    ours.clear_embedding_cache()
    one = ours.encode_prompt("prompt 0")
    size = one.numel() * one.element_size()
    monkeypatch.setattr(pipeline, "EMBEDDING_CACHE_BYTES", 3 * size)
    for k in range(1, 10):
        ours.encode_prompt(f"prompt {k}")
    assert ours.embedding_cache_bytes == 3 * size  # the three most recent prompts
    assert list(ours._embeddings) == ["prompt 7", "prompt 8", "prompt 9"]
    ours.clear_embedding_cache()


def test_cross_attention_keys_and_values_are_kept_between_steps_with_the_same_bits(model_folder):
    """The prompts' K and V are computed once per batch of rows, not at every step, and the
    cached ones give the bits of computing them afresh; a new context or a changed weight remakes
    them; nothing is kept after a generation."""
    pipe = sdcore.load_pipeline(model_folder)
    unet = pipe.unet
    cross = [m.attn2 for m in unet.modules() if hasattr(m, "attn2")]
    calls = []
    for attention in cross:
        attention.to_k.register_forward_hook(lambda *a: calls.append(1))
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 6, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([999.0, 10.0])
    with torch.inference_mode():
        first = unet(x, t, context)
        second = unet(x * 0.5, t - 5, context)  # the same context object: K and V reused
        assert len(calls) == len(cross)  # computed once, not twice
        fresh = unet(x * 0.5, t - 5, context.clone())  # another tensor: computed again
        assert len(calls) == 2 * len(cross)
        assert torch.equal(second, fresh)
        assert not torch.equal(first, second)
        assert torch.equal(unet(x * 0.5, t - 5, context), second)  # `context`'s K and V cached again
    # A weight changed in place between forwards: the cached K is stale and must be remade.
    with torch.no_grad():
        cross[0].to_k.weight.mul_(1.5)
    with torch.inference_mode():
        changed = unet(x * 0.5, t - 5, context)
        assert torch.equal(changed, unet(x * 0.5, t - 5, context.clone()))
        assert not torch.equal(changed, fresh)
    # Through the pipeline: one K/V per batch (4 rows in one fixed-shape forward, 6 steps), and
    # nothing held once the images are out.
    calls.clear()
    rows = [{"prompt": f"a shape {i}", "seed": i} for i in range(4)]
    pipe.generate(rows, sampler="ddim", steps=6, guidance_scale=5.0, width=32, height=32, fixed_batch=4,
                  batch_invariant=False)  # fmt: skip
    assert len(calls) == len(cross)
    assert all(attention._context_cache is None for attention in cross)


def test_odd_latent_size_runs(ours):
    """Any multiple of 8 works, including sizes whose latent does not halve evenly."""
    image = ours.generate(
        [{"prompt": "x", "seed": 0}], sampler="ddim", steps=2, guidance_scale=5.0, width=40, height=24
    )[0]
    assert image.size == (40, 24)


@pytest.mark.parametrize("width, height", [(8, 8), (16, 8), (16, 16)])
def test_the_smallest_sizes_run_unguided(ours, width, height):
    """One unguided row at the tiny config's smallest sizes reaches a 1x1 map with one channel
    per norm group, which PyTorch's GroupNorm (and diffusers) refuses: sdcore's normalizes it
    (to its bias), the same way every time."""

    def make():
        rows = [{"prompt": "x", "seed": 3}]
        return ours.generate(rows, sampler="ddim", steps=2, guidance_scale=1.0, width=width, height=height)[0]

    first = make()
    assert first.size == (width, height)
    assert first.tobytes() == make().tobytes()


def test_a_group_of_one_value_normalizes_to_the_bias_as_in_a_larger_batch():
    generator = torch.Generator().manual_seed(0)
    norm = GroupNorm(4, 4)
    with torch.no_grad():
        norm.bias.copy_(torch.randn(4, generator=generator))
    one = torch.tensor([1.0, -2.0, 3.0, 0.5]).view(1, 4, 1, 1)
    # the bias, up to the rounding of its mean (amplified by 1/sqrt(eps))
    torch.testing.assert_close(norm(one), norm.bias.view(1, 4, 1, 1), atol=1e-3, rtol=0)
    assert torch.equal(norm(one), norm(torch.cat([one, torch.randn(3, 4, 1, 1, generator=generator)]))[:1])
    wider = torch.randn(1, 4, 2, 1, generator=generator)  # more than one value per group: PyTorch's own path
    assert torch.equal(norm(wider), torch.nn.functional.group_norm(wider, 4, norm.weight, norm.bias, norm.eps))


@pytest.mark.parametrize(
    "row, settings, message",
    [
        ({"prompt": "x", "seed": 1}, {"width": 65}, "request 0: width: 65 is not a multiple of 8"),
        ({"prompt": "x", "seed": 1}, {"height": 0}, "height: expected a positive integer"),
        ({"prompt": "x", "seed": 1}, {"sampler": "plms"}, "unknown sampler 'plms'"),
        ({"prompt": "x", "seed": 1}, {"steps": 0}, "steps: expected an integer in 1..999, got 0"),
        ({"prompt": "x", "seed": 1}, {"guidance_scale": float("nan")}, "guidance_scale: expected a finite number"),
        ({"prompt": "x", "seed": 1, "steps": 1000}, {}, "steps: expected an integer in 1..999"),
        ({"prompt": None, "seed": 1}, {}, "prompt: expected a string"),
        ({"prompt": "x", "seed": "7"}, {}, "seed: expected an integer"),
        ({"prompt": "x", "seed": -1}, {}, "seed: -1 outside 0..2**63-1"),
        ({"prompt": "x", "seed": 2**63}, {}, "seed: 9223372036854775808 outside 0..2**63-1"),
        ({"prompt": "x", "seed": 1, "strength": 0.0, "init_image": init_image(0)}, {}, "strength: 0 outside (0, 1]"),
        ({"prompt": "x", "seed": 1, "strength": 1.5, "init_image": init_image(0)}, {}, "strength: 1.5 outside (0, 1]"),
        ({"prompt": "x", "seed": 1, "init_image": init_image(0)}, {}, "request 0: strength: an img2img request"),
        ({"prompt": "x", "seed": 1, "strength": 0.01, "init_image": init_image(0)}, {}, "leaves no denoising step"),
        ({"prompt": "x", "seed": 1, "strength": 0.5, "init_image": "cat.png"}, {}, "expected a PIL image"),
        ({"prompt": "x", "seed": 1, "cfg": 3}, {}, "unknown request field(s): cfg"),
        (
            {"prompt": "x", "seed": 1, "sampler": "euler_a", "karras": True},
            {},
            "karras: karras sigmas apply only to dpmpp_2m",
        ),
    ],
)
def test_bad_input_is_a_clear_error(ours, row, settings, message):
    base = dict(sampler="ddim", steps=4, guidance_scale=5.0, width=32, height=32)
    with pytest.raises(ValueError) as info:
        ours.generate([row], **{**base, **settings})
    assert message in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_matches_diffusers(model_folder, dtype):
    """The dtype users run on GPUs: same weights cast the same way, same image as diffusers."""
    reference_pipe = StableDiffusionPipeline.from_pretrained(
        model_folder,
        torch_dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
        tokenizer=get_tokenizer(),
    )
    reference_pipe.set_progress_bar_config(disable=True)
    reference_pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    ours = sdcore.load_pipeline(model_folder, dtype=dtype)
    assert ours.dtype == dtype
    expected = reference_pipe(
        "a red circle",
        num_inference_steps=5,
        guidance_scale=7.5,
        width=64,
        height=64,
        generator=torch.Generator("cpu").manual_seed(3),
    ).images[0]
    got = ours.generate(
        [{"prompt": "a red circle", "seed": 3}], sampler="euler_a", steps=5, guidance_scale=7.5, width=64, height=64
    )[0]
    assert max_diff(expected, got) <= MAX_PIXEL_DIFF


def test_pixels_become_bytes_exactly_as_diffusers_rounds_them():
    """sdcore.pipeline.pixels_to_uint8 runs diffusers' numpy steps (x * 255, round half to even,
    uint8) in torch on the pixels' device: the same bytes, exact halves included."""
    from sdcore.pipeline import pixels_to_uint8

    halves = (torch.arange(256, dtype=torch.float32) + 0.5) / 255 * 2 - 1  # k + 0.5 after scaling
    x = torch.cat([torch.linspace(-1.2, 1.2, 3 * 64 * 64 - 256), halves]).reshape(1, 3, 64, 64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        pixels = x.to(dtype)
        expected = ((pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(pixels_to_uint8(pixels).numpy(), expected), dtype


def test_images_given_out_forwards_after_their_decode_are_the_same_images(tiny_pipe):
    """On CUDA a decode's images are given out two UNet forwards after it is queued (so that
    reading them never idles the GPU); forced here on the CPU: the same bytes for every row; each
    image comes out exactly two forwards after its decode (or at the stream's end), and before
    any later decode is queued (reading it then waits for nothing queued after a forward)."""
    requests = [sdcore.GenerationRequest(f"row {k}", seed=k, strength=None) for k in range(7)]
    settings = dict(sampler="ddim", steps=2, guidance_scale=5.0, width=32, height=32, fixed_batch=2, decode_batch=2)
    events = []
    hooks = [
        tiny_pipe.unet.register_forward_hook(lambda *_: events.append("forward")),
        tiny_pipe.vae.decoder.register_forward_hook(lambda *_: events.append("decode")),
    ]
    images = {}
    try:
        for lag, early_rows in ((0, 6), (2, 4)):
            tiny_pipe.give_out_lag = lag
            events.clear()
            given = {}
            for index, image, _ in tiny_pipe.generate_stream(requests, **settings):
                given[index] = np.asarray(image)
                events.append("out")
            images[lag] = given
            # Rows finish in pairs every 2 forwards (0-1 at forward 2, 2-3 at 4, 4-5 at 6, 6 at 8).
            forwards, seen, outs, early = events.count("forward"), 0, 0, 0
            decoded_at = []  # forwards seen at each decode
            for position, event in enumerate(events):
                if event == "forward":
                    seen += 1
                elif event == "decode":
                    decoded_at.append(seen)
                else:
                    if seen < forwards:  # before the stream's end
                        assert seen - decoded_at[outs // 2] == lag, (lag, events)
                        last_forward = max(k for k in range(position) if events[k] == "forward")
                        if lag:
                            assert "decode" not in events[last_forward:position], (lag, events)
                        early += 1
                    outs += 1
            assert (outs, early) == (7, early_rows), (lag, events)
    finally:
        for hook in hooks:
            hook.remove()
        tiny_pipe.give_out_lag = None
    assert images[0].keys() == images[2].keys() == set(range(7))
    assert all(np.array_equal(images[0][k], images[2][k]) for k in range(7))


def _mixed_requests() -> list[dict]:
    """Rows that share forwards in unlike ways: txt2img and img2img at several strengths, other
    step counts and guidance scales, an unguided row and a row of another size (other lanes)."""
    rows = []
    for k in range(11):
        row = {"prompt": f"mixed row {k}", "seed": 40 + k, "negative": "blurry" if k % 4 == 1 else ""}
        if k % 3 == 1:
            row.update(init_image=init_image(k, size=(32, 32)), strength=(0.5, 0.75, 1.0, 0.6)[k // 3])
        if k % 5 == 2:
            row["steps"] = 5
        if k == 6:
            row["guidance_scale"] = 1.0  # no unconditional half: a lane of its own
        if k == 9:
            row.update(width=40, height=40)
        rows.append(row)
    return rows


def test_rows_started_ahead_give_the_same_images_in_the_same_slots(tiny_pipe):
    """On CUDA a lane reads one batch of requests ahead of its free slots and starts them
    (prompts encoded, starting latents drawn and encoded) while its forwards run; forced here on
    the CPU: every row of a mixed stream comes out with the same bytes and the same placement
    (UNet slot, decode slot) as when each row starts as its slot takes it."""
    settings = dict(sampler="ddim", steps=3, guidance_scale=5.0, width=32, height=32, fixed_batch=3, decode_batch=2)
    made = {}
    try:
        for ahead in (False, True):
            tiny_pipe.prepare_ahead = ahead
            tiny_pipe.clear_embedding_cache()
            stream = tiny_pipe.generate_stream(_mixed_requests(), **settings)
            made[ahead] = {index: (np.asarray(image).tobytes(), placement) for index, image, placement in stream}
    finally:
        tiny_pipe.prepare_ahead = None
    assert set(made[True]) == set(range(11))
    assert made[True] == made[False]


def test_rows_are_started_a_few_per_forward_while_the_batch_before_them_runs(tiny_pipe):
    """With rows started ahead, the next batch's prompts are encoded one between two forwards of
    the batch before it (not all at once when its slots free up), and the stream reads at most
    one batch beyond its free slots."""
    requests = [sdcore.GenerationRequest(f"started ahead {k}", seed=k) for k in range(6)]
    settings = dict(sampler="ddim", steps=4, guidance_scale=5.0, width=32, height=32, fixed_batch=2)
    events = []

    def reading(requests):
        for request in requests:
            events.append("read")
            yield request

    hooks = [
        tiny_pipe.unet.register_forward_hook(lambda *_: events.append("forward")),
        tiny_pipe.text_encoder.register_forward_hook(lambda *_: events.append("encode")),
    ]
    try:
        for ahead in (False, True):
            tiny_pipe.prepare_ahead = ahead
            tiny_pipe.clear_embedding_cache()
            events.clear()
            for _ in tiny_pipe.generate_stream(reading(requests), **settings):
                events.append("out")
            # The encodes between two forwards, after the first forward (the first batch and the
            # empty negative are encoded before it either way).
            first = events.index("forward")
            gaps = "".join("e" if e == "encode" else "|" if e == "forward" else "" for e in events[first:])
            most = max(len(run) for run in gaps.split("|"))
            assert events[:first].count("encode") == 3  # two prompts and the empty negative
            assert events.count("encode") == 7 and events.count("forward") == 12
            # Rows read and not yet given out, at most: the batch in its slots, and with rows
            # started ahead, the next batch and the one read when the first finishes.
            held = max(events[: k + 1].count("read") - events[: k + 1].count("out") for k in range(len(events)))
            assert (most, held) == ((1, 6) if ahead else (2, 2)), (ahead, events)
    finally:
        for hook in hooks:
            hook.remove()
        tiny_pipe.prepare_ahead = None


# ------------------------------------------------------------------ library API: bug hunt fixes

LIBRARY_SETTINGS = dict(sampler="ddim", steps=2, guidance_scale=5.0, width=16, height=16)


def sixteen_bit_grey(values: np.ndarray, mode: str) -> Image.Image:
    """A 16-bit greyscale PIL image of `values` (uint16) in `mode` (I;16 little-, I;16B big-endian)."""
    stored = values.astype(">u2" if mode == "I;16B" else "<u2")
    return Image.frombytes(mode, values.shape[::-1], stored.tobytes())


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_a_16_bit_grey_init_image_is_its_top_8_bits_as_the_job_decodes_it(tiny_pipe, mode):
    """PIL's convert("RGB") clips 16-bit grey to 255: a grey ramp became a white init image and
    img2img ran on it without a word. It is scaled to 8 bits (`>> 8`, the job runner's decoding)."""
    from sdcore.pipeline import image_to_tensor

    values = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)  # a ramp of greys
    grey16 = sixteen_bit_grey(values, mode)
    grey8 = Image.fromarray((values >> 8).astype(np.uint8))  # mode L
    assert torch.equal(image_to_tensor(grey16, 16, 16), image_to_tensor(grey8, 16, 16))
    made = [
        tiny_pipe.generate([{"prompt": "x", "seed": 1, "init_image": image, "strength": 0.5}], **LIBRARY_SETTINGS)[0]
        for image in (grey16, grey8)
    ]
    assert made[0].tobytes() == made[1].tobytes()


@pytest.mark.parametrize(
    "image, message",
    [
        (Image.fromarray(np.full((16, 16), 70000, np.int32)), "init_image: mode I (32-bit integer pixels) has no"),
        (Image.fromarray(np.full((16, 16), 0.5, np.float32)), "init_image: mode F (32-bit float pixels) has no fixed"),
        (Image.new("RGB", (0, 0)), "init_image: the image is 0x0 pixels: it has none"),
        (Image.new("L", (0, 16)), "init_image: the image is 0x16 pixels: it has none"),
    ],
)
def test_init_images_of_an_ambiguous_mode_or_without_pixels_are_refused(tiny_pipe, image, message):
    """A float image became a black init, a 32-bit one a white one, an empty one a black one,
    silently; each is a ValueError naming the request and what to do."""
    rows = [{"prompt": "x", "seed": 1}, {"prompt": "x", "seed": 2, "init_image": image, "strength": 0.5}]
    with pytest.raises(ValueError) as info:
        tiny_pipe.generate(rows, **LIBRARY_SETTINGS)
    assert str(info.value).startswith(f"request 1: {message}"), str(info.value)
    if image.mode in ("I", "F"):
        assert "convert it to 8-bit RGB (mode RGB, values 0..255) or 16-bit greyscale" in str(info.value)


def test_alpha_palette_and_cmyk_init_images_are_read_as_pils_convert_rgb_gives_them():
    """What diffusers' `load_image` does (its image processor would pass RGBA's 4 channels on)."""
    from sdcore.pipeline import image_to_tensor

    rgb = init_image(3, size=(16, 16))
    for image in (rgb.convert("RGBA"), rgb.convert("P"), rgb.convert("CMYK"), rgb.convert("LA"), rgb.convert("1")):
        assert torch.equal(image_to_tensor(image, 16, 16), image_to_tensor(image.convert("RGB"), 16, 16)), image.mode


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "inference_tensor"])
def test_a_context_changed_in_place_gets_fresh_keys_and_values(tiny_pipe, mode):
    """The cross-attentions keep K and V per context tensor: a context changed in place between
    two forwards (`copy_`) reused the old K and V, a wrong output. Under no_grad and inference
    mode an ordinary tensor's version counter shows the change; an inference tensor (made in
    inference mode) has none, so its K and V are not kept."""
    unet = tiny_pipe.unet
    gen = torch.Generator().manual_seed(5)
    width = tiny_pipe.config.unet.cross_attention_dim
    x, t = torch.randn(2, 4, 4, 4, generator=gen), torch.tensor([500.0, 20.0])
    old, new = torch.randn(2, 77, width, generator=gen), torch.randn(2, 77, width, generator=gen)
    context = old.clone()  # an ordinary tensor
    try:
        with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
            if mode == "inference_tensor":
                context = old.clone()
                assert context.is_inference()
            before = unet(x, t, context)
            context.copy_(new)
            after = unet(x, t, context)
            assert torch.equal(after, unet(x, t, new.clone()))
            assert not torch.equal(after, before)
    finally:
        unet.forget_context()


def test_the_prompt_cache_follows_the_text_encoders_weights():
    """Embeddings were cached by prompt alone: after `text_encoder.load_state_dict(...)` (or an
    in-place change) generate used the old weights' embeddings."""
    pipe = sdcore.load_pipeline("builtin:tiny")
    rows = [{"prompt": "a red circle", "seed": 1}]
    before = pipe.generate(rows, **LIBRARY_SETTINGS)[0]
    pipe.text_encoder.load_state_dict({k: v * 1.5 for k, v in pipe.text_encoder.state_dict().items()})
    after = pipe.generate(rows, **LIBRARY_SETTINGS)[0]
    pipe.clear_embedding_cache()
    assert after.tobytes() == pipe.generate(rows, **LIBRARY_SETTINGS)[0].tobytes()
    assert after.tobytes() != before.tobytes()
    # encode_prompt on its own, after an in-place change
    with torch.no_grad():
        pipe.text_encoder.text_model.final_layer_norm.bias.add_(0.25)
    with torch.inference_mode():
        expected = pipe.text_encoder(tokenize(["a red circle"]))
    assert torch.equal(pipe.encode_prompt("a red circle"), expected)


@pytest.mark.parametrize(
    "asked, message",
    [
        (dict(fixed_batch=2, slots=[0.5]), "slots: request 0's entry: expected an integer slot or None, got 0.5"),
        (dict(fixed_batch=2, slots=[True]), "slots: request 0's entry: expected an integer slot or None, got True"),
        (dict(decode_batch=2, decode_slots=[0.5]), "decode_slots: request 0's entry: expected an integer slot"),
        (dict(decode_batch=2, decode_slots=["1"]), "decode_slots: request 0's entry: expected an integer slot"),
    ],
)
def test_slots_that_are_not_integers_are_a_clear_error(tiny_pipe, asked, message):
    """slots=[0.5] passed the range check and died in the stream ("generator raised
    StopIteration"); decode_slots=[0.5] raised a TypeError."""
    with pytest.raises(ValueError) as info:
        tiny_pipe.generate([{"prompt": "x", "seed": 1}], **LIBRARY_SETTINGS, **asked)
    assert message in str(info.value)


def test_numpy_and_0dim_torch_integers_and_numpy_bools_are_taken_as_their_values(tiny_pipe):
    """steps=torch.tensor(2), seed=torch.tensor(3), fixed_batch=np.int64(2), karras=np.bool_(True)
    were refused (while a 0-dim torch float was taken as a guidance scale): each gives the image
    and placement of its plain value."""
    plain = tiny_pipe.generate_placed(
        [sdcore.GenerationRequest("x", seed=3)],
        sampler="dpmpp_2m", karras=True, steps=2, guidance_scale=5.0, width=16, height=16,
        fixed_batch=2, slots=[1], decode_batch=2, decode_slots=[1],
    )  # fmt: skip
    typed = tiny_pipe.generate_placed(
        [sdcore.GenerationRequest("x", seed=torch.tensor(3))],
        sampler="dpmpp_2m", karras=np.bool_(True), steps=torch.tensor(2), guidance_scale=5.0,
        width=torch.tensor(16), height=np.int64(16), fixed_batch=np.int64(2), slots=[np.int64(1)],
        decode_batch=torch.tensor(2), decode_slots=np.array([1]),
    )  # fmt: skip
    assert typed[0][0].tobytes() == plain[0][0].tobytes()
    assert typed[0][1] == plain[0][1] == Placement(rows=2, slot=1, decode_rows=2, decode_slot=1)
    assert all(type(value) is int for value in vars(typed[0][1]).values())


def test_a_truncated_prompts_warning_points_at_the_line_that_called_generate(tiny_pipe):
    """It pointed at sdcore/pipeline.py (stacklevel=2 from the tokenizer)."""
    prompt = " ".join(["a small green triangle"] * 25)  # 100 tokens
    with pytest.warns(PromptTruncatedWarning) as record:
        line = inspect.currentframe().f_lineno + 1
        tiny_pipe.generate([{"prompt": prompt, "seed": 1}], **{**LIBRARY_SETTINGS, "guidance_scale": 1.0})
    assert [(w.filename, w.lineno) for w in record] == [(__file__, line)]
