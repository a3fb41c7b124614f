"""The reversible coupling block: forward, inverse and the inverse's tangent.

    F(U) = act(U V_F) W_F^T + b_F,  G(U) = act(U V_G) W_G^T + b_G   (V = None: no bottleneck, act(U))
    forward:  y1 = x1 + F(x2),  y2 = x2 + G(y1)      inverse:  x2 = y2 - G(y1),  x1 = y1 - F(x2)

Shapes: x*, y* (n, d/2); V*, W* (d/2, M); b* (d/2,). Without a bottleneck W* is (d/2, d/2). The
activations come from :mod:`revgn_ext.ops.activations`.

This module owns the op family: the pure-PyTorch reference (``*_reference`` and :func:`coupling_vjp`,
the specification), the public wrappers that validate their arguments, the ``torch.library``
registrations (fake kernels, autograd) and the C++/CUDA kernels' dispatch (csrc/coupling/).
"""
from __future__ import annotations

import torch

from .._checks import check_dim, check_same, check_tensor
from . import _loader
from .activations import ACTIVATIONS, FEATURE_GRAD, activation, activation_grad_times

__all__ = ["coupling_forward", "coupling_inverse", "coupling_inverse_tangent", "coupling_forward_reference",
           "coupling_inverse_reference", "coupling_inverse_tangent_reference", "coupling_vjp",
           "coupling_inverse_tangent_unchecked"]


def _use_kernel(op: str, t: torch.Tensor) -> bool:
    return _loader.has_kernel(op, t.device.type)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------

def _pre(U, V):
    return U if V is None else U @ V


def coupling_forward_reference(x1, x2, VF, WF, bF, VG, WG, bG, activation_name="relu", return_features=False):
    """(y1, y2, hF, hG) with hF = act(x2 V_F), hG = act(y1 V_G) when ``return_features``, else None."""
    hF = activation(activation_name, _pre(x2, VF))
    y1 = x1 + hF @ WF.mT + bF
    hG = activation(activation_name, _pre(y1, VG))
    y2 = x2 + hG @ WG.mT + bG
    if return_features:
        return y1, y2, hF, hG
    return y1, y2, None, None


def coupling_inverse_reference(y1, y2, VF, WF, bF, VG, WG, bG, activation_name="relu"):
    """(x1, x2) with x2 = y2 - G(y1), x1 = y1 - F(x2)."""
    x2 = y2 - activation(activation_name, _pre(y1, VG)) @ WG.mT - bG
    x1 = y1 - activation(activation_name, _pre(x2, VF)) @ WF.mT - bF
    return x1, x2


def coupling_inverse_tangent_reference(y1, x2, dy1, dy2, VF, WF, VG, WG, activation_name="relu", hF=None,
                                       hG=None):
    """Tangent of the inverse at (y1, x2) along (dy1, dy2):

    dx2 = dy2 - (act'(y1 V_G) * (dy1 V_G)) W_G^T,   dx1 = dy1 - (act'(x2 V_F) * (dx2 V_F)) W_F^T.
    ``x2`` is the block's input half (what the inverse returns), ``y1`` its first output half. The
    forward's features hF = act(x2 V_F), hG = act(y1 V_G), when given, supply act' without the
    pre-activation GEMMs (see :func:`activation_grad_times`).
    """
    dx2 = dy2 - activation_grad_times(activation_name, _pre(dy1, VG), lambda: _pre(y1, VG), hG) @ WG.mT
    dx1 = dy1 - activation_grad_times(activation_name, _pre(dx2, VF), lambda: _pre(x2, VF), hF) @ WF.mT
    return dx1, dx2


