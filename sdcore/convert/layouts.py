"""The CompVis / A1111 single-file layout and its mapping onto sdcore's modules.

Nothing here restates the architecture. `mapping_table(config)` builds sdcore's three networks
on the meta device (no memory) and takes every parameter name and shape from their state dicts;
what is written by hand is only what the modules cannot know:

  * the key prefixes of a single file (`UNET_PREFIX`, `VAE_PREFIX`, `TEXT_PREFIX`, ...) and the
    EMA copy's naming (`ema_key`);
  * the module renaming, `unet_names` / `vae_names` / `TEXT_NAMES`: sdcore module path ->
    CompVis module path. Where CompVis numbers blocks differently (the UNet's flat
    `input_blocks` / `output_blocks`, the VAE decoder's reversed `up.i`) the index arithmetic is
    spelled out; inside a renamed block, `UNET_RESNET`, `VAE_RESNET` and `VAE_ATTENTION` list
    the sub-module names;
  * the explicit shape transforms: `CONV1X1_MODULES` (the VAE's mid-block attention q/k/v/
    proj_out are Linear layers in sdcore, 1x1 convolutions in CompVis);
  * the keys that exist in one layout only: `IGNORED_KEYS` (schedule buffers, EMA bookkeeping,
    CLIP's `position_ids`, which `parts_to_compvis` writes as a fresh arange).

A parameter of the modules that no entry names is an error (`LayoutError`), never skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from sdcore.clip import CLIPTextModel
from sdcore.config import ModelConfig, UNetConfig, VAEConfig
from sdcore.unet import UNet2DConditionModel
from sdcore.vae import AutoencoderKL

from .errors import CheckpointError

# ------------------------------------------------------------------------------------------------
# Keys of a single file
# ------------------------------------------------------------------------------------------------

PARTS = ("unet", "vae", "text_encoder")

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."  # + the part key (text_model.embeddings...)
LEGACY_TEXT_PREFIX = "cond_stage_model.transformer."  # + the part key without "text_model."
POSITION_IDS = TEXT_PREFIX + "text_model.embeddings.position_ids"

PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}

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
        # CLIP's position_ids buffer, an int64 arange (1, T). sdcore has no such buffer; merged
        # files often carry a corrupted float copy, so it is never read, and export writes it.
        POSITION_IDS,
        LEGACY_TEXT_PREFIX + "embeddings.position_ids",
    }
)


def ema_key(key: str) -> str:
    """`model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`."""
    return EMA_PREFIX + key[len("model.") :].replace(".", "")


def check_part_names(parts: Mapping[str, object]) -> None:
    if set(parts) != set(PARTS):
        raise CheckpointError(f"parts must be exactly {list(PARTS)}, got {sorted(parts)}")


# ------------------------------------------------------------------------------------------------
# Module names: sdcore (diffusers / transformers) -> CompVis
# ------------------------------------------------------------------------------------------------

Names = dict[str, str]

# Sub-modules of a block: (sdcore name, CompVis name).
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
# The UNet's SpatialTransformer and the CLIP text model use the same names inside in both
# layouts, so they are mapped as whole modules.
TEXT_NAMES: Names = {"text_model": "text_model"}  # transformers CLIPTextModel (+ TEXT_PREFIX)


def _block(sdcore: str, compvis: str, inner: tuple[tuple[str, str], ...]) -> Names:
    """A block whose sub-modules are renamed: one entry per sub-module, none for the block."""
    return {f"{sdcore}.{a}": f"{compvis}.{b}" for a, b in inner}


def unet_names(u: UNetConfig) -> Names:
    """sdcore UNet module -> CompVis `openaimodel.UNetModel` module (under UNET_PREFIX).

    CompVis numbers the down path as one flat list `input_blocks`: conv_in, then per level
    `layers_per_block` x [ResBlock, SpatialTransformer?] and a Downsample `op` (except after the
    deepest level). The up path is `output_blocks`: per level, deepest first,
    `layers_per_block + 1` x [ResBlock, SpatialTransformer?], the level's last one followed by an
    Upsample `conv` (except at the shallowest level). sdcore, like diffusers, nests both per level.
    """
    levels, lpb = len(u.block_out_channels), u.layers_per_block
    names: Names = {
        "time_embedding.linear_1": "time_embed.0",  # time_embed = [Linear, SiLU, Linear]
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        **_block("mid_block.resnets.0", "middle_block.0", UNET_RESNET),
        "mid_block.attentions.0": "middle_block.1",
        **_block("mid_block.resnets.1", "middle_block.2", UNET_RESNET),
        "conv_norm_out": "out.0",  # out = [GroupNorm, SiLU, conv]
        "conv_out": "out.2",
    }
    for level in range(levels):
        first = 1 + level * (lpb + 1)  # input_blocks index of the level's first ResBlock
        for j in range(lpb):
            names |= _block(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{first + j}.0", UNET_RESNET)
            if u.attention_levels[level]:
                names[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{first + j}.1"
        if level < levels - 1:
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{first + lpb}.0.op"
    for up in range(levels):
        level = levels - 1 - up  # up_blocks.0 is the deepest level
        first = up * (lpb + 1)  # output_blocks index of its first ResBlock
        for j in range(lpb + 1):
            names |= _block(f"up_blocks.{up}.resnets.{j}", f"output_blocks.{first + j}.0", UNET_RESNET)
            if u.attention_levels[level]:
                names[f"up_blocks.{up}.attentions.{j}"] = f"output_blocks.{first + j}.1"
        if level > 0:
            after = 2 if u.attention_levels[level] else 1  # after the transformer, if the level has one
            names[f"up_blocks.{up}.upsamplers.0.conv"] = f"output_blocks.{first + lpb}.{after}.conv"
    return names


def vae_names(v: VAEConfig) -> Names:
    """sdcore VAE module -> CompVis `ldm.modules.diffusionmodules.model` module (under VAE_PREFIX).

    The encoder's `down.i` is sdcore's `down_blocks.i`; the decoder's `up.i` counts from the
    *shallowest* level, so sdcore's `up_blocks.i` is CompVis `up.{levels-1-i}`.
    """
    levels, lpb = len(v.block_out_channels), v.layers_per_block
    names: Names = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for coder in ("encoder", "decoder"):
        names |= {
            f"{coder}.conv_in": f"{coder}.conv_in",
            **_block(f"{coder}.mid_block.resnets.0", f"{coder}.mid.block_1", VAE_RESNET),
            **_block(f"{coder}.mid_block.attentions.0", f"{coder}.mid.attn_1", VAE_ATTENTION),
            **_block(f"{coder}.mid_block.resnets.1", f"{coder}.mid.block_2", VAE_RESNET),
            f"{coder}.conv_norm_out": f"{coder}.norm_out",
            f"{coder}.conv_out": f"{coder}.conv_out",
        }
    for i in range(levels):
        for j in range(lpb):
            names |= _block(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET)
        if i < levels - 1:
            names[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
    for i in range(levels):
        level = levels - 1 - i
        for j in range(lpb + 1):
            names |= _block(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", VAE_RESNET)
        if level > 0:
            names[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    return names


def module_names(config: ModelConfig) -> dict[str, Names]:
    """Per part: sdcore module path -> CompVis module path (without the part's prefix)."""
    return {"unet": unet_names(config.unet), "vae": vae_names(config.vae), "text_encoder": dict(TEXT_NAMES)}


def rename(key: str, names: Mapping[str, str]) -> str | None:
    """`key` with its longest module path found in `names` renamed, the rest kept; None if none.

    rename("down_blocks.0.resnets.1.conv1.weight", unet_names(...)) -> "input_blocks.2.0.in_layers.2.weight"
    """
    head, tail = key, ""
    while head not in names:
        if "." not in head:
            return None
        head, last = head.rsplit(".", 1)
        tail = f".{last}{tail}"
    return names[head] + tail


# ------------------------------------------------------------------------------------------------
# Shape transforms
# ------------------------------------------------------------------------------------------------

# CONV1X1: sdcore Linear weight (O, I)  <->  CompVis 1x1 conv weight (O, I, 1, 1). The explicit
# list of CompVis modules it applies to (their weights; the biases (O,) are the same):
CONV1X1 = "conv1x1"
CONV1X1_MODULES = (
    "encoder.mid.attn_1.q", "encoder.mid.attn_1.k", "encoder.mid.attn_1.v", "encoder.mid.attn_1.proj_out",
    "decoder.mid.attn_1.q", "decoder.mid.attn_1.k", "decoder.mid.attn_1.v", "decoder.mid.attn_1.proj_out",
)  # fmt: skip
CONV1X1_KEYS = frozenset(f"{VAE_PREFIX}{module}.weight" for module in CONV1X1_MODULES)


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


class LayoutError(RuntimeError):
    """sdcore's modules have a parameter the naming table does not cover (a bug in sdcore)."""


@dataclass(frozen=True)
class Row:
    """One tensor: where it lives in the single file and in the parts, and its shape."""

    compvis: str  # key in the single file
    part: str  # "unet" | "vae" | "text_encoder"
    key: str  # key inside the part
    shape: tuple[int, ...]  # shape in the part, as sdcore's module has it
    transform: str | None = None  # None | CONV1X1

    @property
    def compvis_shape(self) -> tuple[int, ...]:
        # CONV1X1: (O, I) -> (O, I, 1, 1)
        return self.shape + (1, 1) if self.transform == CONV1X1 else self.shape


def module_shapes(config: ModelConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every state-dict entry of sdcore's three networks for `config`, with its shape.

    Read from the real modules built on the meta device: no memory, no initialisation.
    """
    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel(config.unet),
            "vae": AutoencoderKL(config.vae),
            "text_encoder": CLIPTextModel(config.text_encoder),
        }
    return {part: {key: tuple(t.shape) for key, t in modules[part].state_dict().items()} for part in PARTS}


def mapping_rows(config: ModelConfig, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> list[Row]:
    """One `Row` per entry of `shapes` ({part: {key: shape}}), named by `module_names(config)`.

    Every key must have a CompVis name, no two the same; every CONV1X1 key must occur, as a
    2-D Linear weight. Anything else is a `LayoutError` naming the keys.
    """
    names = module_names(config)
    rows: list[Row] = []
    uncovered: list[str] = []
    for part in PARTS:
        for key, shape in shapes[part].items():
            name = rename(key, names[part])
            if name is None:
                uncovered.append(f"{part}:{key}")
                continue
            compvis = PREFIXES[part] + name
            transform = CONV1X1 if compvis in CONV1X1_KEYS else None
            rows.append(Row(compvis, part, key, tuple(shape), transform))
    if uncovered:
        raise LayoutError(f"no CompVis name for sdcore key(s) {', '.join(uncovered)} (see sdcore/convert/layouts.py)")

    seen: dict[str, Row] = {}
    for row in rows:
        if row.compvis in seen:
            other = seen[row.compvis]
            raise LayoutError(f"{other.part}:{other.key} and {row.part}:{row.key} both map to {row.compvis}")
        seen[row.compvis] = row
    for key in sorted(CONV1X1_KEYS):
        if key not in seen or len(seen[key].shape) != 2:
            found = seen[key].shape if key in seen else "absent"
            raise LayoutError(f"CONV1X1 key {key} must map a Linear weight (O, I), found {found}")
    return rows


def mapping_table(config: ModelConfig) -> list[Row]:
    """One `Row` per tensor of the model described by `config`, in sdcore's module order."""
    return mapping_rows(config, module_shapes(config))
