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

from torch import nn

from .base import KronInput, Rule, kron_per_sample
from .conv import ConvRule
from .embedding import EmbeddingRule
from .linear import LinearRule
from .norm import NormRule

__all__ = ["Rule", "KronInput", "kron_per_sample", "rule_for", "RULES"]

RULES: list[Rule] = [LinearRule(), ConvRule(), EmbeddingRule(), NormRule()]


def rule_for(module: nn.Module) -> Rule | None:
    for rule in RULES:
        if type(module) in rule.types:
            return rule
    return None
