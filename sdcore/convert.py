"""Strict dict -> dict conversion between CompVis / A1111 single-file checkpoints and sdcore parts.

sdcore's modules name their parameters like diffusers and transformers do, so a model is three
"parts", each a flat state dict:

    {"unet": {...}, "vae": {...}, "text_encoder": {...}}

    unet          diffusers UNet2DConditionModel keys   (conv_in.weight, down_blocks.0.resnets.0...)
    vae           diffusers AutoencoderKL keys          (encoder.down_blocks.0..., to_q/to_k/to_v)
    text_encoder  transformers CLIPTextModel keys       (text_model.embeddings.token_embedding.weight...)
                  without the non-persistent text_model.embeddings.position_ids buffer

A single-file checkpoint (the original CompVis `ldm` layout, written by A1111, ComfyUI and
`diffusers` exports) holds the same tensors under other names:

    model.diffusion_model.*                      UNet (time_embed, input_blocks, middle_block, ...)
    model_ema.*                                  optional EMA copy of the UNet, dots removed
                                                 (model_ema.diffusion_modelinput_blocks00weight)
    first_stage_model.*                          VAE (encoder.down.0.block.0, decoder.up.3, mid.attn_1)
    cond_stage_model.transformer.text_model.*    CLIP text encoder (older files: without text_model.)

The conversion is driven by one table, `mapping_table(config)`: one `Row` per tensor naming its
CompVis key, its part and key there, its shape, and its shape transform. The table is generated
from the config by walking the networks' module layout (see `_unet_layout`, `_vae_layout`,
`_text_layout`), so it fits every `ModelConfig`, not only SD 1.5's sizes. The only shape transform
is `CONV1X1`: the VAE's mid-block attention q/k/v/proj_out are 1x1 convolutions in CompVis and
Linear layers in sdcore.

Both directions are strict: every key of the table must be present with exactly its shape, and
every key of the input must be used or be on the explicit `IGNORED_KEYS` list; anything else is a
`CheckpointError` naming the keys. Inputs are never modified; output tensors share storage with
the input (a reshape is a view), nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from sdcore.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

__all__ = [
    "CheckpointError",
    "Row",
    "mapping_table",
    "compvis_to_parts",
    "parts_to_compvis",
    "infer_config",
    "infer_config_from_parts",
    "detect_unsupported",
    "IGNORED_KEYS",
]


class CheckpointError(ValueError):
    """A checkpoint that does not match the SD 1.x layout; the message names keys and shapes."""

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------

PARTS = ("unet", "vae", "text_encoder")

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."  # + the part key (text_model.embeddings...)
LEGACY_TEXT_PREFIX = "cond_stage_model.transformer."  # + the part key without "text_model."
POSITION_IDS = TEXT_PREFIX + "text_model.embeddings.position_ids"

# Entries of a single file that are not network weights, ignored by name (never by pattern).
IGNORED_KEYS = frozenset(
    {
        # LatentDiffusion's DDPM schedule buffers (ldm/models/diffusion/ddpm.py register_schedule)
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "lvlb_weights",
        "logvar",
        # LitEma bookkeeping
        "model_ema.decay",
        "model_ema.num_updates",
        # CLIP's position_ids buffer (an arange; merged files often carry a corrupted float copy,
        # so it is rebuilt rather than read)
        POSITION_IDS,
        LEGACY_TEXT_PREFIX + "embeddings.position_ids",
    }
)

# Parameter names inside one module: (sdcore / diffusers name, CompVis name).
UNET_RESNET = (  # ldm ResBlock: in_layers = [norm, SiLU, conv], out_layers = [norm, SiLU, drop, conv]
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),  # emb_layers = [SiLU, Linear]
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),  # only when in_channels != out_channels
)
VAE_RESNET = (
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("conv_shortcut", "nin_shortcut"),  # only when in_channels != out_channels
)
VAE_ATTENTION = (  # ldm AttnBlock: q/k/v/proj_out are 1x1 convs (see CONV1X1_MODULES)
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)
# The UNet's SpatialTransformer uses the same names in both layouts (norm, proj_in,
# transformer_blocks.N.{norm1,attn1,norm2,attn2,norm3,ff}, proj_out).

# Shape transforms: None (identity) or CONV1X1: part Linear weight (O, I)  <->  CompVis 1x1 conv
# weight (O, I, 1, 1). The explicit list of CompVis modules it applies to (weights only):
CONV1X1 = "conv1x1"
CONV1X1_MODULES = (
    "encoder.mid.attn_1.q", "encoder.mid.attn_1.k", "encoder.mid.attn_1.v", "encoder.mid.attn_1.proj_out",
    "decoder.mid.attn_1.q", "decoder.mid.attn_1.k", "decoder.mid.attn_1.v", "decoder.mid.attn_1.proj_out",
)  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One tensor: where it lives in the single file and in the parts, and its shape."""

    compvis: str  # key in the single file
    part: str  # "unet" | "vae" | "text_encoder"
    key: str  # key inside the part
    shape: tuple[int, ...]  # shape in the part
    transform: str | None = None  # None | CONV1X1

    @property
    def compvis_shape(self) -> tuple[int, ...]:
        return self.shape + (1, 1) if self.transform == CONV1X1 else self.shape