def coupling_vjp(x2, y1, VF, WF, VG, WG, activation_name, gy1, gy2, hF=None, hG=None, ghF=None, ghG=None,
                 need=(True,) * 8):
    """Vector-Jacobian product of :func:`coupling_forward_reference` at input half x2 and output half y1, with
    zF = x2 V_F, zG = y1 V_G and cotangents (gy1, gy2) of the outputs (ghF, ghG of the features):

        gzG = act'(zG) * (gy2 W_G + ghG),   gy1' = gy1 + gzG V_G^T,   gzF = act'(zF) * (gy1' W_F + ghF)
        gx1 = gy1',  gx2 = gy2 + gzF V_F^T,  gW_F = gy1'^T hF,  gb_F = 1^T gy1',  gV_F = x2^T gzF
        (and the same for G with gy2, y1, hG, gzG).

    The features hF, hG are recomputed when not given. Returns (gx1, gx2, gVF, gWF, gbF, gVG, gWG, gbG);
    an entry whose ``need`` flag (same order) is False is None.
    """
    zF = zG = None
    if hF is None or hG is None or activation_name not in FEATURE_GRAD:
        zF, zG = _pre(x2, VF), _pre(y1, VG)
        hF, hG = activation(activation_name, zF), activation(activation_name, zG)
    gzG = gy2 @ WG if ghG is None else gy2 @ WG + ghG
    gzG = activation_grad_times(activation_name, gzG, lambda: zG, hG)
    gy1 = gy1 + (gzG if VG is None else gzG @ VG.mT)
    gzF = gy1 @ WF if ghF is None else gy1 @ WF + ghF
    gzF = activation_grad_times(activation_name, gzF, lambda: zF, hF)
    return (gy1,
            (gy2 + (gzF if VF is None else gzF @ VF.mT)) if need[1] else None,
            x2.mT @ gzF if need[2] and VF is not None else None,
            gy1.mT @ hF if need[3] else None,
            gy1.sum(0) if need[4] else None,
            y1.mT @ gzG if need[5] and VG is not None else None,
            gy2.mT @ hG if need[6] else None,
            gy2.sum(0) if need[7] else None)

# --------------------------------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------------------------------

def _check_all_finite(named: dict) -> None:
    """ValueError naming the first tensor in ``named`` that holds NaN or Inf.

    One summed read per tensor and one host sync for all of them: a sum is finite whenever every
    entry is (a NaN or Inf entry makes it NaN or Inf), so only a non-finite sum, from a bad entry or an
    overflow of finite ones, falls back to the exact per-tensor ``isfinite`` test that names the tensor.
    The per-tensor ``isfinite(t).all()`` this replaces cost 6.8 ms of a 19 ms coupling forward at n 256,
    d/2 392, M 2048 (fp32, 1 thread); the sums cost 0.16 ms (benchmarks/results/kernels.md).
    """
    tensors = [t for t in named.values() if t.numel()]
    with torch.no_grad():  # a check, not part of any graph
        if not tensors or bool(torch.isfinite(torch.stack([t.sum() for t in tensors])).all()):
            return
    for name, t in named.items():
        check_tensor(name, t, finite=True)


def _check_coupling(inputs: dict, params: dict, activation: str, check_finite: bool) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    names = tuple(inputs)
    for name, t in inputs.items():
        check_tensor(name, t, ndim=2, finite=False)
    first = inputs[names[0]]
    half = first.shape[1]
    for name in names[1:]:
        check_dim(name, inputs[name], 0, first.shape[0], f"batch size of {names[0]}")
        check_dim(name, inputs[name], 1, half, f"feature half of {names[0]}")
    tensors = [first]
    tnames = [names[0]]
    for name, t in params.items():
        if t is None:
            if name.startswith("V"):
                continue
            raise ValueError(f"{name} must be a tensor")
        want = 1 if name.startswith("b") else 2
        check_tensor(name, t, ndim=want, finite=False)
        check_dim(name, t, 0, half, "feature half d/2")
        tnames.append(name)
        tensors.append(t)
    check_same(tuple(tnames) + names[1:], tuple(tensors) + tuple(inputs[n] for n in names[1:]))
    for side in ("F", "G"):
        V, W = params.get("V" + side), params["W" + side]
        width = half if V is None else V.shape[1]
        check_dim("W" + side, W, 1, width, "hidden width M of V" + side if V is not None else "d/2")
    if check_finite:
        _check_all_finite({**inputs, **{k: v for k, v in params.items() if v is not None}})


