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

from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .clip import CLIPTextModel
from .config import ModelConfig
from .request import GenerationRequest
from .samplers import Sampler
from .tokenizer import tokenize
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

EMBEDDING_CACHE_SIZE = 4096


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
        requests: Sequence[GenerationRequest | Mapping[str, Any]],
        *,
        sampler: str,
        steps: int,
        guidance_scale: float,
        width: int,
        height: int,
        karras: bool = False,
        batch_invariant: bool = True,
    ) -> list[Image.Image]:
        """Images for `requests`, in order; each is the image its request would get alone.

        The keyword settings apply to every request that does not set its own (see
        `GenerationRequest`). Requests with equal settings share UNet forwards; mappings are
        read with `GenerationRequest.from_mapping`. ValueError, naming the request's index, for
        anything `sdcore.rules` refuses.
        """
        defaults = dict(
            sampler=sampler, karras=karras, steps=steps, guidance_scale=guidance_scale, width=width, height=height
        )
        resolved = [self._resolve(i, request, defaults) for i, request in enumerate(requests)]
        images: list[Image.Image | None] = [None] * len(resolved)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(resolved):
            groups.setdefault(request.settings_key(), []).append(index)
        for indices in groups.values():
            group_images = self._generate_group([resolved[i] for i in indices], batch_invariant)
            for index, image in zip(indices, group_images):
                images[index] = image
        return images

    def _resolve(self, index: int, request: GenerationRequest | Mapping[str, Any], defaults: dict) -> GenerationRequest:
        try:
            if not isinstance(request, GenerationRequest):
                if not isinstance(request, Mapping):
                    raise ValueError(f"expected a GenerationRequest or a mapping, got {type(request).__name__}")
                request = GenerationRequest.from_mapping(request)
            return request.resolve(defaults, self.size_multiple)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"request {index}: {exc}") from None

    def _generate_group(self, group: list[GenerationRequest], batch_invariant: bool) -> list[Image.Image]:
        """Images for requests that share every setting (one schedule, one size)."""
        first = group[0]
        schedule = Sampler(first.sampler, first.steps, first.karras)
        latents, starts, generators = [], [], []
        for request in group:
            generator = torch.Generator("cpu").manual_seed(request.seed)
            latents.append(self._initial_latent(request, schedule, generator))
            starts.append(0 if request.strength is None else schedule.start_index(request.strength))
            generators.append(generator)

        images: list[Image.Image | None] = [None] * len(group)
        # Requests sharing a start step run through the UNet together.
        for start in sorted(set(starts)):
            members = [i for i, s in enumerate(starts) if s == start]
            x = torch.cat([latents[i] for i in members])
            denoise = self._denoiser([group[i] for i in members], first.guidance_scale, batch_invariant)
            x = schedule.run(denoise, x, [generators[i] for i in members], start_index=start)
            for i, latent in zip(members, x.split(1)):
                images[i] = self._decode(latent)
        return images

    def _initial_latent(
        self, request: GenerationRequest, schedule: Sampler, generator: torch.Generator
    ) -> torch.Tensor:
        """The request's starting latent (1, 4, h, w), drawing from its generator in diffusers' order."""
        factor = self.size_multiple
        shape = (1, self.config.vae.latent_channels, request.height // factor, request.width // factor)
        if request.init_image is None:
            noise = torch.randn(shape, generator=generator, dtype=self.dtype)
            return schedule.txt2img_latents(noise.to(self.device))
        pixels = image_to_tensor(request.init_image, request.width, request.height).to(self.device, self.dtype)
        mean, logvar = self.vae.encode(pixels)
        # Sample the VAE posterior: mean + std * N(0, I), the first draw of an img2img row.
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(self.device)
        init = (mean + torch.exp(0.5 * logvar) * eps) * self.config.vae.scaling_factor
        noise = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device)
        return schedule.img2img_latents(init, noise, schedule.start_index(request.strength))

    def _denoiser(self, group: list[GenerationRequest], guidance_scale: float, batch_invariant: bool):
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
            return torch.cat([denoise_batch(x[i : i + 1], t, per_row[:, i]) for i in range(len(group))])

        return denoise

    def _decode(self, latent: torch.Tensor) -> Image.Image:
        pixels = self.vae.decode(latent / self.config.vae.scaling_factor)
        return tensor_to_image(pixels)
