"""The `ModelConfig` of a checkpoint, inferred from its tensor shapes.

Channels, levels, layers per level, attention levels, transformer depth, projection kind and
the text encoder's sizes all leave a trace in the shapes and are read from them. Heads, norm
groups, eps, activation and the VAE scaling factor do not: they take the SD 1.x values.
`infer_config` reads a CompVis single file (walking `input_blocks` to find the levels),
`infer_config_from_parts` sdcore parts.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from sdcore.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

from .errors import CheckpointError
from .layouts import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, check_part_names
from .sources import choose_sources, source_key, unwrap

SD1_UNET_HEADS = 8  # SD 1.x convention; heads leave no trace in the weights
SD1_TEXT_HEAD_DIM = 64  # CLIP ViT-L/14: 768 / 12


def _text_heads(hidden: int) -> int:
    return hidden // SD1_TEXT_HEAD_DIM if hidden % SD1_TEXT_HEAD_DIM == 0 else 1


class _Shapes:
    """Shape look-ups for inference; a missing key is a CheckpointError naming it.

    The shapes read: conv weight (out, in, k, k), Linear weight (out, in), norm weight (C,),
    Embedding weight (rows, width). A 1x1 conv proj_in (C, C, 1, 1) vs a Linear one (C, C) tells
    `use_linear_projection`.
    """

    def __init__(self, tensors: Mapping[str, object], name: Callable[[str], str]) -> None:
        self._tensors, self._name = tensors, name

    def has(self, key: str) -> bool:
        return self._name(key) in self._tensors

    def __call__(self, key: str, ndim: int | None = None) -> tuple[int, ...]:
        name = self._name(key)
        value = self._tensors.get(name)
        if value is None:
            raise CheckpointError(f"cannot infer the model config: missing key {name}", missing=[name])
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name} is a {type(value).__name__}, not a tensor")
        if ndim is not None and value.ndim != ndim:
            raise CheckpointError(
                f"cannot infer the model config: {name} has shape {tuple(value.shape)}, expected {ndim} dims"
            )
        return tuple(value.shape)

    def count(self, template: str) -> int:
        n = 0
        while self.has(template.format(n)):
            n += 1
        return n


def _make_config(unet: dict, vae: dict, text: dict) -> ModelConfig:
    try:
        return ModelConfig(UNetConfig(**unet), VAEConfig(**vae), TextEncoderConfig(**text))
    except ValueError as e:
        raise CheckpointError(f"inferred model config is inconsistent: {e}") from e


def _infer_text(s: _Shapes, prefix: str) -> dict:
    vocab, hidden = s(prefix + "embeddings.token_embedding.weight", 2)
    positions = s(prefix + "embeddings.position_embedding.weight", 2)[0]
    layers = s.count(prefix + "encoder.layers.{}.layer_norm1.weight")
    intermediate = s(prefix + "encoder.layers.0.mlp.fc1.weight", 2)[0] if layers else 4 * hidden
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                num_heads=_text_heads(hidden), max_position_embeddings=positions)  # fmt: skip


def infer_config(sd: Mapping[str, object], *, ema: bool | None = None) -> ModelConfig:
    """The `ModelConfig` of a CompVis-layout checkpoint, from tensor shapes.

    Heads, norm groups, eps, activation and the VAE scaling factor leave no trace in the shapes:
    they take the SD 1.x values (8 UNet heads, hidden/64 text heads, `ModelConfig` defaults).
    """
    sd = unwrap(sd)
    use_ema, legacy_text = choose_sources(sd, ema)
    s = _Shapes(sd, lambda key: source_key(key, use_ema, legacy_text))

    # UNet: walk input_blocks: R = ResBlock, D = Downsample; "RRDRRDRR" is 3 levels x 2 layers.
    u = lambda key: UNET_PREFIX + key  # noqa: E731
    walk, n = "", 1
    while True:
        if s.has(u(f"input_blocks.{n}.0.in_layers.0.weight")):
            walk += "R"
        elif s.has(u(f"input_blocks.{n}.0.op.weight")):
            walk += "D"
        else:
            break
        n += 1
    runs = walk.split("D")
    lpb = len(runs[0])
    if lpb == 0 or any(len(run) != lpb for run in runs):
        first = source_key(u("input_blocks.1.0.in_layers.0.weight"), use_ema, legacy_text)
        raise CheckpointError(
            f"cannot infer the UNet layout: input_blocks read as {walk or 'nothing'!r} "
            f"(R = ResBlock, D = Downsample), expected equal runs of ResBlocks; first key {first}"
        )
    starts = [1 + level * (lpb + 1) for level in range(len(runs))]
    unet = dict(
        in_channels=s(u("input_blocks.0.0.weight"), 4)[1],
        out_channels=s(u("out.2.weight"), 4)[0],
        block_out_channels=tuple(s(u(f"input_blocks.{n}.0.out_layers.3.weight"), 4)[0] for n in starts),
        attention_levels=tuple(s.has(u(f"input_blocks.{n}.1.norm.weight")) for n in starts),
        layers_per_block=lpb,
        num_heads=SD1_UNET_HEADS,
        cross_attention_dim=s(u("middle_block.1.transformer_blocks.0.attn2.to_k.weight"), 2)[1],
        transformer_layers=s.count(u("middle_block.1.transformer_blocks.{}.norm1.weight")),
        use_linear_projection=len(s(u("middle_block.1.proj_in.weight"))) == 2,
    )

    v = lambda key: VAE_PREFIX + key  # noqa: E731
    levels = s.count(v("encoder.down.{}.block.0.conv1.weight"))
    vae = dict(
        in_channels=s(v("encoder.conv_in.weight"), 4)[1],
        out_channels=s(v("decoder.conv_out.weight"), 4)[0],
        latent_channels=s(v("decoder.conv_in.weight"), 4)[1],
        block_out_channels=tuple(s(v(f"encoder.down.{i}.block.0.conv2.weight"), 4)[0] for i in range(levels)),
        layers_per_block=s.count(v("encoder.down.0.block.{}.conv1.weight")),
    )
    return _make_config(unet, vae, _infer_text(s, TEXT_PREFIX + "text_model."))


def infer_config_from_parts(parts: Mapping[str, Mapping[str, object]]) -> ModelConfig:
    """The `ModelConfig` of sdcore parts, from tensor shapes (same conventions as `infer_config`)."""
    check_part_names(parts)
    su = _Shapes(parts["unet"], lambda key: key)
    levels = su.count("down_blocks.{}.resnets.0.conv1.weight")
    unet = dict(
        in_channels=su("conv_in.weight", 4)[1],
        out_channels=su("conv_out.weight", 4)[0],
        block_out_channels=tuple(su(f"down_blocks.{i}.resnets.0.conv2.weight", 4)[0] for i in range(levels)),
        attention_levels=tuple(su.has(f"down_blocks.{i}.attentions.0.norm.weight") for i in range(levels)),
        layers_per_block=su.count("down_blocks.0.resnets.{}.conv1.weight"),
        num_heads=SD1_UNET_HEADS,
        cross_attention_dim=su("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", 2)[1],
        transformer_layers=su.count("mid_block.attentions.0.transformer_blocks.{}.norm1.weight"),
        use_linear_projection=len(su("mid_block.attentions.0.proj_in.weight")) == 2,
    )
    sv = _Shapes(parts["vae"], lambda key: key)
    levels = sv.count("encoder.down_blocks.{}.resnets.0.conv1.weight")
    vae = dict(
        in_channels=sv("encoder.conv_in.weight", 4)[1],
        out_channels=sv("decoder.conv_out.weight", 4)[0],
        latent_channels=sv("decoder.conv_in.weight", 4)[1],
        block_out_channels=tuple(sv(f"encoder.down_blocks.{i}.resnets.0.conv2.weight", 4)[0] for i in range(levels)),
        layers_per_block=sv.count("encoder.down_blocks.0.resnets.{}.conv1.weight"),
    )
    text = _infer_text(_Shapes(parts["text_encoder"], lambda key: key), "text_model.")
    return _make_config(unet, vae, text)
