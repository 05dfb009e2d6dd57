"""3x3 convolutions as Winograd F(2x2, 3x3): the same result in 16 multiplies per 2x2 outputs
and channel pair instead of 36 (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural
Networks").

Why here: on a CPU the UNet's and the VAE's 3x3 convolutions are most of their time, and oneDNN
(what `F.conv2d` calls) already runs them near the machine's matmul peak, so only fewer
multiplications make them faster. Each 4x4 input tile d (stride 2) and each 3x3 filter g are
transformed, V = Bᵀ d B and U = G g Gᵀ; for each of the 16 positions of the 4x4 transformed tile
the channel sum is one matrix product, M = U · V (16 batched GEMMs of out x in by in x tiles);
the 2x2 output tile is Aᵀ M A. The transforms are additions only (G holds halves), so the result
differs from `F.conv2d` by float rounding of the same size as oneDNN's own (tests check both
against float64).

Measured on the project's 2-core CPU (bench/RESULTS.md): 1.3-2x faster than `F.conv2d` from 256
channels up, slower below (the transforms are memory passes whose cost grows with the channels,
the saving with their square), hence `MIN_CHANNELS`. Tiles are processed in chunks of tile rows
so that one chunk's transformed tiles stay in cache.

Exactness: every step is elementwise or a GEMM over the channels at shapes fixed by the input's
shape, so a row's result does not depend on the other rows of its batch, only on its position
(the same contract as the direct kernels; see sdcore/pipeline.py). Which convolutions take this
path is a rule on shapes alone (`applies`), recorded by name with every image (sdcore.kernels).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Both constants decide images' last bits (which layers take this path; the GEMMs' shapes), and
# records name the algorithm only ("winograd-f2x3"): changing either needs a new name in
# sdcore/rules.py CONV_ALGORITHMS, or older records would no longer reproduce identical.
# Below this many input or output channels the direct convolution is faster on the measured CPU.
MIN_CHANNELS = 256
# Tile columns (tiles x images) per chunk: 16 x channels x 512 floats is 8-32 MB for 256-1280
# channels, which the measured CPU runs faster than whole images or smaller chunks.
CHUNK_TILES = 512

# G of F(2x2, 3x3), U = G g Gᵀ: rows [1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1].


def eligible(conv: nn.Conv2d) -> bool:
    """Whether `conv` is a convolution this algorithm computes: 3x3, stride 1, padding 1, no
    dilation or groups, zero padding, at least MIN_CHANNELS channels in and out."""
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
    )


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Float32 on the CPU: elsewhere cuDNN picks its own algorithms."""
    return device.type == "cpu" and dtype == torch.float32


def applies(x: torch.Tensor) -> bool:
    """Whether an eligible convolution takes this path for input `x`: `supported` device and
    dtype, even height and width (whole 2x2 output tiles)."""
    return supported(x.device, x.dtype) and x.dim() == 4 and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, 3, 3) filters -> (16, out, in): U = G g Gᵀ, one (out x in) matrix per position.

    Elementwise, in a fixed order (no matmul whose summation order a BLAS could choose), so the
    transformed filters have the same bits on every machine."""

    def g_times(taps: list[torch.Tensor]) -> list[torch.Tensor]:
        # G applied along one axis: 3 taps -> 4
        return [taps[0], (taps[0] + taps[1] + taps[2]) * 0.5, (taps[0] - taps[1] + taps[2]) * 0.5, taps[2]]

    taps = weight.permute(2, 3, 0, 1).contiguous()  # (3, 3, out, in): each tap a contiguous plane
    rows = g_times([taps[i] for i in range(3)])  # 4 x (3, out, in)
    u = torch.empty(4, 4, weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
    for a, row in enumerate(rows):
        for b, value in enumerate(g_times([row[j] for j in range(3)])):
            u[a, b] = value
    return u.view(16, weight.shape[0], weight.shape[1])


def conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` for x (N, C, H, W) with H, W even, given
    u = transform_weight(weight)."""
    n, c, height, width = x.shape
    k = u.shape[1]
    h, w = height // 2, width // 2  # output tiles per column / row
    xp = F.pad(x, (1, 1, 1, 1))
    # (N, K, h, 2, w, 2) is (N, K, H, W) with each 2x2 output tile's rows and columns split out
    y = torch.empty(n, k, h, 2, w, 2, dtype=x.dtype, device=x.device)
    rows_per_chunk = max(1, min(h, CHUNK_TILES // (n * w)))
    for i0 in range(0, h, rows_per_chunk):
        hc = min(rows_per_chunk, h - i0)
        # Input transform Bᵀ d B, separably. Bᵀ = [[1,0,-1,0], [0,1,1,0], [0,-1,1,0], [0,1,0,-1]].
        # Along the rows: the tile rows' 4 input rows, as strided views of the padded input.
        r = [xp[:, :, 2 * i0 + j : 2 * i0 + j + 2 * hc : 2] for j in range(4)]  # (N, C, hc, W+2)
        v = torch.empty(4, 4, c, n, hc, w, dtype=x.dtype, device=x.device)
        for a, t in enumerate((r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3])):
            # Along the columns, written straight into V's (C, N, tiles) layout for the GEMM.
            col = [t[..., j : j + 2 * w : 2] for j in range(4)]  # (N, C, hc, w)
            torch.sub(col[0], col[2], out=v[a, 0].transpose(0, 1))
            torch.add(col[1], col[2], out=v[a, 1].transpose(0, 1))
            torch.sub(col[2], col[1], out=v[a, 2].transpose(0, 1))
            torch.sub(col[1], col[3], out=v[a, 3].transpose(0, 1))
        # 16 GEMMs: (K x C) @ (C x tiles) for each position of the transformed tile.
        m = torch.bmm(u, v.view(16, c, n * hc * w)).view(4, 4, k, n, hc, w)
        # Output transform Aᵀ M A, Aᵀ = [[1,1,1,0], [0,1,-1,-1]]: rows, then columns.
        s0 = m[0] + m[1]
        s0 += m[2]
        s1 = m[1] - m[2]
        s1 -= m[3]
        out = y[:, :, i0 : i0 + hc].permute(3, 5, 1, 0, 2, 4)  # (2, 2, K, N, hc, w)
        for row, s in enumerate((s0, s1)):
            torch.add(s[0] + s[1], s[2], out=out[row, 0])
            torch.sub(s[1] - s[2], s[3], out=out[row, 1])
    y = y.view(n, k, height, width)
    if bias is not None:
        y += bias.view(1, -1, 1, 1)
    return y