def coupling_forward(x1, x2, VF, WF, bF, VG, WG, bG, activation: str = "relu",
                     return_features: bool = False, check_finite: bool = True):
    """Forward of one coupling block: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``.

    Returns ``(y1, y2, hF, hG)``; the features ``hF = act(x2 V_F)``, ``hG = act(y1 V_G)`` are returned
    when ``return_features`` (RevGN needs them), else ``None``. Differentiable. ``VF``/``VG`` may be
    ``None`` for the variant without a bottleneck.
    """
    _check_coupling({"x1": x1, "x2": x2}, {"VF": VF, "WF": WF, "bF": bF, "VG": VG, "WG": WG, "bG": bG},
                    activation, check_finite)
    if VF is not None and VG is not None and _use_kernel("coupling_forward", x1):
        return _coupling_forward_kernel(x1, x2, VF, WF, bF, VG, WG, bG, activation, return_features)
    return coupling_forward_reference(x1, x2, VF, WF, bF, VG, WG, bG, activation, return_features)


def coupling_inverse(y1, y2, VF, WF, bF, VG, WG, bG, activation: str = "relu", check_finite: bool = True):
    """Exact inverse of :func:`coupling_forward`: ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``."""
    _check_coupling({"y1": y1, "y2": y2}, {"VF": VF, "WF": WF, "bF": bF, "VG": VG, "WG": WG, "bG": bG},
                    activation, check_finite)
    if VF is not None and VG is not None and _use_kernel("coupling_inverse", y1):
        return tuple(torch.ops.revgn.coupling_inverse(y1, y2, VF, WF, bF, VG, WG, bG, activation))
    return coupling_inverse_reference(y1, y2, VF, WF, bF, VG, WG, bG, activation)


def coupling_inverse_tangent(y1, x2, dy1, dy2, VF, WF, VG, WG, activation: str = "relu",
                             check_finite: bool = True, hF=None, hG=None):
    """Push a tangent (dy1, dy2) of the block output back through the inverse; returns (dx1, dx2).

    ``y1`` is the block's first output half and ``x2`` its second input half (the linearisation points).
    Passing the forward's features ``hF = act(x2 V_F)`` and ``hG = act(y1 V_G)`` (as RevGN does) reads
    act' off them for identity, relu and tanh: two GEMMs instead of the kernel's four (the kernel
    recomputes the pre-activations).
    """
    _check_coupling({"y1": y1, "x2": x2, "dy1": dy1, "dy2": dy2},
                    {"VF": VF, "WF": WF, "VG": VG, "WG": WG}, activation, check_finite)
    if hF is not None and hG is not None:
        width = VF.shape[1] if VF is not None else y1.shape[1]
        check_tensor("hF", hF, ndim=2, finite=False)
        check_tensor("hG", hG, ndim=2, finite=False)
        for name, h in (("hF", hF), ("hG", hG)):
            check_dim(name, h, 0, y1.shape[0], "batch size of y1")
            check_dim(name, h, 1, width, "hidden width M")
    return coupling_inverse_tangent_unchecked(y1, x2, dy1, dy2, VF, WF, VG, WG, activation, hF, hG)


def coupling_inverse_tangent_unchecked(y1, x2, dy1, dy2, VF, WF, VG, WG, activation, hF=None, hG=None):
    """:func:`coupling_inverse_tangent` for arguments the caller has checked (RevGN's transport).

    With the features and an activation whose act' is a function of them (FEATURE_GRAD), the
    expression runs two GEMMs with ATen's one-pass activation backward; the kernel runs four (it
    recomputes the pre-activations y1 V_G and x2 V_F). Measured on the CPU (ReLU, d/2 392, fp32 and
    fp64, 1 and 2 threads, benchmarks/results/kernels.md "CPU default path"), the kernel took
    1.42-1.51x the time of this route at n 256-1024, M 2048-8000, so the route stays here: giving
    the kernel the features would only repeat these two GEMMs and the two elementwise passes in C++.
    """
    if hF is not None and hG is not None and activation in FEATURE_GRAD:
        return coupling_inverse_tangent_reference(y1, x2, dy1, dy2, VF, WF, VG, WG, activation, hF, hG)
    if VF is not None and VG is not None and _use_kernel("coupling_inverse_tangent", y1):
        return tuple(torch.ops.revgn.coupling_inverse_tangent(y1, x2, dy1, dy2, VF, WF, VG, WG, activation))
    return coupling_inverse_tangent_reference(y1, x2, dy1, dy2, VF, WF, VG, WG, activation)


