"""The KL-regularised autoencoder of Latent Diffusion (Rombach et al. 2022, sec. 3).

The encoder maps an image in [-1, 1] to the mean and log-variance of a diagonal Gaussian over
latents 8x smaller per side (for SD's 4 levels); the decoder maps a latent back to pixels.
Sampling from the Gaussian is left to the caller, so every draw names its generator.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .config import VAEConfig
from .layers import Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

VAE_NORM_EPS = 1e-6


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps=VAE_NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # (B, C, H, W) -> (B, H*W, C)
        h = self.group_norm(x).view(batch, channels, height * width).transpose(1, 2)
        # one head: (B, H*W, C) -> (B, 1, H*W, C)
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        h = self.to_out[0](h)
        # (B, H*W, C) -> (B, C, H, W)
        h = h.transpose(1, 2).reshape(batch, channels, height, width)
        return x + h


class VAEMidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        block = dict(groups=groups, eps=VAE_NORM_EPS)
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, **block), ResnetBlock2D(channels, channels, **block)]
        )
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class VAEBlock(nn.Module):
    """`layers` resnets, then an optional 2x down- or upsampler."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups=groups, eps=VAE_NORM_EPS) for i in range(layers)
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, asymmetric_pad=True)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for sampler in getattr(self, "downsamplers", ()):
            x = sampler(x)
        for sampler in getattr(self, "upsamplers", ()):
            x = sampler(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels = cfg.block_out_channels
        groups = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for level, out_ch in enumerate(channels):
            in_ch = channels[max(level - 1, 0)]
            last = level == len(channels) - 1
            self.down_blocks.append(VAEBlock(in_ch, out_ch, cfg.layers_per_block, groups, None if last else "down"))
        self.mid_block = VAEMidBlock(channels[-1], groups)
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=VAE_NORM_EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) -> (B, C0, H, W)
        x = self.conv_in(x)
        # -> (B, C_last, H/f, W/f), f = 2^(levels-1)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        # -> (B, 2*latent, H/f, W/f): mean and log-variance stacked on channels
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels = tuple(reversed(cfg.block_out_channels))
        groups = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels[0], 3, padding=1)
        self.mid_block = VAEMidBlock(channels[0], groups)
        self.up_blocks = nn.ModuleList()
        for level, out_ch in enumerate(channels):
            in_ch = channels[max(level - 1, 0)]
            last = level == len(channels) - 1
            self.up_blocks.append(VAEBlock(in_ch, out_ch, cfg.layers_per_block + 1, groups, None if last else "up"))
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=VAE_NORM_EPS)
        self.conv_out = nn.Conv2d(channels[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # (B, latent, h, w) -> (B, C_last, h, w)
        x = self.mid_block(self.conv_in(z))
        # -> (B, C0, h*f, w*f)
        for block in self.up_blocks:
            x = block(x)
        # -> (B, 3, h*f, w*f)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> mean, logvar, each (B, latent, H/f, W/f), unscaled."""
        moments = self.quant_conv(self.encoder(x))
        mean, logvar = moments.chunk(2, dim=1)
        # The same clamp as LDM's DiagonalGaussianDistribution keeps exp() finite.
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent, h, w), unscaled -> (B, 3, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
