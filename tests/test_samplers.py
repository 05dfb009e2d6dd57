"""sdcore.schedules / sdcore.samplers against the reference diffusers schedulers.

Golden/parity tests (STYLE 10): every sampler is run from the same start latents, the same
seeds and a deterministic toy denoiser both here and through the diffusers scheduler
configured from Stable Diffusion 1.5's scheduler_config.json (+ timestep_spacing "leading"),
looping exactly as StableDiffusionPipeline / StableDiffusionImg2ImgPipeline do. Tensors are
tiny (B, 4, 8, 8) so the whole file runs in a few seconds on CPU.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import warnings

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
)
from diffusers.utils.torch_utils import randn_tensor

from sdcore import schedules
from sdcore.rules import SAMPLERS
from sdcore.samplers import Sampler, build_schedule

from tests.reference import SD15_SCHEDULER_CONFIG

REFERENCE = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}
# (name, karras) for every supported combination
CONFIGS = [("ddpm", False), ("ddim", False), ("euler_a", False), ("dpmpp_2m", False), ("dpmpp_2m", True)]
STEP_COUNTS = [1, 2, 7, 25, 50]
SHAPE = (4, 8, 8)  # one latent row (C, H, W)
SEEDS = [11, 22, 33]
RTOL, ATOL = 1e-5, 1e-6
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def reference_scheduler(name: str, karras: bool, steps: int):
    config = dict(SD15_SCHEDULER_CONFIG)
    if name == "dpmpp_2m":
        config["use_karras_sigmas"] = karras
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = REFERENCE[name].from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler


def toy_eps(x: torch.Tensor, t) -> torch.Tensor:
    """Deterministic, nonlinear in x and t, row-wise, eps-sized. Mixes channels so a swapped
    or mis-scaled input shows up."""
    t = torch.as_tensor(t).to(torch.float32)
    phase = torch.sin(t / 97.0)  # 0-dim
    mixed = x + 0.3 * torch.roll(x, shifts=1, dims=1)
    return 0.8 * torch.tanh(0.7 * mixed + phase) + 0.2 * torch.cos(x * (1.0 + t / 1000.0))


def generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def start_noise(seeds):
    """Initial latent noise per row, as the pipeline draws it (one (1, C, H, W) draw per row)."""
    return torch.cat([torch.randn((1, *SHAPE), generator=g) for g in generators(seeds)])


def init_latents(batch: int) -> torch.Tensor:
    """Stand-in for VAE-encoded image latents, deterministic and independent of the seeds."""
    grid = torch.arange(batch * math.prod(SHAPE), dtype=torch.float32).reshape(batch, *SHAPE)
    return torch.sin(grid * 0.37) * 1.5


def reference_loop(scheduler, latents, timesteps, gens):
    """StableDiffusionPipeline's denoising loop (no guidance; the toy eps is the guided eps)."""
    return reference_loop_with(scheduler, latents, timesteps, gens, toy_eps)


def reference_loop_with(scheduler, latents, timesteps, gens, denoise):
    kwargs = {"generator": gens} if "generator" in _step_params(scheduler) else {}
    if "eta" in _step_params(scheduler):
        kwargs["eta"] = 0.0
    for t in timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        eps = denoise(model_input, t)
        latents = scheduler.step(eps, t, latents, return_dict=False, **kwargs)[0]
    return latents


def _step_params(scheduler):
    return set(inspect.signature(scheduler.step).parameters)


def recording_denoiser(log):
    def denoise(model_input, t):
        assert t.dim() == 0 and t.dtype == torch.float32
        log.append((model_input.clone(), t.clone()))
        return toy_eps(model_input, t)

    return denoise


# ----------------------------------------------------------------------------- schedules


