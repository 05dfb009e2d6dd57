"""Noise schedules for Stable Diffusion 1.x: pure functions, no state.

Everything here is a function of its arguments. The SD 1.5 defaults (scaled-linear betas
0.00085 -> 0.012 over 1000 training steps, `steps_offset=1`, "leading" timestep spacing,
`set_alpha_to_one=False`) are the keyword defaults. Expensive tables are memoised in private
helpers; the public functions hand out fresh tensors, so a caller may do what it likes with
them.

Notation:
  alpha_bar_t   cumulative product prod_{s<=t} (1 - beta_s)          (Ho et al. 2020, eq. 4)
  sigma_t       sqrt((1 - alpha_bar_t) / alpha_bar_t), the "VE" noise level of the same
                marginal, x_t / sqrt(alpha_bar_t) = x_0 + sigma_t * eps   (Karras et al. 2022,
                Table 1, "VP" column; Song et al. 2021 DDIM, Sec. 4.3, eq. 14)

Precision follows the reference (diffusers' schedulers) on purpose: tables are float32 where
the reference builds them in float32, and Karras sigmas are built in float64 before the final
float32 rounding, so sdcore and diffusers agree to the last bit on the tables.
"""

from __future__ import annotations

import functools

import torch

from .rules import NUM_TRAIN_TIMESTEPS, STEPS_OFFSET, img2img_steps

BETA_START = 0.00085
BETA_END = 0.012
KARRAS_RHO = 7.0


# ----------------------------------------------------------------------------- training schedule


@functools.lru_cache(maxsize=8)
def _alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    betas = scaled_linear_betas(num_train_timesteps, beta_start, beta_end)  # (T,) float32
    # alpha_bar_t = prod_{s<=t} (1 - beta_s)   (Ho et al. 2020, eq. 4 notation)
    return torch.cumprod(1.0 - betas, dim=0)  # (T,) float32


