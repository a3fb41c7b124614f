"""The factor of EGN's damped Gram K + b lambda I, with the failure policy of the factor op
(:func:`revgn_ext.ops.gram.gram_factor_from_gram`: pivot floor, jitter retries, non-finite entries).

On the CPU, for systems of at most PLAIN_MAX_ROWS rows, a plain LAPACK factor (``torch.linalg.cholesky_ex``)
with a summary that the step reads in its one host sync and judges with exactly the op's policy
(:func:`clean`); only a factor that fails it goes to the op. Elsewhere, and for larger systems (where the
plain factor's n x n copy would count against one Gram in memory), the op itself, in place
(:func:`revgn_ext.ops.gram.gram_factor_from_gram_inplace_unchecked`: K's lower triangle becomes L, its
strict upper keeps K for the retries), deciding its retries on the device.
"""
from __future__ import annotations

import math
import struct

import torch

from ..ops.gram import PIVOT_FLOOR, gram_factor_from_gram_inplace_unchecked

__all__ = ["PLAIN_FACTOR_DEVICES", "PLAIN_MAX_ROWS", "plain_factor", "plain_cholesky", "factor_op", "clean"]

PLAIN_FACTOR_DEVICES = ("cpu",)   # where a plain LAPACK factor beats the factor op (see plain_cholesky)
PLAIN_MAX_ROWS = 2048             # above it the in-place op: no n x n copy (16 MiB in float32 here)


def plain_factor(damped: torch.Tensor) -> bool:
    """Whether the step factors ``damped`` with :func:`plain_cholesky` first (a copy) or the op in place."""
    return damped.device.type in PLAIN_FACTOR_DEVICES and damped.shape[0] <= PLAIN_MAX_ROWS


def plain_cholesky(damped: torch.Tensor):
    """(L, summary): the Cholesky factor of the damped Gram, and (LAPACK status, mean diagonal, the
    smallest L_jj^2, sum of the entries and pivots) for :func:`clean`, without a host sync."""
    L, status = torch.linalg.cholesky_ex(damped)
    pivots = L.diagonal()
    summary = [status.to(damped.dtype), damped.diagonal().mean(), (pivots * pivots).amin(),
               damped.sum() + pivots.sum()]
    return L, torch.stack(summary)


def factor_op(damped: torch.Tensor, mu: float):
    """(L, [retries, jitter], mu + jitter) from the factor op, in place: ``damped``'s lower triangle
    becomes L (read it with :func:`revgn_ext.ops.gram.cholesky_solve_lower`), its strict upper keeps K.
    The op decides its jitter retries on the device (no host sync here)."""
    chol = gram_factor_from_gram_inplace_unchecked(damped[None], damped.new_zeros(1))
    jitter = chol.jitter.reshape(())
    return chol.L[0], torch.stack([chol.info.reshape(()).to(jitter.dtype), jitter]), mu + jitter


def _rounded(value: float, dtype) -> float:
    """``value`` rounded to ``dtype`` as torch rounds (float32 by struct, without a tensor)."""
    if dtype == torch.float32 and abs(value) <= _FLOAT32_MAX:
        return struct.unpack("f", struct.pack("f", value))[0]
    return torch.tensor(value, dtype=torch.float64).to(dtype).item()


_FLOAT32_MAX = torch.finfo(torch.float32).max


def clean(summary, dtype) -> bool:
    """True exactly when :func:`revgn_ext.ops.gram.gram_factor_from_gram` would accept the plain factor
    without a retry: LAPACK succeeded, every pivot L_jj^2 above its floor PIVOT_FLOOR * eps * scale
    (computed in double and rounded to the dtype, as there), every entry and pivot finite (a non-finite
    one makes the sum inf or NaN)."""
    status, scale, smallest, total = summary
    scale = abs(scale)
    floor = scale * (PIVOT_FLOOR * torch.finfo(dtype).eps)
    if dtype != torch.float64:
        floor = _rounded(floor, dtype)
    return status == 0 and scale > 0 and math.isfinite(total) and smallest > floor