# ------------------------------------------------------------------------------------------------
# Module layouts: every module as (sdcore module name, CompVis module name, {param: shape in sdcore})
# ------------------------------------------------------------------------------------------------

Params = dict[str, tuple[int, ...]]
Module = tuple[str, str, Params]


def _conv(c_out: int, c_in: int, k: int) -> Params:
    return {"weight": (c_out, c_in, k, k), "bias": (c_out,)}


def _linear(c_out: int, c_in: int, bias: bool = True) -> Params:
    return {"weight": (c_out, c_in), "bias": (c_out,)} if bias else {"weight": (c_out, c_in)}


def _norm(c: int) -> Params:
    return {"weight": (c,), "bias": (c,)}


def _renamed(part: str, cv: str, names: tuple[tuple[str, str], ...], params: dict[str, Params]):
    """Expand a module whose sub-modules are renamed by `names` (sdcore name -> CompVis name)."""
    for sd_name, cv_name in names:
        if sd_name in params:
            yield f"{part}.{sd_name}", f"{cv}.{cv_name}", params[sd_name]


def _unet_resnet(part: str, cv: str, c_in: int, c_out: int, temb: int) -> Iterator[Module]:
    params = {
        "norm1": _norm(c_in),
        "conv1": _conv(c_out, c_in, 3),
        "time_emb_proj": _linear(c_out, temb),
        "norm2": _norm(c_out),
        "conv2": _conv(c_out, c_out, 3),
    }
    if c_in != c_out:
        params["conv_shortcut"] = _conv(c_out, c_in, 1)
    yield from _renamed(part, cv, UNET_RESNET, params)


def _unet_transformer(part: str, cv: str, c: int, u: UNetConfig) -> Iterator[Module]:
    """SpatialTransformer / Transformer2DModel: identical names in both layouts."""
    proj = _linear(c, c) if u.use_linear_projection else _conv(c, c, 1)
    yield f"{part}.norm", f"{cv}.norm", _norm(c)
    yield f"{part}.proj_in", f"{cv}.proj_in", proj
    for k in range(u.transformer_layers):
        block = f"transformer_blocks.{k}"
        sub: dict[str, Params] = {
            "norm1": _norm(c),
            "attn1.to_q": _linear(c, c, bias=False),
            "attn1.to_k": _linear(c, c, bias=False),
            "attn1.to_v": _linear(c, c, bias=False),
            "attn1.to_out.0": _linear(c, c),
            "norm2": _norm(c),
            "attn2.to_q": _linear(c, c, bias=False),
            "attn2.to_k": _linear(c, u.cross_attention_dim, bias=False),
            "attn2.to_v": _linear(c, u.cross_attention_dim, bias=False),
            "attn2.to_out.0": _linear(c, c),
            "norm3": _norm(c),
            "ff.net.0.proj": _linear(8 * c, c),  # GEGLU: (C) -> 2 x (4C)
            "ff.net.2": _linear(c, 4 * c),
        }
        for name, params in sub.items():
            yield f"{part}.{block}.{name}", f"{cv}.{block}.{name}", params
    yield f"{part}.proj_out", f"{cv}.proj_out", proj


