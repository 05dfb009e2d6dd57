"""Copies between the host and a CUDA device that do not make the host wait for the device.

To the device: `tensor.to("cuda")` from host memory waits for everything queued on the stream
before it returns, so each such copy drained the GPU's queue and whatever the host did next ran
with the GPU idle. `to_device` queues it instead (`non_blocking=True`): from ordinary (pageable)
memory CUDA first copies the bytes into a staging buffer of its own and returns, so the caller
may reuse the tensor at once. Not through `pin_memory()`: that allocates page-locked memory per
call (`cudaHostAlloc`, under a driver-wide lock), and PyTorch's pinned-memory cache only reuses a
block once every copy queued before it has run — with the host ahead of the GPU, nearly every
call allocated afresh, and a job's launching thread spent a third of its time there
(bench/GPU_RESULTS.md, run 10).

To the host: `HostCopy(tensor)` queues the copy into page-locked memory and records an event;
`result()` waits for that copy only, not for the work queued after it, so the host can read a
decode's pixels while the next UNet forwards run.

The values are the same either way; off CUDA both are plain copies. `ASYNC_COPIES = False`
restores the waiting copies (for an A/B in the benchmarks).
"""

from __future__ import annotations

import torch

ASYNC_COPIES = True


def compute_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device that can hold and compute a model's tensors; ValueError naming
    it otherwise: not a device name, `meta` (shapes without data: a pipeline there cannot
    generate), CUDA where this torch has none, or any other device that cannot run one small
    tensor op and give its result back to the host (an absent accelerator, a GPU index past the
    last one)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r}: not a torch device ({exc})") from None
    if device.type == "meta":
        raise ValueError(
            "device meta: tensors there have shapes but no data, so a pipeline cannot generate on it; "
            "load on a compute device (cpu, cuda, ...)"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: this torch has no CUDA device (torch.cuda.is_available() is False)")
    if device.type != "cpu":
        try:
            works = torch.ones(1, device=device).add(1).cpu().item() == 2.0
        except Exception as exc:  # noqa: BLE001 - each backend fails its own way (RuntimeError, NotImplementedError, ...)
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise ValueError(f"device {device}: cannot compute there ({type(exc).__name__}: {first})") from None
        if not works:
            raise ValueError(f"device {device}: a test addition there gave a wrong result")
    return device


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor.to(device, dtype)`, queued without waiting where `tensor` is on the host and
    `device` is a CUDA device. The caller may reuse `tensor` at once."""
    device = torch.device(device)
    if ASYNC_COPIES and device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.to(device, dtype, non_blocking=True)
    return tensor.to(device, dtype)


class HostCopy:
    """A device tensor's copy to the host, queued on the current stream; `result()` is the host
    tensor, once that copy is done (work queued after it is not waited for)."""

    def __init__(self, tensor: torch.Tensor):
        self._event = None
        if ASYNC_COPIES and tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.cpu()

    def result(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host


__all__ = ["ASYNC_COPIES", "HostCopy", "compute_device", "to_device"]