@functools.lru_cache(maxsize=8)
def _train_sigmas(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    alphas_cumprod = _alphas_cumprod(num_train_timesteps, beta_start, beta_end)
    # sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)   (Karras et al. 2022, Table 1, VP)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # (T,) float32, increasing in t


def scaled_linear_betas(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
) -> torch.Tensor:
    """beta_t, t = 0..T-1, linear in sqrt(beta): latent diffusion's "scaled_linear" schedule
    (Rombach et al. 2022). (T,) float32, built in float32 as the reference does."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def alphas_cumprod(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), shape (T,), float32 (Ho et al. 2020, eq. 4)."""
    return _alphas_cumprod(num_train_timesteps, beta_start, beta_end).clone()


def train_sigmas(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training step, (T,) float32."""
    return _train_sigmas(num_train_timesteps, beta_start, beta_end).clone()


# ----------------------------------------------------------------------------- inference timesteps


def leading_timesteps(
    steps: int,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    steps_offset: int = STEPS_OFFSET,
) -> torch.Tensor:
    """ "Leading" spacing (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Table 2): t_i = i * (T // steps) + offset for i = steps-1 .. 0, descending.

    SD 1.5 (offset 1), 25 steps: 961, 921, ..., 41, 1. Shape (steps,), int64.
    """
    _check_steps(steps, num_train_timesteps)
    ratio = num_train_timesteps // steps
    return torch.arange(steps - 1, -1, -1, dtype=torch.int64) * ratio + steps_offset


def dpmsolver_leading_timesteps(
    steps: int,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    steps_offset: int = STEPS_OFFSET,
) -> torch.Tensor:
    """The DPM-Solver flavour of "leading" spacing used by the reference multistep solver:
    the grid is laid out for steps + 1 points (ratio T // (steps + 1)) and the point at 0 is
    dropped, t_i = i * ratio + offset for i = steps .. 1.

    SD 1.5, 25 steps: 951, 913, ..., 77, 39. Shape (steps,), int64.
    """
    _check_steps(steps, num_train_timesteps)
    ratio = num_train_timesteps // (steps + 1)
    if ratio == 0:
        raise ValueError(f"steps={steps}: DPM-Solver's leading spacing needs steps + 1 <= {num_train_timesteps}")
    return torch.arange(steps, 0, -1, dtype=torch.int64) * ratio + steps_offset


# ----------------------------------------------------------------------------- sigma schedules


def sigmas_at(timesteps: torch.Tensor, **schedule) -> torch.Tensor:
    """sigma_t at integer training timesteps, with a final 0 appended: (len + 1,) float32.

    For integer t the reference's linear interpolation of the training sigmas is exact; like
    it, a t past the end of the table (t = T, which "leading" spacing with offset 1 reaches
    at T - 1 or T steps) takes the last entry.
    """
    table = _train_sigmas(*_schedule_args(**schedule))  # (T,)
    index = timesteps.long().clamp(0, table.shape[0] - 1)
    return torch.cat([table[index], torch.zeros(1, dtype=torch.float32)])


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. 2022, eq. (5):

        sigma_i = (sigma_max^(1/rho) + i/(n-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
        i = 0 .. n-1,

    descending from sigma_max to sigma_min. Computed in float64 (shape (n,)); no trailing zero.
    """
    if n < 1:
        raise ValueError(f"karras_sigmas needs n >= 1, got {n}")
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    # i / (n - 1) as i * (1 / (n - 1)), last point exactly 1 (numpy.linspace's rounding).
    step = 1.0 / (n - 1) if n > 1 else 0.0
    ramp = torch.arange(n, dtype=torch.float64) * step
    if n > 1:
        ramp[-1] = 1.0
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_timestep(sigmas: torch.Tensor, **schedule) -> torch.Tensor:
    """Continuous training timestep t for each sigma: piecewise-linear interpolation of t
    against log sigma_t over the training table (float64, clamped to [0, T-1]).

    Used to feed the UNet the timestep that matches a sigma not on the training grid
    (Karras sigmas), as k-diffusion's `DiscreteSchedule.sigma_to_t` does.
    """
    table = _train_sigmas(*_schedule_args(**schedule))
    log_table = torch.log(table)  # (T,) float32, increasing
    log_sigma = torch.log(torch.clamp(sigmas.to(torch.float64), min=1e-10))  # (N,) float64
    # low = last grid index with log_table <= log_sigma (0 if none), clipped so low+1 exists.
    below = (log_sigma[None, :] - log_table[:, None].to(torch.float64)) >= 0  # (T, N)
    low = (below.to(torch.int64).sum(dim=0) - 1).clamp(min=0, max=table.shape[0] - 2)  # (N,)
    high = low + 1
    lo = log_table[low].to(torch.float64)
    hi = log_table[high].to(torch.float64)
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low.to(torch.float64) + w * high.to(torch.float64)  # (N,) float64


@functools.lru_cache(maxsize=64)
def _karras_schedule(steps: int, rho: float, schedule_args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    table = _train_sigmas(*schedule_args)  # (T,) float32
    sigmas = karras_sigmas(table[0].item(), table[-1].item(), steps, rho)  # (steps,) float64
    # round() is round-half-to-even, as numpy's.
    timesteps = torch.round(sigma_to_timestep(sigmas, **dict(zip(_SCHEDULE_KEYS, schedule_args))))
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)
    return timesteps.to(torch.int64), sigmas


def karras_schedule(steps: int, rho: float = KARRAS_RHO, **schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (steps,) int64, sigmas (steps + 1,) float32 ending in 0) for Karras spacing
    between the training sigma_min and sigma_max (Karras et al. 2022, eq. 5), with each
    timestep the rounded `sigma_to_timestep` of its sigma."""
    args = _schedule_args(**schedule)
    _check_steps(steps, args[0])
    timesteps, sigmas = _karras_schedule(steps, rho, args)
    return timesteps.clone(), sigmas.clone()


# ----------------------------------------------------------------------------- img2img


def img2img_start_index(steps: int, strength: float) -> int:
    """Index of the first timestep an img2img run denoises from.

    The reference pipeline keeps the last `rules.img2img_steps(steps, strength)` =
    `min(int(steps * strength), steps)` of the `steps` timesteps, so the run starts at
    `steps - that`. Raises ValueError unless 0 < strength <= 1, and when `steps * strength < 1`
    (no step would run).
    """
    if strength is None or isinstance(strength, (bool, str, bytes)):
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    init_timestep = img2img_steps(steps, strength)  # the rule lives in sdcore.rules
    return max(steps - init_timestep, 0)


# ----------------------------------------------------------------------------- helpers

_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end")


def _schedule_args(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
) -> tuple[int, float, float]:
    return (num_train_timesteps, beta_start, beta_end)


def _check_steps(steps: int, num_train_timesteps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if steps > num_train_timesteps:
        raise ValueError(f"steps must be <= {num_train_timesteps} (training timesteps), got {steps}")