def _unet_layout(u: UNetConfig) -> Iterator[Module]:
    """Every UNet module, CompVis `openaimodel.UNetModel` order.

    CompVis numbers the down path as one flat list `input_blocks` (conv_in, then per level
    `layers_per_block` x [ResBlock, SpatialTransformer?] and a Downsample `op`), the up path as
    `output_blocks` (per level, deepest first, `layers_per_block + 1` x [ResBlock,
    SpatialTransformer?, Upsample `conv` after the last one]); diffusers nests them per level.
    """
    ch, attn, lpb = u.block_out_channels, u.attention_levels, u.layers_per_block
    levels, temb = len(ch), u.time_embed_dim

    yield "time_embedding.linear_1", "time_embed.0", _linear(temb, ch[0])
    yield "time_embedding.linear_2", "time_embed.2", _linear(temb, temb)
    yield "conv_in", "input_blocks.0.0", _conv(ch[0], u.in_channels, 3)

    n = 1  # input_blocks index
    c_in = ch[0]
    for level in range(levels):
        for j in range(lpb):
            cv = f"input_blocks.{n}"
            yield from _unet_resnet(f"down_blocks.{level}.resnets.{j}", f"{cv}.0", c_in, ch[level], temb)
            if attn[level]:
                yield from _unet_transformer(f"down_blocks.{level}.attentions.{j}", f"{cv}.1", ch[level], u)
            c_in, n = ch[level], n + 1
        if level < levels - 1:
            yield f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{n}.0.op", _conv(c_in, c_in, 3)
            n += 1

    c = ch[-1]
    yield from _unet_resnet("mid_block.resnets.0", "middle_block.0", c, c, temb)
    yield from _unet_transformer("mid_block.attentions.0", "middle_block.1", c, u)
    yield from _unet_resnet("mid_block.resnets.1", "middle_block.2", c, c, temb)

    n = 0  # output_blocks index
    c_in = ch[-1]
    for up in range(levels):
        level = levels - 1 - up  # up_blocks.0 is the deepest level
        for j in range(lpb + 1):
            # skip connection from the down path: the level's own resnets, and for the last one
            # the previous level's output (its downsampler, or conv_in at level 0)
            skip = ch[max(level - 1, 0)] if j == lpb else ch[level]
            cv = f"output_blocks.{n}"
            yield from _unet_resnet(f"up_blocks.{up}.resnets.{j}", f"{cv}.0", c_in + skip, ch[level], temb)
            if attn[level]:
                yield from _unet_transformer(f"up_blocks.{up}.attentions.{j}", f"{cv}.1", ch[level], u)
            c_in = ch[level]
            if j == lpb and level > 0:
                index = 2 if attn[level] else 1  # after the transformer, if the level has one
                yield f"up_blocks.{up}.upsamplers.0.conv", f"{cv}.{index}.conv", _conv(c_in, c_in, 3)
            n += 1

    yield "conv_norm_out", "out.0", _norm(ch[0])  # out = [GroupNorm, SiLU, conv]
    yield "conv_out", "out.2", _conv(u.out_channels, ch[0], 3)


def _vae_resnet(part: str, cv: str, c_in: int, c_out: int) -> Iterator[Module]:
    params = {
        "norm1": _norm(c_in),
        "conv1": _conv(c_out, c_in, 3),
        "norm2": _norm(c_out),
        "conv2": _conv(c_out, c_out, 3),
    }
    if c_in != c_out:
        params["conv_shortcut"] = _conv(c_out, c_in, 1)
    yield from _renamed(part, cv, VAE_RESNET, params)


def _vae_mid(part: str, cv: str, c: int) -> Iterator[Module]:
    yield from _vae_resnet(f"{part}.resnets.0", f"{cv}.block_1", c, c)
    attn = {"group_norm": _norm(c), "to_q": _linear(c, c), "to_k": _linear(c, c),
            "to_v": _linear(c, c), "to_out.0": _linear(c, c)}  # fmt: skip
    yield from _renamed(f"{part}.attentions.0", f"{cv}.attn_1", VAE_ATTENTION, attn)
    yield from _vae_resnet(f"{part}.resnets.1", f"{cv}.block_2", c, c)


