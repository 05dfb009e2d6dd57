"""Numerical faults: NaN or Inf in a row's latents or decoded pixels makes that row an error
record ("non-finite values at step k"), never a saved image.

`generate_finite(pipe, requests, **settings)` is `pipe.generate_stream` with forward hooks on the
UNet (its input latents and its output, per forward) and on the VAE decoder (final latents and
pixels). A non-finite tensor raises `NonFiniteError`, a `ValueError`: `isolation.py` treats it as
the row's own problem, so a batch that hits it is retried row by row and only the poisoned row
becomes an error record. The hooks live here, not in sdcore, and cost one `isfinite` reduction
per forward. The step named in the message counts UNet forwards: for one row alone (how
`isolation.py` retries a failed batch, which is what ends up in the error record) that is the
row's own sampler step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class NonFiniteError(ValueError):
    """NaN or Inf in the latents or pixels of a generation."""


def _finite(tensor: Any) -> bool:
    import torch

    return not torch.is_tensor(tensor) or bool(torch.isfinite(tensor).all())


def generate_finite(pipe: Any, requests: Iterable[Any], **settings: Any) -> Iterator[Any]:
    """`pipe.generate_stream(requests, **settings)`: (index, image, placement) per request as it
    finishes, raising NonFiniteError at the first non-finite latent or pixel."""
    timesteps: list[tuple] = []  # the timestep vector of each forward: its length is the step

    def step_of(inputs: tuple) -> int:
        if len(inputs) > 1 and hasattr(inputs[1], "flatten"):
            t = tuple(inputs[1].flatten().tolist())
            if not timesteps or timesteps[-1] != t:
                timesteps.append(t)
        return len(timesteps)

    def unet_in(module, inputs):
        step = step_of(inputs)
        if not _finite(inputs[0]):  # made by the previous step's update (step 0: the initial latents)
            raise NonFiniteError(f"non-finite values at step {step - 1} (latents after it)")

    def unet_out(module, inputs, output):
        if not _finite(output):
            raise NonFiniteError(f"non-finite values at step {len(timesteps)} (UNet output)")

    def decoder_in(module, inputs):
        if not _finite(inputs[0]):
            raise NonFiniteError(f"non-finite values at step {len(timesteps)} (final latents)")

    def decoder_out(module, inputs, output):
        if not _finite(output):
            raise NonFiniteError(f"non-finite values at step {len(timesteps)} (decoded pixels)")

    handles = []
    unet, decoder = getattr(pipe, "unet", None), getattr(getattr(pipe, "vae", None), "decoder", None)
    if hasattr(unet, "register_forward_hook"):
        handles += [unet.register_forward_pre_hook(unet_in), unet.register_forward_hook(unet_out)]
    if hasattr(decoder, "register_forward_hook"):
        handles += [decoder.register_forward_pre_hook(decoder_in), decoder.register_forward_hook(decoder_out)]
    try:
        yield from pipe.generate_stream(requests, **settings)
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["NonFiniteError", "generate_finite"]
