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
from torch.autograd import forward_ad

from .._checks import all_finite, check_dim, check_same, check_tensor
from . import _loader
from ._autocast import float32_under_autocast, register as _register_autocast
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
    if all_finite(named.values()):
        return
    for name, t in named.items():
        check_tensor(name, t, finite=True)


def _check_coupling(inputs: dict, params: dict, activation: str, check_finite: bool) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    # Reading a value back (the finiteness check) is data-dependent control flow, which torch.vmap refuses.
    check_finite = check_finite and not torch._C._are_functorch_transforms_active()
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


@float32_under_autocast
def coupling_forward(x1, x2, VF, WF, bF, VG, WG, bG, activation: str = "relu",
                     return_features: bool = False, check_finite: bool = True):
    """Forward of one coupling block: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``.

    Returns ``(y1, y2, hF, hG)``; the features ``hF = act(x2 V_F)``, ``hG = act(y1 V_G)`` are returned
    when ``return_features`` (RevGN needs them), else ``None``. Differentiable. ``VF``/``VG`` may be
    ``None`` for the variant without a bottleneck.

    Shapes: x1, x2 (n, d/2); VF, VG (d/2, M); WF, WG (d/2, M) ((d/2, d/2) without V); bF, bG (d/2,).
    Returns y1, y2 (n, d/2) and hF, hG (n, M). Under autocast it runs in float32.
    """
    _check_coupling({"x1": x1, "x2": x2}, {"VF": VF, "WF": WF, "bF": bF, "VG": VG, "WG": WG, "bG": bG},
                    activation, check_finite)
    if VF is not None and VG is not None and _use_kernel("coupling_forward", x1):
        return _coupling_forward_kernel(x1, x2, VF, WF, bF, VG, WG, bG, activation, return_features)
    return coupling_forward_reference(x1, x2, VF, WF, bF, VG, WG, bG, activation, return_features)


@float32_under_autocast
def coupling_inverse(y1, y2, VF, WF, bF, VG, WG, bG, activation: str = "relu", check_finite: bool = True):
    """Exact inverse of :func:`coupling_forward`: ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``.

    Shapes as :func:`coupling_forward`: y1, y2 (n, d/2) -> x1, x2 (n, d/2).
    """
    _check_coupling({"y1": y1, "y2": y2}, {"VF": VF, "WF": WF, "bF": bF, "VG": VG, "WG": WG, "bG": bG},
                    activation, check_finite)
    if VF is not None and VG is not None and _use_kernel("coupling_inverse", y1):
        return tuple(_apply("coupling_inverse", y1, y2, VF, WF, bF, VG, WG, bG, activation))
    return coupling_inverse_reference(y1, y2, VF, WF, bF, VG, WG, bG, activation)