def _vae_layout(v: VAEConfig) -> Iterator[Module]:
    """Every VAE module, CompVis `ldm.modules.diffusionmodules.model` order.

    The encoder's `down.i` is diffusers' `down_blocks.i`; the decoder's `up.i` counts from the
    *shallowest* level, so diffusers' `up_blocks.i` is CompVis `up.{levels-1-i}`.
    """
    ch, lpb, z = v.block_out_channels, v.layers_per_block, v.latent_channels
    levels = len(ch)

    yield "encoder.conv_in", "encoder.conv_in", _conv(ch[0], v.in_channels, 3)
    c_in = ch[0]
    for i in range(levels):
        for j in range(lpb):
            yield from _vae_resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", c_in, ch[i])
            c_in = ch[i]
        if i < levels - 1:
            down = _conv(c_in, c_in, 3)
            yield f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", down
    yield from _vae_mid("encoder.mid_block", "encoder.mid", ch[-1])
    yield "encoder.conv_norm_out", "encoder.norm_out", _norm(ch[-1])
    yield "encoder.conv_out", "encoder.conv_out", _conv(2 * z, ch[-1], 3)  # mean and logvar

    yield "decoder.conv_in", "decoder.conv_in", _conv(ch[-1], z, 3)
    yield from _vae_mid("decoder.mid_block", "decoder.mid", ch[-1])
    c_in = ch[-1]
    for i in range(levels):
        level = levels - 1 - i
        for j in range(lpb + 1):
            part, cv = f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}"
            yield from _vae_resnet(part, cv, c_in, ch[level])
            c_in = ch[level]
        if level > 0:
            yield f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv", _conv(c_in, c_in, 3)
    yield "decoder.conv_norm_out", "decoder.norm_out", _norm(ch[0])
    yield "decoder.conv_out", "decoder.conv_out", _conv(v.out_channels, ch[0], 3)

    yield "quant_conv", "quant_conv", _conv(2 * z, 2 * z, 1)
    yield "post_quant_conv", "post_quant_conv", _conv(z, z, 1)


def _text_layout(t: TextEncoderConfig) -> Iterator[Module]:
    """transformers CLIPTextModel: the same names in both layouts (CompVis adds TEXT_PREFIX)."""
    d = t.hidden_size
    modules: list[tuple[str, Params]] = [
        ("text_model.embeddings.token_embedding", {"weight": (t.vocab_size, d)}),
        ("text_model.embeddings.position_embedding", {"weight": (t.max_position_embeddings, d)}),
    ]
    for i in range(t.num_layers):
        layer = f"text_model.encoder.layers.{i}"
        modules += [
            (f"{layer}.self_attn.k_proj", _linear(d, d)),
            (f"{layer}.self_attn.v_proj", _linear(d, d)),
            (f"{layer}.self_attn.q_proj", _linear(d, d)),
            (f"{layer}.self_attn.out_proj", _linear(d, d)),
            (f"{layer}.layer_norm1", _norm(d)),
            (f"{layer}.mlp.fc1", _linear(t.intermediate_size, d)),
            (f"{layer}.mlp.fc2", _linear(d, t.intermediate_size)),
            (f"{layer}.layer_norm2", _norm(d)),
        ]
    modules.append(("text_model.final_layer_norm", _norm(d)))
    for name, params in modules:
        yield name, name, params


def mapping_table(config: ModelConfig) -> list[Row]:
    """One `Row` per tensor of the model described by `config`, in CompVis order."""
    rows: list[Row] = []
    for part_prefix, cv_prefix, params in _unet_layout(config.unet):
        for name, shape in params.items():
            rows.append(Row(f"{UNET_PREFIX}{cv_prefix}.{name}", "unet", f"{part_prefix}.{name}", shape))
    for part_prefix, cv_prefix, params in _vae_layout(config.vae):
        for name, shape in params.items():
            transform = CONV1X1 if cv_prefix in CONV1X1_MODULES and name == "weight" else None
            rows.append(Row(f"{VAE_PREFIX}{cv_prefix}.{name}", "vae", f"{part_prefix}.{name}", shape, transform))
    for part_prefix, cv_prefix, params in _text_layout(config.text_encoder):
        for name, shape in params.items():
            rows.append(Row(f"{TEXT_PREFIX}{cv_prefix}.{name}", "text_encoder", f"{part_prefix}.{name}", shape))
    return rows


