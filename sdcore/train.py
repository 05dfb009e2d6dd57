"""Train a small Stable Diffusion 1.x on the shape world (`sdcore.shapes`), on a CPU, from scratch.

The recipe is Latent Diffusion's (Rombach et al. 2022), in two stages, with sdcore's own modules:

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
   speeds up convergence a lot at this scale. Captions are dropped (replaced by "", the
   pipeline's default negative prompt) with probability 0.2 so that one network also learns the
   unconditional model that classifier-free guidance needs (Ho & Salimans 2022, sec. 3.2).
   An exponential moving average of the weights is kept and shipped (as SD's `model_ema`).

`VAEConfig.scaling_factor` is set to `latent_std` / std of the trained latents. LDM (sec. 4.3.2)
and SD use unit variance; the shapes model uses 0.6. Its latents are 16x16 and its images are
big flat colour regions, so under SD's noise schedule an object's colour is still plain at
t ~ 640, where img2img at strength 0.7 starts, and the model keeps the init's colours whatever
the prompt says. Shrinking the latents is the input-scaling form of a noise-schedule shift
(Chen 2023, "On the importance of noise scheduling for diffusion models", sec. 2.2): 0.6 makes
SNR(t = 641) what unit-variance latents have at t ~ 760, so a strength means about as much
repainting as it does in SD. The samplers and schedule stay SD 1.5's. Measured on two runs that
differ only in `latent_std` (7000 UNet steps, 60 validation rows, red circle -> "blue circle"
at strength 0.7, guidance 5): 45% blue at 1.0, 100% at 0.6; txt2img adherence as good or better.

`--caption-noise P` mislabels one attribute in a fixed fraction P of the training captions, as web
alt-text often names the wrong thing; `--caption-noise-attributes` says which of colour, shape and
position may be named wrongly, `--caption-noise-min-t` and `--caption-noise-from-step` restrict the
mislabelled captions to timesteps t >= T and to UNet steps from S on (before S the run is the clean
run, bit for bit, so a clean run can be continued into a noisy one). Why: a caption of this world
fixes almost everything about its image, and a model trained on exact captions draws held-out
prompts as well without guidance as with it (all-correct 96.7% at g1.0 vs 96.2% at g5, 240
prompts), unlike SD, whose unguided samples follow their prompts loosely because its captions are
noisy. The shipped model mislabels the position in 30% of the captions from UNet step 7000 on.
What was tried, each continuing the same clean 7000-step checkpoint for 1000-2000 steps, on 60
validation prompts (prompt seed 99; txt2img all-correct at g5 / g1.0, then red -> blue circle
recolouring at strength 0.7, g5 / g7.5):

    no caption noise (7000 steps)              98% / 97%    100% / 100%
    P 0.1, any attribute, 9000 steps           98% / 75%     25% /  37%
    P 0.25, any attribute, t >= 700, 9000      97% / 90%     60% /  93%
    P 0.5, any attribute, t >= 850, 8000       98% / 97%    100% / 100%
    P 0.5, any attribute, t >= 750, 9000       95% / 83%     60% /  92%
    P 0.5, position only, 8000 / 9000          92% / 60%    100% / 100%  (9000: 70% / 40%)
    P 0.3, position only, 8400 (shipped)       95% / 70%    100% /  98%

(and trained from scratch with P 0.25 on any attribute, 6000 steps: 92% at g7.5 / 52% at g1.0,
recolouring 7% / 12%.)

A model that has seen captions with a wrong colour learns to keep the colour it sees in x_t when the
prompt disagrees, which is exactly what img2img recolouring asks it not to do; restricting the noise
to high noise levels only delays that, since colour is decided late (t < 850) and position early.
Mislabelled positions make the unguided model place objects loosely while colour and shape edits
stay prompt-driven; the cost is that img2img is expected to keep the init's position over a prompt
that asks for another one (not measured). Longer training on 50% noise also lowers guided position
accuracy (g5: 92% at 8000, 70% at 9000), so the checkpoint was chosen on the validation prompts.

`--vae-from RUN` takes the finished VAE stage (`vae.pt`, `latents.pt`) of an earlier run
whose stage-1 settings are identical, to iterate on stage 2 without redoing stage 1.

Everything random draws from generators seeded from `--seed` (initial weights, batches,
timesteps, noise, caption dropout), so a run is reproducible on one machine; checkpoints hold
the generator states as well, so `--resume` continues the same run.

    python -m sdcore.train --out runs/shapes --seed 0 --vae-steps 1500 --unet-steps 5000
    python -m sdcore.train --out runs/shapes --resume ...   # continue after an interruption
    python -m sdcore.train --out runs/shapes --export sdcore/builtin/shapes  # ship the result

Files in `--out`: `train_config.json`, `vae.pt`, `unet.pt` (checkpoints, replaced atomically),
`latents.pt`, `log.jsonl` (one line per logged step: phase, step, loss, lr, seconds),
`summary.json`. `--export DIR` writes `DIR/model.safetensors` (float16, CompVis layout, config
in the metadata) and `DIR/training.json` (dataset seed, steps, losses, wall time, commit and a
small stored adherence figure that `tests/test_train.py` re-measures).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import schedules
from .clip import CLIPTextModel
from .config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from .tokenizer import tokenize
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL


def shapes_config(scaling_factor: float = 1.0) -> ModelConfig:
    """The model shipped as `builtin:shapes`: 4x VAE (64x64 px -> 16x16x4 latents), a 3-level
    UNet (1.7M parameters) with cross-attention at 8x8 and 4x4, a 2-layer 64-wide CLIP text
    encoder over SD's full 49408-token vocabulary."""
    return ModelConfig(
        unet=UNetConfig(
            block_out_channels=(32, 64, 64),
            attention_levels=(False, True, True),
            layers_per_block=1,
            num_heads=4,
            cross_attention_dim=64,
            norm_num_groups=16,
        ),
        vae=VAEConfig(
            block_out_channels=(16, 32, 64),
            layers_per_block=1,
            norm_num_groups=16,
            scaling_factor=scaling_factor,
        ),
        text_encoder=TextEncoderConfig(
            hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4
        ),
    )


