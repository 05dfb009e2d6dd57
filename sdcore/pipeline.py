"""Batched txt2img / img2img with one random generator per row.

The randomness contract (SPEC.md): row r gets `torch.Generator("cpu").manual_seed(seed_r)` and
draws, in order and shape, what diffusers' StableDiffusion(Img2Img)Pipeline draws for one image:
txt2img: initial noise (1, 4, h, w); img2img: VAE posterior noise, then add-noise; then the
sampler's per-step noise (DDPM, Euler ancestral). Every per-row computation whose result could
depend on its batch neighbours runs one row at a time: text encoding, VAE encode/decode, and —
unless `batch_invariant=False` — the UNet. Convolution and matmul kernels (oneDNN, cuDNN, cuBLAS)
choose their algorithm by input shape, batch included, so the same row computed inside a batch
of 8 and alone can differ in the last float bits and, after rounding, by one pixel level. With
`batch_invariant=True` every UNet call has the same shape (one row, its unconditional and
conditional halves together), which makes images bit-identical whatever the batching.
`batch_invariant=False` batches all rows of a group into one forward pass: more throughput on a
GPU, images equal only within float tolerance across batch sizes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .clip import CLIPTextModel
from .config import ModelConfig
from .samplers import Sampler
from .tokenizer import tokenize
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

MAX_SEED = 2**64 - 1
EMBEDDING_CACHE_SIZE = 4096


@dataclass(frozen=True)
class _Row:
    """One validated request; index is its position in the caller's list."""

    index: int
    prompt: str
    negative: str
    seed: int
    strength: float | None
    init_image: Image.Image | None


def _validate_row(index: int, row: Mapping[str, Any], schedule: Sampler) -> _Row:
    where = f"row {index}"
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    negative = row.get("negative") or ""
    if not isinstance(negative, str):
        raise ValueError(f"{where}: 'negative' must be a string, got {type(negative).__name__}")
    seed = row.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"{where}: 'seed' must be an integer, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{where}: 'seed' {seed} outside [0, 2**64 - 1]")
    init_image = row.get("init_image")
    strength = row.get("strength")
    if init_image is not None:
        if not isinstance(init_image, Image.Image):
            raise ValueError(f"{where}: 'init_image' must be a PIL image")
        if strength is None:
            raise ValueError(f"{where}: img2img row needs a 'strength' in (0, 1]")
        strength = float(strength)
        if not (0.0 < strength <= 1.0):
            raise ValueError(f"{where}: 'strength' {strength} outside (0, 1]")
        try:
            schedule.start_index(strength)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    else:
        strength = None  # a strength without an init image has nothing to act on
    return _Row(index, prompt, negative, seed, strength, init_image)


def _validate_size(width: int, height: int, multiple: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if value % multiple:
            raise ValueError(f"{name} {value} is not a multiple of {multiple}")


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1], resized (Lanczos) to width x height."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    # (H, W, 3) -> (1, 3, H, W)
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> 8-bit RGB, rounding as diffusers' image processor does."""
    x = (x / 2 + 0.5).clamp(0, 1)
    # (1, 3, H, W) -> (H, W, 3)
    array = x[0].permute(1, 2, 0).float().cpu().numpy()
    return Image.fromarray((array * 255).round().astype(np.uint8))


