"""Recognising single files of other model families, so they are refused by name.

SDXL, SD 2.x, SD 3, Flux, ControlNets, LoRAs, v-prediction / zero-terminal-SNR models, and UNet
variants with extra input channels (inpainting, instruct-pix2pix, depth, x4 upscaler) would
otherwise fail as a long list of missing and unexpected keys, or worse, load and run wrongly.
`detect_unsupported` says what such a file is, from marker keys and a few tensor shapes.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .layouts import EMA_PREFIX, LEGACY_TEXT_PREFIX, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, ema_key
from .sources import unwrap

# (key prefix, what a checkpoint holding such keys is), checked in order.
UNSUPPORTED_MARKERS = (  # fmt: skip
    ("conditioner.embedders.", "an SDXL checkpoint (text encoders under conditioner.embedders.*)"),
    (
        "cond_stage_model.model.",
        "a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H text encoder under cond_stage_model.model.*)",
    ),
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


def _unsupported(what: str) -> str:
    return (
        f"unsupported checkpoint: this looks like {what}; sdgen runs Stable Diffusion 1.x "
        "(CLIP ViT-L text encoder, latent-input epsilon-prediction UNet) only"
    )


def detect_unsupported(sd: Mapping[str, object]) -> str | None:
    """A message if the CompVis-layout `sd` is a known non-SD-1.x model, else None."""
    sd = unwrap(sd)
    for marker, what in UNSUPPORTED_MARKERS:
        if any(key.startswith(marker) for key in sd):
            return _unsupported(what)

    def shape(key: str) -> tuple[int, ...] | None:
        for candidate in (key, ema_key(key)) if key.startswith(UNET_PREFIX) else (key,):
            value = sd.get(candidate)
            if isinstance(value, torch.Tensor):
                return tuple(value.shape)
        return None

    # conv_in (C0, in_channels, 3, 3) against the VAE latent, decoder.conv_in (C, latent, 3, 3)
    conv_in_key = UNET_PREFIX + "input_blocks.0.0.weight"
    conv_in = shape(conv_in_key)
    latent = shape(VAE_PREFIX + "decoder.conv_in.weight")
    latent_channels = latent[1] if latent and len(latent) == 4 else 4
    if conv_in and len(conv_in) == 4 and conv_in[1] != latent_channels:
        what = UNET_INPUT_VARIANTS.get(conv_in[1], f"a UNet variant taking {conv_in[1]} input channels")
        return _unsupported(f"{what}: {conv_in_key} has shape {conv_in}, the VAE latent has {latent_channels} channels")

    # cross-attention to_k (C, context width): 1024 is OpenCLIP ViT-H (SD 2.x), 768 CLIP ViT-L
    to_k_key = UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    to_k = shape(to_k_key)
    tokens = shape(TEXT_PREFIX + "text_model.embeddings.token_embedding.weight") or shape(
        LEGACY_TEXT_PREFIX + "embeddings.token_embedding.weight"
    )
    if to_k and len(to_k) == 2 and to_k[1] == 1024 and (tokens is None or tokens[-1] != 1024):
        linear = shape(UNET_PREFIX + "middle_block.1.proj_in.weight")
        proj = ", linear proj_in" if linear and len(linear) == 2 else ""
        return _unsupported(f"a Stable Diffusion 2.x checkpoint (cross-attention width 1024 in {to_k_key}{proj})")
    return None
