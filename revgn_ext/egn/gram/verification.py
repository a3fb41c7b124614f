"""Run-time verification of the layer rules' factors against autograd.

A use that no module hook sees (``F.linear(h, enc.weight.t())``, a weight read by another module's
forward, a layer that treats dim 0 as something other than the sample) would make V_p silently wrong.
Both checks compare autograd's gradient of every checked parameter for some grad_outputs
``sum_a w_a columns[a]`` with ``sum_{i,a} w_ia V_p[(i, a)]`` from the factors:

* :func:`random_weight_check`: the first Gram of every new call pattern, with random per-sample
  weights w (b, m): one more backward pass;
* :func:`disagreement` with w = u: the back-projection J^T S u that every step computes anyway (free).

A parameter disagrees when its relative error exceeds sqrt(eps) of the dtype. Because the weights
differ per sample, a wrong grouping of rows into samples is caught as well as a missing use.
"""
from __future__ import annotations

import math

import torch

from .columns import weighted_columns

__all__ = ["MISMATCH", "weighted", "disagreement", "aligned_mismatches", "random_weight_check"]

MISMATCH = ("its hooked per-layer gradient differs from autograd's (a use no layer rule sees, such as "
            "F.linear(h, layer.weight.t()), or a layer whose dim 0 is not the sample)")


def weighted(factors, w) -> dict:
    """{id(param): (param, sum_{i,a} w_ia V_p[(i, a)])} over the factors."""
    ours: dict[int, tuple] = {}
    for factor in factors:
        for p, grad in factor.weighted_gradients(w).items():
            ours[id(p)] = (p, grad if id(p) not in ours else ours[id(p)][1] + grad)
    return ours


def compare(ours: dict, truth, dtype) -> list[int]:
    """ids of the parameters whose factor sums differ from autograd's ``truth`` (aligned with ``ours``)."""
    checked, flags = mismatches(ours, truth, dtype)
    return [pid for pid, flag in zip(checked, flags.tolist()) if flag]


def mismatches(ours: dict, truth, dtype, truth_norms=None, slack=None):
    """(ids, flags): :func:`compare`'s verdict per parameter as a bool tensor, without a host sync.
    ``truth_norms``: the 2-norms of ``truth`` (0-dim tensors, aligned), where the caller has them;
    ``slack``: norms (aligned) added to each scale, for a ``truth`` formed as a difference of them."""
    checked = [p for p, _ in ours.values()]
    mine = [g for _, g in ours.values()]
    eps = torch.finfo(dtype).eps
    truth = [torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g) for p, g in zip(checked, truth)]
    # one fused call for ||a - g||, ||a|| and ||g|| of every parameter
    if truth_norms is None:
        norms = torch._foreach_norm([*torch._foreach_sub(mine, truth), *mine, *truth])
    else:
        norms = [*torch._foreach_norm([*torch._foreach_sub(mine, truth), *mine]), *truth_norms]
    norms = torch.stack(norms).view(3, -1)
    errors, scales = norms[0], norms[1] + norms[2]
    if slack is not None:
        scales = scales + torch.stack(slack)
    # Relative to the parameter's own gradient, with a floor at rounding level of the whole gradient
    # (a gradient that vanishes identically, e.g. a bias under softmax's shift invariance).
    floor = scales.norm().mul_(100 * eps).add_(torch.finfo(dtype).tiny)
    return [id(p) for p in checked], ~(errors <= torch.add(floor, scales, alpha=math.sqrt(eps)))


def disagreement(factors, params, u: torch.Tensor, products, norms=None, slack=None):
    """(ids, flags): per checked parameter, whether its ``sum_{i,a} u_ia V_p[(i, a)]`` differs from
    autograd's J^T S u (``products``: one tensor per parameter of ``params``, summed over ranks), as a
    bool tensor (no host sync), for a caller that reads it together with other values. ``norms``: the
    2-norms of ``products`` (0-dim tensors), where the caller has them; ``slack``: see :func:`mismatches`."""
    ours = weighted(factors, u)
    if not ours:
        return [], torch.zeros(0, dtype=torch.bool, device=u.device)
    return aligned_mismatches(ours, params, products, u.dtype, norms, slack)


def aligned_mismatches(ours: dict, params, products, dtype, norms=None, slack=None):
    """:func:`mismatches` of ``ours`` ({id(param): (param, sum)}) against ``products``, ``norms`` and
    ``slack`` given one per parameter of ``params`` (None: not given)."""
    index = {id(p): k for k, p in enumerate(params)}
    at = [index[pid] for pid in ours]

    def pick(values):
        return None if values is None else [values[k] for k in at]
    return mismatches(ours, pick(products), dtype, pick(norms), pick(slack))


def random_weight_check(f: torch.Tensor, columns: torch.Tensor, factors, generator: torch.Generator) -> list[int]:
    """ids of the parameters whose factors disagree with autograd's gradient for random per-sample
    weights w in [0.5, 1.5) (one backward pass through f's graph, which is kept)."""
    m, b, _ = columns.shape
    w = torch.rand(b, m, generator=generator, dtype=f.dtype).to(f.device) + 0.5
    ours = weighted(factors, w)
    if not ours:
        return []
    checked = [p for p, _ in ours.values()]
    grad_outputs = weighted_columns(columns, w)
    truth = torch.autograd.grad(f, checked, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
    return compare(ours, truth, f.dtype)
