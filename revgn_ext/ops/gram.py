"""The batched Gram-Cholesky solve: ``A^T (A A^T (+ 1 1^T) + lambda I)^{-1} R`` for B small Grams.

This module owns the op family: its pure-PyTorch reference (the specification, ``*_reference``), the
public wrappers that validate their arguments (:func:`gram_factor`, :func:`gram_solve`,
:func:`gram_cholesky_solve`, :func:`gram_factor_from_gram`), the trusted entries that the optimizers
call with arguments they have already checked (``*_unchecked``: no validation, no host sync), and the
``torch.library`` registrations (fake kernels for torch.compile, autograd). The C++/CUDA kernels live
in csrc/gram_cholesky/; where none is registered for the tensors' device, the reference runs.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._checks import check_dim, check_same, check_tensor
from . import _loader
from ._autocast import float32_under_autocast, register as _register_autocast

__all__ = ["GramFactor", "CholeskyFactor", "gram_factor", "gram_factor_from_gram", "gram_factor_from_gram_",
           "gram_factor_from_gram_inplace_unchecked", "cholesky_solve_lower", "IN_PLACE_BLOCK", "gram_solve",
           "gram_cholesky_solve", "gram_factor_unchecked", "gram_factor_from_gram_unchecked",
           "gram_solve_unchecked", "damping_tensor", "PIVOT_FLOOR", "JITTER_START", "JITTER_GROWTH",
           "jitter_schedule", "gram", "gram_factor_reference", "gram_factor_from_gram_reference",
           "gram_solve_reference", "gram_cholesky_solve_reference", "gram_factor_from_gram_inplace_reference"]


def _use_kernel(op: str, t: torch.Tensor) -> bool:
    return _loader.has_kernel(op, t.device.type)


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------

# Failure policy shared by every backend. A factorisation fails when a pivot L_jj^2 falls to
# ``PIVOT_FLOOR * eps * scale`` or below (scale = mean of the damped Gram's diagonal, 1 for an all-zero
# Gram): such a pivot is rounding noise of a singular matrix, and solving with it would amplify noise.
# A failed matrix is retried with jitter ``rel * scale`` for rel in ``jitter_schedule``, growing tenfold
# up to ``scale`` itself, where the matrix is PD with condition number <= n + 1 and cannot fail.
# A damped Gram with a non-finite entry anywhere (either triangle) fails outright on every backend:
# no retry, info -1, the diagonal stand-in factor; a factor with a non-finite pivot is a failure too.
PIVOT_FLOOR = 10.0
JITTER_START = 1e-10
JITTER_GROWTH = 10.0


def jitter_schedule(dtype: torch.dtype) -> list[float]:
    """Relative jitters tried after a failed Cholesky, smallest first, ending at 1.0."""
    j = max(JITTER_START, 10.0 * PIVOT_FLOOR * torch.finfo(dtype).eps)
    out = []
    while j < 1.0:
        out.append(j)
        j *= JITTER_GROWTH
    out.append(1.0)
    return out


def _cholesky_ok(G: torch.Tensor, floor: torch.Tensor):
    """Batched Cholesky; ``ok`` is False where it failed or a pivot is at or below ``floor``."""
    L, status = torch.linalg.cholesky_ex(G)
    pivots = L.diagonal(dim1=-2, dim2=-1)
    ok = (status == 0) & (((pivots * pivots) > floor.unsqueeze(-1)) & pivots.isfinite()).all(-1)
    return L, ok


def gram(A: torch.Tensor, append_ones: bool = False) -> torch.Tensor:
    """G = A A^T, or [A, 1][A, 1]^T = A A^T + 1 1^T with ``append_ones``. A: (B, n, m) -> (B, n, n)."""
    G = A @ A.mT
    if append_ones:
        G = G + 1.0
    return G


def gram_factor_from_gram_reference(G: torch.Tensor, damping: torch.Tensor):
    """Cholesky factor of G + (lambda + jitter) I, retrying failed matrices with growing jitter.

    G: (B, n, n) symmetric positive semi-definite. Returns ``(L, info, jitter)``: L (B, n, n) lower
    triangular, info (B,) int32 with the number of retries each matrix needed (0 = clean; -1 = every
    retry failed, L then holds the Jacobi factor sqrt(diag)), jitter (B,) the absolute jitter added.
    """
    B, n, _ = G.shape
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    G = G + damping.reshape(B, 1, 1) * eye
    scale = G.diagonal(dim1=-2, dim2=-1).mean(-1).abs()
    # An all-zero Gram: any jitter works. A non-finite one (direct calls only) gets a finite scale.
    scale = torch.where((scale > 0) & scale.isfinite(), scale, torch.ones_like(scale))
    floor = PIVOT_FLOOR * torch.finfo(G.dtype).eps * scale
    L, ok = _cholesky_ok(G, floor)
    finite = G.isfinite().flatten(1).all(1)
    ok = ok & finite
    info = torch.zeros(B, dtype=torch.int32, device=G.device)
    jitter = torch.zeros(B, dtype=G.dtype, device=G.device)
    for b in range(B):
        if ok[b]:
            continue
        info[b] = -1
        for k, rel in enumerate(jitter_schedule(G.dtype) if finite[b] else ()):
            Lb, okb = _cholesky_ok(G[b] + rel * scale[b] * eye, floor[b])
            if okb:
                L[b], info[b], jitter[b] = Lb, k + 1, rel * scale[b]
                break
        if info[b] < 0:
            d = G[b].diagonal()
            L[b] = torch.diag(torch.where(d.isfinite() & (d > 0), d, torch.ones_like(d)).sqrt())
            jitter[b] = scale[b]
    return L, info, jitter


# Block width of the in-place factorisation (both backends): temporaries are a few (n, BLOCK) panels.
IN_PLACE_BLOCK = 256


def _blocks(n: int):
    return ((i, min(n, i + IN_PLACE_BLOCK)) for i in range(0, n, IN_PLACE_BLOCK))


def _factor_lower_in_place(G: torch.Tensor, floor: torch.Tensor) -> bool:
    """Left-looking blocked Cholesky of the symmetric matrix in G's lower triangle (G: (n, n)), in place.

    Afterwards the lower triangle (with the diagonal) holds L and the strict upper triangle is untouched.
    False when a block's factorisation fails or a pivot L_jj^2 is at or below ``floor`` (stops there).
    """
    n = G.shape[0]
    for j0, j1 in _blocks(n):
        D = G[j0:j1, j0:j1]
        upper = D.triu(1)                  # the update below also writes D's strict upper: restored after
        if j0:
            G[j0:, j0:j1].addmm_(G[j0:, :j0], G[j0:j1, :j0].mT, alpha=-1)
        Lb, status = torch.linalg.cholesky_ex(D)   # reads D's lower triangle
        pivots = Lb.diagonal()
        if not bool((status == 0) & ((pivots * pivots > floor) & pivots.isfinite()).all()):
            return False
        D.copy_(Lb + upper)
        if j1 < n:
            P = G[j1:, j0:j1]
            P.copy_(torch.linalg.solve_triangular(Lb.mT, P, upper=True, left=False))
    return True


def _lower_from_upper(G: torch.Tensor, diagonal: torch.Tensor) -> None:
    """Rebuild G's lower triangle from its strict upper one (a symmetric matrix), the diagonal from ``diagonal``."""
    for i0, i1 in _blocks(G.shape[0]):
        if i0:
            G[i0:i1, :i0].copy_(G[:i0, i0:i1].mT)
        D = G[i0:i1, i0:i1]
        upper = D.triu(1)
        D.copy_(upper + upper.mT)
        D.diagonal().copy_(diagonal[i0:i1])


