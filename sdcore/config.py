"""Typed model configs, one per model, passed down to every submodule.

Full Stable Diffusion 1.5 is one instance (`ModelConfig.sd15()`), the tiny random test model
another (`ModelConfig.tiny()`). Field names follow diffusers' `config.json` meaning, with the
one legacy quirk made explicit: SD 1.x's `attention_head_dim: 8` is really the number of heads,
so it is stored here as `num_heads`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


def _tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # Which resolution levels (down path, mirrored on the way up) carry a spatial transformer:
    # SD 1.x is CrossAttnDownBlock2D x3 then DownBlock2D.
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    # Heads per level (an int means the same at every level). SD 1.x: 8 heads everywhere.
    num_heads: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768
    transformer_layers: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if len(self.attention_levels) != levels:
            raise ValueError(
                f"UNetConfig.attention_levels has {len(self.attention_levels)} entries, block_out_channels has {levels}"
            )
        if not isinstance(self.num_heads, int) and len(self.num_heads) != levels:
            raise ValueError(f"UNetConfig.num_heads needs one entry per level ({levels})")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig: {channels} channels not divisible by norm_num_groups={self.norm_num_groups}"
                )

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def heads(self, level: int) -> int:
        return self.num_heads if isinstance(self.num_heads, int) else self.num_heads[level]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD 1.x)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError("TextEncoderConfig: hidden_size must be divisible by num_heads")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"TextEncoderConfig.hidden_act {self.hidden_act!r} unsupported")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build the three networks of one SD 1.x checkpoint."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def __post_init__(self) -> None:
        if self.unet.cross_attention_dim != self.text_encoder.hidden_size:
            raise ValueError(
                f"UNet cross_attention_dim {self.unet.cross_attention_dim} != text encoder "
                f"hidden_size {self.text_encoder.hidden_size}"
            )
        if self.unet.in_channels != self.vae.latent_channels:
            raise ValueError("UNet in_channels must equal VAE latent_channels")

    @classmethod
    def sd15(cls) -> "ModelConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """A few-MB model of the same architecture: 8x VAE, 3-level UNet, 2-layer CLIP."""
        return cls(
            unet=UNetConfig(
                block_out_channels=(32, 64, 64),
                attention_levels=(True, True, False),
                layers_per_block=2,
                num_heads=2,
                cross_attention_dim=32,
            ),
            vae=VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
            text_encoder=TextEncoderConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        def build(kind, values):
            known = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - known
            if unknown:
                raise ValueError(f"unknown {kind.__name__} keys: {sorted(unknown)}")
            return kind(**{k: _tuple(v) for k, v in values.items()})

        unknown = set(data) - {"unet", "vae", "text_encoder"}
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {sorted(unknown)}")
        return cls(
            unet=build(UNetConfig, data.get("unet", {})),
            vae=build(VAEConfig, data.get("vae", {})),
            text_encoder=build(TextEncoderConfig, data.get("text_encoder", {})),
        )
