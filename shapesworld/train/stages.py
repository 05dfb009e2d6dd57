"""The two training stages, Latent Diffusion's recipe (Rombach et al. 2022) with sdcore's modules.

1. **VAE** (`AutoencoderKL`): reconstruction (L1 + L2) plus a small KL term towards N(0, I)
   (LDM sec. 3 and appendix G, "KL-reg"; no perceptual or GAN loss: flat-coloured shapes do not
   need them). The latent is sampled from the posterior with the reparameterisation trick
   (Kingma & Welling 2014, eq. 10). Two changes make it learn in minutes on a CPU: shape pixels
   weigh 10x in the reconstruction (they cover 3-9% of an image, and an unweighted loss first
   settles for background + blob), and the posterior starts narrow (log-variance bias -4), so
   the decoder sees the encoder's signal rather than unit noise from the first step.
2. **UNet + text encoder** (`UNet2DConditionModel`, `CLIPTextModel`), trained jointly from
   scratch on the frozen VAE's latents with the ε-prediction objective of DDPM (Ho et al. 2020,
   eq. 14, "L_simple") on SD 1.5's noise schedule (`schedules.alphas_cumprod`), weighted by
   Min-SNR-γ (Hang et al. 2023, eq. 8 for ε-prediction: w_t = min(SNR_t, γ) / SNR_t), which
   speeds up convergence a lot at this scale. Captions are dropped with probability 0.2 for
   classifier-free guidance (data.py). An exponential moving average of the weights is kept and
   shipped (as SD's `model_ema`).

`VAEConfig.scaling_factor` is set to `latent_std` / std of the trained latents
(`scaling_factor_for`). LDM (sec. 4.3.2) and SD use unit variance; the shapes model uses 0.6.
Its latents are 16x16 and its images are big flat colour regions, so under SD's noise schedule
an object's colour is still plain at t ~ 640, where img2img at strength 0.7 starts, and the
model keeps the init's colours whatever the prompt says. Shrinking the latents is the
input-scaling form of a noise-schedule shift (Chen 2023, "On the importance of noise scheduling
for diffusion models", sec. 2.2): 0.6 makes SNR(t = 641) what unit-variance latents have at
t ~ 760, so a strength means about as much repainting as it does in SD. The samplers and schedule
stay SD 1.5's. What it measured: "Training experiments" in bench/QUALITY.md.

Every random draw names its generator, seeded from `cfg.seed`; checkpoints hold the generator
states, so a resumed stage continues the same run bit for bit.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from sdcore import schedules
from sdcore.clip import CLIPTextModel
from sdcore.unet import UNet2DConditionModel
from sdcore.vae import AutoencoderKL

from .checkpoints import (
    RunLog,
    load_checkpoint,
    restore_stage,
    save_checkpoint,
    stage_state,
)
from .config import TrainConfig
from .data import CaptionTokens, image_batch, latent_batch, to_unit


def lr_at(step: int, base: float, warmup: int) -> float:
    """Linear warm-up, then constant (a stopped-early run is as good as its EMA so far)."""
    return base * min(1.0, (step + 1) / warmup)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, params, grad_clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, mininterval=5, dynamic_ncols=True)


def due(step: int, every: int, last: int) -> bool:
    """Whether to log or checkpoint after `step`: every `every` steps and at the last one."""
    return step % every == 0 or step == last


# ---------------------------------------------------------------------------------- stage 1


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per element (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def new_vae(cfg: TrainConfig) -> AutoencoderKL:
    """Stage 1's initial VAE, drawn from `cfg.seed`."""
    config = cfg.model_config()
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # initial weights (PyTorch's default init draws globally)
        vae = AutoencoderKL(config.vae)
        # Start with a narrow posterior (std e^-2 ~ 0.14), so the decoder sees the encoder's
        # signal from the first step instead of unit noise; the KL term widens it as it likes.
        latent = config.vae.latent_channels
        with torch.no_grad():
            vae.quant_conv.bias[latent:].fill_(cfg.initial_logvar)
    return vae


def vae_loss(
    vae: AutoencoderKL, x: torch.Tensor, cfg: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1's objective on images x (B, 3, H, W): (loss, reconstruction term, KL term)."""
    mean, logvar = vae.encode(x)  # (B, 4, H/f, W/f) each
    eps = torch.randn(mean.shape, generator=generator)
    z = mean + torch.exp(0.5 * logvar) * eps  # reparameterisation
    recon = vae.decode(z)
    # Foreground-weighted L1 + L2: the shape covers 3-9% of the pixels, so an unweighted
    # loss is won by painting the background and a blob. Shapes never touch the border,
    # so a pixel unlike the corner pixel is foreground: (B, 1, H, W).
    foreground = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.05).float()
    weight = 1.0 + (cfg.foreground_weight - 1.0) * foreground
    rec = (weight * ((recon - x).abs() + (recon - x).pow(2))).mean() / weight.mean()
    kl = kl_to_standard_normal(mean, logvar).mean()
    return rec + cfg.kl_weight * kl, rec, kl


