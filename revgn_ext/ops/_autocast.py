"""The ops' precision under ``torch.autocast``: they run in float32 (float64 stays float64).

The Gram-Cholesky ops need float32 at least (a bf16 Gram loses its positive definiteness), and the
coupling block mixes inputs from autocast regions (bf16) with float32 weights. So both the compiled
ops (:func:`register`, through ``torch.library.register_autocast``) and the public Python wrappers
(:func:`float32_under_autocast`, which covers the reference path too) cast their floating inputs to
float32 and run with autocast off. The two backends therefore return the same dtypes and values under
autocast.
"""
from __future__ import annotations

import functools

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")


def _cast(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.float()
    return value


def float32_under_autocast(fn):
    """Run ``fn`` with its floating tensor arguments in float32 and autocast off, when autocast is on
    for the device of its first tensor argument; otherwise call it unchanged."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or first.device.type not in AUTOCAST_DEVICES \
                or not torch.is_autocast_enabled(first.device.type):
            return fn(*args, **kwargs)
        with torch.autocast(first.device.type, enabled=False):
            return fn(*map(_cast, args), **{k: _cast(v) for k, v in kwargs.items()})
    return wrapper


def register(*ops: str) -> None:
    """``torch.library.register_autocast`` to float32 on CPU and CUDA for each op ("revgn::name")."""
    for op in ops:
        for device in AUTOCAST_DEVICES:
            if torch.amp.is_autocast_available(device):
                torch.library.register_autocast(op, device, torch.float32)