# what `--caption-noise` may name wrongly (size and background are always captioned right)
MISLABEL_ATTRIBUTES = ("colour", "shape", "position")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    dataset_seed: int = 0
    n_train: int = 30_000  # pre-rendered training images (64x64)
    size: int = 64
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4  # per latent element, against per-pixel-mean reconstruction
    foreground_weight: float = 10.0  # reconstruction weight of shape pixels vs background
    initial_logvar: float = -4.0
    unet_steps: int = 5000
    unet_batch: int = 64
    unet_lr: float = 3e-4
    warmup: int = 100
    caption_dropout: float = 0.2
    latent_std: float = 0.6  # std of the UNet's latents (SD: 1.0); see the module docstring
    caption_noise: float = 0.0  # fraction of training images whose caption gets one attribute wrong
    caption_noise_min_t: int = 0  # mislabelled captions are used only at timesteps t >= this
    caption_noise_from_step: int = 0  # ... and only from this UNet step on
    caption_noise_attributes: tuple = MISLABEL_ATTRIBUTES  # which of them may be named wrongly
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 200
    model: dict = field(default_factory=lambda: shapes_config().to_dict())

    # the fields stage 1 (the VAE and its latents) depends on
    VAE_FIELDS = ("seed", "dataset_seed", "n_train", "size", "vae_steps", "vae_batch", "vae_lr",
                  "kl_weight", "foreground_weight", "initial_logvar", "warmup", "grad_clip")

    def __post_init__(self) -> None:
        # checked here so that a bad value fails before 30000 images are rendered
        if not 0.0 <= self.caption_noise < 1.0:
            raise ValueError(f"caption_noise {self.caption_noise}: must be in [0, 1)")
        if not 0 <= self.caption_noise_min_t <= schedules.NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"caption_noise_min_t {self.caption_noise_min_t}: must be in "
                             f"[0, {schedules.NUM_TRAIN_TIMESTEPS}]")
        if not self.caption_noise_attributes or any(
                a not in MISLABEL_ATTRIBUTES for a in self.caption_noise_attributes):
            raise ValueError(f"caption_noise_attributes {list(self.caption_noise_attributes)}: "
                             f"choose from {list(MISLABEL_ATTRIBUTES)}")

    def vae_stage(self) -> dict:
        """What stage 1's result depends on: two runs with equal values train the same VAE."""
        stage = {name: getattr(self, name) for name in self.VAE_FIELDS}
        stage["vae"] = ModelConfig.from_dict(self.model).to_dict()["vae"]
        stage["vae"].pop("scaling_factor", None)
        return stage

    def model_config(self, scaling_factor: float = 1.0) -> ModelConfig:
        config = ModelConfig.from_dict(self.model)
        return replace(config, vae=replace(config.vae, scaling_factor=scaling_factor))


