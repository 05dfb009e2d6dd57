"""Samplers for Stable Diffusion 1.x: `ddpm`, `ddim`, `euler_a`, `dpmpp_2m`.

Each sampler family is one step function over (schedule, step index, latents, eps, per-row
generators); caller tensors are never written, and every random draw names the row's own
generator. `Sampler` is the frozen, hashable description (name, steps, karras) that the pipeline
holds; it builds the schedule (from `schedules.py`, memoised). `Sampler.run` loops a whole batch
through its steps; a `Trajectory` is the same loop one step at a time, so that rows at different
steps, or of different samplers, can share one UNet forward (the pipeline's fixed-shape batches).

Parity contract (SPEC "Randomness"): each sampler equals the diffusers scheduler of the same
family configured from Stable Diffusion 1.5's `scheduler_config.json` with "leading" spacing,
step for step and draw for draw. To make that hold to the last bit in float32 the scalar
coefficients are float32 0-dim tensors, combined in the same order as the reference, and the
precision rules of the reference are kept (Euler ancestral and DPM-Solver++ update in float32
and cast back to the model output's dtype; DDPM draws its noise in the model output's dtype).

Randomness: row i's noise is `torch.randn((1, C, H, W), generator=generators[i], device="cpu",
dtype=...)` moved to the latents' device, drawn in the order the reference draws it for a single
image, so a row's result does not depend on its batch or its position in it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from . import rules, schedules
from .devices import to_device

# denoise(model_input (B, C, H, W), t 0-dim float32) -> eps (B, C, H, W), guidance applied.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(step_index, total): called after each step, step_index counting 0 .. total-1.
Callback = Callable[[int, int], None]


# ----------------------------------------------------------------------------- schedule


class Schedule(NamedTuple):
    """Everything a run needs, for one (name, steps, karras). Shared and read-only."""

    timesteps: torch.Tensor  # (N,) as the reference exposes them: int64, or float32 for euler_a
    alphas_cumprod: torch.Tensor  # (1000,) float32 (ddpm, ddim, add_noise)
    sigmas: torch.Tensor | None  # (N + 1,) float32 ending in 0 (euler_a, dpmpp_2m), else None


@functools.lru_cache(maxsize=128)
def build_schedule(name: str, steps: int, karras: bool = False) -> Schedule:
    """The (memoised, shared: do not modify) schedule of one sampler configuration."""
    alphas_cumprod = schedules.alphas_cumprod()
    if name in ("ddpm", "ddim"):
        return Schedule(schedules.leading_timesteps(steps), alphas_cumprod, None)
    if name == "euler_a":
        timesteps = schedules.leading_timesteps(steps)
        return Schedule(timesteps.to(torch.float32), alphas_cumprod, schedules.sigmas_at(timesteps))
    # dpmpp_2m
    if karras:
        timesteps, sigmas = schedules.karras_schedule(steps)
    else:
        timesteps = schedules.dpmsolver_leading_timesteps(steps)
        sigmas = schedules.sigmas_at(timesteps)
    return Schedule(timesteps, alphas_cumprod, sigmas)


# ----------------------------------------------------------------------------- public object


@dataclass(frozen=True)
class Sampler:
    """A sampler family and its step count; see the module docstring for the contract.

    name: one of SAMPLERS. steps: 1 .. MAX_STEPS. karras: Karras et al. (2022) sigma spacing,
    only for samplers in KARRAS_SAMPLERS.
    """

    name: str
    steps: int
    karras: bool = False

    def __post_init__(self) -> None:
        checks = (
            ("sampler", rules.sampler_problem(self.name)),
            ("steps", rules.steps_problem(self.steps)),
            ("karras", rules.karras_problem(self.karras, self.name)),
        )
        for what, problem in checks:
            if problem:
                raise ValueError(f"{what}: {problem}")

    @property
    def _sched(self) -> Schedule:
        return build_schedule(self.name, self.steps, self.karras)

    def timesteps(self) -> torch.Tensor:
        """The reference scheduler's `timesteps` after `set_timesteps(steps)` (a fresh tensor):
        int64, except float32 for euler_a, as diffusers has them."""
        return self._sched.timesteps.clone()

    def start_index(self, strength: float) -> int:
        """img2img: index of the first timestep to run (the reference pipeline's `t_start`).

        `init = min(int(steps * strength), steps)`, start = steps - init. ValueError unless
        0 < strength <= 1, and when int(steps * strength) == 0 (no step would run; the reference
        pipeline then builds an empty batch and fails, so this is refused up front).
        """
        return schedules.img2img_start_index(self.steps, strength)

    def txt2img_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """Starting latents for txt2img: noise * init_noise_sigma (a new tensor).

        init_noise_sigma is 1 for the VP samplers (x_T ~ N(0, I)); for Euler on the
        sigma-scaled latents x = x_VP * sqrt(1 + sigma^2) it is sqrt(sigma_max^2 + 1).
        """
        if self.name == "euler_a":
            sigma_max = self._sched.sigmas.max()  # 0-dim float32
            return noise * (sigma_max**2 + 1) ** 0.5
        return noise * 1.0

    def img2img_latents(self, init_latents: torch.Tensor, noise: torch.Tensor, start_index: int) -> torch.Tensor:
        """Forward-diffuse clean latents to timestep `timesteps[start_index]` (a new tensor).

        VP (ddpm, ddim): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps  (Ho et al.
        2020, eq. 4). Euler: x = x_0 + sigma eps. DPM-Solver: x_t = alpha_t x_0 + sigma_t eps with
        alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t (Lu et al. 2022, Sec. 2).
        Coefficients are taken in the latents' dtype and device, as the reference does.
        """
        sched = self._sched
        index = _check_start(start_index, len(sched.timesteps))
        device, dtype = init_latents.device, init_latents.dtype
        if self.name in ("ddpm", "ddim"):
            alphas_cumprod = to_device(sched.alphas_cumprod, device).to(dtype=dtype)
            t = to_device(sched.timesteps[index : index + 1], device)  # (1,)
            sqrt_alpha_bar = (alphas_cumprod[t] ** 0.5).view(1, *[1] * (init_latents.dim() - 1))
            sqrt_one_minus = ((1 - alphas_cumprod[t]) ** 0.5).view(1, *[1] * (init_latents.dim() - 1))
            return sqrt_alpha_bar * init_latents + sqrt_one_minus * noise
        sigma = to_device(sched.sigmas, device, dtype)[index : index + 1]  # (1,)
        sigma = sigma.view(1, *[1] * (init_latents.dim() - 1))  # (1, 1, 1, 1)
        if self.name == "euler_a":
            return init_latents + noise * sigma
        alpha_t, sigma_t = _vp_alpha_sigma(sigma)
        return alpha_t * init_latents + sigma_t * noise

    def run(
        self,
        denoise: Denoiser,
        latents: torch.Tensor,
        generators: Sequence[torch.Generator],
        start_index: int = 0,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        """Denoise `latents` (B, C, H, W) over timesteps[start_index:]; returns new latents.

        `denoise(model_input, t)` gets the sampler-scaled input and `t`, a 0-dim float32 tensor
        on the latents' device holding the timestep the reference would give the UNet; it
        returns eps with the latents' shape. `generators[i]` (CPU) feeds row i's noise.
        """
        if len(generators) != latents.shape[0]:
            raise ValueError(
                f"need one generator per latent row: {len(generators)} generators, {latents.shape[0]} rows"
            )
        trajectory = self.trajectory(start_index)
        x, generators = latents, list(generators)
        total = trajectory.remaining
        while not trajectory.done:
            done = total - trajectory.remaining
            eps = denoise(trajectory.model_input(x), to_device(trajectory.timestep(), x.device))
            x = trajectory.step(x, eps, generators)
            if callback is not None:
                callback(done, total)
        return x

    def trajectory(self, start_index: int = 0) -> Trajectory:
        """A fresh `Trajectory` over timesteps[start_index:] (the step-by-step form of `run`)."""
        return Trajectory(self, start_index)


# ----------------------------------------------------------------------------- step by step


class Trajectory:
    """Where the rows of one latent tensor (usually one row) are on a sampler's schedule.

    `run` is `model_input` -> denoiser -> `step` until `done`. Driving it step by step lets rows
    at different steps, or of different samplers, share one UNet forward: each row keeps its own
    trajectory, the forward takes every row's `model_input` and `timestep`, and each row's slice
    of the output goes back through its own `step`. The update is elementwise, so a row stepped
    alone gives the same bits as the same row stepped inside a batch.
    """

    def __init__(self, sampler: Sampler, start_index: int = 0):
        self.sampler = sampler
        self._sched = sampler._sched
        self.index = _check_start(start_index, len(self._sched.timesteps))
        self._x0_prev: torch.Tensor | None = None  # DPM-Solver++(2M): the previous data prediction

    @property
    def done(self) -> bool:
        return self.index >= len(self._sched.timesteps)

    @property
    def remaining(self) -> int:
        """Steps (UNet evaluations) left."""
        return len(self._sched.timesteps) - self.index

    def timestep(self) -> torch.Tensor:
        """The timestep the UNet gets at this step: a 0-dim float32 CPU tensor."""
        return self._sched.timesteps[self.index].to(torch.float32).reshape(())

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the denoiser is given for latents `x` at this step (Euler scales it by c_in)."""
        if self.sampler.name == "euler_a":
            sigma = self._sched.sigmas[self.index]  # 0-dim float32
            return x / ((sigma**2 + 1) ** 0.5)
        return x

    def step(self, x: torch.Tensor, eps: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """The latents after this step, from the denoiser's `eps` for `model_input(x)`; row i's
        noise (ddpm, euler_a) comes from `generators[i]`. Advances to the next step."""
        if self.done:
            raise ValueError("the trajectory has no steps left")
        sched, i, name = self._sched, self.index, self.sampler.name
        if name == "ddpm":
            x = _ddpm_step(sched, i, x, eps, list(generators))
        elif name == "ddim":
            x = _ddim_step(sched, i, x, eps)
        elif name == "euler_a":
            x = _euler_ancestral_step(sched, i, x, eps, list(generators))
        else:
            x, self._x0_prev = _dpmpp_2m_step(sched, i, x, eps, self._x0_prev)
        self.index += 1
        return x


# ----------------------------------------------------------------------------- one step each


def _ddpm_step(
    sched: Schedule, i: int, x: torch.Tensor, eps: torch.Tensor, generators: list[torch.Generator]
) -> torch.Tensor:
    """Ancestral sampling of Ho et al. (2020), Algorithm 2, on the strided timestep grid.

    With a = alpha_bar_t, a' = alpha_bar_{t'} for the next timestep t' (1 after the last),
    alpha_t = a / a', beta_t = 1 - alpha_t:
      x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a)                                    (eq. 15)
      mu  = sqrt(a') beta_t / (1 - a) x_0 + sqrt(alpha_t) (1 - a') / (1 - a) x_t  (eq. 7)
      x_t' = mu + sqrt(beta~_t) z,  beta~_t = (1 - a') / (1 - a) beta_t, z ~ N(0, I) for t > 0
    (`clip_sample` is off for SD; the variance is clamped at 1e-20 as in the reference.)
    """
    timesteps, alphas_cumprod = sched.timesteps, sched.alphas_cumprod
    t = int(timesteps[i])
    alpha_bar = alphas_cumprod[t]
    alpha_bar_prev = alphas_cumprod[int(timesteps[i + 1])] if i + 1 < len(timesteps) else torch.tensor(1.0)
    beta_bar = 1 - alpha_bar
    beta_bar_prev = 1 - alpha_bar_prev
    alpha_t = alpha_bar / alpha_bar_prev
    beta_t = 1 - alpha_t

    x0 = (x - beta_bar**0.5 * eps) / alpha_bar**0.5  # eq. 15
    coef_x0 = (alpha_bar_prev**0.5 * beta_t) / beta_bar  # eq. 7
    coef_xt = alpha_t**0.5 * beta_bar_prev / beta_bar
    x_prev = coef_x0 * x0 + coef_xt * x
    if t > 0:
        z = _row_noise(generators, eps.shape, eps.dtype, eps.device)
        beta_tilde = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar) * beta_t, min=1e-20)
        x_prev = x_prev + beta_tilde**0.5 * z
    return x_prev


