"""Argument validation shared by the ops and the optimizers.

Every check raises ``ValueError`` that names the offending argument, before anything is computed or
written, so a bad call never leaves partial state behind.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def all_finite(tensors) -> bool:
    """Every entry of every tensor finite, in one host sync.

    A sum is finite whenever every entry is (a NaN or Inf entry makes it NaN or Inf), so the sums of all
    tensors are read first; only a non-finite sum, from a bad entry or an overflow of finite ones, falls
    back to the exact ``isfinite`` test. On the CPU ``isfinite(t).all()`` and the max-norm cost about 30x
    a sum (0.7-0.8 ms against 0.014 ms for 256k float32 entries, 1 thread).
    """
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    with torch.no_grad():   # a check, not part of any graph
        sums = torch.stack([t.sum().to(torch.float64) for t in tensors])
        if bool(torch.isfinite(sums).all()):
            return True
        return all(bool(torch.isfinite(t).all()) for t in tensors)


def check_tensor(name: str, t, ndim: int | None = None, float_only: bool = True,
                 finite: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32 or float64, got {t.dtype}")
    if finite and t.is_floating_point() and not all_finite([t]):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """All tensors share dtype and device; the message names the first one that differs."""
    ref_name, ref = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name} has size {t.shape[dim]} in dimension {dim}, expected {expected} ({what}); "
                         f"got shape {tuple(t.shape)}")


def check_number(name: str, value, low=None, high=None, low_open: bool = False, high_open: bool = False) -> None:
    """A finite real (not a bool) within [low, high]; ``*_open`` excludes that end."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
