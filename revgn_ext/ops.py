"""Public ops: thin wrappers that validate arguments and dispatch to the ``revgn`` custom ops.

The compiled library registers each op once in ``TORCH_LIBRARY(revgn, ...)`` with CPU and CUDA
kernels under their dispatch keys; the dispatcher picks the kernel from the tensors' device. Where no
kernel exists (no extension, or a CPU-only build given CUDA tensors) the pure-PyTorch reference in
:mod:`revgn_ext.reference` runs instead.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _loader, reference
from ._checks import check_dim, check_same, check_tensor

__all__ = ["backend", "build_info", "gram_cholesky_solve", "gram_factor", "gram_factor_from_gram", "gram_solve",
           "GramFactor", "CholeskyFactor",
           "coupling_forward", "coupling_inverse", "coupling_inverse_tangent"]


def backend() -> str:
    """Which kernels are in use: "cuda" (CUDA kernels built and a GPU present), "cpp" or "reference"."""
    if _loader.load() == "reference":
        return "reference"
    if _loader.has_kernel("gram_factor", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpp"


def build_info() -> dict:
    """How the kernels were obtained: load path ("compiled", "jit", "reference"), library file, errors."""
    return _loader.info()


def _use_kernel(op: str, t: torch.Tensor) -> bool:
    return _loader.has_kernel(op, t.device.type)


# --------------------------------------------------------------------------------------------------
# Batched Gram-Cholesky solve
# --------------------------------------------------------------------------------------------------

class GramFactor(NamedTuple):
    """Cholesky factors of the B damped Grams ``A A^T (+ 1 1^T) + (lambda + jitter) I``.

    ``info[b]`` counts the jitter retries matrix b needed (0 = clean, -1 = all retries failed and a
    diagonal factor was used); ``jitter[b]`` is the absolute jitter that was added.
    """
    A: torch.Tensor
    L: torch.Tensor
    info: torch.Tensor
    jitter: torch.Tensor
    append_ones: bool


def _damping_tensor(damping, A: torch.Tensor) -> torch.Tensor:
    B = A.shape[0]
    if isinstance(damping, torch.Tensor):
        if damping.dim() == 0:
            damping = damping.reshape(1).expand(B)
        if damping.shape != (B,):
            raise ValueError(f"damping must be a float or a tensor of shape ({B},), got shape "
                             f"{tuple(damping.shape)}")
        if damping.device != A.device:
            raise ValueError(f"damping is on {damping.device} but A is on {A.device}")
        check_tensor("damping", damping.to(A.dtype))
        damping = damping.to(A.dtype)
    else:
        try:
            damping = float(damping)
        except (TypeError, ValueError):
            raise ValueError(f"damping must be a float or a tensor, got {type(damping).__name__}") from None
        if not torch.isfinite(torch.tensor(damping)):
            raise ValueError(f"damping must be finite, got {damping}")
        damping = torch.full((B,), damping, dtype=A.dtype, device=A.device)
    # A fully negative damping would make the Gram indefinite on purpose; refuse it up front.
    if bool((damping < 0).any()):
        raise ValueError("damping must be >= 0")
    return damping.contiguous()


def _check_A(A, check_finite: bool) -> torch.Tensor:
    check_tensor("A", A, ndim=3, finite=check_finite)
    if A.shape[0] == 0 or A.shape[1] == 0:
        raise ValueError(f"A must have a non-empty batch and row dimension, got shape {tuple(A.shape)}")
    return A


def _check_R(R, A, check_finite: bool) -> torch.Tensor:
    check_tensor("R", R, ndim=3, finite=False)
    check_same(("A", "R"), (A, R))
    check_dim("R", R, 0, A.shape[0], "batch size of A")
    check_dim("R", R, 1, A.shape[1], "rows of A")
    return check_tensor("R", R, finite=check_finite)


def gram_factor(A: torch.Tensor, damping=0.0, append_ones: bool = False,
                check_finite: bool = True) -> GramFactor:
    """Factor all B Grams at once: ``L L^T = A A^T (+ 1 1^T) + lambda I``.

    A: (B, n, m); damping: a float or a (B,) tensor, absolute. With ``append_ones`` an implicit column
    of ones is appended to A. Failed factorisations are retried with growing jitter (see
    :func:`revgn_ext.reference.jitter_schedule`) and reported in ``info``; the result is never NaN.
    Set ``check_finite=False`` to skip the (synchronising) finiteness check on trusted GPU input.
    """
    _check_A(A, check_finite)
    lam = _damping_tensor(damping, A)
    if _use_kernel("gram_factor", A):
        L, info, jitter = torch.ops.revgn.gram_factor(A, lam, append_ones)
    else:
        L, info, jitter = reference.gram_factor(A, lam, append_ones)
    return GramFactor(A, L, info, jitter, bool(append_ones))


class CholeskyFactor(NamedTuple):
    """``L L^T = G + (lambda + jitter) I`` for B ready-made Grams; ``info``/``jitter`` as in GramFactor."""
    L: torch.Tensor
    info: torch.Tensor
    jitter: torch.Tensor


def gram_factor_from_gram(G: torch.Tensor, damping=0.0, check_finite: bool = True) -> CholeskyFactor:
    """Factor Grams formed elsewhere (G: (B, n, n), symmetric PSD) with the same jitter policy as
    :func:`gram_factor`: ``L L^T = G + (lambda + jitter) I``. Solve with ``torch.cholesky_solve(R, L)``.
    """
    check_tensor("G", G, ndim=3, finite=check_finite)
    if G.shape[1] != G.shape[2] or G.shape[0] == 0 or G.shape[1] == 0:
        raise ValueError(f"G must be a non-empty batch of square matrices (B, n, n), got shape {tuple(G.shape)}")
    lam = _damping_tensor(damping, G)
    if _use_kernel("gram_factor_from_gram", G):
        return CholeskyFactor(*torch.ops.revgn.gram_factor_from_gram(G, lam))
    return CholeskyFactor(*reference.gram_factor_from_gram(G, lam))


def gram_solve(factor: GramFactor, R: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
    """Solve against new right-hand sides with a stored factor: ``A^T (L L^T)^{-1} R``.

    R: (B, n, k) -> (B, m, k), or (B, m + 1, k) with ``append_ones`` (the extra row is ``1^T U``).
    """
    if not isinstance(factor, GramFactor):
        raise ValueError("factor must be the GramFactor returned by gram_factor")
    _check_R(R, factor.A, check_finite)
    if _use_kernel("gram_solve", R):
        return torch.ops.revgn.gram_solve(factor.A, factor.L, R, factor.append_ones)
    return reference.gram_solve(factor.A, factor.L, R, factor.append_ones)


def gram_cholesky_solve(A: torch.Tensor, R: torch.Tensor, damping=0.0, append_ones: bool = False,
                        return_info: bool = False, check_finite: bool = True):
    """Minimum-norm solve ``A^T (A A^T + lambda I)^{-1} R`` for a batch of small Grams.

    A: (B, n, m), R: (B, n, k), damping: float or (B,) tensor. With ``append_ones`` the implicit ones
    column makes the result (B, m + 1, k). Differentiable in A, R and a tensor damping. With
    ``return_info`` also returns the per-matrix retry count (int32, see :class:`GramFactor`).
    """
    _check_A(A, check_finite)
    _check_R(R, A, check_finite)
    lam = _damping_tensor(damping, A)
    if _use_kernel("gram_cholesky_solve", A):
        out, info, _ = torch.ops.revgn.gram_cholesky_solve(A, R, lam, append_ones)
    else:
        out, info, _ = reference.gram_cholesky_solve(A, R, lam, append_ones)
    return (out, info) if return_info else out


# --------------------------------------------------------------------------------------------------
# Reversible coupling layer (formulas in revgn_ext.reference)
# --------------------------------------------------------------------------------------------------

def _check_coupling(inputs: dict, params: dict, activation: str, check_finite: bool) -> None:
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
    names = tuple(inputs)
    for name, t in inputs.items():
        check_tensor(name, t, ndim=2, finite=check_finite)
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
        check_tensor(name, t, ndim=want, finite=check_finite)
        check_dim(name, t, 0, half, "feature half d/2")
        tnames.append(name)
        tensors.append(t)
    check_same(tuple(tnames) + names[1:], tuple(tensors) + tuple(inputs[n] for n in names[1:]))
    for side in ("F", "G"):
        V, W = params.get("V" + side), params["W" + side]
        width = half if V is None else V.shape[1]
        check_dim("W" + side, W, 1, width, "hidden width M of V" + side if V is not None else "d/2")


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
    return reference.coupling_forward(x1, x2, VF, WF, bF, VG, WG, bG, activation, return_features)


def coupling_inverse(y1, y2, VF, WF, bF, VG, WG, bG, activation: str = "relu", check_finite: bool = True):
    """Exact inverse of :func:`coupling_forward`: ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``."""
    _check_coupling({"y1": y1, "y2": y2}, {"VF": VF, "WF": WF, "bF": bF, "VG": VG, "WG": WG, "bG": bG},
                    activation, check_finite)
    if VF is not None and VG is not None and _use_kernel("coupling_inverse", y1):
        return tuple(torch.ops.revgn.coupling_inverse(y1, y2, VF, WF, bF, VG, WG, bG, activation))
    return reference.coupling_inverse(y1, y2, VF, WF, bF, VG, WG, bG, activation)


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
    features = hF is not None and hG is not None and activation in ("identity", "relu", "tanh")
    if features:
        width = VF.shape[1] if VF is not None else y1.shape[1]
        check_tensor("hF", hF, ndim=2, finite=False)
        check_tensor("hG", hG, ndim=2, finite=False)
        for name, h in (("hF", hF), ("hG", hG)):
            check_dim(name, h, 0, y1.shape[0], "batch size of y1")
            check_dim(name, h, 1, width, "hidden width M")
        return reference.coupling_inverse_tangent(y1, x2, dy1, dy2, VF, WF, VG, WG, activation, hF, hG)
    if VF is not None and VG is not None and _use_kernel("coupling_inverse_tangent", y1):
        return tuple(torch.ops.revgn.coupling_inverse_tangent(y1, x2, dy1, dy2, VF, WF, VG, WG, activation))
    return reference.coupling_inverse_tangent(y1, x2, dy1, dy2, VF, WF, VG, WG, activation)


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
    """Vector-Jacobian product of coupling_forward (:func:`revgn_ext.reference.coupling_vjp`); the
    features saved by the forward supply act' without recomputing the hidden tiles."""
    x2, VF, WF, VG, WG, y1, hF, hG = ctx.saved_tensors
    gy1 = torch.zeros_like(y1) if gy1 is None else gy1
    gy2 = torch.zeros_like(y1) if gy2 is None else gy2
    if not ctx.has_features:
        hF = hG = ghF = ghG = None
    grads = reference.coupling_vjp(x2, y1, VF, WF, VG, WG, ctx.activation, gy1, gy2, hF, hG, ghF, ghG,
                                   need=(True,) + tuple(ctx.needs_input_grad[1:8]))
    return (*grads, None, None)