def _coupling_forward_kernel(x1, x2, VF, WF, bF, VG, WG, bG, activation, return_features):
    # Under autograd the features are kept for the backward pass: the kernels write the hidden tile
    # anyway, so asking for it costs nothing and saves recomputing act(U V) there.
    keep = return_features or (torch.is_grad_enabled()
                                and any(t.requires_grad for t in (x1, x2, VF, WF, bF, VG, WG, bG)))
    y1, y2, hF, hG = torch.ops.revgn.coupling_forward(x1, x2, VF, WF, bF, VG, WG, bG, activation, keep)
    if not return_features:
        hF = hG = None
    return y1, y2, hF, hG


def _coupling_setup_context(ctx, inputs, output):
    x1, x2, VF, WF, bF, VG, WG, bG, activation, return_features = inputs
    y1, _, hF, hG = output
    ctx.activation = activation
    ctx.has_features = bool(return_features)
    ctx.save_for_backward(x2, VF, WF, VG, WG, y1, hF, hG)


def _coupling_backward(ctx, gy1, gy2, ghF, ghG):
    """Vector-Jacobian product of coupling_forward (:func:`coupling_vjp`); the
    features saved by the forward supply act' without recomputing the hidden tiles."""
    x2, VF, WF, VG, WG, y1, hF, hG = ctx.saved_tensors
    gy1 = torch.zeros_like(y1) if gy1 is None else gy1
    gy2 = torch.zeros_like(y1) if gy2 is None else gy2
    if not ctx.has_features:
        hF = hG = ghF = ghG = None
    grads = coupling_vjp(x2, y1, VF, WF, VG, WG, ctx.activation, gy1, gy2, hF, hG, ghF, ghG,
                                   need=(True,) + tuple(ctx.needs_input_grad[1:8]))
    return (*grads, None, None)


# --------------------------------------------------------------------------------------------------
# torch.library registrations (fake kernels for torch.compile / meta, autograd)
# --------------------------------------------------------------------------------------------------

def _register() -> None:
    if _loader.load() == "reference" or not hasattr(torch.ops.revgn, "coupling_forward"):
        return

    @torch.library.register_fake("revgn::coupling_forward")
    def _(x1, x2, VF, WF, bF, VG, WG, bG, activation, return_features):
        if return_features:
            hF, hG = x1.new_empty(x1.shape[0], VF.shape[1]), x1.new_empty(x1.shape[0], VG.shape[1])
        else:
            hF, hG = x1.new_empty(0), x1.new_empty(0)
        return x1.new_empty(x1.shape), x1.new_empty(x1.shape), hF, hG

    @torch.library.register_fake("revgn::coupling_inverse")
    def _(y1, y2, VF, WF, bF, VG, WG, bG, activation):
        return y1.new_empty(y1.shape), y1.new_empty(y1.shape)

    @torch.library.register_fake("revgn::coupling_inverse_tangent")
    def _(y1, x2, dy1, dy2, VF, WF, VG, WG, activation):
        # The kernels write dx2 into the bottom half of the stacked [x2; dx2] GEMM operand.
        stacked = y1.new_empty(2 * y1.shape[0], y1.shape[1])
        return y1.new_empty(y1.shape), stacked[y1.shape[0]:]

    torch.library.register_autograd("revgn::coupling_forward", _coupling_backward,
                                    setup_context=_coupling_setup_context)


_register()
