"""CLIP's text transformer (Radford et al. 2021), as SD 1.x uses it: the last hidden state after
the final LayerNorm, with a causal mask, conditions the UNet through cross-attention.

Parameter names follow transformers' `CLIPTextModel` (`text_model.encoder.layers.N.self_attn…`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .config import TextEncoderConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # CLIP's sigmoid approximation of GELU (what ViT-L/14 was trained with)
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        width = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            # (B, T, D) -> (B, heads, T, D / heads)
            return t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = (split_heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        # Causal: token i sees tokens <= i, so padding after EOS never leaks backwards.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # (B, heads, T, D / heads) -> (B, T, D)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.activation = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """nn.Embedding, initialised N(0, 1) as usual except on the meta device.

    Loaders build the model on meta and then fill it; there `normal_` would init nothing, yet its
    first call imports torch._dynamo (1.6 s of every worker's start), so it is skipped."""
    weight = torch.empty(rows, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(rows, dim, _weight=weight)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = _embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # (B, T) -> (B, T, D)
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(positions)[None]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, 77) -> last hidden state (B, 77, D)."""
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"{ids.shape[1]} tokens exceed the text encoder's {self.config.max_position_embeddings} positions"
            )
        return self.text_model(ids)
