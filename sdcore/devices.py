"""Host-to-device copies that do not make the host wait for the device.

`tensor.to("cuda")` from ordinary (pageable) host memory waits for everything queued on the
stream before it returns. The pipeline makes a few such copies per UNet forward (the rows'
timesteps, fresh noise, an init image): each one drained the GPU's queue, so whatever the host
did next (a job's bookkeeping, the next forward's launches) ran with the GPU idle. From pinned
memory the copy is queued like a kernel and the host runs on. The values copied are the same,
so nothing changes in the results; off CUDA it is a plain `.to`.

`ASYNC_COPIES = False` restores the waiting copies (for an A/B in the benchmarks).
"""

from __future__ import annotations

import torch

ASYNC_COPIES = True


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor.to(device, dtype)`, queued without waiting where `tensor` is on the host and
    `device` is a CUDA device. The caller may reuse `tensor` at once: the copy reads a pinned
    duplicate, which PyTorch's pinned-memory cache keeps until the copy has run."""
    device = torch.device(device)
    if ASYNC_COPIES and device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, dtype, non_blocking=True)
    return tensor.to(device, dtype)