def gram_factor_from_gram_inplace_reference(G: torch.Tensor, damping: torch.Tensor):
    """:func:`gram_factor_from_gram_reference` written into G itself: returns ``(info, jitter)``.

    G: (B, n, n) contiguous, symmetric. Afterwards G's lower triangle (with the diagonal) holds L and its
    strict upper triangle still holds G's. A failed factorisation is retried from that strict upper
    triangle and the damped diagonal (kept as a vector), so no copy of G is ever made.
    """
    B, n, _ = G.shape
    info = torch.zeros(B, dtype=torch.int32, device=G.device)
    jitter = torch.zeros(B, dtype=G.dtype, device=G.device)
    eps = torch.finfo(G.dtype).eps
    for b in range(B):
        Gb = G[b]
        Gb.diagonal().add_(damping[b])
        diagonal = Gb.diagonal().clone()
        scale = diagonal.mean().abs()
        scale = torch.where((scale > 0) & scale.isfinite(), scale, torch.ones_like(scale))
        floor = PIVOT_FLOOR * eps * scale
        finite = torch.ones((), dtype=torch.bool, device=G.device)
        for i0, i1 in _blocks(n):   # row blocks: no n x n temporary
            finite &= Gb[i0:i1].isfinite().all()
        finite = bool(finite)
        if finite and _factor_lower_in_place(Gb, floor):
            continue
        info[b] = -1
        for k, rel in enumerate(jitter_schedule(G.dtype) if finite else ()):
            _lower_from_upper(Gb, diagonal + rel * scale)
            if _factor_lower_in_place(Gb, floor):
                info[b], jitter[b] = k + 1, rel * scale
                break
        if info[b] < 0:   # non-finite input only: the diagonal factor keeps the result finite
            for i0, i1 in _blocks(n):
                Gb[i0:i1, :i0].zero_()
                D = Gb[i0:i1, i0:i1]
                D.copy_(D.triu(1))
            d = torch.where(diagonal.isfinite() & (diagonal > 0), diagonal, torch.ones_like(diagonal))
            Gb.diagonal().copy_(d.sqrt())
            jitter[b] = scale
    return info, jitter


