"""Numerical faults: NaN or Inf in a row's latents or decoded pixels makes that row an error
record ("non-finite values at step k"), never a saved image.

`generate_finite(pipe, requests, **settings)` is `pipe.generate_stream` with forward hooks on the
UNet (its input latents and its output, per forward) and on the VAE decoder (final latents and
pixels). A non-finite tensor raises `NonFiniteError`, a `ValueError`: `isolation.py` treats it as
the row's own problem, so a batch that hits it is retried row by row and only the poisoned row
becomes an error record. The hooks live here, not in sdcore, and cost one `isfinite` reduction
per tensor, read after each decode rather than at each forward. The step named in the message
counts UNet forwards: for one row alone (how `isolation.py` retries a failed batch, which is what
ends up in the error record) that is the row's own sampler step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class NonFiniteError(ValueError):
    """NaN or Inf in the latents or pixels of a generation."""


class _FiniteChecks:
    """`isfinite` reductions queued on the device, read together by `settle`.

    Reading each one as it is made would make the host wait for the GPU at every UNet forward,
    which cost a GPU job a third of its throughput (bench/GPU_RESULTS.md). The images come out of
    VAE decodes, and the checks are settled after each decode, so no image made after a failed
    check is given out."""

    def __init__(self) -> None:
        self.unread: list[Any] = []  # the timestep vectors of the forwards not read yet
        self.forwards_read = 0
        self.step = 0  # the step of the last forward read
        self.last_vector: tuple | None = None  # its timesteps
        self.pending: list[tuple[str, int, Any]] = []  # (what, forwards by then, all-finite flag)

    def forward(self, t: Any) -> None:
        self.unread.append(t)

    def check(self, what: str, tensor: Any) -> None:
        import torch

        if torch.is_tensor(tensor):
            forwards = self.forwards_read + len(self.unread)
            self.pending.append((what, forwards, torch.isfinite(tensor).all()))

    def settle(self) -> None:
        """Read every queued check (one wait for the device); raise for the first that failed.
        A step counts the forwards whose timestep vector differs from the one before: for one row
        alone (how isolation.py retries a failed batch) that is the row's own sampler step."""
        import torch

        step_after = {self.forwards_read: self.step}  # forwards seen -> the step they reached
        for t in self.unread:
            vector = tuple(t.flatten().tolist())
            self.step += vector != self.last_vector
            self.last_vector = vector
            self.forwards_read += 1
            step_after[self.forwards_read] = self.step
        self.unread.clear()
        if not self.pending:
            return
        queued, self.pending = self.pending, []
        for (what, forwards, _), finite in zip(queued, torch.stack([flag for *_, flag in queued]).tolist()):
            if not finite:
                # latents going into a forward were made by the previous step's update
                step = step_after[forwards] - (what == "latents after it")
                raise NonFiniteError(f"non-finite values at step {step} ({what})")


def generate_finite(pipe: Any, requests: Iterable[Any], **settings: Any) -> Iterator[Any]:
    """`pipe.generate_stream(requests, **settings)`: (index, image, placement) per request as it
    finishes, raising NonFiniteError for the first non-finite latent or pixel before any image
    made after it is given out."""
    checks = _FiniteChecks()

    def unet_in(module, inputs):
        if len(inputs) > 1 and hasattr(inputs[1], "flatten"):
            checks.forward(inputs[1])
        checks.check("latents after it", inputs[0])  # step 0: the initial latents

    def unet_out(module, inputs, output):
        checks.check("UNet output", output)

    def decoder_in(module, inputs):
        checks.check("final latents", inputs[0])

    def decoder_out(module, inputs, output):
        checks.check("decoded pixels", output)
        checks.settle()

    handles = []
    unet, decoder = getattr(pipe, "unet", None), getattr(getattr(pipe, "vae", None), "decoder", None)
    if hasattr(unet, "register_forward_hook"):
        handles += [unet.register_forward_pre_hook(unet_in), unet.register_forward_hook(unet_out)]
    if hasattr(decoder, "register_forward_hook"):
        handles += [decoder.register_forward_pre_hook(decoder_in), decoder.register_forward_hook(decoder_out)]
    try:
        yield from pipe.generate_stream(requests, **settings)
        checks.settle()
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["NonFiniteError", "generate_finite"]
