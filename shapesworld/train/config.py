"""`TrainConfig`: every setting of a training run, checked when the config is made."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sdcore import schedules
from sdcore.config import ModelConfig

from .presets import shapes_config

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
    latent_std: float = 0.6  # std of the UNet's latents (SD: 1.0); see stages.py's docstring
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
    VAE_FIELDS = (
        "seed",
        "dataset_seed",
        "n_train",
        "size",
        "vae_steps",
        "vae_batch",
        "vae_lr",
        "kl_weight",
        "foreground_weight",
        "initial_logvar",
        "warmup",
        "grad_clip",
    )

    def __post_init__(self) -> None:
        # checked here so that a bad value fails before 30000 images are rendered
        if not 0.0 <= self.caption_noise < 1.0:
            raise ValueError(f"caption_noise {self.caption_noise}: must be in [0, 1)")
        if not 0 <= self.caption_noise_min_t <= schedules.NUM_TRAIN_TIMESTEPS:
            raise ValueError(
                f"caption_noise_min_t {self.caption_noise_min_t}: must be in [0, {schedules.NUM_TRAIN_TIMESTEPS}]"
            )
        if not self.caption_noise_attributes or any(
            a not in MISLABEL_ATTRIBUTES for a in self.caption_noise_attributes
        ):
            raise ValueError(
                f"caption_noise_attributes {list(self.caption_noise_attributes)}: "
                f"choose from {list(MISLABEL_ATTRIBUTES)}"
            )

    def vae_stage(self) -> dict:
        """What stage 1's result depends on: two runs with equal values train the same VAE."""
        stage = {name: getattr(self, name) for name in self.VAE_FIELDS}
        stage["vae"] = ModelConfig.from_dict(self.model).to_dict()["vae"]
        stage["vae"].pop("scaling_factor", None)
        return stage

    def model_config(self, scaling_factor: float = 1.0) -> ModelConfig:
        config = ModelConfig.from_dict(self.model)
        return replace(config, vae=replace(config.vae, scaling_factor=scaling_factor))
