"""The base of every layer rule: :class:`Rule` (what a layer type tells the layer-wise Gram) and
:class:`KronInput` (the input side of a Kronecker-form per-sample gradient); see :mod:`revgn_ext.egn.rules`
for the two forms a rule gives."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["Rule", "KronInput", "kron_per_sample"]


class KronInput(NamedTuple):
    """The input side of a Kronecker-form gradient: features X (b, T, p), or token ids (b, T) with
    p = ``vocab`` (id -1: the position contributes nothing). The gradient sum_t G_t (x) X_t is (q, p)
    for features, reshaped to the parameter; for ids it is (q, vocab), transposed to (vocab, q)."""
    X: torch.Tensor
    vocab: int | None = None

    @property
    def kind(self) -> str:
        return "features" if self.vocab is None else "ids"

    @property
    def width(self) -> int:
        return self.X.shape[2] if self.vocab is None else self.vocab


class Rule:
    """One layer type. Subclasses set ``types`` and override what applies."""
    types: tuple = ()

    def attrs(self, module: nn.Module) -> list[str]:
        """Names of the parameters the rule covers (those that are not None)."""
        return [a for a in ("weight", "bias") if isinstance(getattr(module, a, None), nn.Parameter)]

    def obstacle(self, module: nn.Module) -> str | None:
        """Why this module's configuration is not covered (None: covered)."""
        return None

    def kron_inputs(self, module: nn.Module, inp: torch.Tensor) -> dict[str, KronInput]:
        """Kronecker-form inputs of the parameters that admit one."""
        return {}

    def positions(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        """The output gradient g as (b, T, q), matching :meth:`kron_inputs`' positions."""
        raise NotImplementedError

    def per_sample(self, module: nn.Module, inp: torch.Tensor, g: torch.Tensor, attrs) -> dict[str, torch.Tensor]:
        """Per-sample gradients (b, *shape) of ``attrs``; defaults to the Kronecker form contracted."""
        kron = self.kron_inputs(module, inp)
        G = self.positions(module, g)
        return {a: kron_per_sample(kron[a], G, getattr(module, a).shape) for a in attrs}

    def dense_former(self, module: nn.Module, inp: torch.Tensor, attrs, kron: dict):
        """``g -> {attr: per-sample gradient (b, *shape)}`` for one use's ``attrs``, called once per output
        column of a solve: what depends on the input alone is computed once, here. ``kron``: the use's
        :meth:`kron_inputs`. Default: the Kronecker form contracted where there is one, else
        :meth:`per_sample`."""
        with_kron = [a for a in attrs if a in kron]
        rest = [a for a in attrs if a not in kron]

        def former(g):
            out = {}
            if with_kron:
                G = self.positions(module, g)
                out.update({a: kron_per_sample(kron[a], G, getattr(module, a).shape) for a in with_kron})
            if rest:
                out.update(self.per_sample(module, inp, g, rest))
            return out
        return former


def kron_per_sample(k: KronInput, G: torch.Tensor, shape) -> torch.Tensor:
    """sum_t G[i, t] (x) X[i, t] per sample, in the parameter's shape. G: (b, T, q)."""
    b = G.shape[0]
    if k.kind == "features":
        return torch.einsum("btq,btp->bqp", G, k.X).reshape(b, *shape)
    out = G.new_zeros(b, k.vocab + 1, G.shape[2])   # row `vocab` collects the ids -1 (no contribution)
    ids = torch.where(k.X < 0, k.vocab, k.X)
    out.scatter_add_(1, ids[:, :, None].expand(-1, -1, G.shape[2]), G)
    return out[:, :k.vocab].reshape(b, *shape)
