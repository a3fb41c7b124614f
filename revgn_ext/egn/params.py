"""EGN's writes to the parameters: the finiteness check before an update and the fused update."""
from __future__ import annotations

import torch

__all__ = ["all_finite_owned", "set_params"]


def all_finite_owned(tensors) -> bool:
    """:func:`revgn_ext._checks.all_finite` for tensors the caller owns and may write (the update's new
    values): one fused check (torch's loss-scaling check, which multiplies them by 1 in place: no value
    changes), one host sync."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return True
    device = tensors[0].device
    found = torch.zeros(1, dtype=torch.float32, device=device)   # the op's flag and scale are float32
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, dtype=torch.float32, device=device))
    return not bool(found)


def set_params(params, base, direction, alpha: float) -> None:
    """w = base + alpha d, in place."""
    with torch.no_grad():   # fused over the parameters: two calls
        torch._foreach_copy_(params, base)
        torch._foreach_add_(params, direction, alpha=alpha)
