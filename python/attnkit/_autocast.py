"""Autocast for attnkit's drop-ins, which torch's autocast does not see: the ops are custom
ops (and eager calls skip even those), so each drop-in casts its inputs itself, as autocast
casts those of the torch op it replaces, and runs its kernels with autocast off, in one dtype."""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch


def lower_precision_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast gives ops on its lower-precision list (F.linear, SDPA) on
    `device_type`, or None where autocast is off there."""
    if not torch._C._is_any_autocast_enabled():  # the common case, in one call (~0.2 us)
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def cast_floating(dtype: Optional[torch.dtype], tensors: Iterable) -> list:
    """`tensors` (None kept) in `dtype` as autocast casts: floating ones but float64,
    by a differentiable copy, so gradients reach float32 parameters; as they are when
    dtype is None."""
    if dtype is None:
        return list(tensors)
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in tensors]


def off(device_type: str, active: bool):
    """Autocast off for `device_type` inside the block where `active`, else nothing."""
    return torch.autocast(device_type, enabled=False) if active else contextlib.nullcontext()


def without_autocast(device_type: str, kernel, *args):
    """kernel(*args) with autocast off for `device_type`: a backend's ATen matmuls (the
    plain-PyTorch reference's above all) would otherwise take some operands in the autocast
    dtype, and a kernel runs one dtype throughout (the drop-ins cast to torch's autocast dtype first)."""
    if not torch._C._is_any_autocast_enabled():
        return kernel(*args)
    with torch.autocast(device_type, enabled=False):
        return kernel(*args)


def run_without_autocast(kernel, *args):
    """without_autocast for the device of args[0] (the RNN and additive-attention kernels' input).
    Autocast checked first: the device lookup and a second call level cost ~1 us of a call."""
    if not torch._C._is_any_autocast_enabled():
        return kernel(*args)
    return without_autocast(args[0].device.type, kernel, *args)
