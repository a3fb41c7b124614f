"""Affine parameters of per-sample normalisations: LayerNorm, GroupNorm, RMSNorm, and BatchNorm in
eval mode (running statistics; in training mode it mixes samples and is refused before this rule).

With x^ the normalised input (no affine), y = gamma * x^ + beta elementwise (per channel for GroupNorm
and BatchNorm), so the per-sample gradients are sum over the other positions of g * x^ for gamma and of
g for beta: dense and small (one number per feature or channel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Rule

_TYPES = [nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d]
if hasattr(nn, "RMSNorm"):
    _TYPES.append(nn.RMSNorm)


class NormRule(Rule):
    types = tuple(_TYPES)

    def obstacle(self, module):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
            return "BatchNorm uses batch statistics here (training mode or track_running_stats=False)"
        return None

    def _normalised(self, module, x):
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, module.normalized_shape, eps=module.eps)
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, eps=module.eps)
        if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
            return F.rms_norm(x, module.normalized_shape, eps=module.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - module.running_mean.reshape(shape)) * torch.rsqrt(module.running_var.reshape(shape) + module.eps)

    def per_sample(self, module, inp, g, attrs):
        return self.dense_former(module, inp, attrs, {})(g)

    def dense_former(self, module, inp, attrs, kron):
        b = inp.shape[0]
        if isinstance(module, (nn.LayerNorm,)) or (hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm)):
            n = len(module.normalized_shape)
            reduce = lambda t: t.reshape(b, -1, *t.shape[t.dim() - n:]).sum(1)   # noqa: E731
        else:   # channel dimension 1
            reduce = lambda t: t.reshape(b, t.shape[1], -1).sum(-1)             # noqa: E731
        normalised = self._normalised(module, inp) if "weight" in attrs else None

        def former(g):
            out = {}
            if "weight" in attrs:
                out["weight"] = reduce(g * normalised)
            if "bias" in attrs:
                out["bias"] = reduce(g)
            return out
        return former