def test_alphas_cumprod_matches_reference_and_closed_form():
    reference = reference_scheduler("ddim", False, 10)
    ac = schedules.alphas_cumprod()
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    assert torch.equal(ac, reference.alphas_cumprod)
    # closed form, float64: beta_t = (sqrt(b0) + t/(T-1) (sqrt(b1) - sqrt(b0)))^2
    t = torch.arange(1000, dtype=torch.float64)
    betas = (0.00085**0.5 + t / 999 * (0.012**0.5 - 0.00085**0.5)) ** 2
    torch.testing.assert_close(ac.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=0)
    assert ac[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    # public functions hand out fresh tensors
    ac.zero_()
    assert schedules.alphas_cumprod()[0] > 0.99


def test_known_timesteps():
    assert schedules.leading_timesteps(25).tolist() == list(range(961, 0, -40))
    assert schedules.leading_timesteps(1).tolist() == [1]
    assert schedules.dpmsolver_leading_timesteps(25).tolist() == list(range(951, 38, -38))
    karras_t, karras_s = schedules.karras_schedule(25)
    assert karras_t[0] == 999 and karras_t[-1] == 0
    assert karras_s[-1] == 0 and karras_s.shape == (26,)
    sig = schedules.train_sigmas()
    assert karras_s[0] == sig[-1] and karras_s[-2] == sig[0]


def test_karras_sigmas_formula():
    s = schedules.karras_sigmas(0.1, 10.0, 5, rho=7.0)
    i = torch.arange(5, dtype=torch.float64)
    expected = (10.0 ** (1 / 7) + i / 4 * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(s, expected, rtol=1e-12, atol=0)


def test_sigma_to_timestep_inverts_training_sigmas():
    sig = schedules.train_sigmas()
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    torch.testing.assert_close(schedules.sigma_to_timestep(sig[t]), t.double(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,karras", CONFIGS)
@pytest.mark.parametrize("steps", STEP_COUNTS + [3, 10, 15, 100, 999])
def test_timesteps_match_reference(name, karras, steps):
    reference = reference_scheduler(name, karras, steps)
    ours = Sampler(name, steps, karras).timesteps()
    assert ours.dtype == reference.timesteps.dtype
    assert torch.equal(ours, reference.timesteps)
    if name in ("euler_a", "dpmpp_2m"):
        assert torch.equal(build_schedule(name, steps, karras).sigmas, reference.sigmas)


# ----------------------------------------------------------------------------- txt2img loops


@pytest.mark.parametrize("name,karras", CONFIGS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_txt2img_loop_matches_reference(name, karras, steps):
    sampler = Sampler(name, steps, karras)
    noise = start_noise(SEEDS)

    reference = reference_scheduler(name, karras, steps)
    expected = reference_loop(reference, noise * reference.init_noise_sigma, reference.timesteps, generators(SEEDS))

    log = []
    latents = sampler.txt2img_latents(noise)
    noise_before = noise.clone()
    latents_before = latents.clone()
    got = sampler.run(recording_denoiser(log), latents, generators(SEEDS))

    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert len(log) == steps
    assert [t.item() for _, t in log] == [float(t) for t in reference.timesteps]
    # inputs untouched
    assert torch.equal(noise, noise_before) and torch.equal(latents, latents_before)
    # the result actually moved (a no-op sampler must not pass)
    assert not torch.allclose(got, latents)


def test_float32_results_are_bit_identical_to_reference():
    """Same op order and float32 coefficient tensors as the reference: not just close, equal."""
    for name, karras in CONFIGS:
        reference = reference_scheduler(name, karras, 25)
        noise = start_noise(SEEDS)
        expected = reference_loop(reference, noise * reference.init_noise_sigma, reference.timesteps, generators(SEEDS))
        sampler = Sampler(name, 25, karras)
        got = sampler.run(toy_eps, sampler.txt2img_latents(noise), generators(SEEDS))
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,karras", CONFIGS)
def test_reduced_precision_matches_reference_bit_for_bit(name, karras, dtype):
    """Half-precision latents/eps: same draws (in eps' dtype), same float32 upcasts and
    casts back as the reference, so the results are equal, not just close."""

    def denoise(x, t):
        return toy_eps(x.float(), t).to(dtype)

    reference = reference_scheduler(name, karras, 7)
    noise = start_noise(SEEDS).to(dtype)
    expected = reference_loop_with(
        reference, noise * reference.init_noise_sigma, reference.timesteps, generators(SEEDS), denoise
    )
    sampler = Sampler(name, 7, karras)
    got = sampler.run(denoise, sampler.txt2img_latents(noise), generators(SEEDS))
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected)

    init = init_latents(len(SEEDS)).to(dtype)
    reference = reference_scheduler(name, karras, 7)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
        types.SimpleNamespace(scheduler=reference), 7, 0.6, "cpu"
    )
    expected = reference.add_noise(init, noise, timesteps[:1].repeat(len(SEEDS)))
    got = sampler.img2img_latents(init, noise, sampler.start_index(0.6))
    assert got.dtype == dtype and torch.equal(got, expected)


def test_euler_ancestral_scales_model_input():
    sampler = Sampler("euler_a", 7)
    log = []
    latents = sampler.txt2img_latents(start_noise(SEEDS))
    sampler.run(recording_denoiser(log), latents, generators(SEEDS))
    sigma0 = schedules.train_sigmas()[int(sampler.timesteps()[0])]
    torch.testing.assert_close(log[0][0], latents / (sigma0**2 + 1) ** 0.5)
    torch.testing.assert_close(
        latents, start_noise(SEEDS) * (sigma0**2 + 1) ** 0.5
    )  # init_noise_sigma (leading spacing)


# ----------------------------------------------------------------------------- img2img


def reference_img2img(name, karras, steps, strength, init, seeds):
    """StableDiffusionImg2ImgPipeline: get_timesteps, add_noise at timesteps[:1], then loop."""
    scheduler = reference_scheduler(name, karras, steps)
    fake_pipe = types.SimpleNamespace(scheduler=scheduler)
    timesteps, remaining = StableDiffusionImg2ImgPipeline.get_timesteps(fake_pipe, steps, strength, "cpu")
    latent_timestep = timesteps[:1].repeat(init.shape[0])
    gens = generators(seeds)
    noise = randn_tensor(init.shape, generator=gens, device=torch.device("cpu"), dtype=init.dtype)
    noisy = scheduler.add_noise(init, noise, latent_timestep)
    return noisy, reference_loop(scheduler, noisy, timesteps, gens), remaining, gens


@pytest.mark.parametrize("name,karras", CONFIGS)
@pytest.mark.parametrize("steps,strength", [(25, 0.75), (25, 1.0), (7, 0.5), (50, 0.3), (2, 0.6), (10, 0.1)])
def test_img2img_matches_reference(name, karras, steps, strength):
    init = init_latents(len(SEEDS))
    ref_noisy, expected, remaining, _ = reference_img2img(name, karras, steps, strength, init, SEEDS)

    sampler = Sampler(name, steps, karras)
    start = sampler.start_index(strength)
    assert steps - start == remaining
    gens = generators(SEEDS)
    noise = torch.cat([torch.randn((1, *SHAPE), generator=g) for g in gens])  # pipeline's draw
    noisy = sampler.img2img_latents(init, noise, start)
    torch.testing.assert_close(noisy, ref_noisy, rtol=RTOL, atol=ATOL)
    log = []
    got = sampler.run(recording_denoiser(log), noisy, gens, start_index=start)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert len(log) == remaining
    assert log[0][1].item() == float(sampler.timesteps()[start])


@pytest.mark.parametrize(
    "steps,strength,start",
    [(25, 1.0, 0), (25, 0.75, 7), (25, 0.5, 13), (10, 0.3, 7), (10, 0.7, 3), (50, 0.04, 48), (1, 1.0, 0)],
)
def test_start_index_values(steps, strength, start):
    assert Sampler("ddim", steps).start_index(strength) == start


def test_start_index_mirrors_int_truncation():
    # int(10 * 0.29) == 2 (10 * 0.29 = 2.9000000000000004) -> start 8
    assert Sampler("ddim", 10).start_index(0.29) == 8


# ----------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("name,karras", CONFIGS)
def test_batch_rows_equal_single_rows(name, karras):
    sampler = Sampler(name, 7, karras)
    batch = sampler.run(toy_eps, sampler.txt2img_latents(start_noise(SEEDS)), generators(SEEDS))
    for i, seed in enumerate(SEEDS):
        alone = sampler.run(toy_eps, sampler.txt2img_latents(start_noise([seed])), generators([seed]))
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-6, atol=1e-7)
    # and the order of rows does not matter
    rev = sampler.run(toy_eps, sampler.txt2img_latents(start_noise(SEEDS[::-1])), generators(SEEDS[::-1]))
    torch.testing.assert_close(rev.flip(0), batch, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["ddpm", "euler_a"])
def test_stochastic_samplers_use_the_row_generator(name):
    sampler = Sampler(name, 5)
    latents = sampler.txt2img_latents(start_noise([1, 1]))
    a = sampler.run(toy_eps, latents, generators([5, 6]))
    assert not torch.allclose(a[0], a[1])  # same start, different step noise
    b = sampler.run(toy_eps, latents, generators([5, 6]))
    assert torch.equal(a, b)
    # the global RNG is never touched
    torch.manual_seed(0)
    state = torch.get_rng_state()
    sampler.run(toy_eps, latents, generators([5, 6]))
    assert torch.equal(torch.get_rng_state(), state)


def test_stochastic_noise_drawn_in_step_order():
    """DDPM: one (1, C, H, W) draw per step per row from the row generator, right after the
    denoiser call, so the generator ends `steps` draws further along."""
    sampler = Sampler("ddpm", 4)
    g = generators([3])
    sampler.run(toy_eps, torch.zeros(1, *SHAPE), g)
    probe = generators([3])[0]
    for _ in range(4):
        torch.randn((1, *SHAPE), generator=probe)
    assert torch.equal(torch.randn(3, generator=g[0]), torch.randn(3, generator=probe))


def test_callback_reports_progress():
    calls = []
    sampler = Sampler("dpmpp_2m", 10)
    sampler.run(
        toy_eps, torch.randn(1, *SHAPE), generators([0]), start_index=4, callback=lambda i, n: calls.append((i, n))
    )
    assert calls == [(i, 6) for i in range(6)]


# ----------------------------------------------------------------------------- validation


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown sampler 'plms'.*ddpm, ddim, euler_a, dpmpp_2m"):
        Sampler("plms", 10)
    for bad in (0, -3, 1000, 2.5, True, "25"):
        with pytest.raises(ValueError, match="steps"):
            Sampler("ddim", bad)
    for name in ("ddpm", "ddim", "euler_a"):
        with pytest.raises(ValueError, match=f"karras.*{name}"):
            Sampler(name, 10, karras=True)
    with pytest.raises(ValueError, match="karras"):
        Sampler("dpmpp_2m", 10, karras="yes")
    sampler = Sampler("ddim", 10)
    for bad in (0.0, -0.1, 1.01, float("nan"), "high", None):
        with pytest.raises(ValueError, match="strength"):
            sampler.start_index(bad)
    with pytest.raises(ValueError, match="no denoising step"):
        sampler.start_index(0.05)  # int(10 * 0.05) == 0
    with pytest.raises(ValueError, match="one generator per latent row"):
        sampler.run(toy_eps, torch.zeros(2, *SHAPE), generators([1]))
    with pytest.raises(ValueError, match="start_index"):
        sampler.run(toy_eps, torch.zeros(1, *SHAPE), generators([1]), start_index=10)
    with pytest.raises(ValueError, match="start_index"):
        sampler.img2img_latents(torch.zeros(1, *SHAPE), torch.zeros(1, *SHAPE), -1)


def test_sampler_is_frozen_and_hashable():
    s = Sampler("dpmpp_2m", 20, karras=True)
    assert s == Sampler("dpmpp_2m", 20, True) and hash(s) == hash(Sampler("dpmpp_2m", 20, True))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 3  # type: ignore[misc]
    assert set(SAMPLERS) == set(REFERENCE)