@float32_under_autocast
def coupling_inverse_tangent(y1, x2, dy1, dy2, VF, WF, VG, WG, activation: str = "relu",
                             check_finite: bool = True, hF=None, hG=None):
    """Push a tangent (dy1, dy2) of the block output back through the inverse; returns (dx1, dx2).

    ``y1`` is the block's first output half and ``x2`` its second input half (the linearisation points).
    Passing the forward's features ``hF = act(x2 V_F)`` and ``hG = act(y1 V_G)`` (as RevGN does) reads
    act' off them for identity, relu and tanh: two GEMMs instead of the kernel's four (the kernel
    recomputes the pre-activations).

    Shapes: y1, x2, dy1, dy2 (n, d/2); VF, WF, VG, WG (d/2, M); hF, hG (n, M). Returns dx1, dx2 (n, d/2).
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
        return tuple(_apply("coupling_inverse_tangent", y1, x2, dy1, dy2, VF, WF, VG, WG, activation))
    return coupling_inverse_tangent_reference(y1, x2, dy1, dy2, VF, WF, VG, WG, activation)


def _coupling_forward_kernel(x1, x2, VF, WF, bF, VG, WG, bG, activation, return_features):
    # Under autograd the features are kept for the backward pass: the kernels write the hidden tile
    # anyway, so asking for it costs nothing and saves recomputing act(U V) there.
    keep = return_features or (torch.is_grad_enabled()
                                and any(t.requires_grad for t in (x1, x2, VF, WF, bF, VG, WG, bG)))
    y1, y2, hF, hG = _apply("coupling_forward", x1, x2, VF, WF, bF, VG, WG, bG, activation, keep)
    if not return_features:
        hF = hG = None
    return y1, y2, hF, hG


def coupling_jvp(x2, y1, VF, WF, VG, WG, activation_name, dx1, dx2, dVF, dWF, dbF, dVG, dWG, dbG, hF=None,
                 hG=None):
    """Jacobian-vector product (forward-mode tangent) of :func:`coupling_forward_reference` at input half x2
    and output half y1, along input tangents (any may be None for zero), with zF = x2 V_F, zG = y1 V_G:

        dhF = act'(zF) * (dx2 V_F + x2 dV_F),   dy1 = dx1 + dhF W_F^T + hF dW_F^T + db_F
        dhG = act'(zG) * (dy1 V_G + y1 dV_G),   dy2 = dx2 + dhG W_G^T + hG dW_G^T + db_G

    The features hF, hG are recomputed when not given. Returns (dy1, dy2, dhF, dhG).
    """
    def pre(U, V):
        return lambda: _pre(U, V)

    def total(*terms):
        terms = [t for t in terms if t is not None]
        if not terms:
            return None
        out = terms[0]
        for t in terms[1:]:
            out = out + t
        return out

    if hF is None:
        hF = activation(activation_name, _pre(x2, VF))
    if hG is None:
        hG = activation(activation_name, _pre(y1, VG))
    dzF = total(None if dx2 is None else _pre(dx2, VF), None if dVF is None else x2 @ dVF)
    dzF = torch.zeros_like(hF) if dzF is None else dzF
    dhF = activation_grad_times(activation_name, dzF, pre(x2, VF), hF)
    dy1 = total(dx1, dhF @ WF.mT, None if dWF is None else hF @ dWF.mT, dbF)
    dzG = total(_pre(dy1, VG), None if dVG is None else y1 @ dVG)
    dhG = activation_grad_times(activation_name, dzG, pre(y1, VG), hG)
    dy2 = total(dx2, dhG @ WG.mT, None if dWG is None else hG @ dWG.mT, dbG)
    return dy1, dy2, dhF, dhG


# --------------------------------------------------------------------------------------------------
# torch.library registrations (fake kernels for torch.compile / meta; autograd, forward-mode AD, vmap)
# --------------------------------------------------------------------------------------------------
#
# Each compiled op's Autograd kernel runs it inside a torch.autograd.Function with setup_context, so
# torch.func (grad, vjp, jacrev, jvp, jacfwd, vmap) and torch.autograd.forward_ad see proper rules:
# backward and jvp are the hand-written coupling_vjp / coupling_jvp for coupling_forward, and for the
# inverse and its tangent (used by RevGN under no_grad; differentiating them is rare) the VJP / JVP of
# the reference. The vmap rule folds a batch that only the row inputs (samples) carry into the rows of
# one kernel call; a batch over the weights runs the reference under torch.vmap. Without these rules the
# op dropped forward-mode tangents silently (torch.func.jvp returned zeros).

def _forward_op_reference(x1, x2, VF, WF, bF, VG, WG, bG, activation_name, return_features):
    """:func:`coupling_forward_reference` with the op's outputs: empty features unless requested."""
    y1, y2, hF, hG = coupling_forward_reference(x1, x2, VF, WF, bF, VG, WG, bG, activation_name, True)
    if not return_features:
        hF, hG = x1.new_zeros(0), x1.new_zeros(0)
    return y1, y2, hF, hG


def _inverse_op_reference(y1, y2, VF, WF, bF, VG, WG, bG, activation_name):
    return coupling_inverse_reference(y1, y2, VF, WF, bF, VG, WG, bG, activation_name)


def _tangent_op_reference(y1, x2, dy1, dy2, VF, WF, VG, WG, activation_name):
    return coupling_inverse_tangent_reference(y1, x2, dy1, dy2, VF, WF, VG, WG, activation_name)


def _forward_backward(ctx, gy1, gy2, ghF, ghG):
    """coupling_vjp with the features the forward saved (they supply act' without recomputing)."""
    x1, x2, VF, WF, bF, VG, WG, bG, y1, _, hF, hG = ctx.saved_tensors
    if not ctx.extra[1]:
        hF = hG = ghF = ghG = None
    grads = coupling_vjp(x2, y1, VF, WF, VG, WG, ctx.extra[0], gy1, gy2, hF, hG, ghF, ghG,
                         need=(True,) + tuple(ctx.needs_input_grad[1:8]))
    return (*grads, None, None)


def _forward_jvp(ctx, dx1, dx2, dVF, dWF, dbF, dVG, dWG, dbG, *_):
    x1, x2, VF, WF, bF, VG, WG, bG, y1, _, hF, hG = ctx.saved_tensors
    activation_name, features = ctx.extra
    dy1, dy2, dhF, dhG = coupling_jvp(x2, y1, VF, WF, VG, WG, activation_name, dx1, dx2, dVF, dWF, dbF, dVG,
                                      dWG, dbG, hF if features else None, hG if features else None)
    if not features:
        dhF, dhG = torch.zeros_like(hF), torch.zeros_like(hG)
    return dy1, dy2, dhF, dhG


