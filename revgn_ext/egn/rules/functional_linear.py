"""Linear calls seen by :class:`revgn_ext.egn.capture.LinearCapture` (``F.linear`` / ``@`` with a parameter,
wherever called: attention projections, hand-written layers).

A call y = x W_u^T + b_u with W_u = W[r0:r1] (or W[r0:r1]^T for a parameter stored (in, out), ``x @ W``)
has, per sample i, the gradient sum_t g_it x_it^T in rows r0..r1 of W (transposed for a parameter stored
(in, out)) and sum_t g_it in rows r0..r1 of the bias, where t runs over the call's rows of sample i (its
``layout``). A call on the whole weight stored (out, in) is ``nn.Linear``'s Kronecker form (X = the input
rows, X = ones for the bias); the others are given densely (zero outside the rows used), and several
calls of one parameter (the q, k, v blocks of ``in_proj_weight``) sum.
"""
from __future__ import annotations

import torch

from ..capture import LinearCall, to_samples
from .base import KronInput, Rule


class FunctionalLinearRule(Rule):
    types = (LinearCall,)

    def attrs(self, call):
        return (["weight"] if call.weight is not None else []) + (["bias"] if call.bias is not None else [])

    def obstacle(self, call):
        return None if call.layout is not None else "no sample axis found in the call's rows"

    def _bias_full(self, call):
        return call.bias is None or call.bias_rows == (0, call.bias.shape[0])

    def kron_inputs(self, call, inp):
        if not ((call.full or call.weight is None) and self._bias_full(call)):
            return {}
        X = self.samples(call, inp)
        out = {"weight": KronInput(X)} if call.weight is not None else {}
        if call.bias is not None:
            out["bias"] = KronInput(X.new_ones(X.shape[0], X.shape[1], 1))
        return out

    @staticmethod
    def samples(call, t):
        """(b, T, w) rows of ``t`` (the call's input, output or output gradient) grouped by sample."""
        return to_samples(t, call.layout, call.batch)

    def positions(self, call, g):
        return self.samples(call, g)

    def per_sample(self, call, inp, g, attrs):
        X, G = self.samples(call, inp), self.samples(call, g)
        b = X.shape[0]
        out = {}
        if "weight" in attrs:
            W = call.weight
            r0, r1 = call.rows
            grad = torch.einsum("btq,btp->bqp", G, X)                     # (b, out, in) of W_u
            if call.full:
                out["weight"] = grad
            else:
                full = grad.new_zeros(b, *W.shape)
                full[:, r0:r1] = grad.transpose(1, 2) if call.transposed else grad
                out["weight"] = full
        if "bias" in attrs:
            r0, r1 = call.bias_rows
            if (r0, r1) == (0, call.bias.shape[0]):
                out["bias"] = G.sum(1)
            else:
                full = G.new_zeros(b, *call.bias.shape)
                full[:, r0:r1] = G.sum(1)
                out["bias"] = full
        return out

    def dense_former(self, call, inp, attrs, kron):
        """Per-sample gradients of the rows the call uses only: {attr: (b, r1 - r0, ...)}, rows r0..r1 of
        the parameter as stored ((in, out) for ``x @ W``: G^T X transposed)."""
        X = self.samples(call, inp)
        spec = "btq,btp->bpq" if call.transposed else "btq,btp->bqp"

        def former(g):
            G = self.samples(call, g)
            out = {}
            if "weight" in attrs:
                out["weight"] = torch.einsum(spec, G, X)
            if "bias" in attrs:
                out["bias"] = G.sum(1)
            return out
        return former


def linear_call_rows(f: torch.Tensor, calls, columns: torch.Tensor) -> dict:
    """{id(param): V_p (b, m, d_p)}: per-sample gradients of the output columns S^T f from the calls
    (every call must have a layout), summed over the calls of each parameter. columns: (m, b, c)."""
    rule = FunctionalLinearRule()
    m, b, _ = columns.shape
    rows: dict[int, torch.Tensor] = {}
    outs = [c.out for c in calls]
    for a in range(m):
        grads = torch.autograd.grad(f, outs, grad_outputs=columns[a], retain_graph=True, allow_unused=True)
        for call, g in zip(calls, grads):
            if g is None:
                continue
            for attr, V in rule.per_sample(call, call.inp, g, rule.attrs(call)).items():
                p = getattr(call, attr)
                acc = rows.setdefault(id(p), f.new_zeros(b, m, p.numel()))
                acc[:, a] += V.reshape(b, -1)
    return rows