# ---------------------------------------------------------------------------------- data


def render_training_set(cfg: TrainConfig) -> tuple[torch.Tensor, list[str]]:
    """The fixed training set: (N, 3, H, W) uint8 images and their captions."""
    from .shapes.dataset import dataset  # lazy: only training needs it

    data = dataset(cfg.n_train, seed=cfg.dataset_seed, split="train", size=cfg.size,
                   tensors=False)
    images = torch.empty(cfg.n_train, 3, cfg.size, cfg.size, dtype=torch.uint8)
    captions = []
    for i in range(cfg.n_train):
        image, caption = data[i]
        # (H, W, 3) -> (3, H, W)
        images[i] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        captions.append(caption)
    return images, captions


def mislabel_captions(cfg: TrainConfig, captions: list[str]) -> list[str]:
    """`cfg.caption_noise` of the training images get a caption with one of colour, shape or
    position (those in `cfg.caption_noise_attributes`) replaced by another value, the way web
    alt-text often names the wrong thing. The choice is fixed per image (seeded by the dataset
    seed), and never names a held-out combination. SD's unguided samples follow their prompts loosely because its captions are
    noisy; classifier-free guidance pulls samples towards images the caption fits (p(c|x)),
    and this is the regime in which it matters."""
    if cfg.caption_noise <= 0:
        return list(captions)
    from .shapes.dataset import COLOURS, POSITIONS, SHAPES, TEMPLATES, dataset, is_held_out

    data = dataset(len(captions), seed=cfg.dataset_seed, split="train", size=cfg.size,
                   tensors=False)
    values = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS)}
    choices = {name: values[name] for name in MISLABEL_ATTRIBUTES
               if name in cfg.caption_noise_attributes}
    rng = np.random.default_rng([cfg.dataset_seed, 17])
    noisy = list(captions)
    for i in range(len(captions)):
        if rng.random() >= cfg.caption_noise:
            continue
        scene, caption = data.scene(i)
        template = next(t for t in range(len(TEMPLATES)) if scene.caption(t) == caption)
        while True:
            attribute = list(choices)[rng.integers(len(choices))]
            others = [v for v in choices[attribute] if v != getattr(scene, attribute)]
            wrong = replace(scene, **{attribute: others[rng.integers(len(others))]})
            if not is_held_out(wrong):
                break
        noisy[i] = wrong.caption(template)
    return noisy


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0