# ------------------------------------------------------------------------------------------------
# Recognising what is not SD 1.x
# ------------------------------------------------------------------------------------------------

# (key prefix, what a checkpoint holding such keys is), checked in order.
UNSUPPORTED_MARKERS = (  # fmt: skip
    ("conditioner.embedders.", "an SDXL checkpoint (text encoders under conditioner.embedders.*)"),
    ("cond_stage_model.model.",
     "a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H text encoder under cond_stage_model.model.*)"),
    (UNET_PREFIX + "label_emb.", "a class-conditioned UNet (label_emb.*: SDXL, unCLIP, x4 upscaler)"),
    (EMA_PREFIX + "diffusion_modellabel_emb", "a class-conditioned UNet (label_emb.*: SDXL, unCLIP, x4 upscaler)"),
    ("control_model.", "a ControlNet"),
    ("lora_unet_", "a LoRA / LyCORIS adapter, not a full checkpoint"),
    ("lora_te", "a LoRA / LyCORIS adapter, not a full checkpoint"),
    (UNET_PREFIX + "joint_blocks.", "a Stable Diffusion 3 checkpoint"),
    (UNET_PREFIX + "double_blocks.", "a Flux checkpoint"),
    ("v_pred", "a v-prediction model (marker key 'v_pred'); sdgen's samplers assume epsilon prediction"),
    ("edm_vpred.", "a v-prediction / EDM model (marker keys edm_vpred.*); sdgen's samplers assume epsilon prediction"),
    ("ztsnr", "a zero-terminal-SNR model (marker key 'ztsnr'); sdgen's schedules assume SD 1.5's"),
    ("edm_mean", "a Playground v2.5 checkpoint (edm_mean / edm_std)"),
)

# Input channels of known UNet variants whose conv_in does not take the plain latent.
UNET_INPUT_VARIANTS = {
    9: "an inpainting checkpoint (latent + mask + masked-image latent)",
    8: "an instruct-pix2pix checkpoint (latent + image latent)",
    7: "an x4 upscaler checkpoint (latent + low-res image)",
    5: "a depth-conditioned checkpoint (latent + depth map)",
}


def _ema_key(key: str) -> str:
    """`model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`."""
    return EMA_PREFIX + key[len("model.") :].replace(".", "")


def _unsupported(what: str) -> str:
    return (
        f"unsupported checkpoint: this looks like {what}; sdgen runs Stable Diffusion 1.x "
        "(CLIP ViT-L text encoder, latent-input epsilon-prediction UNet) only"
    )


def detect_unsupported(sd: Mapping[str, object]) -> str | None:
    """A message if the CompVis-layout `sd` is a known non-SD-1.x model, else None."""
    sd = _unwrap(sd)
    for marker, what in UNSUPPORTED_MARKERS:
        if any(key.startswith(marker) for key in sd):
            return _unsupported(what)

    def shape(key: str) -> tuple[int, ...] | None:
        for candidate in (key, _ema_key(key)) if key.startswith(UNET_PREFIX) else (key,):
            value = sd.get(candidate)
            if isinstance(value, torch.Tensor):
                return tuple(value.shape)
        return None

    conv_in_key = UNET_PREFIX + "input_blocks.0.0.weight"
    conv_in = shape(conv_in_key)
    latent = shape(VAE_PREFIX + "decoder.conv_in.weight")
    latent_channels = latent[1] if latent and len(latent) == 4 else 4
    if conv_in and len(conv_in) == 4 and conv_in[1] != latent_channels:
        what = UNET_INPUT_VARIANTS.get(conv_in[1], f"a UNet variant taking {conv_in[1]} input channels")
        return _unsupported(
            f"{what}: {conv_in_key} has shape {conv_in}, the VAE latent has {latent_channels} channels"
        )

    to_k_key = UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    to_k = shape(to_k_key)
    tokens = shape(TEXT_PREFIX + "text_model.embeddings.token_embedding.weight") or shape(
        LEGACY_TEXT_PREFIX + "embeddings.token_embedding.weight"
    )
    if to_k and len(to_k) == 2 and to_k[1] == 1024 and (tokens is None or tokens[-1] != 1024):
        linear = shape(UNET_PREFIX + "middle_block.1.proj_in.weight")
        proj = ", linear proj_in" if linear and len(linear) == 2 else ""
        return _unsupported(
            f"a Stable Diffusion 2.x checkpoint (cross-attention width 1024 in {to_k_key}{proj})"
        )
    return None


