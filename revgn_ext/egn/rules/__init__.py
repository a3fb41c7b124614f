"""Layer rules of the layer-wise Gram: the per-sample gradient structure of one layer type each.

A rule sees one *use* of a module (one call in the forward: its input and the gradient g of one output
column of S^T f with respect to the module's output) and gives, for each parameter it covers, the
per-sample gradient of that column, in one of two forms:

* **Kronecker form** (:meth:`Rule.kron_inputs`, :meth:`Rule.positions`): the per-sample gradient is
  ``sum_t G[i, t] (x) X[i, t]`` over positions t (sequence positions, conv patches), with X the layer's
  input features at each position (or token ids, for an embedding) and G[i, t] (q,) the output gradient
  there. The Gram of such a parameter is ``sum_{t,s} (x_it . x_js)(g_iat . g_jbs)``, formed without
  the per-sample gradients (for one position: the Hadamard product of two small kernels).
* **dense form** (:meth:`Rule.per_sample`): the per-sample gradient itself, (b, *param.shape), for
  parameters whose gradient is not an outer product (norm affines, grouped convolutions, biases).

Files: :mod:`.linear` (``nn.Linear`` on inputs of any rank), :mod:`.conv` (``nn.Conv1d``/``nn.Conv2d``
through unfolded patches), :mod:`.norm` (LayerNorm, GroupNorm, RMSNorm, BatchNorm in eval mode),
:mod:`.embedding` (``nn.Embedding``). :func:`rule_for` picks the rule of a module, or None.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["Rule", "KronInput", "rule_for", "RULES"]


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


def kron_per_sample(k: KronInput, G: torch.Tensor, shape) -> torch.Tensor:
    """sum_t G[i, t] (x) X[i, t] per sample, in the parameter's shape. G: (b, T, q)."""
    b = G.shape[0]
    if k.kind == "features":
        return torch.einsum("btq,btp->bqp", G, k.X).reshape(b, *shape)
    out = G.new_zeros(b, k.vocab + 1, G.shape[2])   # row `vocab` collects the ids -1 (no contribution)
    ids = torch.where(k.X < 0, k.vocab, k.X)
    out.scatter_add_(1, ids[:, :, None].expand(-1, -1, G.shape[2]), G)
    return out[:, :k.vocab].reshape(b, *shape)


from .conv import ConvRule          # noqa: E402
from .embedding import EmbeddingRule  # noqa: E402
from .linear import LinearRule      # noqa: E402
from .norm import NormRule          # noqa: E402

RULES: list[Rule] = [LinearRule(), ConvRule(), EmbeddingRule(), NormRule()]


def rule_for(module: nn.Module) -> Rule | None:
    for rule in RULES:
        if type(module) in rule.types:
            return rule
    return None