def _make_function(name: str, rows: int, reference, backward=None, jvp=None):
    """The autograd.Function around ``revgn::name``: its first 8 arguments are tensors, of which the first
    ``rows`` are (n, d/2) sample rows; ``reference`` computes the same outputs in PyTorch."""
    op = getattr(torch.ops.revgn, name).default

    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return tuple(op(*args))

    def setup_context(ctx, inputs, output):
        ctx.extra = tuple(inputs[8:])
        ctx.save_for_backward(*inputs[:8], *output)
        ctx.save_for_forward(*inputs[:8], *output)

    def reference_backward(ctx, *grads):
        inputs = ctx.saved_tensors[:8]
        _, vjp_fn = torch.func.vjp(lambda *t: reference(*t, *ctx.extra), *inputs)
        return (*vjp_fn(tuple(grads)), *(None,) * len(ctx.extra))

    def reference_jvp(ctx, *tangents):
        inputs = ctx.saved_tensors[:8]
        tangents = tuple(torch.zeros_like(t) if dt is None else dt for t, dt in zip(inputs, tangents))
        return torch.func.jvp(lambda *t: reference(*t, *ctx.extra), inputs, tangents)[1]

    def vmap(info, in_dims, *args):
        tensors, extra, dims = args[:8], args[8:], in_dims[:8]
        if all(d is None for d in dims[rows:]):
            size = info.batch_size

            def fold(t, d):
                t = t.expand(size, *t.shape) if d is None else t.movedim(d, 0)
                return t.reshape(-1, t.shape[-1])

            out = function.apply(*(fold(t, d) for t, d in zip(tensors[:rows], dims[:rows])), *tensors[rows:],
                                 *extra)
            return (tuple(o.unflatten(0, (size, -1)) if o.dim() == 2 else o for o in out),
                    tuple(0 if o.dim() == 2 else None for o in out))
        out = torch.vmap(lambda *t: reference(*t, *extra), in_dims=tuple(dims), randomness=info.randomness)(
            *tensors)
        return tuple(out), (0,) * len(out)

    function = type(f"{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward or reference_backward), "jvp": staticmethod(jvp or reference_jvp),
        "vmap": staticmethod(vmap)})
    return function


def _differentiating(args) -> bool:
    """True when a result of these arguments may be differentiated: grad mode with an input that requires
    grad, a forward-AD dual level, or a torch.func transform."""
    return (torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
            or (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)))


def _autograd_kernel(function, op, reference):
    """Autograd-key kernel of ``revgn::op`` for callers of ``torch.ops.revgn.*``: the autograd.Function when
    something may be differentiated (grad mode and an input that requires grad, or a forward-AD dual
    level), the reference under a torch.func transform (an autograd.Function must be applied above the
    dispatcher for those, as the public wrappers do), else the kernel."""
    def kernel(keyset, *args):
        if torch._C._are_functorch_transforms_active():
            return tuple(reference(*args))
        if _differentiating(args):
            return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
    return kernel


_LIBRARY: list = []  # keeps the registrations alive
_FUNCTIONS: dict = {}


def _apply(name: str, *args):
    """Run the compiled ``revgn::name``; through its autograd.Function (applied above the dispatcher, so
    torch.func transforms and forward-mode AD use its rules) when the result may be differentiated,
    else straight to the kernel (autograd.Function.apply costs tens of microseconds a call)."""
    if _differentiating(args):
        return _FUNCTIONS[name].apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return getattr(torch.ops.revgn, name).default(*args)


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

    # Under autocast the ops run in float32, as the wrappers' reference path does.
    _register_autocast("revgn::coupling_forward", "revgn::coupling_inverse", "revgn::coupling_inverse_tangent")
    lib = torch.library.Library("revgn", "IMPL")
    _LIBRARY.append(lib)
    for name, rows, reference, backward, jvp in (
            ("coupling_forward", 2, _forward_op_reference, _forward_backward, _forward_jvp),
            ("coupling_inverse", 2, _inverse_op_reference, None, None),
            ("coupling_inverse_tangent", 4, _tangent_op_reference, None, None)):
        _FUNCTIONS[name] = function = _make_function(name, rows, reference, backward, jvp)
        lib.impl(name, _autograd_kernel(function, getattr(torch.ops.revgn, name).default, reference), "Autograd",
                 with_keyset=True)


_register()
