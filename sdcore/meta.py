"""Shape-only modules on the meta device, without the meta kernels' one-off import cost.

`with torch.device("meta"):` builds a model with no memory and no initialisation, but two of the
meta ops that takes run as Python decompositions whose first call in a process imports much of
torch's compiler stack: `normal_` (nn.Embedding's `reset_parameters`) imports torch._dynamo and
sympy (1.5-2.5 s), `empty_like` (`Module.to_empty`) the symbolic-shapes module and sympy (~0.7 s).
Every process that loads a model pays them once (each Ray worker, each dry run). Here:

- `on_meta()`: `torch.device("meta")` with `normal_` on a meta tensor returning it unchanged (a
  meta tensor has no data to fill);
- `to_empty(module, device)`: `module.to_empty(device=device)` with each meta tensor's
  `empty_like` made by `torch.empty_strided` (same size, strides and dtype: what `empty_like`
  gives a meta tensor).

Every other op, and both ops on real tensors, run as usual.
"""

from __future__ import annotations

import torch

_NORMAL = (torch.nn.init.normal_, torch.Tensor.normal_)


def _first_tensor(args, kwargs, name):
    return args[0] if args else kwargs.get(name)


class _NoRandomInitOnMeta(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NORMAL:
            tensor = _first_tensor(args, kwargs, "tensor")  # nn.init.normal_ passes it by name
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


class _EmptyFromMeta(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty_like:
            tensor = _first_tensor(args, kwargs, "input")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta and set(kwargs) <= {"input", "device"}:
                device = kwargs.get("device", tensor.device)
                return torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=device)
        return func(*args, **kwargs)


class on_meta:
    """`with on_meta():` as `with torch.device("meta"):`, without `normal_`'s import cost."""

    def __enter__(self):
        self._device, self._mode = torch.device("meta"), _NoRandomInitOnMeta()
        self._device.__enter__()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        return self._device.__exit__(*exc)


def to_empty(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """`module.to_empty(device=device)`, without `empty_like`'s import cost on meta tensors."""
    with _EmptyFromMeta():
        return module.to_empty(device=device)
