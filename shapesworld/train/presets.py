"""Model size presets: the architecture of the model shipped as `builtin:shapes`."""

from __future__ import annotations

from sdcore.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig


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
        text_encoder=TextEncoderConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4),
    )