def train_vae(
    cfg: TrainConfig, out: Path, images: torch.Tensor, *, resume: bool, progress: bool = True
) -> tuple[AutoencoderKL, list[float]]:
    """Stage 1: the KL autoencoder on uint8 images (N, 3, H, W), checkpointed to `out/vae.pt`.
    Returns the trained VAE and its per-step losses."""
    path = out / "vae.pt"
    vae = new_vae(cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + 1)
    modules = {"model": vae}
    losses: list[float] = []
    step = 0
    if resume and path.exists():
        losses, step = restore_stage(load_checkpoint(path), modules, optimizer, generator)

    def checkpoint() -> None:
        save_checkpoint(stage_state(modules, optimizer, generator, losses, step), path)

    log = RunLog(out / "log.jsonl")
    bar = progress_bar(cfg.vae_steps, step, "vae", progress)
    vae.train()
    start = time.time()
    while step < cfg.vae_steps:
        lr = set_lr(optimizer, lr_at(step, cfg.vae_lr, cfg.warmup))
        x = image_batch(images, cfg.vae_batch, generator)  # (B, 3, H, W)
        loss, rec, kl = vae_loss(vae, x, cfg, generator)
        optimizer_step(optimizer, loss, vae.parameters(), cfg.grad_clip)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if due(step, cfg.log_every, cfg.vae_steps):
            recent = float(np.mean(losses[-cfg.log_every :]))
            bar.set_postfix(loss=f"{recent:.4f}", rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
            log.write(
                phase="vae",
                step=step,
                loss=recent,
                rec=rec.item(),
                kl=kl.item(),
                lr=lr,
                seconds=round(time.time() - start, 1),
            )
        if due(step, cfg.checkpoint_every, cfg.vae_steps):
            checkpoint()
    bar.close()
    return vae.eval().requires_grad_(False), losses


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256):
    """Posterior mean and std of every training image, (N, 4, h, w) each, unscaled."""
    means, stds = [], []
    for chunk in images.split(batch):
        mean, logvar = vae.encode(to_unit(chunk))
        means.append(mean)
        stds.append(torch.exp(0.5 * logvar))
    return torch.cat(means), torch.cat(stds)


def scaling_factor_for(mean: torch.Tensor, latent_std: float) -> float:
    """LDM sec. 4.3.2 rescales by 1 / std of the latents (here of the posterior mean, as
    diffusers' training scripts compute it on a batch); we aim at `latent_std` instead of 1."""
    return float(latent_std / mean.std())


# ---------------------------------------------------------------------------------- stage 2


def new_unet_and_text(cfg: TrainConfig) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Stage 2's initial UNet and text encoder, drawn from `cfg.seed + 1`."""
    config = cfg.model_config()
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + 1)
        return UNet2DConditionModel(config.unet), CLIPTextModel(config.text_encoder)


def min_snr_weights(alpha_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weight per timestep for ε-prediction (Hang et al. 2023, eq. 8):
    min(SNR_t, γ) / SNR_t, (T,)."""
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) (Ho et al. 2020, eq. 4), x0 (B, 4, h, w)."""
    a = alpha_bar[t].view(len(t), 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def update_ema(pairs: list, step: int, max_decay: float) -> None:
    """EMA of (ema, live) parameter pairs, with the usual warm-up of the decay,
    min(decay, (1 + n) / (10 + n))."""
    decay = min(max_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for ema_p, p in pairs:
            ema_p.lerp_(p, 1 - decay)


def train_unet(
    cfg: TrainConfig,
    out: Path,
    latents: tuple[torch.Tensor, torch.Tensor],
    scaling_factor: float,
    captions: list[str],
    noisy_captions: list[str],
    *,
    resume: bool,
    progress: bool = True,
):
    """Stage 2: UNet + text encoder with ε-prediction on SD 1.5's schedule, caption dropout and
    Min-SNR weighting, checkpointed to `out/unet.pt`. `noisy_captions` (see
    `data.mislabel_captions`) replace `captions` for the rows with t >= cfg.caption_noise_min_t
    from step cfg.caption_noise_from_step on.
    Returns (ema unet, ema text encoder, per-step losses)."""
    path = out / "unet.pt"
    unet, text = new_unet_and_text(cfg)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text).requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    modules = {"unet": unet, "text_encoder": text, "ema_unet": ema_unet, "ema_text_encoder": ema_text}
    losses: list[float] = []
    step = 0
    if resume and path.exists():
        losses, step = restore_stage(load_checkpoint(path), modules, optimizer, generator)

    def checkpoint() -> None:
        save_checkpoint(stage_state(modules, optimizer, generator, losses, step, scaling_factor=scaling_factor), path)

    tokens = CaptionTokens.build(captions, noisy_captions)
    alpha_bar = schedules.alphas_cumprod()  # (1000,) SD 1.5 scaled-linear
    weight_table = min_snr_weights(alpha_bar, cfg.min_snr_gamma)
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params))

    log = RunLog(out / "log.jsonl")
    bar = progress_bar(cfg.unet_steps, step, "unet", progress)
    unet.train()
    text.train()
    start = time.time()
    while step < cfg.unet_steps:
        lr = set_lr(optimizer, lr_at(step, cfg.unet_lr, cfg.warmup))
        index, x0 = latent_batch(latents, cfg.unet_batch, scaling_factor, generator)
        t = torch.randint(0, schedules.NUM_TRAIN_TIMESTEPS, (len(index),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        xt = add_noise(x0, noise, t, alpha_bar)
        context = text(tokens.batch(cfg, index, t, step, generator))  # (B, 77, D)
        per_row = (unet(xt, t, context) - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
        loss = (weight_table[t] * per_row).mean()
        optimizer_step(optimizer, loss, params, cfg.grad_clip)
        step += 1
        update_ema(ema_pairs, step, cfg.ema_decay)
        losses.append(per_row.mean().item())  # unweighted ε-MSE: comparable across runs
        bar.update(1)
        if due(step, cfg.log_every, cfg.unet_steps):
            recent = float(np.mean(losses[-cfg.log_every :]))
            bar.set_postfix(loss=f"{recent:.4f}")
            log.write(
                phase="unet", step=step, loss=recent, weighted=loss.item(), lr=lr, seconds=round(time.time() - start, 1)
            )
        if due(step, cfg.checkpoint_every, cfg.unet_steps):
            checkpoint()
    bar.close()
    # buffers (none today) follow the live model
    return ema_unet.eval(), ema_text.eval(), losses