# --------------------------------------------------------------------------------------------------
# torch.library registrations (fake kernels for torch.compile / meta, autograd)
# --------------------------------------------------------------------------------------------------

def _register() -> None:
    if _loader.load() == "reference":
        return

    @torch.library.register_fake("revgn::gram_factor")
    def _(A, damping, append_ones):
        B, n, _ = A.shape
        return (A.new_empty(B, n, n), A.new_empty(B, dtype=torch.int32), A.new_empty(B))

    if hasattr(torch.ops.revgn, "gram_factor_from_gram"):  # absent from libraries built before it
        @torch.library.register_fake("revgn::gram_factor_from_gram")
        def _(G, damping):
            B, n, _ = G.shape
            return (G.new_empty(B, n, n), G.new_empty(B, dtype=torch.int32), G.new_empty(B))

    @torch.library.register_fake("revgn::gram_solve")
    def _(A, L, R, append_ones):
        B, _, m = A.shape
        return R.new_empty(B, m + int(append_ones), R.shape[-1])

    @torch.library.register_fake("revgn::gram_cholesky_solve")
    def _(A, R, damping, append_ones):
        B, _, m = A.shape
        return (R.new_empty(B, m + int(append_ones), R.shape[-1]), A.new_empty(B, dtype=torch.int32),
                A.new_empty(B))

    def setup_context(ctx, inputs, output):
        A, R, damping, append_ones = inputs
        out, _, jitter = output
        ctx.append_ones = append_ones
        ctx.save_for_backward(A, R, damping, jitter)
        ctx.mark_non_differentiable(output[1], output[2])

    def backward(ctx, grad_out, _grad_info, _grad_jitter):
        # G = A1 A1^T + mu I with A1 = [A, 1] and mu = lambda + jitter; U = G^{-1} R; out = A1^T U.
        # dU = A1 gO, dR = G^{-1} dU, dG = -dR U^T, dA = U gO_A^T + (dG + dG^T) A, dlambda = tr dG.
        A, R, damping, jitter = ctx.saved_tensors
        L, _, _ = torch.ops.revgn.gram_factor(A, damping + jitter, ctx.append_ones)
        U = torch.cholesky_solve(R, L)
        m = A.shape[-1]
        gA = grad_out[:, :m]
        dU = A @ gA
        if ctx.append_ones:
            dU = dU + grad_out[:, m:]
        dR = torch.cholesky_solve(dU, L)
        dG = -dR @ U.mT
        dA = U @ gA.mT + (dG + dG.mT) @ A
        dlam = dG.diagonal(dim1=-2, dim2=-1).sum(-1)
        return dA, dR, dlam, None

    torch.library.register_autograd("revgn::gram_cholesky_solve", backward, setup_context=setup_context)

    if not hasattr(torch.ops.revgn, "coupling_forward"):  # a library built before the coupling ops
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
