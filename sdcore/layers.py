"""Building blocks shared by the VAE and the UNet.

Parameter names follow diffusers' layout (`norm1`, `conv1`, `time_emb_proj`, `to_q`, `to_out.0`…)
so that checkpoints map onto them key for key.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import winograd


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that runs as Winograd F(2x2, 3x3) (sdcore/winograd.py) where `use_winograd` is
    set: by `sdcore.kernels.set_conv_algorithm`, on eligible convolutions only. Same parameters,
    same state-dict keys.

    The transformed filters are kept beside the weight (16/9 of its size) and remade when the
    weight is replaced or changed in place through autograd-visible ops; after writing through
    `.data`, call `set_conv_algorithm` again."""

    use_winograd = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_winograd and winograd.applies(x):
            # Under torch.compile, the filters compile_unet transformed (the cache check would
            # break the graph).
            u = self._winograd_u if torch.compiler.is_compiling() else self.winograd_weight()
            return winograd.conv3x3(x, u, self.bias)
        return super().forward(x)

    def winograd_weight(self) -> torch.Tensor:
        weight = self.weight
        key = tensor_key(weight)
        if getattr(self, "_winograd_key", None) != key:
            # A normal tensor even when first made inside inference_mode, so that later forwards
            # outside it (autograd recording) can use it too.
            with torch.inference_mode(False), torch.no_grad():
                self._winograd_u = winograd.transform_weight(weight.detach())
            self._winograd_key = key
        return self._winograd_u

    def forget_winograd_weight(self) -> None:
        self._winograd_u = self._winograd_key = None


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that also normalizes a group holding one value: one row whose map is 1x1
    where the group has one channel (a tiny config at its smallest size, unguided). PyTorch
    refuses that input ("Expected more than 1 value per channel"), diffusers with it; its
    normalized value is 0 (its own mean, over sqrt(0 + eps)), so the output is the bias. Each
    row is normalized on its own, so the row is run beside a copy of itself and the copy
    dropped: the same bits as that row in any larger batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and self.num_channels == self.num_groups and x[0, 0].numel() == 1:
            return super().forward(x.expand(2, *x.shape[1:]))[:1]
        return super().forward(x)


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with an optional time-embedding bias in between.

    Used by the VAE (no time embedding, eps 1e-6) and the UNet (time embedding, eps 1e-5).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        groups: int,
        eps: float,
        temb_channels: int | None = None,
    ):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 projection only where the channel count changes; identity otherwise.
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C_in, H, W); temb: (B, T) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            # (B, T) -> (B, C_out, 1, 1): one bias per channel, broadcast over space
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention through `scaled_dot_product_attention`."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        *,
        context_dim: int | None = None,
        qkv_bias: bool = False,
    ):
        super().__init__()
        if query_dim % heads:
            raise ValueError(f"attention width {query_dim} not divisible by {heads} heads")
        self.heads = heads
        context_dim = context_dim or query_dim
        self.to_q = nn.Linear(query_dim, query_dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, query_dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, query_dim, bias=qkv_bias)
        # A ModuleList so the key is `to_out.0`, as in every SD checkpoint layout.
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim)])
        self._context_cache: tuple | None = None  # (context, its version and weights' key, K, V): see _keys_values

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, N, C); context: (B, M, C_ctx), defaults to x (self-attention)
        batch, n, channels = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            # (B, L, C) -> (B, heads, L, C / heads)
            return t.view(batch, -1, self.heads, channels // self.heads).transpose(1, 2)

        q = split_heads(self.to_q(x))
        if context is None:
            k, v = split_heads(self.to_k(x)), split_heads(self.to_v(x))
        else:
            k, v = self._keys_values(context, split_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        # (B, heads, N, C / heads) -> (B, N, C)
        out = out.transpose(1, 2).reshape(batch, n, channels)
        return self.to_out[0](out)

    def _keys_values(self, context: torch.Tensor, split_heads) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the text context, kept while the same, unchanged context tensor comes back:
        the pipeline passes one context tensor to every step of a batch whose rows stay the same,
        and the prompts' K and V do not change between steps. The same ops on the same tensor, so
        the bits are those of computing them afresh. Remade for any other tensor (checked by
        identity: the cache holds the tensor, so its id cannot be reused), for the same tensor
        changed in place (its version counter moved: `context.copy_(...)`), or when a weight
        changes. Not kept for an inference tensor (made in inference mode: it has no version
        counter, so an in-place change could not be seen; the pipeline makes its contexts as
        ordinary tensors), nor where autograd records (training), under torch.compile, or while
        a CUDA graph is captured (a replay must compute them from its own context buffer). A
        write through `.data` moves no version counter: call `forget_context` after one."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or context.is_inference() or _capturing(context):
            return split_heads(self.to_k(context)), split_heads(self.to_v(context))
        weights = (self.to_k.weight, self.to_k.bias, self.to_v.weight, self.to_v.bias)
        key = (context._version, *(tensor_key(p) for p in weights))
        cached = self._context_cache
        if cached is not None and cached[0] is context and cached[1] == key:
            return cached[2], cached[3]
        k, v = split_heads(self.to_k(context)), split_heads(self.to_v(context))
        self._context_cache = (context, key, k, v)
        return k, v

    def forget_context(self) -> None:
        """Drop the cached K and V (and the context they came from)."""
        self._context_cache = None


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on `t`'s device (never asked under torch.compile:
    the question would break its graph)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def tensor_key(t: torch.Tensor | None) -> tuple | None:
    """What identifies a parameter's current values: its storage and in-place version
    (inference tensors have no version counter; they cannot be changed outside inference mode)."""
    if t is None:
        return None
    return (t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype, t.device)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. The VAE pads right/bottom only (padding=0 + manual pad), the UNet pads 1."""

    def __init__(self, channels: int, *, asymmetric_pad: bool):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 (or to an explicit size, to meet an odd-sized skip), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, 2H, 2W) or (B, C, *size)
        dtype = x.dtype
        if dtype == torch.bfloat16:
            # nearest upsampling has no bfloat16 kernel on some backends
            x = x.float()
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x.to(dtype))
