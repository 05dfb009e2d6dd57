"""Numerical faults: NaN or Inf in a row's latents or decoded pixels makes that row an error
record ("non-finite values at step k"), never a saved image.

`generate_finite(pipe, requests, **settings)` is `pipe.generate_stream` with forward hooks on the
UNet (its input latents and its output, per forward) and on the VAE decoder (final latents and
pixels). A non-finite tensor raises `NonFiniteError`, a `ValueError`: `isolation.py` treats it as
the row's own problem, so a batch that hits it is retried row by row and only the poisoned row
becomes an error record. The hooks live here, not in sdcore, and cost one `isfinite` reduction
per tensor, read when a decode's images are given out rather than at each forward. The step
named in the message counts UNet forwards: for one row alone (how `isolation.py` retries a
failed batch, which is what ends up in the error record) that is the row's own sampler step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any


class NonFiniteError(ValueError):
    """NaN or Inf in the latents or pixels of a generation."""


class _FiniteChecks:
    """`isfinite` reductions queued on the device, read when the images made after them are
    given out.

    Reading each one as it is made would make the host wait for the GPU at every UNet forward,
    which cost a GPU job a third of its throughput (bench/GPU_RESULTS.md). Instead each VAE
    decode closes a batch of checks (`mark`: the flags and the forwards' timesteps since the
    last decode, sent to the host in one queued copy each), and `settle`, called before an image
    is given out, reads the batches closed so far. The pipeline gives a decode's images out a
    few UNet forwards after queuing it (sdcore.pipeline._Decoder), so those reads wait for
    nothing the GPU has not long finished; and no image made after a failed check is given out."""

    def __init__(self) -> None:
        self.unread: list[Any] = []  # the timestep vectors of the forwards since the last mark
        self.pending: list[tuple[str, int, Any]] = []  # (what, forwards by then, all-finite flag)
        self.marked: deque[tuple[list[tuple[str, int]], list[int], Any, Any]] = deque()
        self.forwards = 0  # forwards seen
        self.forwards_read = 0
        self.step = 0  # the step of the last forward read
        self.last_vector: tuple | None = None  # its timesteps

    def forward(self, t: Any) -> None:
        self.unread.append(t)
        self.forwards += 1

    def check(self, what: str, tensor: Any) -> None:
        import torch

        if torch.is_tensor(tensor):
            self.pending.append((what, self.forwards, torch.isfinite(tensor).all()))

    def mark(self) -> None:
        """Close the checks and forwards so far into one batch, on its way to the host."""
        import torch

        from sdcore.devices import HostCopy

        if not (self.pending or self.unread):
            return
        flags = HostCopy(torch.stack([flag for *_, flag in self.pending])) if self.pending else None
        sizes = [t.numel() for t in self.unread]
        times = HostCopy(torch.cat([t.flatten().float() for t in self.unread])) if self.unread else None
        self.marked.append(([(what, forwards) for what, forwards, _ in self.pending], sizes, flags, times))
        self.pending, self.unread = [], []

    def settle(self, everything: bool = False) -> None:
        """Read the batches closed so far (`everything`: close the open one first); raise for the
        first check that failed. A step counts the forwards whose timestep vector differs from
        the one before: for one row alone (how isolation.py retries a failed batch) that is the
        row's own sampler step."""
        if everything:
            self.mark()
        while self.marked:
            checks, sizes, flags, times = self.marked.popleft()
            step_after = {self.forwards_read: self.step}  # forwards seen -> the step they reached
            values = times.result().tolist() if times is not None else []
            for size in sizes:
                vector, values = tuple(values[:size]), values[size:]
                self.step += vector != self.last_vector
                self.last_vector = vector
                self.forwards_read += 1
                step_after[self.forwards_read] = self.step
            finite = flags.result().tolist() if flags is not None else []
            for (what, forwards), ok in zip(checks, finite):
                if not ok:
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
        checks.mark()

    handles = []
    unet, decoder = getattr(pipe, "unet", None), getattr(getattr(pipe, "vae", None), "decoder", None)
    if hasattr(unet, "register_forward_hook"):
        handles += [unet.register_forward_pre_hook(unet_in), unet.register_forward_hook(unet_out)]
    if hasattr(decoder, "register_forward_hook"):
        handles += [decoder.register_forward_pre_hook(decoder_in), decoder.register_forward_hook(decoder_out)]
    try:
        for item in pipe.generate_stream(requests, **settings):
            checks.settle()  # every check up to the decode this image came from
            yield item
        checks.settle(everything=True)
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["NonFiniteError", "generate_finite"]