# ------------------------------------------------------------------------------------------------
# Config inference
# ------------------------------------------------------------------------------------------------

SD1_UNET_HEADS = 8  # SD 1.x convention; heads leave no trace in the weights
SD1_TEXT_HEAD_DIM = 64  # CLIP ViT-L/14: 768 / 12


def _text_heads(hidden: int) -> int:
    return hidden // SD1_TEXT_HEAD_DIM if hidden % SD1_TEXT_HEAD_DIM == 0 else 1


class _Shapes:
    """Shape look-ups for inference; a missing key is a CheckpointError naming it."""

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
    sd = _unwrap(sd)
    use_ema, legacy_text = _choose_sources(sd, ema)
    s = _Shapes(sd, lambda key: _source_key(key, use_ema, legacy_text))

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
        first = _source_key(u("input_blocks.1.0.in_layers.0.weight"), use_ema, legacy_text)
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
    _check_part_names(parts)
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


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------


def _unwrap(sd: Mapping[str, object]) -> Mapping[str, object]:
    """A Lightning `.ckpt` keeps the weights under "state_dict" (beside global_step, epoch...)."""
    inner = sd.get("state_dict")
    return inner if isinstance(inner, Mapping) else sd


def _choose_sources(sd: Mapping[str, object], ema: bool | None) -> tuple[bool, bool]:
    """(read the UNet from the EMA copy?, text encoder under the legacy prefix?)."""
    has_main = any(key.startswith(UNET_PREFIX) for key in sd)
    has_ema = any(key.startswith(EMA_PREFIX) and key not in IGNORED_KEYS for key in sd)
    if ema is True and not has_ema:
        raise CheckpointError("ema=True but the checkpoint has no EMA UNet weights (model_ema.*)")
    if ema is False and not has_main:
        raise CheckpointError(f"ema=False but the checkpoint has no {UNET_PREFIX}* UNet weights")
    if not has_main and not has_ema:
        raise CheckpointError(f"no UNet weights in the checkpoint (expected {UNET_PREFIX}* or {EMA_PREFIX}*)")
    use_ema = ema if ema is not None else not has_main
    legacy_text = (LEGACY_TEXT_PREFIX + "embeddings.token_embedding.weight") in sd
    return use_ema, legacy_text


def _source_key(key: str, use_ema: bool, legacy_text: bool) -> str:
    """Where the table's CompVis `key` is found in this particular file."""
    if use_ema and key.startswith(UNET_PREFIX):
        return _ema_key(key)
    if legacy_text and key.startswith(TEXT_PREFIX + "text_model."):
        return LEGACY_TEXT_PREFIX + key[len(TEXT_PREFIX + "text_model.") :]
    return key


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): {shown}{more}"


def _raise_if_problems(what: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    if not (missing or unexpected or mismatched):
        return
    sections = [
        _listing(title, items)
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched))
        if items
    ]
    message = f"{what}: " + "; ".join(sections)
    raise CheckpointError(message, missing=missing, unexpected=unexpected, mismatched=mismatched)


def _config_note(subject: str, config: ModelConfig, inferred: bool) -> str:
    u = config.unet
    source = "inferred" if inferred else "given"
    return (
        f"{subject} do not match the SD 1.x layout for the {source} config "
        f"(UNet {u.block_out_channels}, {u.layers_per_block} layers/level, attention {u.attention_levels})"
    )


