"""EGN's writes to the parameters: the finiteness check before an update and the fused update."""
from __future__ import annotations

import math

import torch

__all__ = ["all_finite", "set_params"]


def all_finite(tensors) -> bool:
    """Every entry of every tensor finite: the max-norms (which cannot overflow, and are NaN or inf
    exactly when an entry is) of all tensors in one fused call, one host sync."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, ord=math.inf))).all())


def set_params(params, base, direction, alpha: float) -> None:
    """w = base + alpha d, in place."""
    with torch.no_grad():   # fused over the parameters: two calls
        torch._foreach_copy_(params, base)
        torch._foreach_add_(params, direction, alpha=alpha)