def cholesky_solve_lower(R: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """(L L^T)^{-1} R reading only L's lower triangle, without copying L (``torch.cholesky_solve`` copies
    its factor). For the factors of :func:`gram_factor_from_gram_`, whose strict upper triangle holds G."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, R, upper=False), upper=True)


def gram_factor_reference(A: torch.Tensor, damping: torch.Tensor, append_ones: bool = False):
    """:func:`gram_factor_from_gram_reference` of G = A A^T (+ 1 1^T). A: (B, n, m)."""
    return gram_factor_from_gram_reference(gram(A, append_ones), damping)


def gram_solve_reference(A: torch.Tensor, L: torch.Tensor, R: torch.Tensor, append_ones: bool = False):
    """A^T (L L^T)^{-1} R. A: (B, n, m), L: (B, n, n), R: (B, n, k) -> (B, m [+1], k)."""
    U = torch.cholesky_solve(R, L)
    out = A.mT @ U
    if append_ones:
        out = torch.cat([out, U.sum(dim=-2, keepdim=True)], dim=-2)
    return out


def gram_cholesky_solve_reference(A, R, damping, append_ones=False):
    """A^T (A A^T + lambda I)^{-1} R (ones column appended to A when asked), with jitter on failure.

    Returns ``(out, info, jitter)`` as :func:`gram_factor_reference` and :func:`gram_solve_reference`.
    """
    L, info, jitter = gram_factor_reference(A, damping, append_ones)
    return gram_solve_reference(A, L, R, append_ones), info, jitter


# --------------------------------------------------------------------------------------------------
# Public wrappers and trusted entries
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


def damping_tensor(damping, A: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
    """damping as a contiguous (B,) tensor of A's dtype and device, B = A.shape[0].

    A float is checked on the host. A tensor is checked for shape and device; its values (finite,
    >= 0) only when ``check_finite``, because that reads them back from the device (a host sync).
    """
    B = A.shape[0]
    if isinstance(damping, torch.Tensor):
        if damping.dim() == 0:
            damping = damping.reshape(1).expand(B)
        if damping.shape != (B,):
            raise ValueError(f"damping must be a float or a tensor of shape ({B},), got shape "
                             f"{tuple(damping.shape)}")
        if damping.device != A.device:
            raise ValueError(f"damping is on {damping.device} but A is on {A.device}")
        if damping.dtype == torch.bool or damping.is_complex():
            raise ValueError(f"damping must be a real tensor, got {damping.dtype}")
        damping = damping.to(A.dtype)
        if check_finite:
            check_tensor("damping", damping)
            # A negative damping would make the Gram indefinite on purpose; refuse it up front.
            if bool((damping < 0).any()):
                raise ValueError("damping must be >= 0")
        return damping.contiguous()
    if isinstance(damping, bool):
        raise ValueError("damping must be a float or a tensor, got bool")
    try:
        value = float(damping)
    except (TypeError, ValueError):
        raise ValueError(f"damping must be a float or a tensor, got {type(damping).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"damping must be finite, got {value}")
    if value < 0:
        raise ValueError(f"damping must be >= 0, got {value}")
    if A.is_floating_point() and value > torch.finfo(A.dtype).max:
        raise ValueError(f"damping = {value:g} overflows {str(A.dtype).replace('torch.', '')} (largest finite "
                         f"value {torch.finfo(A.dtype).max:.3g})")
    return torch.full((B,), value, dtype=A.dtype, device=A.device)


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


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


@float32_under_autocast
def gram_factor(A: torch.Tensor, damping=0.0, append_ones: bool = False,
                check_finite: bool = True) -> GramFactor:
    """Factor all B Grams at once: ``L L^T = A A^T (+ 1 1^T) + lambda I``.

    A: (B, n, m); damping: a float or a (B,) tensor, absolute. With ``append_ones`` an implicit column
    of ones is appended to A. Failed factorisations are retried with growing jitter (see
    :func:`jitter_schedule`) and reported in ``info``; the result is never NaN.
    Set ``check_finite=False`` to skip the (synchronising) finiteness check on trusted GPU input.
    """
    _check_A(A, check_finite)
    _check_flag("append_ones", append_ones)
    return gram_factor_unchecked(A, damping_tensor(damping, A, check_finite), append_ones)


class CholeskyFactor(NamedTuple):
    """``L L^T = G + (lambda + jitter) I`` for B ready-made Grams; ``info``/``jitter`` as in GramFactor."""
    L: torch.Tensor
    info: torch.Tensor
    jitter: torch.Tensor


@float32_under_autocast
def gram_factor_from_gram(G: torch.Tensor, damping=0.0, check_finite: bool = True) -> CholeskyFactor:
    """Factor Grams formed elsewhere (G: (B, n, n), symmetric PSD) with the same jitter policy as
    :func:`gram_factor`: ``L L^T = G + (lambda + jitter) I``. Solve with ``torch.cholesky_solve(R, L)``.
    """
    check_tensor("G", G, ndim=3, finite=check_finite)
    if G.shape[1] != G.shape[2] or G.shape[0] == 0 or G.shape[1] == 0:
        raise ValueError(f"G must be a non-empty batch of square matrices (B, n, n), got shape {tuple(G.shape)}")
    if check_finite:
        # The backends read different triangles: a non-symmetric G would give backend-dependent factors.
        tol = math.sqrt(torch.finfo(G.dtype).eps) * float(G.abs().amax())
        if float((G - G.mT).abs().amax()) > tol:
            raise ValueError("G must be symmetric (a Gram matrix); it differs from its transpose by more than "
                             "sqrt(eps) of its largest entry")
    return gram_factor_from_gram_unchecked(G, damping_tensor(damping, G, check_finite))


def gram_factor_from_gram_(G: torch.Tensor, damping=0.0, check_finite: bool = True) -> CholeskyFactor:
    """:func:`gram_factor_from_gram` in place: the factor is written into G, which must be contiguous.

    Returns a :class:`CholeskyFactor` whose ``L`` is G itself: its lower triangle (with the diagonal) holds
    the factor of ``G + (lambda + jitter) I``, its strict upper triangle still holds G's (G's diagonal is
    lost). Solve with :func:`cholesky_solve_lower`, which reads the lower triangle only. Retries and
    failures follow :func:`gram_factor_from_gram`; no n x n temporary is made.
    """
    check_tensor("G", G, ndim=3, finite=check_finite)
    if G.shape[1] != G.shape[2] or G.shape[0] == 0 or G.shape[1] == 0:
        raise ValueError(f"G must be a non-empty batch of square matrices (B, n, n), got shape {tuple(G.shape)}")
    if not G.is_contiguous():
        raise ValueError("G must be contiguous to be factored in place (pass G.contiguous())")
    if G.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"G must be float32 or float64 to be factored in place, got {G.dtype}")
    if check_finite:   # a retry rebuilds G from its strict upper triangle: G must be symmetric
        blocks = list(_blocks(G.shape[1]))   # row blocks: no n x n temporary
        tol = math.sqrt(torch.finfo(G.dtype).eps) * max(float(G[:, i0:i1].abs().amax()) for i0, i1 in blocks)
        for i0, i1 in blocks:
            if float((G[:, i0:i1] - G[:, :, i0:i1].mT).abs().amax()) > tol:
                raise ValueError("G must be symmetric (a Gram matrix); it differs from its transpose by more "
                                 "than sqrt(eps) of its largest entry")
    return gram_factor_from_gram_inplace_unchecked(G, damping_tensor(damping, G, check_finite))


@float32_under_autocast
def gram_solve(factor: GramFactor, R: torch.Tensor, check_finite: bool = True) -> torch.Tensor:
    """Solve against new right-hand sides with a stored factor: ``A^T (L L^T)^{-1} R``.

    R: (B, n, k) -> (B, m, k), or (B, m + 1, k) with ``append_ones`` (the extra row is ``1^T U``).
    """
    if not isinstance(factor, GramFactor):
        raise ValueError("factor must be the GramFactor returned by gram_factor")
    _check_R(R, factor.A, check_finite)
    return gram_solve_unchecked(factor, R)


def gram_factor_unchecked(A: torch.Tensor, damping: torch.Tensor, append_ones: bool) -> GramFactor:
    """:func:`gram_factor` for arguments the caller has checked (damping a (B,) tensor like A)."""
    if _use_kernel("gram_factor", A):
        L, info, jitter = torch.ops.revgn.gram_factor(A, damping, append_ones)
    else:
        L, info, jitter = gram_factor_reference(A, damping, append_ones)
    return GramFactor(A, L, info, jitter, bool(append_ones))


def gram_factor_from_gram_unchecked(G: torch.Tensor, damping: torch.Tensor) -> CholeskyFactor:
    """:func:`gram_factor_from_gram` for arguments the caller has checked."""
    if _use_kernel("gram_factor_from_gram", G):
        return CholeskyFactor(*torch.ops.revgn.gram_factor_from_gram(G, damping))
    return CholeskyFactor(*gram_factor_from_gram_reference(G, damping))


def gram_factor_from_gram_inplace_unchecked(G: torch.Tensor, damping: torch.Tensor) -> CholeskyFactor:
    """:func:`gram_factor_from_gram_` for arguments the caller has checked (G contiguous)."""
    if _use_kernel("gram_factor_from_gram_inplace", G):
        info, jitter = torch.ops.revgn.gram_factor_from_gram_inplace(G, damping)
    else:
        info, jitter = gram_factor_from_gram_inplace_reference(G, damping)
    return CholeskyFactor(G, info, jitter)


def gram_solve_unchecked(factor: GramFactor, R: torch.Tensor) -> torch.Tensor:
    """:func:`gram_solve` for arguments the caller has checked."""
    if _use_kernel("gram_solve", R):
        return torch.ops.revgn.gram_solve(factor.A, factor.L, R, factor.append_ones)
    return gram_solve_reference(factor.A, factor.L, R, factor.append_ones)


@float32_under_autocast
def gram_cholesky_solve(A: torch.Tensor, R: torch.Tensor, damping=0.0, append_ones: bool = False,
                        return_info: bool = False, check_finite: bool = True):
    """Minimum-norm solve ``A^T (A A^T + lambda I)^{-1} R`` for a batch of small Grams.

    A: (B, n, m), R: (B, n, k), damping: float or (B,) tensor. With ``append_ones`` the implicit ones
    column makes the result (B, m + 1, k). Differentiable in A, R and a tensor damping. With
    ``return_info`` also returns the per-matrix retry count (int32, see :class:`GramFactor`).
    """
    _check_A(A, check_finite)
    _check_R(R, A, check_finite)
    _check_flag("append_ones", append_ones)
    _check_flag("return_info", return_info)
    lam = damping_tensor(damping, A, check_finite)
    if _use_kernel("gram_cholesky_solve", A):
        out, info, _ = torch.ops.revgn.gram_cholesky_solve(A, R, lam, append_ones)
    else:
        out, info, _ = gram_cholesky_solve_reference(A, R, lam, append_ones)
    return (out, info) if return_info else out

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

    if hasattr(torch.ops.revgn, "gram_factor_from_gram_inplace"):
        @torch.library.register_fake("revgn::gram_factor_from_gram_inplace")
        def _(G, damping):
            return G.new_empty(G.shape[0], dtype=torch.int32), G.new_empty(G.shape[0])

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
    # Under autocast the Gram and its Cholesky factor are formed in float32 (float64 stays).
    _register_autocast(*(f"revgn::{op}" for op in ("gram_factor", "gram_factor_from_gram", "gram_solve",
                                                    "gram_cholesky_solve") if hasattr(torch.ops.revgn, op)))


_register()