class Pipeline:
    """The three networks of one SD 1.x checkpoint on one device, ready to generate."""

    def __init__(
        self,
        config: ModelConfig,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        *,
        fingerprint: str,
        source: str,
    ):
        self.config = config
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.fingerprint = fingerprint
        self.source = source
        self._embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def size_multiple(self) -> int:
        """Width/height must be multiples of this (the VAE's factor, 8 for SD 1.x)."""
        return self.config.vae.scale_factor

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "unet": self.unet.state_dict(),
            "vae": self.vae.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
        }

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt -> (1, 77, D) text embedding, cached (the empty negative repeats a lot)."""
        cached = self._embeddings.get(prompt)
        if cached is not None:
            self._embeddings.move_to_end(prompt)
            return cached
        ids = tokenize([prompt]).to(self.device)
        embedding = self.text_encoder(ids)
        self._embeddings[prompt] = embedding
        if len(self._embeddings) > EMBEDDING_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return embedding

    @torch.inference_mode()
    def generate(
        self,
        rows: Sequence[Mapping[str, Any]],
        *,
        sampler: str,
        steps: int,
        guidance_scale: float,
        width: int,
        height: int,
        karras: bool = False,
        batch_invariant: bool = True,
    ) -> list[Image.Image]:
        """Images for `rows`, in row order; each is the image its row would get alone."""
        schedule = Sampler(sampler, steps, karras)
        _validate_size(width, height, self.size_multiple)
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        checked = [_validate_row(i, row, schedule) for i, row in enumerate(rows)]
        if not checked:
            return []

        latents, starts, row_generators = [], [], []
        for row in checked:
            generator = torch.Generator("cpu").manual_seed(row.seed)
            latents.append(self._initial_latent(row, schedule, generator, width, height))
            starts.append(0 if row.strength is None else schedule.start_index(row.strength))
            row_generators.append(generator)

        images: list[Image.Image | None] = [None] * len(checked)
        # Rows sharing a start step run through the UNet together.
        for start in sorted(set(starts)):
            group = [r for r, s in zip(checked, starts) if s == start]
            x = torch.cat([latents[r.index] for r in group])
            generators = [row_generators[r.index] for r in group]
            denoise = self._denoiser(group, guidance_scale, batch_invariant)
            x = schedule.run(denoise, x, generators, start_index=start)
            for row, latent in zip(group, x.split(1)):
                images[row.index] = self._decode(latent)
        return images

    def _initial_latent(
        self,
        row: _Row,
        schedule: Sampler,
        generator: torch.Generator,
        width: int,
        height: int,
    ) -> torch.Tensor:
        """The row's starting latent (1, 4, h, w), drawing from its generator in diffusers' order."""
        factor = self.size_multiple
        shape = (1, self.config.vae.latent_channels, height // factor, width // factor)
        if row.init_image is None:
            noise = torch.randn(shape, generator=generator, dtype=self.dtype)
            return schedule.txt2img_latents(noise.to(self.device))
        pixels = image_to_tensor(row.init_image, width, height).to(self.device, self.dtype)
        mean, logvar = self.vae.encode(pixels)
        # Sample the VAE posterior: mean + std * N(0, I), the first draw of an img2img row.
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(self.device)
        init = (mean + torch.exp(0.5 * logvar) * eps) * self.config.vae.scaling_factor
        noise = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
        return schedule.img2img_latents(init, noise, schedule.start_index(row.strength))

    def _denoiser(self, group: list[_Row], guidance_scale: float, batch_invariant: bool):
        """ε(x, t) for a group of rows, with classifier-free guidance (Ho & Salimans 2022)."""
        cond = torch.cat([self.encode_prompt(r.prompt) for r in group])
        guided = guidance_scale > 1.0  # diffusers skips the unconditional pass at <= 1
        if guided:
            uncond = torch.cat([self.encode_prompt(r.negative) for r in group])
            # (B, 77, D) x 2 -> (2B, 77, D): unconditional first, as diffusers orders them
            context = torch.cat([uncond, cond])
        else:
            context = cond

        def denoise_batch(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            if not guided:
                return self.unet(x, t, context)
            # (B, 4, h, w) -> (2B, 4, h, w): both halves in one forward pass
            eps_uncond, eps_cond = self.unet(torch.cat([x, x]), t, context).chunk(2)
            return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.device)
            if not batch_invariant or len(group) == 1:
                return denoise_batch(x, t, context)
            # One fixed-shape forward per row (see the module docstring).
            per_row = context.view(2 if guided else 1, len(group), *context.shape[1:])
            return torch.cat(
                [denoise_batch(x[i : i + 1], t, per_row[:, i]) for i in range(len(group))]
            )

        return denoise

    def _decode(self, latent: torch.Tensor) -> Image.Image:
        pixels = self.vae.decode(latent / self.config.vae.scaling_factor)
        return tensor_to_image(pixels)