def compvis_to_parts(
    sd: Mapping[str, torch.Tensor], config: ModelConfig | None = None, *, ema: bool | None = None
) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    """CompVis / A1111 single-file state dict -> (config, {"unet", "vae", "text_encoder"} parts).

    `config` None infers it from the shapes (`infer_config`). `ema` None reads the UNet from
    model.diffusion_model.* when present (as A1111 and diffusers do), else from the EMA copy;
    True / False force the EMA / non-EMA copy. The copy not chosen is checked for unknown keys and
    otherwise ignored.
    """
    sd = _unwrap(sd)
    problem = detect_unsupported(sd)
    if problem:
        raise CheckpointError(problem)
    use_ema, legacy_text = _choose_sources(sd, ema)
    inferred = config is None
    if config is None:
        config = infer_config(sd, ema=use_ema)

    rows = mapping_table(config)
    if use_ema:
        # EMA names drop the dots; refuse a config for which that would be ambiguous
        names = [_ema_key(row.compvis) for row in rows if row.part == "unet"]
        if len(set(names)) != len(names):
            raise CheckpointError("EMA key names (dots removed) are ambiguous for this config; use ema=False")
    parts: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    missing, mismatched, used = [], [], set()
    for row in rows:
        key = _source_key(row.compvis, use_ema, legacy_text)
        value = sd.get(key)
        if value is None:
            missing.append(key)
            continue
        used.add(key)
        if not isinstance(value, torch.Tensor):
            mismatched.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != row.compvis_shape:
            mismatched.append(f"{key} {tuple(value.shape)} != expected {row.compvis_shape}")
        else:
            # CONV1X1: (O, I, 1, 1) -> (O, I)
            parts[row.part][row.key] = value.reshape(row.shape) if row.transform == CONV1X1 else value

    # The UNet copy not chosen: its keys are known (and ignored) if they are the table's.
    other_copy = {(_ema_key(r.compvis) if not use_ema else r.compvis) for r in rows if r.part == "unet"}
    unexpected = [key for key in sd if key not in used and key not in IGNORED_KEYS and key not in other_copy]
    _raise_if_problems(_config_note("checkpoint keys", config, inferred), missing, unexpected, mismatched)
    return config, parts


def _check_part_names(parts: Mapping[str, object]) -> None:
    if set(parts) != set(PARTS):
        raise CheckpointError(f"parts must be exactly {list(PARTS)}, got {sorted(parts)}")


def parts_to_compvis(
    parts: Mapping[str, Mapping[str, torch.Tensor]], config: ModelConfig | None = None
) -> dict[str, torch.Tensor]:
    """sdcore parts -> the CompVis single-file layout that A1111, ComfyUI and diffusers'
    `from_single_file` load (VAE attention as 1x1 convs, CLIP under
    cond_stage_model.transformer.text_model.*, int64 position_ids included).

    `config` None infers it from the parts' shapes; either way every key and shape is checked.
    """
    _check_part_names(parts)
    inferred = config is None
    if config is None:
        config = infer_config_from_parts(parts)
    rows = mapping_table(config)
    out: dict[str, torch.Tensor] = {}
    missing, mismatched = [], []
    for row in rows:
        value = parts[row.part].get(row.key)
        if value is None:
            missing.append(f"{row.part}:{row.key}")
        elif not isinstance(value, torch.Tensor):
            mismatched.append(f"{row.part}:{row.key} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != row.shape:
            mismatched.append(f"{row.part}:{row.key} {tuple(value.shape)} != expected {row.shape}")
        else:
            # CONV1X1: (O, I) -> (O, I, 1, 1)
            out[row.compvis] = value.reshape(row.compvis_shape) if row.transform == CONV1X1 else value
    expected = {(row.part, row.key) for row in rows}
    unexpected = [f"{part}:{key}" for part in PARTS for key in parts[part] if (part, key) not in expected]
    _raise_if_problems(_config_note("parts", config, inferred), missing, unexpected, mismatched)
    # transformers' CLIPTextModel keeps position_ids as a buffer; single-file loaders expect it.
    out[POSITION_IDS] = torch.arange(config.text_encoder.max_position_embeddings, dtype=torch.int64)[None]
    return out