def _ddim_step(sched: Schedule, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM, Song et al. (2021), eq. (12) with sigma_t = 0 (eta = 0):

      x_0    = (x_t - sqrt(1 - a) eps) / sqrt(a)
      x_prev = sqrt(a') x_0 + sqrt(1 - a') eps

    a = alpha_bar_t, a' = alpha_bar at t - T // steps, or alpha_bar_0 past the end
    (SD's `set_alpha_to_one: false`). No noise is drawn.
    """
    timesteps, alphas_cumprod = sched.timesteps, sched.alphas_cumprod
    stride = schedules.NUM_TRAIN_TIMESTEPS // len(timesteps)
    t = int(timesteps[i])
    t_prev = t - stride
    alpha_bar = alphas_cumprod[t]
    alpha_bar_prev = alphas_cumprod[t_prev] if t_prev >= 0 else alphas_cumprod[0]
    beta_bar = 1 - alpha_bar

    x0 = (x - beta_bar**0.5 * eps) / alpha_bar**0.5  # "predicted x_0", eq. 12
    direction = (1 - alpha_bar_prev) ** 0.5 * eps  # "direction pointing to x_t", eq. 12
    return alpha_bar_prev**0.5 * x0 + direction


def _euler_ancestral_step(
    sched: Schedule, i: int, x: torch.Tensor, eps: torch.Tensor, generators: list[torch.Generator]
) -> torch.Tensor:
    """Euler ancestral sampler, Karras et al. (2022) Algorithm 2's Euler step with the ancestral
    noise split of k-diffusion (`sample_euler_ancestral`, eta = 1), on x = x_VP sqrt(1 + sigma^2):

      model input c_in x, c_in = 1 / sqrt(sigma^2 + 1)        (Karras et al. 2022, Table 1, VP)
      D = x - sigma eps;  d = (x - D) / sigma                 (eq. 3: dx/dsigma)
      sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
      sigma_down = sqrt(sigma_next^2 - sigma_up^2)
      x_next = x + d (sigma_down - sigma) + sigma_up z,  z ~ N(0, I) every step

    The update runs in float32 and is cast back to the model output's dtype; the noise is drawn
    in the model output's dtype (as the reference does).
    """
    sigmas = sched.sigmas
    sigma = sigmas[i]  # 0-dim float32
    x32 = x.to(torch.float32)
    denoised = x32 - sigma * eps
    sigma_from, sigma_to = sigmas[i], sigmas[i + 1]
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    d = (x32 - denoised) / sigma
    x_next = x32 + d * (sigma_down - sigma)
    z = _row_noise(generators, eps.shape, eps.dtype, eps.device)
    return (x_next + z * sigma_up).to(eps.dtype)


def _dpmpp_2m_step(
    sched: Schedule, i: int, x: torch.Tensor, eps: torch.Tensor, x0_prev: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(2M), Lu et al. (2022, "DPM-Solver++"), Algorithm 2, data prediction,
    midpoint form, first order on the first step of a run (`x0_prev` None) and on the last step
    (final sigma 0). Returns (x_next, this step's data prediction for the next step).

    With alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t, lambda = log(alpha_t / sigma_t):
      x_0,i = (x - sigma_s eps) / alpha_s                                   (data prediction)
      h = lambda_t - lambda_s
      1st order (= DDIM):  x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) x_0,i
      2nd order, r = h_prev / h, D1 = (x_0,i - x_0,i-1) / r:
                           x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) (x_0,i + D1 / 2)
    The x_0 prediction is in the input dtype; the update runs in float32 and is cast back.
    """
    sigmas = sched.sigmas
    alpha_s, sigma_s = _vp_alpha_sigma(sigmas[i])
    x0 = (x - sigma_s * eps) / alpha_s
    x32 = x.to(torch.float32)

    alpha_t, sigma_t = _vp_alpha_sigma(sigmas[i + 1])
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)  # +inf at the final sigma 0
    lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
    h = lambda_t - lambda_s
    if x0_prev is None or i == len(sched.timesteps) - 1:
        x_next = (sigma_t / sigma_s) * x32 - (alpha_t * (torch.exp(-h) - 1.0)) * x0
    else:
        alpha_r, sigma_r = _vp_alpha_sigma(sigmas[i - 1])
        lambda_r = torch.log(alpha_r) - torch.log(sigma_r)
        r = (lambda_s - lambda_r) / h
        d1 = (1.0 / r) * (x0 - x0_prev)
        x_next = (
            (sigma_t / sigma_s) * x32
            - (alpha_t * (torch.exp(-h) - 1.0)) * x0
            - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
        )
    return x_next.to(x0.dtype), x0


# ----------------------------------------------------------------------------- helpers


def _vp_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VE sigma -> VP (alpha_t, sigma_t): alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _row_noise(
    generators: list[torch.Generator], shape: torch.Size, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """One N(0, I) draw of shape (1, C, H, W) per row from that row's CPU generator -> (B, C, H, W)."""
    row_shape = (1, *shape[1:])
    rows = [torch.randn(row_shape, generator=g, device="cpu", dtype=dtype) for g in generators]
    return to_device(torch.cat(rows, dim=0), device)  # (B, C, H, W)


def _check_start(start_index: int, num_timesteps: int) -> int:
    if isinstance(start_index, bool) or not isinstance(start_index, int):
        raise ValueError(f"start_index must be an integer, got {start_index!r}")
    if not 0 <= start_index < num_timesteps:
        raise ValueError(f"start_index must be in 0..{num_timesteps - 1}, got {start_index}")
    return start_index
