"""EGN's writes to the parameters: the finiteness check before an update and the fused update."""
from __future__ import annotations

import torch

from .._checks import all_finite

__all__ = ["all_finite", "set_params"]


def set_params(params, base, direction, alpha: float) -> None:
    """w = base + alpha d, in place."""
    with torch.no_grad():   # fused over the parameters: two calls
        torch._foreach_copy_(params, base)
        torch._foreach_add_(params, direction, alpha=alpha)
