"""What one EGN solve hands on to the rest of the step: :class:`Solution`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .loss_factors import LossFactor

__all__ = ["Solution", "push_through_terms", "woodbury_terms"]


@dataclass
class Solution:
    """One solve on a batch: the pre-step loss, the LM direction and the quadratic model's terms.

    ``b`` is the global batch size; ``direction`` is None when the loss, the Gram or its factor is not
    finite. With dir the direction, S^T J dir = -``Ku`` (b, m) and g^T dir = -``tKu`` / b, formed on
    first use (only the line search and the damping update read them) by ``terms``.
    """
    f: torch.Tensor                   # (b_r, c) outputs of this rank's samples, with their graph
    y: torch.Tensor                   # the targets in the loss factor's form
    factor: LossFactor
    b: int
    loss: torch.Tensor                # L at the current parameters (global mean)
    time: dict = field(default_factory=dict)
    direction: list | None = None
    retries: int = 0                  # Cholesky jitter retries (negative: the Gram was not finite)
    jitter: float = 0.0
    norm: float | None = None         # ||direction||, read with the solve's verdicts
    loss_value: float | None = None   # float(loss), likewise
    terms: Callable | None = None     # () -> (Ku, tKu, doubtful) of the last back-projection
    layout: Any = None                # per-position losses: the kept positions (sequence.Layout), else None
    _model: tuple | None = field(default=None, repr=False)

    def set_terms(self, terms: Callable) -> None:
        self.terms, self._model = terms, None

    def _formed(self) -> tuple:
        if self._model is None:
            self._model = self.terms()
        return self._model

    @property
    def Ku(self) -> torch.Tensor | None:
        return None if self.terms is None else self._formed()[0]

    @property
    def tKu(self) -> torch.Tensor | None:
        return None if self.terms is None else self._formed()[1]

    @property
    def doubtful(self) -> torch.Tensor | None:
        """True (a 0-dim tensor) where Ku and tKu may have lost more than half their digits."""
        return None if self.terms is None else self._formed()[2]


def push_through_terms(t, u, mu):
    """(K u, t^T K u, doubtful) with K u = t - mu u; doubtful where that difference may have lost more
    than half the digits (a confidently wrong sample makes t_i ~ 1/sqrt(p_i) large)."""
    Ku = t - mu * u
    tKu = (t * Ku).sum()
    eps = torch.finfo(t.dtype).eps
    slop = eps * (t.abs() + mu * u.abs())   # the rounding bound of each entry of K u
    doubtful = ((t.abs() * slop).sum() > eps ** 0.5 * tKu.abs()) | \
        (2 * (Ku.abs() * slop).sum() > eps ** 0.5 * Ku.square().sum())
    return Ku, tKu, doubtful


def woodbury_terms(rhs, u, gg, mu, lam, b, top):
    """The quadratic model's terms of a Woodbury solve (K + mu I) u = A g, A = S^T J, dir = -(g - A^T u) /
    lambda: (Ku, tKu, doubtful) in :class:`Solution`'s sense, S^T J dir = -mu u / lambda and g^T dir =
    -(g.g - (A g).u) / lambda.

    doubtful where either may have lost more than half its digits: g.g - (A g).u cancels when g lies
    almost in A's row space and lambda is small; mu u carries the solve's residual, up to about
    eps ||K + mu I|| ||u|| (``top``: the largest diagonal entry of K + mu I, a 0-dim tensor)."""
    gu = rhs * u
    diff = gg - gu.sum()
    eps = torch.finfo(u.dtype).eps
    doubtful = (eps * (gg + gu.abs().sum()) > eps ** 0.5 * diff.abs()) | (eps * top > eps ** 0.5 * mu)
    return mu / lam * u, b / lam * diff, doubtful
