"""The conditional UNet of Latent Diffusion (Rombach et al. 2022, sec. 3.3): predicts the noise
ε in a noisy latent, conditioned on the timestep (sinusoidal embedding, Ho et al. 2020) and on
text through cross-attention in spatial transformers.

Down path: per level `layers_per_block` x (ResNet [+ transformer]), then a stride-2 conv
(except the last level). Middle: ResNet, transformer, ResNet. Up path mirrors the down path
with one extra ResNet per level, each fed the matching skip connection.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import UNetConfig
from .layers import Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

TRANSFORMER_NORM_EPS = 1e-6


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017; DDPM's time input), cosines first as SD does.

    t: (B,) float -> (B, dim) float32
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    # (B, 1) * (1, half) -> (B, half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): half the projection gates the other half."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, C) -> 2 x (B, N, hidden)
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # indices 0 and 2 are the weights' keys; 1 is the (inference-time no-op) dropout
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-norm, residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, H*W, C); context: (B, 77, D)
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Lets every latent pixel attend to the others and to the prompt tokens."""

    def __init__(self, channels: int, heads: int, cfg: UNetConfig):
        super().__init__()
        self.norm = GroupNorm(cfg.norm_num_groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.use_linear_projection = cfg.use_linear_projection
        if self.use_linear_projection:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, cfg.cross_attention_dim) for _ in range(cfg.transformer_layers)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def to_tokens(t: torch.Tensor) -> torch.Tensor:
            # (B, C, H, W) -> (B, H*W, C)
            return t.permute(0, 2, 3, 1).reshape(batch, height * width, channels)

        def to_map(t: torch.Tensor) -> torch.Tensor:
            # (B, H*W, C) -> (B, C, H, W)
            return t.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()

        if self.use_linear_projection:
            h = self.proj_in(to_tokens(h))
        else:
            h = to_tokens(self.proj_in(h))
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = to_map(self.proj_out(h))
        else:
            h = self.proj_out(to_map(h))
        return x + h


class UNetLevel(nn.Module):
    """One resolution level: resnets (each optionally followed by a transformer) + resampler.

    On the way down a level records its outputs as skips; on the way up it consumes them.
    """

    def __init__(
        self,
        resnet_in_channels: list[int],
        out_channels: int,
        *,
        attention: bool,
        heads: int,
        resample: str | None,
        cfg: UNetConfig,
    ):
        super().__init__()
        block = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, temb_channels=cfg.time_embed_dim)
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch, out_channels, **block) for in_ch in resnet_in_channels)
        if attention:
            self.attentions = nn.ModuleList(SpatialTransformer(out_channels, heads, cfg) for _ in resnet_in_channels)
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, asymmetric_pad=False)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])

    def _layers(self):
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        return zip(self.resnets, attentions)

    def down(self, x, temb, context, skips: list[torch.Tensor]) -> torch.Tensor:
        for resnet, attention in self._layers():
            x = resnet(x, temb)
            if attention is not None:
                x = attention(x, context)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x

    def up(self, x, temb, context, skips: list[torch.Tensor]) -> torch.Tensor:
        for resnet, attention in self._layers():
            # (B, C, H, W) + skip (B, C_skip, H, W) -> (B, C + C_skip, H, W)
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if attention is not None:
                x = attention(x, context)
        if hasattr(self, "upsamplers"):
            # Match the next skip's size: odd latent sizes round up on the way down.
            size = tuple(skips[-1].shape[-2:])
            doubled = (x.shape[-2] * 2, x.shape[-1] * 2)
            x = self.upsamplers[0](x, None if size == doubled else size)
        return x


class UNetMidBlock(nn.Module):
    def __init__(self, channels: int, heads: int, cfg: UNetConfig):
        super().__init__()
        block = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, temb_channels=cfg.time_embed_dim)
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(channels, channels, **block), ResnetBlock2D(channels, channels, **block)]
        )
        self.attentions = nn.ModuleList([SpatialTransformer(channels, heads, cfg)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        channels = cfg.block_out_channels
        levels = len(channels)
        layers = cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], cfg.time_embed_dim)

        self.down_blocks = nn.ModuleList()
        for level, out_ch in enumerate(channels):
            in_ch = channels[max(level - 1, 0)]
            self.down_blocks.append(
                UNetLevel(
                    [in_ch] + [out_ch] * (layers - 1),
                    out_ch,
                    attention=cfg.attention_levels[level],
                    heads=cfg.heads(level),
                    resample="down" if level < levels - 1 else None,
                    cfg=cfg,
                )
            )
        self.mid_block = UNetMidBlock(channels[-1], cfg.heads(levels - 1), cfg)

        # Skip channels, in the order the up path pops them (last pushed first).
        skip_channels = [channels[0]]
        for level, out_ch in enumerate(channels):
            skip_channels += [out_ch] * layers + ([out_ch] if level < levels - 1 else [])
        self.up_blocks = nn.ModuleList()
        prev_ch = channels[-1]
        for level in reversed(range(levels)):
            out_ch = channels[level]
            resnet_in = []
            for i in range(layers + 1):
                resnet_in.append((prev_ch if i == 0 else out_ch) + skip_channels.pop())
            self.up_blocks.append(
                UNetLevel(
                    resnet_in,
                    out_ch,
                    attention=cfg.attention_levels[level],
                    heads=cfg.heads(level),
                    resample="up" if level > 0 else None,
                    cfg=cfg,
                )
            )
            prev_ch = out_ch

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, 4, h, w) noisy latent, t (B,) or scalar timestep, context (B, 77, D) -> ε."""
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        # (B,) -> (B, C0) -> (B, 4*C0)
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(x.dtype))

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x = block.down(x, temb, context, skips)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            x = block.up(x, temb, context, skips)
        # (B, C0, h, w) -> (B, 4, h, w)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def forget_context(self) -> None:
        """Drop the text context's K and V that the cross-attentions keep between steps
        (sdcore/layers.py `Attention`); the pipeline calls it when a generation ends."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.forget_context()
