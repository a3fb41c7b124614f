"""Pure-PyTorch references for every op in ``revgn_ext.ops``.

These few lines are the specification: each C++/CUDA kernel is an optimisation of the function of the
same name here, and the tests compare the two. They also serve as the fallback when the compiled
extension is not available.
"""
from __future__ import annotations

import torch

# Failure policy shared by every backend. A factorisation fails when a pivot L_jj^2 falls to
# ``PIVOT_FLOOR * eps * scale`` or below (scale = mean of the damped Gram's diagonal, 1 for an all-zero
# Gram): such a pivot is rounding noise of a singular matrix, and solving with it would amplify noise.
# A failed matrix is retried with jitter ``rel * scale`` for rel in ``jitter_schedule``, growing tenfold
# up to ``scale`` itself, where the matrix is PD with condition number <= n + 1 and cannot fail.
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
    ok = (status == 0) & ((pivots * pivots) > floor.unsqueeze(-1)).all(-1)
    return L, ok


def gram(A: torch.Tensor, append_ones: bool = False) -> torch.Tensor:
    """G = A A^T, or [A, 1][A, 1]^T = A A^T + 1 1^T with ``append_ones``. A: (B, n, m) -> (B, n, n)."""
    G = A @ A.mT
    if append_ones:
        G = G + 1.0
    return G


def gram_factor_from_gram(G: torch.Tensor, damping: torch.Tensor):
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
    info = torch.zeros(B, dtype=torch.int32, device=G.device)
    jitter = torch.zeros(B, dtype=G.dtype, device=G.device)
    for b in range(B):
        if ok[b]:
            continue
        info[b] = -1
        for k, rel in enumerate(jitter_schedule(G.dtype)):
            Lb, okb = _cholesky_ok(G[b] + rel * scale[b] * eye, floor[b])
            if okb:
                L[b], info[b], jitter[b] = Lb, k + 1, rel * scale[b]
                break
        if info[b] < 0:
            d = G[b].diagonal()
            L[b] = torch.diag(torch.where(d.isfinite() & (d > 0), d, torch.ones_like(d)).sqrt())
            jitter[b] = scale[b]
    return L, info, jitter


def gram_factor(A: torch.Tensor, damping: torch.Tensor, append_ones: bool = False):
    """:func:`gram_factor_from_gram` of G = A A^T (+ 1 1^T). A: (B, n, m)."""
    return gram_factor_from_gram(gram(A, append_ones), damping)


def gram_solve(A: torch.Tensor, L: torch.Tensor, R: torch.Tensor, append_ones: bool = False):
    """A^T (L L^T)^{-1} R. A: (B, n, m), L: (B, n, n), R: (B, n, k) -> (B, m [+1], k)."""
    U = torch.cholesky_solve(R, L)
    out = A.mT @ U
    if append_ones:
        out = torch.cat([out, U.sum(dim=-2, keepdim=True)], dim=-2)
    return out


def gram_cholesky_solve(A, R, damping, append_ones=False):
    """A^T (A A^T + lambda I)^{-1} R (ones column appended to A when asked), with jitter on failure.

    Returns ``(out, info, jitter)`` as :func:`gram_factor` and :func:`gram_solve`.
    """
    L, info, jitter = gram_factor(A, damping, append_ones)
    return gram_solve(A, L, R, append_ones), info, jitter


# --------------------------------------------------------------------------------------------------
# Reversible coupling layer
#   F(U) = act(U V_F) W_F^T + b_F,  G(U) = act(U V_G) W_G^T + b_G   (V = None: no bottleneck, act(U))
#   forward:  y1 = x1 + F(x2),  y2 = x2 + G(y1)      inverse:  x2 = y2 - G(y1),  x1 = y1 - F(x2)
# Shapes: x*, y* (n, d/2); V*, W* (d/2, M); b* (d/2,). Without a bottleneck W* is (d/2, d/2).
# --------------------------------------------------------------------------------------------------

ACTIVATIONS = ("identity", "relu", "tanh", "gelu")


def activation(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "identity":
        return z
    if name == "relu":
        return torch.relu(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "gelu":
        return torch.nn.functional.gelu(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_grad(name: str, z: torch.Tensor) -> torch.Tensor:
    """act'(z), elementwise."""
    if name == "identity":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "tanh":
        return 1.0 - torch.tanh(z) ** 2
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
        pdf = torch.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_grad_times(name: str, t: torch.Tensor, pre, h: torch.Tensor | None = None) -> torch.Tensor:
    """act'(z) * t. Given the features h = act(z), act' is read off h where that is exact (identity,
    relu: h > 0, tanh: 1 - h^2), which saves forming z; otherwise z = pre() is computed (GELU)."""
    if name == "identity":
        return t
    # ATen's activation backward kernels compute exactly these products in one pass.
    if h is not None and name == "relu":   # act'(z) = [z > 0] = [h > 0]
        return torch.ops.aten.threshold_backward(t, h, 0.0)
    if h is not None and name == "tanh":   # act'(z) = 1 - h^2
        return torch.ops.aten.tanh_backward(t, h)
    return activation_grad(name, pre()) * t


def _pre(U, V):
    return U if V is None else U @ V


def coupling_forward(x1, x2, VF, WF, bF, VG, WG, bG, activation_name="relu", return_features=False):
    """(y1, y2, hF, hG) with hF = act(x2 V_F), hG = act(y1 V_G) when ``return_features``, else None."""
    hF = activation(activation_name, _pre(x2, VF))
    y1 = x1 + hF @ WF.mT + bF
    hG = activation(activation_name, _pre(y1, VG))
    y2 = x2 + hG @ WG.mT + bG
    if return_features:
        return y1, y2, hF, hG
    return y1, y2, None, None


def coupling_inverse(y1, y2, VF, WF, bF, VG, WG, bG, activation_name="relu"):
    """(x1, x2) with x2 = y2 - G(y1), x1 = y1 - F(x2)."""
    x2 = y2 - activation(activation_name, _pre(y1, VG)) @ WG.mT - bG
    x1 = y1 - activation(activation_name, _pre(x2, VF)) @ WF.mT - bF
    return x1, x2


def coupling_inverse_tangent(y1, x2, dy1, dy2, VF, WF, VG, WG, activation_name="relu", hF=None, hG=None):
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
    """Vector-Jacobian product of :func:`coupling_forward` at input half x2 and output half y1, with
    zF = x2 V_F, zG = y1 V_G and cotangents (gy1, gy2) of the outputs (ghF, ghG of the features):

        gzG = act'(zG) * (gy2 W_G + ghG),   gy1' = gy1 + gzG V_G^T,   gzF = act'(zF) * (gy1' W_F + ghF)
        gx1 = gy1',  gx2 = gy2 + gzF V_F^T,  gW_F = gy1'^T hF,  gb_F = 1^T gy1',  gV_F = x2^T gzF
        (and the same for G with gy2, y1, hG, gzG).

    The features hF, hG are recomputed when not given. Returns (gx1, gx2, gVF, gWF, gbF, gVG, gWG, gbG);
    an entry whose ``need`` flag (same order) is False is None.
    """
    zF = zG = None
    if hF is None or hG is None or activation_name not in ("identity", "relu", "tanh"):
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
