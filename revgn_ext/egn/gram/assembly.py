"""What one call of a Gram assembler returns, and the call's contract.

``assembler.assemble(x, system, ranks)`` is the whole exchange between an optimizer and an assembler
for one solve:

1. the assembler hands ``system`` a ``forward`` function (the model on x, with whatever recording the
   assembler needs); ``system(forward)`` runs the caller's checks around that forward, forms the loss
   factor and returns ``(columns, payload)``: ``columns`` (m, b, c) with ``columns[a, i] = S_i[:, a]``
   (a tensor, or formed column by column on demand: :mod:`.columns`),
   or None when no Gram is needed (a non-finite loss), and anything the caller wants back;
2. the assembler forms K = S^T J J^T S (rows of every rank of ``ranks`` gathered: rank, then sample,
   then output), verifying its layer rules;
3. it returns one :class:`Assembly`: the outputs f (with their autograd graph, for the caller's VJP),
   the caller's payload, K, and the factors that the step's back-projection J^T S u can be checked
   against (:meth:`Assembly.disagreement`).

Nothing of one call is kept for the next: the assembler remembers only which parameters take the
torch.func route and which call patterns its random-weight check has passed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .verification import disagreement

__all__ = ["Assembly"]


@dataclass
class Assembly:
    f: torch.Tensor                      # (b, c) outputs of this rank's samples, with their graph
    payload: Any                         # what the caller's ``system`` returned beside the columns
    gram: torch.Tensor | None = None     # K (n, n), n = total b * m; None: no columns were given
    params: list = field(default_factory=list)
    checked: list = field(default_factory=list)   # the rules' factors (global rows), for the direction check
    rows: list | None = None   # every factor of K (rules' and torch.func's); None: the assembler keeps none

    def apply(self, v) -> torch.Tensor | None:
        """A v = S^T J v (total b, m) from the factors of K, for v one tensor per parameter of ``params``
        (the rows of K, so as trustworthy as K, which the direction check covers); None without factors."""
        if not self.rows:
            return None
        by_id = {id(p): t for p, t in zip(self.params, v)}
        out = self.rows[0].apply(by_id)
        for factor in self.rows[1:]:
            out += factor.apply(by_id)
        return out

    def disagreement(self, u: torch.Tensor, products, norms=None, slack=None):
        """(ids, flags): per parameter with a rule factor, whether that factor disagrees with autograd's
        back-projection ``products`` = J^T S u (one tensor per parameter, summed over ranks; ``norms``
        their 2-norms where the caller has them; ``slack`` per-parameter norms that ``products`` carry
        rounding of, where they were formed as a difference); u (total b, m). A bool tensor, read by
        the caller with its other values (no host sync here)."""
        return disagreement(self.checked, self.params, u, products, norms, slack)
