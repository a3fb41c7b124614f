"""The columns of S handed to a Gram assembler, (m, b, c) with ``columns[a, i] = S_i[:, a]``: a tensor,
or an object that forms them on demand (``shape``, ``columns[a]`` (b, c), ``weighted(w)``, ``rows(jac)``;
:class:`revgn_ext.egn.sequence.PositionColumns`, whose dense form would be mostly zeros). The
assemblers read them only through ``columns[a]`` and the two functions here."""
from __future__ import annotations

import torch

__all__ = ["weighted_columns", "column_rows"]


def weighted_columns(columns, w: torch.Tensor) -> torch.Tensor:
    """sum_a w[i, a] columns[a, i] (b, c) for weights w (b, m)."""
    if isinstance(columns, torch.Tensor):
        return torch.einsum("ia,aic->ic", w, columns)
    return columns.weighted(w)


def column_rows(columns, jac: torch.Tensor) -> torch.Tensor:
    """S_i^T J_i (b, m, d) from per-sample Jacobians jac (b, c, d)."""
    if isinstance(columns, torch.Tensor):
        return torch.einsum("aik,ikd->iad", columns, jac)
    return columns.rows(jac)