def token_table(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique captions tokenized once: ids (U, 77), per-image index (N,), and the ids of ""."""
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    ids = tokenize(unique)
    return ids, torch.tensor([index[c] for c in captions]), tokenize([""])[0]


# ---------------------------------------------------------------------------------- helpers


def lr_at(step: int, base: float, warmup: int) -> float:
    """Linear warm-up, then constant (a stopped-early run is as good as its EMA so far)."""
    return base * min(1.0, (step + 1) / warmup)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per element (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class Log:
    def __init__(self, path: Path):
        self.path = path

    def write(self, **record) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, mininterval=5,
                dynamic_ncols=True)


# ---------------------------------------------------------------------------------- stage 1


def train_vae(cfg: TrainConfig, out: Path, images: torch.Tensor, *, resume: bool,
              progress: bool = True) -> tuple[AutoencoderKL, list[float]]:
    """Stage 1: the KL autoencoder. Returns the trained VAE and its per-step losses."""
    path = out / "vae.pt"
    config = cfg.model_config()
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # initial weights (PyTorch's default init draws globally)
        vae = AutoencoderKL(config.vae)
        # Start with a narrow posterior (std e^-2 ~ 0.14), so the decoder sees the encoder's
        # signal from the first step instead of unit noise; the KL term widens it as it likes.
        latent = config.vae.latent_channels
        with torch.no_grad():
            vae.quant_conv.bias[latent:].fill_(cfg.initial_logvar)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + 1)
    losses: list[float] = []
    step = 0
    if resume and path.exists():
        state = _load(path)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        losses, step = list(state["losses"]), int(state["step"])

    def checkpoint() -> None:
        _save({"model": vae.state_dict(), "optimizer": optimizer.state_dict(),
               "generator": generator.get_state(), "losses": losses, "step": step}, path)

    log = Log(out / "log.jsonl")
    bar = _progress(cfg.vae_steps, step, "vae", progress)
    vae.train()
    start = time.time()
    while step < cfg.vae_steps:
        lr = lr_at(step, cfg.vae_lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(images), (cfg.vae_batch,), generator=generator)
        x = to_unit(images[index])  # (B, 3, H, W)
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
        loss = rec + cfg.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.vae_steps:
            recent = float(np.mean(losses[-cfg.log_every:]))
            bar.set_postfix(loss=f"{recent:.4f}", rec=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
            log.write(phase="vae", step=step, loss=recent, rec=rec.item(), kl=kl.item(), lr=lr,
                      seconds=round(time.time() - start, 1))
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
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


# ---------------------------------------------------------------------------------- stage 2


def train_unet(cfg: TrainConfig, out: Path, latents: tuple[torch.Tensor, torch.Tensor],
               scaling_factor: float, captions: list[str], noisy_captions: list[str], *,
               resume: bool, progress: bool = True):
    """Stage 2: UNet + text encoder with ε-prediction on SD 1.5's schedule, caption dropout and
    Min-SNR weighting. `noisy_captions` (see `mislabel_captions`) replace `captions` for the
    rows with t >= cfg.caption_noise_min_t from step cfg.caption_noise_from_step on.
    Returns (ema unet, ema text encoder, per-step losses)."""
    path = out / "unet.pt"
    config = cfg.model_config(scaling_factor)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + 1)
        unet = UNet2DConditionModel(config.unet)
        text = CLIPTextModel(config.text_encoder)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + 2)
    losses: list[float] = []
    step = 0
    if resume and path.exists():
        state = _load(path)
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text_encoder"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        losses, step = list(state["losses"]), int(state["step"])

    def checkpoint() -> None:
        _save({"unet": unet.state_dict(), "text_encoder": text.state_dict(),
               "ema_unet": ema_unet.state_dict(), "ema_text_encoder": ema_text.state_dict(),
               "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
               "losses": losses, "step": step, "scaling_factor": scaling_factor}, path)

    ids, caption_index, empty_ids = token_table(captions + noisy_captions)
    clean_index, noisy_index = caption_index[:len(captions)], caption_index[len(captions):]
    mean_all, std_all = latents
    alpha_bar = schedules.alphas_cumprod()  # (1000,) SD 1.5 scaled-linear
    snr = alpha_bar / (1 - alpha_bar)
    # Min-SNR-γ weight for ε-prediction (Hang et al. 2023): min(SNR, γ) / SNR
    weight_table = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params))

    log = Log(out / "log.jsonl")
    bar = _progress(cfg.unet_steps, step, "unet", progress)
    unet.train()
    text.train()
    start = time.time()
    while step < cfg.unet_steps:
        lr = lr_at(step, cfg.unet_lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = cfg.unet_batch
        index = torch.randint(len(mean_all), (batch,), generator=generator)
        posterior = torch.randn(mean_all[index].shape, generator=generator)
        # a fresh draw from the VAE posterior, scaled to unit variance: (B, 4, h, w)
        x0 = (mean_all[index] + std_all[index] * posterior) * scaling_factor
        t = torch.randint(0, schedules.NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alpha_bar[t].view(batch, 1, 1, 1)
        # q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I)   (Ho et al. 2020, eq. 4)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        drop = torch.rand(batch, generator=generator) < cfg.caption_dropout
        rows = clean_index[index]
        if cfg.caption_noise > 0 and step >= cfg.caption_noise_from_step:
            rows = torch.where(t >= cfg.caption_noise_min_t, noisy_index[index], rows)
        tokens = ids[rows].clone()  # (B, 77)
        tokens[drop] = empty_ids
        context = text(tokens)  # (B, 77, D)
        eps = unet(xt, t, context)
        per_row = (eps - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
        loss = (weight_table[t] * per_row).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        # EMA with the usual warm-up of the decay, min(decay, (1 + n) / (10 + n))
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in ema_pairs:
                ema_p.lerp_(p, 1 - decay)
        losses.append(per_row.mean().item())  # unweighted ε-MSE: comparable across runs
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.unet_steps:
            recent = float(np.mean(losses[-cfg.log_every:]))
            bar.set_postfix(loss=f"{recent:.4f}")
            log.write(phase="unet", step=step, loss=recent, weighted=loss.item(), lr=lr,
                      seconds=round(time.time() - start, 1))
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
            checkpoint()
    bar.close()
    # buffers (none today) follow the live model
    return ema_unet.eval(), ema_text.eval(), losses


# ---------------------------------------------------------------------------------- run / export


def reuse_vae_stage(cfg: TrainConfig, source: Path, out: Path) -> None:
    """Copy a finished stage 1 (`vae.pt`, `latents.pt`) from the run in `source` into `out`,
    after checking that it was trained with exactly the stage-1 settings of `cfg`."""
    import shutil

    saved = TrainConfig(**json.loads((source / "train_config.json").read_text()))
    if saved.vae_stage() != cfg.vae_stage():
        differ = sorted(k for k, v in cfg.vae_stage().items() if saved.vae_stage().get(k) != v)
        raise ValueError(f"--vae-from {source}: its VAE stage was trained with other settings "
                         f"({', '.join(differ)})")
    if int(_load(source / "vae.pt")["step"]) != cfg.vae_steps:
        raise ValueError(f"--vae-from {source}: its VAE stage is not finished")
    if (out / "unet.pt").exists():  # stage 2 would silently continue that older run
        raise ValueError(f"--vae-from: {out} already holds a stage-2 checkpoint (unet.pt); "
                         "use a new --out, or --resume to continue it")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vae.pt", "latents.pt"):
        shutil.copyfile(source / name, out / name)
    log = Log(out / "log.jsonl")
    log.write(phase="vae_from", source=str(source.resolve()))
    for line in (source / "log.jsonl").read_text().splitlines():  # stage 1's own log
        if json.loads(line).get("phase") == "vae":
            log.write(**json.loads(line))


def run(cfg: TrainConfig, out: Path, *, resume: bool = False, progress: bool = True,
        vae_from: Path | None = None) -> dict:
    """Both stages; returns a summary (also written to `out/summary.json`). With `vae_from`,
    stage 1 is taken from that run (see `reuse_vae_stage`)."""
    if vae_from is not None and not (resume and (out / "vae.pt").exists()):
        reuse_vae_stage(cfg, vae_from, out)
        resume = True  # stage 1 is complete; stage 2 starts from scratch (no unet.pt yet)
    out.mkdir(parents=True, exist_ok=True)
    commit_at_start = git_commit()
    (out / "train_config.json").write_text(json.dumps(cfg.__dict__, indent=2, default=list))
    began = time.time()
    images, captions = render_training_set(cfg)
    noisy_captions = mislabel_captions(cfg, captions)
    vae, vae_losses = train_vae(cfg, out, images, resume=resume, progress=progress)

    latents_path = out / "latents.pt"
    if resume and latents_path.exists():
        state = _load(latents_path)
        mean, std = state["mean"], state["std"]
    else:
        mean, std = encode_latents(vae, images)
        _save({"mean": mean, "std": std}, latents_path)
    # LDM sec. 4.3.2 rescales by 1 / std of the latents (here of the posterior mean, as
    # diffusers' training scripts compute it on a batch); we aim at `latent_std` instead of 1
    scaling_factor = float(cfg.latent_std / mean.std())

    unet, text, unet_losses = train_unet(cfg, out, (mean, std), scaling_factor, captions,
                                         noisy_captions, resume=resume, progress=progress)
    summary = {
        "git_commit": commit_at_start,  # the code that trained (HEAD when the run began)
        "seconds": round(time.time() - began, 1),
        "scaling_factor": scaling_factor,
        "vae_loss_first": vae_losses[0] if vae_losses else None,
        "vae_loss_last": float(np.mean(vae_losses[-50:])) if vae_losses else None,
        "unet_loss_first": float(np.mean(unet_losses[:50])) if unet_losses else None,
        "unet_loss_last": float(np.mean(unet_losses[-200:])) if unet_losses else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def pipeline_from_run(out: Path, *, ema: bool = True):
    """A `Pipeline` from the checkpoints in `out` (EMA weights by default)."""
    from .weights import assemble

    cfg = TrainConfig(**json.loads((out / "train_config.json").read_text()))
    vae_state = _load(out / "vae.pt")["model"]
    unet_state = _load(out / "unet.pt")
    prefix = "ema_" if ema else ""
    config = cfg.model_config(float(unet_state["scaling_factor"]))
    parts = {"vae": vae_state, "unet": unet_state[prefix + "unet"],
             "text_encoder": unet_state[prefix + "text_encoder"]}
    return assemble(config, parts, source=str(out)), cfg, unet_state


# A small, fixed adherence figure stored with the shipped weights and re-measured by the tests:
# 12 held-out prompts and 6 img2img recolourings (red circle -> blue, strength 0.7), DDIM 10
# steps, guidance 7.5, one seed each.
CHECK = {"n": 12, "prompt_seed": 7, "sampler": "ddim", "steps": 10, "guidance_scale": 7.5,
         "recolour_n": 6}


def adherence_check(pipe, check: dict = CHECK) -> dict:
    """Generate the check images with `pipe` and judge them:
    {"settings", "prompts", "counts", "recolour_counts"}."""
    from .shapes.dataset import dataset
    from .shapes.evaluate import adherence, recolour_rows

    data = dataset(check["n"], seed=check["prompt_seed"], split="heldout", tensors=False)
    prompts = [data.scene(i)[1] for i in range(check["n"])]
    settings = dict(sampler=check["sampler"], steps=check["steps"],
                    guidance_scale=check["guidance_scale"], width=64, height=64)
    images = pipe.generate([{"prompt": p, "seed": i} for i, p in enumerate(prompts)], **settings)
    result = {"settings": dict(check), "prompts": prompts,
              "counts": adherence(zip(images, prompts))["counts"]}
    rows = recolour_rows(check.get("recolour_n", 0), seed=check["prompt_seed"] + 1)
    if rows:
        images = pipe.generate(rows, **settings)
        result["recolour_counts"] = adherence(zip(images, [r["prompt"] for r in rows]))["counts"]
    return result


def trained_token_ids(cfg: TrainConfig) -> list[int]:
    """Every token id that occurs in the run's (tokenized, padded) training captions or in "":
    the rows of the token table that training updated. The others keep their random init."""
    from .shapes.dataset import dataset

    data = dataset(cfg.n_train, seed=cfg.dataset_seed, split="train", size=cfg.size,
                   tensors=False)
    clean = [data.scene(i)[1] for i in range(cfg.n_train)]
    captions = sorted(set(clean) | set(mislabel_captions(cfg, clean)))
    ids = set(tokenize(captions).flatten().tolist()) | set(tokenize([""]).flatten().tolist())
    return sorted(ids)


def export(out: Path, target: Path, *, dtype: torch.dtype = torch.float16,
           extra: dict | None = None) -> Path:
    """Ship the run in `out` as `target/model.safetensors` (CompVis layout, config in the
    metadata, weights in `dtype`) plus `target/training.json`."""
    from .weights import export_single_file

    pipe, cfg, unet_state = pipeline_from_run(out)
    pipe.unet.to(dtype)
    pipe.vae.to(dtype)
    pipe.text_encoder.to(dtype)
    target.mkdir(parents=True, exist_ok=True)
    # Only the token rows training touched are stored (the rest would be 6 MB of random init);
    # loading makes the others zero, which changes nothing for the world's own prompts.
    token_ids = trained_token_ids(cfg)
    export_single_file(pipe, target / "model.safetensors", token_rows=token_ids)
    vae_state = _load(out / "vae.pt")
    unet_losses, vae_losses = unet_state["losses"], vae_state["losses"]
    log_path = out / "log.jsonl"
    seconds, vae_from = {}, None
    segment: dict[str, float] = {}  # seconds so far in the current (resumed) session per phase
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            record = json.loads(line)
            if "seconds" in record:
                phase = record["phase"]
                if record["seconds"] < segment.get(phase, 0.0):  # a resume restarted the clock
                    seconds[phase] = seconds.get(phase, 0.0) + segment[phase]
                segment[phase] = record["seconds"]
            if record["phase"] == "vae_from":
                vae_from = record["source"]
    for phase, value in segment.items():
        seconds[phase] = round(seconds.get(phase, 0.0) + value, 1)
    meta = {
        "model": "builtin:shapes",
        "dataset": {"module": "sdcore.shapes.dataset", "seed": cfg.dataset_seed,
                    "split": "train", "n_images": cfg.n_train, "size": cfg.size},
        "train_seed": cfg.seed,
        **({"vae_stage_from": f"stage 1 (VAE) taken with --vae-from from the run in {vae_from}, "
                              "trained there with identical stage-1 settings"}
           if vae_from else {}),
        "vae_steps": int(vae_state["step"]),
        "unet_steps": int(unet_state["step"]),
        "vae_loss": {"first": vae_losses[0], "last50": float(np.mean(vae_losses[-50:]))},
        "unet_loss": {"first50": float(np.mean(unet_losses[:50])),
                      "last200": float(np.mean(unet_losses[-200:]))},
        "wall_seconds": seconds,
        "weights": "EMA of UNet and text encoder; stored as " + str(dtype).replace("torch.", "")
                   + f"; token table: the {len(token_ids)} rows of the training captions' "
                   "tokens, others zero",
        "scaling_factor": float(unet_state["scaling_factor"]),
        # the commit that trained (summary.json), and the one that exported
        "git_commit": json.loads((out / "summary.json").read_text()).get("git_commit", "unknown")
                      if (out / "summary.json").exists() else "unknown",
        "export_commit": git_commit(),
        "train_config": {k: v for k, v in cfg.__dict__.items() if k != "model"},
        "model_config": pipe.config.to_dict(),
        "command": (
            f"python -m sdcore.train --out RUN --seed {cfg.seed} --vae-steps {cfg.vae_steps} "
            f"--unet-steps {cfg.unet_steps} --caption-dropout {cfg.caption_dropout} "
            f"--latent-std {cfg.latent_std} --caption-noise {cfg.caption_noise} "
            f"--caption-noise-min-t {cfg.caption_noise_min_t} "
            f"--caption-noise-from-step {cfg.caption_noise_from_step} "
            f"--caption-noise-attributes {','.join(cfg.caption_noise_attributes)}"
            + (" --vae-from VAE_RUN" if vae_from else "")),
        **(extra or {}),
    }
    from .weights import load_single_file, assemble

    config, parts = load_single_file(target / "model.safetensors")  # measured as shipped
    meta["adherence_check"] = adherence_check(assemble(config, parts, source="check"))
    (target / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    return target / "model.safetensors"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdcore.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset-seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=TrainConfig.n_train)
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=TrainConfig.unet_steps)
    parser.add_argument("--vae-batch", type=int, default=TrainConfig.vae_batch)
    parser.add_argument("--unet-batch", type=int, default=TrainConfig.unet_batch)
    parser.add_argument("--caption-dropout", type=float, default=TrainConfig.caption_dropout)
    parser.add_argument("--caption-noise", type=float, default=TrainConfig.caption_noise,
                        help="fraction of training captions with one attribute wrong")
    parser.add_argument("--caption-noise-min-t", type=int, default=TrainConfig.caption_noise_min_t,
                        help="use the mislabelled captions only at timesteps t >= this")
    parser.add_argument("--caption-noise-from-step", type=int,
                        default=TrainConfig.caption_noise_from_step,
                        help="use the mislabelled captions only from this UNet step on")
    parser.add_argument("--caption-noise-attributes", default=",".join(MISLABEL_ATTRIBUTES),
                        help="comma-separated: which of colour,shape,position may be mislabelled")
    parser.add_argument("--latent-std", type=float, default=TrainConfig.latent_std,
                        help="std of the UNet's latents (SD uses 1.0)")
    parser.add_argument("--vae-from", type=Path, metavar="RUN",
                        help="take the finished VAE stage of this earlier run")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--export", type=Path, metavar="DIR",
                        help="instead of training, write DIR/model.safetensors + training.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.export:
        print(export(args.out, args.export))
        return 0
    cfg = TrainConfig(seed=args.seed, dataset_seed=args.dataset_seed, n_train=args.n_train,
                      vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                      vae_batch=args.vae_batch, unet_batch=args.unet_batch,
                      caption_dropout=args.caption_dropout, latent_std=args.latent_std,
                      caption_noise=args.caption_noise,
                      caption_noise_min_t=args.caption_noise_min_t,
                      caption_noise_from_step=args.caption_noise_from_step,
                      caption_noise_attributes=tuple(args.caption_noise_attributes.split(",")))
    if args.resume and (args.out / "train_config.json").exists():
        saved = json.loads((args.out / "train_config.json").read_text())
        saved_cfg = TrainConfig(**saved)
        # step counts may grow on resume; everything else must match the run being continued
        cfg = replace(saved_cfg, vae_steps=args.vae_steps, unet_steps=args.unet_steps)
    print(json.dumps(run(cfg, args.out, resume=args.resume, progress=not args.no_progress,
                         vae_from=args.vae_from)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
