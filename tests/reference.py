"""Reference models for tests: diffusers / transformers networks built from an sdcore ModelConfig.

`diffusers_models(cfg, seed)` gives the three networks users trust, with deterministic random
weights, so parity tests can load the same weights into sdcore and compare outputs.
`sdcore_parts(...)` turns them into sdcore's part state dicts.
"""

from __future__ import annotations

import torch

from sdcore.config import ModelConfig

# Stable Diffusion 1.5's scheduler_config.json, with the spacing SPEC.md fixes for every sampler.
SD15_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "timestep_spacing": "leading",
}

# SD 1.x CLIP tokenizer special ids (openai/clip-vit-large-patch14): <|startoftext|>, <|endoftext|>
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
PAD_TOKEN_ID = 49407


def unet_kwargs(cfg: ModelConfig) -> dict:
    """diffusers UNet2DConditionModel(**kwargs) for cfg.unet (SD 1.x block types)."""
    u = cfg.unet
    return dict(
        sample_size=64,
        in_channels=u.in_channels,
        out_channels=u.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels)),
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        # SD 1.x's legacy naming: diffusers' attention_head_dim is the number of heads
        attention_head_dim=u.num_heads if isinstance(u.num_heads, int) else tuple(u.num_heads),
        cross_attention_dim=u.cross_attention_dim,
        transformer_layers_per_block=u.transformer_layers,
        norm_num_groups=u.norm_num_groups,
        norm_eps=u.norm_eps,
        use_linear_projection=u.use_linear_projection,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
        downsample_padding=1,
        center_input_sample=False,
    )


def vae_kwargs(cfg: ModelConfig) -> dict:
    """diffusers AutoencoderKL(**kwargs) for cfg.vae."""
    v = cfg.vae
    levels = len(v.block_out_channels)
    return dict(
        in_channels=v.in_channels,
        out_channels=v.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(v.block_out_channels),
        layers_per_block=v.layers_per_block,
        act_fn="silu",
        latent_channels=v.latent_channels,
        norm_num_groups=v.norm_num_groups,
        sample_size=256,
        scaling_factor=v.scaling_factor,
    )


def clip_kwargs(cfg: ModelConfig) -> dict:
    """transformers CLIPTextConfig(**kwargs) for cfg.text_encoder."""
    t = cfg.text_encoder
    return dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        hidden_act=t.hidden_act,
        layer_norm_eps=t.layer_norm_eps,
        projection_dim=t.hidden_size,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
    )


def diffusers_models(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu"):
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel) with deterministic random weights.

    Built under a forked RNG seeded with `seed` (the global RNG is left as it was), then every
    parameter gets a small seeded perturbation so that no two tensors are equal (norm weights
    would otherwise all be ones, hiding swapped keys). `device="meta"` gives shape-only models,
    cheap even for SD 1.5. Models are returned in eval mode, float32.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            unet = UNet2DConditionModel(**unet_kwargs(cfg))
            vae = AutoencoderKL(**vae_kwargs(cfg))
            text_encoder = CLIPTextModel(CLIPTextConfig(**clip_kwargs(cfg)))
    if str(device) != "meta":
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            for model in (unet, vae, text_encoder):
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device))
    return unet.eval(), vae.eval(), text_encoder.eval()


def text_encoder_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel's weights under sdcore's keys (`text_model.` prefix, no
    position_ids). transformers >= 5.6 flattened CLIPTextModel, dropping the prefix."""
    sd = text_encoder.state_dict()
    return {
        (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in sd.items()
        if not k.endswith("embeddings.position_ids")
    }


def sdcore_parts(unet, vae, text_encoder) -> dict[str, dict[str, torch.Tensor]]:
    """sdcore's part state dicts for diffusers / transformers models (same key layout)."""
    return {
        "unet": dict(unet.state_dict()),
        "vae": dict(vae.state_dict()),
        "text_encoder": text_encoder_state_dict(text_encoder),
    }


def transformers_text_state_dict(part: dict[str, torch.Tensor], text_encoder) -> dict[str, torch.Tensor]:
    """sdcore's text_encoder part in the key layout of this transformers `text_encoder`
    (for `text_encoder.load_state_dict(..., strict=True)`)."""
    prefixed = any(k.startswith("text_model.") for k in text_encoder.state_dict())
    return part if prefixed else {k.removeprefix("text_model."): v for k, v in part.items()}


def save_diffusers_folder(cfg: ModelConfig, seed: int, folder) -> None:
    """A diffusers-format pipeline folder (as users download them) with random weights from
    `diffusers_models(cfg, seed)`, sdcore's tokenizer and SD 1.5's DDIM scheduler config."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sdcore.tokenizer import get_tokenizer

    unet, vae, text_encoder = diffusers_models(cfg, seed)
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=get_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
