"""``nn.Conv1d`` and ``nn.Conv2d`` through unfolded patches (stride, padding, dilation, groups).

With P[i] = unfold(x_i) (L patches of C_in/groups * prod(kernel) numbers per group) the convolution is a
linear layer on patches, so the per-sample weight gradient of group k is sum_l g_il,k P_il,k^T: the
Kronecker form with T = L positions (groups = 1), else the dense per-sample gradient per group. The
bias gradient is sum_l g_il. Conv1d is Conv2d on a height-1 image. padding='same' pads explicitly the
way torch does (the odd extra element on the right/bottom). Other padding modes are not covered.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import KronInput, Rule


def _pair(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class ConvRule(Rule):
    types = (nn.Conv1d, nn.Conv2d)

    def obstacle(self, module):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is covered)"
        return None

    def _patches(self, module, inp):
        """(b, groups, C_in/groups * prod(kernel), L) patches of the input."""
        one_d = isinstance(module, nn.Conv1d)
        x = inp[:, :, None, :] if one_d else inp
        k = (1,) + tuple(module.kernel_size) if one_d else _pair(module.kernel_size, 2)
        s = (1,) + tuple(module.stride) if one_d else _pair(module.stride, 2)
        d = (1,) + tuple(module.dilation) if one_d else _pair(module.dilation, 2)
        if isinstance(module.padding, str):
            if module.padding == "same":
                pads = []
                for dk, kk in zip(reversed(d), reversed(k)):
                    total = dk * (kk - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
            p = (0, 0)
        else:
            p = (0,) + tuple(module.padding) if one_d else _pair(module.padding, 2)
        P = F.unfold(x, k, dilation=d, padding=p, stride=s)   # (b, C_in * prod(k), L)
        return P.reshape(P.shape[0], module.groups, -1, P.shape[-1])

    def kron_inputs(self, module, inp):
        out = {}
        if module.groups == 1:
            out["weight"] = KronInput(self._patches(module, inp)[:, 0].transpose(1, 2))
        return out

    def positions(self, module, g):
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)

    def per_sample(self, module, inp, g, attrs):
        b = g.shape[0]
        G = g.reshape(b, g.shape[1], -1)                      # (b, C_out, L)
        out = {}
        if "weight" in attrs:
            P = self._patches(module, inp)                     # (b, groups, p, L)
            Gg = G.reshape(b, module.groups, -1, G.shape[-1])  # (b, groups, q, L)
            out["weight"] = torch.einsum("bgql,bgpl->bgqp", Gg, P).reshape(b, *module.weight.shape)
        if "bias" in attrs:
            out["bias"] = G.sum(-1)
        return out
