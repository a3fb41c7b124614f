"""``nn.Embedding`` on token ids of any shape (b, ...): the per-sample weight gradient puts g_it into
row id_it, i.e. sum_t onehot(id_it) g_it^T, the Kronecker form with the input kernel
(x_it . x_js) = [id_it = id_js] (ids equal to ``padding_idx`` contribute nothing, as in torch).
``max_norm`` (renormalises the weight inside the forward) and ``scale_grad_by_freq`` (scales by counts
over the whole batch, mixing samples) are not covered."""
from __future__ import annotations

import torch
from torch import nn

from .base import KronInput, Rule


class EmbeddingRule(Rule):
    types = (nn.Embedding,)

    def attrs(self, module):
        return ["weight"]

    def obstacle(self, module):
        if module.max_norm is not None:
            return "max_norm is set (the forward renormalises the weight in place)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True (the gradient depends on counts over the whole batch)"
        return None

    def kron_inputs(self, module, inp):
        ids = inp.reshape(inp.shape[0], -1).long()
        if module.padding_idx is not None:
            ids = ids.masked_fill(ids == module.padding_idx, -1)
        return {"weight": KronInput(ids, module.num_embeddings)}

    def positions(self, module, g):
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def dense_former(self, module, inp, attrs, kron):
        k = kron["weight"] if "weight" in kron else self.kron_inputs(module, inp)["weight"]
        b, q = k.X.shape[0], module.weight.shape[1]
        if k.X.shape[1] <= q:   # few positions: onehot(ids)^T g per sample, a batched product (ids -1: zero)
            onehot_t = (k.X[:, None, :] == torch.arange(k.vocab, device=k.X.device)[None, :, None])
            onehot_t = onehot_t.to(module.weight.dtype)

            def former(g):
                return {"weight": torch.bmm(onehot_t, g.reshape(b, -1, q))}
            return former
        # row ``vocab`` collects the ids -1 (padding: no contribution)
        index = torch.where(k.X < 0, k.vocab, k.X)[:, :, None].expand(-1, -1, q)

        def former(g):
            out = g.new_zeros(b, k.vocab + 1, q)
            out.scatter_add_(1, index, g.reshape(b, -1, q))
            return {"weight": out[:, :k.vocab]}
        return former
