"""Batched txt2img / img2img with one random generator per row.

The randomness contract (SPEC.md): row r gets `torch.Generator("cpu").manual_seed(seed_r)` and
draws, in order and shape, what diffusers' StableDiffusion(Img2Img)Pipeline draws for one image:
txt2img: initial noise (1, 4, h, w); img2img: VAE posterior noise, then add-noise; then the
sampler's per-step noise (DDPM, Euler ancestral). Every per-row computation whose result could
depend on its batch neighbours runs one row at a time: text encoding, VAE encode/decode, and —
unless `batch_invariant=False` — the UNet. Convolution and matmul kernels (oneDNN, cuDNN, cuBLAS)
choose their algorithm by input shape, batch included, so the same row computed inside a batch
of 8 and alone can differ in the last float bits and, after rounding, by one pixel level. At one
fixed shape they do not depend on the *other* rows (measured: any neighbours leave a row's bits
unchanged), only on the row's position. Three ways to shape the UNet forwards follow:
`fixed_batch=N`: every forward runs N rows, padded with filler rows; a request's bits depend on
its inputs and its slot (its `Placement`), and rebuilding that forward with fillers remakes it
exactly: exact at batched throughput, what the job runner uses. `batch_invariant=True` (the
default): one row (its unconditional and conditional halves) per forward, the same as
`fixed_batch=1`: bit-identical whatever the batching. `batch_invariant=False`: all rows of a group
in one forward, whatever their number: images equal only within float tolerance across batch
sizes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
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

# Text embeddings are cached by prompt (the empty negative and repeated prompts are common). The
# cache is bounded in bytes, not entries: one SD 1.5 embedding (1, 77, 768) float32 is 236 KB, so
# 4096 entries would hold ~1 GB of device memory.
EMBEDDING_CACHE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Placement:
    """Where a request sat in its UNet forwards, which decides its image's last bits: `rows`
    rows per forward (each a guidance pair when guided), the request in `slot`. Rebuilding a
    forward of `rows` rows with the request in `slot` (any filler around it) gives the same
    image. `rows == 0` means the forwards were not fixed-shape (see `generate`)."""

    rows: int
    slot: int


_UNPLACED = Placement(rows=0, slot=0)


class _Shaping:
    """How one call lays rows out in UNet forwards (see `generate`)."""

    def __init__(self, batch_invariant: bool, fixed_batch: int | None):
        self.fixed = fixed_batch is not None
        self.size = fixed_batch
        self.per_row = batch_invariant and not self.fixed  # one row per forward

    def forwards(self, members: list[int], wanted: list[int | None]) -> list[list[int | None]]:
        """The forwards to run, each a list of member indices by slot (None: a filler slot).

        Fixed shape: members fill slots in order, `size` per forward, a short last forward is
        padded; a member that asks for a slot gets it (in the first forward where it is free).
        Otherwise one forward holds every member (per-row forwards happen inside the denoiser).
        """
        if not self.fixed:
            return [list(members)]
        forwards: list[list[int | None]] = []
        for member, slot in sorted(zip(members, wanted), key=lambda pair: pair[1] is None):
            target = next((f for f in forwards if (f[slot] is None if slot is not None else None in f)), None)
            if target is None:
                target = [None] * self.size
                forwards.append(target)
            target[target.index(None) if slot is None else slot] = member
        return forwards


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
        self._embedding_bytes = 0

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

    def clear_embedding_cache(self) -> None:
        self._embeddings.clear()
        self._embedding_bytes = 0

    @property
    def embedding_cache_bytes(self) -> int:
        """Bytes of text embeddings held in the prompt cache (at most EMBEDDING_CACHE_BYTES, or
        one embedding when a single one is larger)."""
        return self._embedding_bytes

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
        self._embedding_bytes += embedding.numel() * embedding.element_size()
        while self._embedding_bytes > EMBEDDING_CACHE_BYTES and len(self._embeddings) > 1:
            _, evicted = self._embeddings.popitem(last=False)
            self._embedding_bytes -= evicted.numel() * evicted.element_size()
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
        fixed_batch: int | None = None,
        slots: Sequence[int | None] | None = None,
    ) -> list[Image.Image]:
        """Images for `requests`, in order.

        The keyword settings apply to every request that does not set its own (see
        `GenerationRequest`). Requests with equal settings share UNet forwards; mappings are
        read with `GenerationRequest.from_mapping`. ValueError, naming the request's index, for
        anything `sdcore.rules` refuses. How the UNet forwards are shaped (which decides an
        image's last bits, see the module docstring):

        - `fixed_batch=N`: every forward runs N rows (a short batch is padded with filler rows),
          and a row's image depends only on its own inputs and its slot among the N; `slots`
          may ask for a slot per request (reproduce uses it to rebuild a recorded forward).
          `generate_placed` also returns each request's `Placement`.
        - else `batch_invariant=True` (default): one row per forward: images are the same
          whatever the batching.
        - else: all rows of a group in one forward, whatever their number.
        """
        placed = self.generate_placed(
            requests,
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            karras=karras,
            batch_invariant=batch_invariant,
            fixed_batch=fixed_batch,
            slots=slots,
        )
        return [image for image, _ in placed]

    @torch.inference_mode()
    def generate_placed(
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
        fixed_batch: int | None = None,
        slots: Sequence[int | None] | None = None,
    ) -> list[tuple[Image.Image, Placement]]:
        """`generate`, with where each request sat in its UNet forwards."""
        if fixed_batch is not None and (
            isinstance(fixed_batch, bool) or not isinstance(fixed_batch, int) or fixed_batch < 1
        ):
            raise ValueError(f"fixed_batch: expected an integer >= 1, got {fixed_batch!r}")
        if slots is not None:
            if fixed_batch is None or len(slots) != len(requests):
                raise ValueError("slots need fixed_batch and one entry per request")
            for slot in slots:
                if slot is not None and not 0 <= slot < fixed_batch:
                    raise ValueError(f"slot {slot} outside 0..{fixed_batch - 1}")
        defaults = dict(
            sampler=sampler, karras=karras, steps=steps, guidance_scale=guidance_scale, width=width, height=height
        )
        resolved = [self._resolve(i, request, defaults) for i, request in enumerate(requests)]
        wanted = list(slots) if slots is not None else [None] * len(resolved)
        shaping = _Shaping(batch_invariant, fixed_batch)
        placed: list[tuple[Image.Image, Placement] | None] = [None] * len(resolved)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(resolved):
            groups.setdefault(request.settings_key(), []).append(index)
        for indices in groups.values():
            results = self._generate_group([resolved[i] for i in indices], [wanted[i] for i in indices], shaping)
            for index, result in zip(indices, results):
                placed[index] = result
        return placed

    def _resolve(self, index: int, request: GenerationRequest | Mapping[str, Any], defaults: dict) -> GenerationRequest:
        try:
            if not isinstance(request, GenerationRequest):
                if not isinstance(request, Mapping):
                    raise ValueError(f"expected a GenerationRequest or a mapping, got {type(request).__name__}")
                request = GenerationRequest.from_mapping(request)
            return request.resolve(defaults, self.size_multiple)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"request {index}: {exc}") from None

    def _generate_group(
        self, group: list[GenerationRequest], wanted: list[int | None], shaping: _Shaping
    ) -> list[tuple[Image.Image, Placement]]:
        """Images for requests that share every setting (one schedule, one size)."""
        first = group[0]
        schedule = Sampler(first.sampler, first.steps, first.karras)
        latents, starts, generators = [], [], []
        for request in group:
            generator = torch.Generator("cpu").manual_seed(request.seed)
            latents.append(self._initial_latent(request, schedule, generator))
            starts.append(0 if request.strength is None else schedule.start_index(request.strength))
            generators.append(generator)

        results: list[tuple[Image.Image, Placement] | None] = [None] * len(group)
        # Requests sharing a start step run through the UNet together.
        for start in sorted(set(starts)):
            members = [i for i, s in enumerate(starts) if s == start]
            for forward in shaping.forwards(members, [wanted[i] for i in members]):
                x, forward_generators, requests = self._forward_inputs(forward, group, latents, generators)
                denoise = self._denoiser(requests, first.guidance_scale, shaping.per_row)
                x = schedule.run(denoise, x, forward_generators, start_index=start)
                for slot, member in enumerate(forward):
                    if member is not None:
                        placement = Placement(rows=len(forward), slot=slot) if shaping.fixed else _UNPLACED
                        results[member] = (self._decode(x[slot : slot + 1]), placement)
        return results

    def _forward_inputs(
        self,
        forward: list[int | None],
        group: list[GenerationRequest],
        latents: list[torch.Tensor],
        generators: list[torch.Generator],
    ) -> tuple[torch.Tensor, list[torch.Generator], list[GenerationRequest | None]]:
        """The batch of one forward: each slot's latent, generator and request; a filler slot
        (None) gets zeros, its own throwaway generator, and the empty prompt (what fills it
        cannot change the real rows' bits: kernels at a fixed shape are neighbour-invariant)."""
        filler = torch.zeros_like(latents[next(m for m in forward if m is not None)])
        x = torch.cat([filler if m is None else latents[m] for m in forward])  # (rows, 4, h, w)
        forward_generators = [torch.Generator("cpu").manual_seed(0) if m is None else generators[m] for m in forward]
        return x, forward_generators, [None if m is None else group[m] for m in forward]

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

    def _denoiser(self, group: list[GenerationRequest | None], guidance_scale: float, batch_invariant: bool):
        """ε(x, t) for a group of rows (None: a filler row), with classifier-free guidance (Ho &
        Salimans 2022)."""
        cond = torch.cat([self.encode_prompt("" if r is None else r.prompt) for r in group])
        guided = guidance_scale > 1.0  # diffusers skips the unconditional pass at <= 1
        if guided:
            uncond = torch.cat([self.encode_prompt("" if r is None else r.negative) for r in group])
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
