"""Per-module parity: sdcore's UNet, VAE and CLIP text encoder against diffusers/transformers on
identical random weights, for several configs and once at full SD 1.5 size."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import CLIPTextConfig
from transformers import CLIPTextModel as CLIPTextModelReference

from sdcore import winograd
from sdcore.clip import CLIPTextModel
from sdcore.config import ModelConfig, UNetConfig, VAEConfig
from sdcore.layers import Conv2d
from sdcore.unet import UNet2DConditionModel
from sdcore.vae import AutoencoderKL
from sdcore.weights import random_parts

from tests.reference import clip_kwargs, diffusers_models, sdcore_parts, transformers_text_state_dict

TOLERANCE = 1e-4  # relative error, float32

CONFIGS = {
    "tiny": ModelConfig.tiny(),
    # two levels, attention only on the first, 2 transformer layers, linear projections,
    # per-level heads, one resnet per level, a 3-level VAE (4x)
    "other": dataclasses.replace(
        ModelConfig.tiny(),
        unet=UNetConfig(
            block_out_channels=(32, 64),
            attention_levels=(True, False),
            layers_per_block=1,
            num_heads=(4, 2),
            cross_attention_dim=32,
            transformer_layers=2,
            use_linear_projection=True,
            norm_num_groups=16,
        ),
        vae=VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16),
    ),
}


def rel_err(reference: torch.Tensor, ours: torch.Tensor) -> float:
    return ((reference - ours).abs().max() / reference.abs().max()).item()


def sdcore_models(cfg: ModelConfig, parts: dict) -> tuple:
    with torch.device("meta"):  # no wasted random init: every tensor comes from `parts`
        unet, vae, text = UNet2DConditionModel(cfg.unet), AutoencoderKL(cfg.vae), CLIPTextModel(cfg.text_encoder)
    unet.load_state_dict(parts["unet"], strict=True, assign=True)
    vae.load_state_dict(parts["vae"], strict=True, assign=True)
    text.load_state_dict(parts["text_encoder"], strict=True, assign=True)
    return unet.eval(), vae.eval(), text.eval()


def check_parity(cfg, ref_unet, ref_vae, ref_text, unet, vae, text, *, latent_hw, image_hw):
    gen = torch.Generator().manual_seed(0)
    batch = 2
    x = torch.randn(batch, 4, *latent_hw, generator=gen)
    context = torch.randn(batch, 77, cfg.unet.cross_attention_dim, generator=gen)
    t = torch.tensor([3.0, 981.0])
    ids = torch.randint(0, cfg.text_encoder.vocab_size, (batch, 77), generator=gen)
    image = torch.rand(1, 3, *image_hw, generator=gen) * 2 - 1
    with torch.no_grad():
        assert rel_err(ref_unet(x, t, context).sample, unet(x, t, context)) <= TOLERANCE
        posterior = ref_vae.encode(image).latent_dist
        mean, logvar = vae.encode(image)
        assert rel_err(posterior.mean, mean) <= TOLERANCE
        assert rel_err(posterior.logvar, logvar) <= TOLERANCE
        z = torch.randn(1, 4, *latent_hw, generator=gen)
        assert rel_err(ref_vae.decode(z).sample, vae.decode(z)) <= TOLERANCE
        assert rel_err(ref_text(ids).last_hidden_state, text(ids)) <= TOLERANCE


@pytest.mark.parametrize("name", CONFIGS)
def test_modules_match_diffusers(name):
    cfg = CONFIGS[name]
    ref = diffusers_models(cfg, seed=1)
    ours = sdcore_models(cfg, sdcore_parts(*ref))
    # odd latent sizes exercise the up path's size matching; non-square images the VAE padding
    check_parity(cfg, *ref, *ours, latent_hw=(5, 7), image_hw=(40, 24))


def test_full_sd15_size_matches_diffusers():
    """The real architecture (860M-parameter UNet, 84M VAE, 123M CLIP) on small inputs."""
    cfg = ModelConfig.sd15()
    parts = random_parts(cfg, seed=3)
    ref_unet, ref_vae, _ = diffusers_models(cfg, device="meta")
    ref_unet.load_state_dict(parts["unet"], strict=True, assign=True)
    ref_vae.load_state_dict(parts["vae"], strict=True, assign=True)
    # transformers keeps non-persistent buffers (position ids) outside the state dict: build
    # the text encoder for real rather than on the meta device.
    ref_text = CLIPTextModelReference(CLIPTextConfig(**clip_kwargs(cfg))).eval()
    ref_text.load_state_dict(transformers_text_state_dict(parts["text_encoder"], ref_text), strict=True)
    ours = sdcore_models(cfg, parts)
    assert sum(p.numel() for p in ours[0].parameters()) == 859_520_964
    check_parity(cfg, ref_unet, ref_vae, ref_text, *ours, latent_hw=(4, 4), image_hw=(32, 32))
    # Again with the 3x3 convolutions of 256+ channels as Winograd F(2x2, 3x3), as pipelines run
    # them on the CPU by default (sdcore/winograd.py).
    switched = 0
    for module in [*ours[0].modules(), *ours[1].modules()]:
        if isinstance(module, Conv2d) and winograd.eligible(module):
            module.use_winograd = True
            switched += 1
    assert switched > 40
    check_parity(cfg, ref_unet, ref_vae, ref_text, *ours, latent_hw=(4, 4), image_hw=(32, 32))


# Random-weight networks amplify rounding; these bounds catch a broken low-precision path
# (NaN, overflow, a missed cast), not ordinary drift. bfloat16 keeps 8 mantissa bits, float16 11.
@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 0.1), (torch.bfloat16, 0.2)])
def test_reduced_precision_runs_close_to_float32(dtype, tolerance):
    cfg = ModelConfig.tiny()
    unet, vae, text = sdcore_models(cfg, random_parts(cfg, seed=0))
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        context = text(ids)
        reference = unet(x, torch.tensor([500.0]), context)
        decoded = vae.decode(x)
        low = [m.to(dtype) for m in (unet, vae, text)]
        out = low[0](x.to(dtype), torch.tensor([500.0]), low[2](ids))
        dec = low[1].decode(x.to(dtype))
    assert out.dtype == dtype and dec.dtype == dtype
    assert rel_err(reference, out.float()) < tolerance
    assert rel_err(decoded, dec.float()) < tolerance
