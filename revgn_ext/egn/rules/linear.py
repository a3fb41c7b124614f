"""``nn.Linear`` on inputs of any rank (b, ..., in): every position t shares the weight, so the
per-sample gradient is sum_t g_t x_t^T for the weight and sum_t g_t for the bias (Kronecker form with
X = the input rows, and X = ones for the bias)."""
from __future__ import annotations

import torch
from torch import nn

from .base import KronInput, Rule


class LinearRule(Rule):
    types = (nn.Linear,)

    def kron_inputs(self, module, inp):
        b = inp.shape[0]
        X = inp.reshape(b, -1, inp.shape[-1])
        out = {"weight": KronInput(X)}
        if module.bias is not None:
            out["bias"] = KronInput(X.new_ones(b, X.shape[1], 1))
        return out

    def positions(self, module, g):
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def dense_former(self, module, inp, attrs, kron):
        X = inp.reshape(inp.shape[0], -1, inp.shape[-1])

        def former(g):
            G = g.reshape(g.shape[0], -1, g.shape[-1])
            out = {}
            if "weight" in attrs:
                out["weight"] = torch.einsum("btq,btp->bqp", G, X)
            if "bias" in attrs:
                out["bias"] = G.sum(1)
            return out
        return former
