"""Right inverse of a RevMLP's Jacobian: Delta with J Delta = dZ (SPEC section 3, steps 2-6).

Z = X_L is the network output and J = dZ/dtheta. Block l takes a share s_l of the target (sum s_l = 1):

* transport: D_L = dZ, D_{l-1} = (dX_l/dX_{l-1})^{-1} D_l, the tangent of block l's inverse at X_l
  (:func:`revgn_ext.ops.coupling_inverse_tangent`, hand-written, no forward-mode autograd);
* per block, with A_F = [act(X2 V_F), 1] and A_G = [act(Y1 V_G), 1] (n x (M+1)):
      Theta_F = A_F^+ (s_l D_l^(1))
      cross   = (act'(Y1 V_G) * ((A_F Theta_F) V_G)) W_G^T      (how F's update moves Y2 through G)
      Theta_G = A_G^+ (s_l D_l^(2) - cross)
  where Theta stacks [dW^T; db^T], so block l moves its own output by exactly s_l D_l when each A has
  full row rank n, and by the least-squares fit otherwise;
* A^+ R = A^T (A A^T + lambda I)^{-1} R through the n x n Gram (ones column implicit:
  A A^T = H H^T + 1 1^T); all 2L Grams depend only on forward features, so they are factored before
  the solves (on a GPU in one batched :func:`revgn_ext.ops.gram_factor` call; on the CPU one call per
  feature matrix, which avoids stacking copies of them). The solves run one half-layer at a time:
  torch's batched cholesky_solve on CUDA was 4-5x slower per matrix than single-matrix calls at
  n = 1024 (measured on an H100), and on the CPU batching gained nothing.
* RevGN's target dZ = E Q^T has rank c (classes) << d/2 (:class:`LowRankTarget`). The solves are linear
  in their right-hand side, so the last block's F half solves for s E (c columns) and multiplies by
  Q^T afterwards, and its two products with V_G (transport and cross-term) run as E (Q^T V_G): at
  d/2 = 392, c = 10 this removes three n x d/2 x M GEMMs and a quarter of the solves per step.

``solver="svd"`` instead uses the official truncated pseudo-inverse: singular values of A below
max(rtol * s_max, atol) are dropped (and the kept ones filtered as s / (s^2 + lambda)).

Data-parallel (``shards``, a :class:`revgn_ext.distributed.ShardGroup`): rank r holds rows A_r of every
A and rows R_r of every right-hand side. The rows are gathered, so every rank factors the same global
Gram and solves the same U = (A A^T + 1 1^T + mu I)^{-1} R; it keeps its share [A_r, 1]^T U_r of
Theta = sum_r [A_r, 1]^T U_r and its rows R_r - mu U_r of the fit A Theta, which is all the next
half-layer needs. One all_reduce of the concatenated shares then gives every rank the full Delta.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ..distributed import choose_gram_route
from ..ops.activations import activation_grad_times
from ..ops.coupling import coupling_inverse_tangent_unchecked
from ..ops.gram import GramFactor, gram_factor_from_gram_unchecked, gram_factor_unchecked, gram_solve_unchecked

__all__ = ["SOLVERS", "BlockDelta", "LowRankTarget", "transport_targets", "gram_damping", "right_inverse"]

SOLVERS = ("cholesky", "svd")


class BlockDelta(NamedTuple):
    """The update of one block, shaped like its parameters."""
    WF: torch.Tensor
    bF: torch.Tensor
    WG: torch.Tensor
    bG: torch.Tensor


class LowRankTarget(NamedTuple):
    """A target dZ = left @ right^T (n, d) kept in factors. RevGN's dZ = E Q^T has rank c (the number
    of classes), far below d/2, so the last block's products with it run through the c columns."""
    left: torch.Tensor   # (n, k)
    right: torch.Tensor  # (d, k)


def _pre(U: torch.Tensor, V) -> torch.Tensor:
    return U if V is None else U @ V


def _gram_flops_from_features(n: int, M: int) -> float:
    """Multiply-adds of the CPU Gram kernel for one (n, M) feature matrix (the lower block triangle
    from n = 192 on, 5/8 of the full product: csrc/gram_cholesky/gram_cholesky_cpu.cpp)."""
    return (5 / 8 if n >= 192 else 1.0) * n * n * M


def _cached_vvt(block, side: str, V: torch.Tensor) -> torch.Tensor:
    """V V^T (d/2, d/2) of a fixed projection V, cached on the block while V is the same tensor at the
    same version (an in-place change or a new buffer recomputes it)."""
    name = "_revgn_vvt_" + side
    cached = getattr(block, name, None)
    if cached is not None and cached[0] is V and cached[1] == V._version:
        return cached[2]
    C = V @ V.mT
    try:
        object.__setattr__(block, name, (V, V._version, C))
    except (AttributeError, TypeError):  # an immutable block description: no cache
        pass
    return C


def _identity_routes(blocks: Sequence, traces: Sequence) -> tuple[list, list]:
    """For each half-layer (F_1, G_1, F_2, ...): its Gram formed from factors, or None, and the factors
    (X, V) for Theta, or None.

    An identity half has A = X V (X = x2 or y1, (n, d/2); V (d/2, M) fixed), so
    A A^T = X (V V^T) X^T costs n d/2 (d/2 + n) multiply-adds with V V^T cached on the block, against
    the Gram kernel's 5/8 n^2 M (n 1024, M 8000: 0.57 G against 5.2 G), and A^T U = V^T (X^T U)
    costs k d/2 (n + M) against k n M. Each route is taken where it does fewer multiply-adds.
    """
    grams, factors = [], []
    for b, t in zip(blocks, traces):
        for side, X, V in (("F", t.x2, b.VF), ("G", t.y1, b.VG)):
            if b.activation != "identity" or V is None:
                grams.append(None)
                factors.append(None)
                continue
            n, half, M = X.shape[0], X.shape[1], V.shape[1]
            if n * half * (half + n) < _gram_flops_from_features(n, M):
                T = X @ _cached_vvt(b, side, V)
                grams.append(T @ X.mT)
            else:
                grams.append(None)
            factors.append((X, V) if half * (n + M) < n * M else None)
    return grams, factors


def _inverse_tangent_low_rank(b, t, E: torch.Tensor, P1: torch.Tensor, dy1: torch.Tensor,
                              dy2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's inverse tangent (:func:`revgn_ext.ops.coupling_inverse_tangent`) along
    (dy1, dy2) with dy1 = E P1^T: dy1 V_G = E (P1^T V_G) costs n k M + d/2 k M instead of n d/2 M."""
    dzG = E @ (P1.mT @ b.VG) if b.VG is not None else dy1
    dx2 = torch.addmm(dy2, activation_grad_times(b.activation, dzG, lambda: _pre(t.y1, b.VG), t.hG), b.WG.mT,
                      alpha=-1)
    dzF = _pre(dx2, b.VF)
    dx1 = torch.addmm(dy1, activation_grad_times(b.activation, dzF, lambda: _pre(t.x2, b.VF), t.hF), b.WF.mT,
                      alpha=-1)
    return dx1, dx2


def _cross_term(b, t, fit: torch.Tensor, P1: torch.Tensor | None = None) -> torch.Tensor:
    """cross = (act'(Y1 V_G) * (dY1 V_G)) W_G^T, how F's update dY1 moves Y2 through G; dY1 = fit, or
    fit P1^T when P1 is given (then dY1 V_G = fit (P1^T V_G))."""
    if P1 is None and b.activation == "identity" and b.VG is not None:
        # cross = dY1 (V_G W_G^T): d/2 x M x d/2 + n x d/2 x d/2 multiply-adds instead of 2 n x d/2 x M,
        # fewer whenever d/2 (M + n) < 2 n M (n 256, d/2 392, M 2048: 0.86x; n 1024, M 8000: 0.22x).
        half, M, n = b.VG.shape[0], b.VG.shape[1], fit.shape[0]
        if half * (M + n) < 2 * n * M:
            return fit @ (b.VG @ b.WG.mT)
    dzG = _pre(fit, b.VG) if P1 is None else fit @ (P1.mT if b.VG is None else P1.mT @ b.VG)
    return activation_grad_times(b.activation, dzG, lambda: _pre(t.y1, b.VG), t.hG) @ b.WG.mT


def transport_targets(blocks: Sequence, traces: Sequence, dZ1: torch.Tensor, dZ2: torch.Tensor,
                      low_rank: tuple | None = None) -> list:
    """[(D_l^(1), D_l^(2)) for l = 1..L]: D_L = dZ, D_{l-1} = JVP of block l's inverse along D_l.

    ``blocks[l]`` has VF, WF, VG, WG, activation; ``traces[l]`` has the block's input half x2 and
    output half y1 (the linearisation point) and the features hF, hG, from which act' is read.
    ``low_rank = (E, P1)`` with dZ1 = E P1^T lets the first step multiply V_G through E's k columns.
    """
    D = [None] * len(blocks)
    D[-1] = (dZ1, dZ2)
    for l in range(len(blocks) - 1, 0, -1):
        b, t = blocks[l], traces[l]
        if low_rank is not None and l == len(blocks) - 1:
            D[l - 1] = _inverse_tangent_low_rank(b, t, *low_rank, *D[l])
        else:
            D[l - 1] = coupling_inverse_tangent_unchecked(t.y1, t.x2, *D[l], b.VF, b.WF, b.VG, b.WG,
                                                          b.activation, t.hF, t.hG)
    return D


def gram_damping(trace: torch.Tensor, n: int, damping: float, relative: bool) -> torch.Tensor:
    """Absolute lambda per Gram (B,) from ``trace`` = tr(A A^T) = ||A||_F^2 per Gram:
    ``damping * mean(diag(A A^T + 1 1^T)) = damping * (trace / n + 1)`` when relative."""
    if not relative:
        return torch.full_like(trace, float(damping))
    # An overflowing Gram must end in a non-finite update the optimizer refuses, not in an error here.
    return torch.nan_to_num(damping * (trace / n + 1.0), nan=0.0, posinf=torch.finfo(trace.dtype).max)


def _shifts_and_failures(lam: torch.Tensor, jitter: torch.Tensor, info: torch.Tensor):
    """([mu_i = lambda_i + jitter_i], [factor i is a diagonal stand-in]) in one host transfer."""
    mu_and_info = torch.stack([lam + jitter, info.to(lam.dtype)]).tolist()
    return mu_and_info[0], [i < 0 for i in mu_and_info[1]]


class _CholeskySolver:
    """A_i^+ R = A_i^T (A_i A_i^T + 1 1^T + lambda_i I)^{-1} R for B feature matrices A_i (n, M).

    ``A`` is a sequence of the B matrices (a (B, n, M) tensor works too). On the CPU each is factored
    on its own, straight from the forward's feature tensors: stacking them into one (B, n, M) batch
    for a single call copied 8 MB (n 256, M 2048) to 131 MB (n 1024, M 8000) per step, 8 ms to 194 ms at
    1 thread, while the CPU kernel factors the batch one matrix at a time anyway. On a GPU one batched
    call saves launches, so there the matrices are stacked.

    Also returns the fit A_i Theta. On the CPU it comes from the factor: with L L^T = A A^T + mu I
    (mu = lambda + jitter) and U = (L L^T)^{-1} R, A Theta = A A^T U = R - mu U, from the same solve
    that gives Theta, instead of an n x M x d/2 GEMM. On a GPU the GEMM is the faster of the two (measured on an
    H100), and it is also the only choice for a matrix whose retries all failed, whose diagonal
    stand-in factor breaks the identity.
    """

    def __init__(self, A, lam: torch.Tensor, grams: Sequence | None = None, factors: Sequence | None = None):
        """``grams[i]``, when given, is A_i A_i^T formed elsewhere (factored without reading A_i);
        ``factors[i] = (X, V)`` with A_i = X V makes Theta's product (U^T X) V (CPU only)."""
        lam = lam.contiguous()
        self.from_factor = A[0].device.type == "cpu"
        if self.from_factor:
            self.A = list(A)
            self.factors = list(factors) if factors is not None else [None] * len(self.A)
            grams = grams if grams is not None else [None] * len(self.A)
            parts = [gram_factor_unchecked(a[None], lam[i:i + 1], True) if G is None
                     else gram_factor_from_gram_unchecked((G + 1.0)[None], lam[i:i + 1])
                     for i, (a, G) in enumerate(zip(self.A, grams))]
            self.L = [f.L[0] for f in parts]
            info, jitter = torch.cat([f.info for f in parts]), torch.cat([f.jitter for f in parts])
            self.mu, self.failed = _shifts_and_failures(lam, jitter, info)
        else:
            f = gram_factor_unchecked(A if torch.is_tensor(A) else torch.stack(list(A)), lam, True)
            self.A, self.L, info, jitter = f.A, f.L, f.info, f.jitter
        self.factor = GramFactor(self.A, self.L, info, jitter, True)

    def __call__(self, i: int, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        A, L = self.A[i], self.L[i]
        if not self.from_factor or self.failed[i]:
            one = GramFactor(A[None], L[None], self.factor.info[i:i + 1], self.factor.jitter[i:i + 1], True)
            theta = gram_solve_unchecked(one, R[None])[0]
            return theta, torch.addmm(theta[-1], A, theta[:-1])
        # One solve serves both: Theta = [A^T U; 1^T U] and the fit R - mu U. (L^T through mT is the
        # column-major upper factor LAPACK reads without a copy.)
        # Theta is formed transposed, (k, M + 1) row-major, so that the W part of the update,
        # Theta[:M]^T, is read row by row when it is added to W (a column-strided update cost 4 % of
        # the step at n 256, M 2048).
        U = torch.cholesky_solve(R, L.mT, upper=True)
        M = A.shape[1]
        theta_t = U.new_empty(U.shape[1], M + 1)
        if self.factors[i] is None:
            torch.mm(U.mT, A, out=theta_t[:, :M])
        else:
            X, V = self.factors[i]
            torch.mm(U.mT @ X, V, out=theta_t[:, :M])
        torch.sum(U, 0, out=theta_t[:, M])
        return theta_t.mT, R - self.mu[i] * U

    def report(self) -> dict:
        return {"info": self.factor.info, "jitter": self.factor.jitter}


class _ShardedCholeskySolver(_CholeskySolver):
    """Data-parallel :class:`_CholeskySolver`: A holds every rank's rows; R arrives as this rank's rows
    and the result is (this rank's share [A_r, 1]^T U_r of Theta, this rank's rows of A Theta)."""

    def __init__(self, A: torch.Tensor, lam: torch.Tensor, shards):
        self.factor = gram_factor_unchecked(A, lam.contiguous(), True)
        self.mu, self.failed = _shifts_and_failures(lam, self.factor.jitter, self.factor.info)
        self.shards = shards

    def _local_rows(self, i: int) -> torch.Tensor:
        """A_r, this rank's rows of the i-th feature matrix."""
        return self.factor.A[i, self.shards.rows]

    def _stand_in_fit(self, i: int, U: torch.Tensor) -> torch.Tensor:
        """This rank's rows of A Theta from the full Theta, for a diagonal stand-in factor, which breaks
        A A^T U = R - mu U."""
        return torch.addmm(U.sum(0), self._local_rows(i), self.factor.A[i].mT @ U)

    def __call__(self, i: int, R_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        U = torch.cholesky_solve(self.shards.gather_rows(R_local), self.factor.L[i])
        U_r, A_r = U[self.shards.rows], self._local_rows(i)
        share = torch.cat([A_r.mT @ U_r, U_r.sum(0, keepdim=True)])
        fit = self._stand_in_fit(i, U) if self.failed[i] else R_local - self.mu[i] * U_r
        return share, fit


class _ReducedGramCholeskySolver(_ShardedCholeskySolver):
    """:class:`_ShardedCholeskySolver` for the "reduce_gram" route: the Grams arrive already summed
    over the ranks (G = A A^T), and A stays sharded, so each rank holds only its rows A_r."""

    def __init__(self, G: torch.Tensor, A_local: torch.Tensor, lam: torch.Tensor, shards):
        self.G1 = G + 1.0   # the implicit ones column: [A, 1][A, 1]^T = A A^T + 1 1^T
        chol = gram_factor_from_gram_unchecked(self.G1, lam.contiguous())
        self.factor = GramFactor(A_local, chol.L, chol.info, chol.jitter, True)
        self.mu, self.failed = _shifts_and_failures(lam, chol.jitter, chol.info)
        self.shards = shards

    def _local_rows(self, i: int) -> torch.Tensor:
        return self.factor.A[i]

    def _stand_in_fit(self, i: int, U: torch.Tensor) -> torch.Tensor:
        # A Theta = [A, 1][A, 1]^T U: the rows of the undamped Gram, since the full A is not here.
        return self.G1[i, self.shards.rows] @ U


class _SVDSolver:
    """Truncated pinv: A^+ R = V diag(phi(s)) U^T R with phi(s) = s / (s^2 + lambda) for
    s >= max(rtol * s_max, atol) and 0 otherwise (A = U diag(s) V^T, ones column explicit)."""

    def __init__(self, A: torch.Tensor, lam: torch.Tensor, rtol: float, atol: float):
        ones = A.new_ones(A.shape[0], A.shape[1], 1)
        U, s, Vh = torch.linalg.svd(torch.cat([A, ones], dim=2), full_matrices=False)
        keep = s >= torch.clamp(rtol * s[:, :1], min=atol)
        self.U, self.s, self.Vh = U, s, Vh
        self.phi = torch.where(keep, s / (s * s + lam[:, None]), torch.zeros_like(s))
        self.rank = keep.sum(1)

    def __call__(self, i: int, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Theta, A Theta) with A Theta = U diag(s phi(s)) U^T R."""
        UR = self.U[i].mT @ R
        theta = self.Vh[i].mT @ (self.phi[i][:, None] * UR)
        fit = self.U[i] @ ((self.s[i] * self.phi[i])[:, None] * UR)
        return theta, fit

    def report(self) -> dict:
        return {"rank": self.rank}


class _ShardedSVDSolver(_SVDSolver):
    """Data-parallel :class:`_SVDSolver`. With [A, 1] = U diag(s) V^T, V diag(phi) U^T R equals
    [A, 1]^T W for W = U diag(phi / s) U^T R, so this rank's share of Theta is [A_r, 1]^T W_r."""

    def __init__(self, A: torch.Tensor, lam: torch.Tensor, rtol: float, atol: float, shards):
        super().__init__(A, lam, rtol, atol)
        self.A, self.shards = A, shards
        self.phi_over_s = torch.where(self.phi > 0, self.phi / self.s, torch.zeros_like(self.s))

    def __call__(self, i: int, R_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.shards.rows
        UR = self.U[i].mT @ self.shards.gather_rows(R_local)
        U_r = self.U[i][rows]
        W_r = U_r @ (self.phi_over_s[i][:, None] * UR)
        share = torch.cat([self.A[i, rows].mT @ W_r, W_r.sum(0, keepdim=True)])
        fit = U_r @ ((self.s[i] * self.phi[i])[:, None] * UR)
        return share, fit


def right_inverse(blocks: Sequence, traces: Sequence, dZ, shares: Sequence[float],
                  damping: float = 0.0, relative_damping: bool = True, solver: str = "cholesky",
                  rtol: float = 1e-2, atol: float = 1e-5, shards=None,
                  gram_route: str = "auto", residual: bool = False) -> tuple[list, dict]:
    """Delta with J Delta = dZ for a stack of coupling blocks (formulas in the module docstring).

    Args:
        blocks: per block, an object with VF, WF, VG, WG (V may be None) and ``activation``.
        traces: per block, the forward trace with x2, y1, hF = act(X2 V_F), hG = act(Y1 V_G).
        dZ: target at the output, (n, d), or a :class:`LowRankTarget` (E, Q) standing for E Q^T.
        shares: s_l per block, summing to one.
        damping: lambda, relative to mean(diag(A A^T)) of each Gram unless ``relative_damping=False``.
        solver: "cholesky" (batched Gram factor) or "svd" (truncated pinv with ``rtol``, ``atol``).
        shards: a :class:`revgn_ext.distributed.ShardGroup` when traces and dZ hold this rank's rows of
            a global batch (see the module docstring); every rank then returns the same global Delta.
        gram_route: with ``shards`` and the Cholesky solver, how the global Grams are assembled:
            "gather_rows" (all_gather of the feature rows), "reduce_gram" (column all_to_all and an
            all_reduce of partial Grams) or "auto" (fewer bytes, :func:`revgn_ext.distributed.gram_route_bytes`).
        residual: also report "residual", per half-layer the relative miss ||A Theta - R|| / ||R|| of its
            solve, measured through a Gaussian sketch (:func:`_sketch_residuals`).
    Returns:
        ([BlockDelta per block], report) where report holds per-Gram tensors in the order
        F_1, G_1, F_2, G_2, ...: "damping" (absolute lambda) and "info", "jitter" (Cholesky retries,
        see :class:`revgn_ext.ops.GramFactor`) or "rank" (SVD).
    """
    low = None
    if isinstance(dZ, LowRankTarget):
        E, P = dZ
        half = P.shape[0] // 2
        dZ1, dZ2 = E @ P[:half].mT, E @ P[half:].mT
        if E.shape[1] < half:
            low = (E, P[:half])
    else:
        half = dZ.shape[1] // 2
        dZ1, dZ2 = dZ[:, :half], dZ[:, half:]
    D = transport_targets(blocks, traces, dZ1, dZ2, low)
    feats = [h for t in traces for h in (t.hF, t.hG)]
    n = feats[0].shape[0] if shards is None else shards.total
    route = None
    if shards is not None:
        route = "gather_rows" if solver == "svd" else choose_gram_route(gram_route, n, feats[0].shape[1],
                                                                         shards.world, feats[0].element_size())
    if shards is None and solver == "cholesky" and feats[0].device.type == "cpu":
        # The matrices are factored where the forward left them; identity halves through A = X V.
        grams, factors = _identity_routes(blocks, traces)
        # tr(A A^T) = ||A||_F^2 per feature matrix (or the trace of the Gram formed from the factors).
        traces_ = torch.stack([torch.linalg.vector_norm(h).square() if G is None else G.diagonal().sum()
                               for h, G in zip(feats, grams)])
        lam = gram_damping(traces_, n, damping, relative_damping)
        solve = _CholeskySolver(feats, lam, grams, factors)
    elif shards is None and solver == "cholesky":
        norms = torch.stack([torch.linalg.vector_norm(h) for h in feats]).square()
        lam = gram_damping(norms, n, damping, relative_damping)
        solve = _CholeskySolver(feats, lam)
    elif route == "reduce_gram":
        A = torch.stack(feats)
        G = shards.reduce_gram(A)
        lam = gram_damping(G.diagonal(dim1=-2, dim2=-1).sum(-1), n, damping, relative_damping)
        solve = _ReducedGramCholeskySolver(G, A, lam, shards)
    else:
        A = torch.stack(feats)
        if route == "gather_rows":
            A = shards.gather_rows(A, dim=1)
        lam = gram_damping(torch.linalg.vector_norm(A.flatten(1), dim=1).square(), n, damping, relative_damping)
        if shards is None:
            solve = _SVDSolver(A, lam, rtol, atol)
        elif solver == "cholesky":
            solve = _ShardedCholeskySolver(A, lam, shards)
        else:
            solve = _ShardedSVDSolver(A, lam, rtol, atol, shards)

    deltas, sketched = [], []
    last = len(blocks) - 1
    for l, (b, t, (D1, D2), s) in enumerate(zip(blocks, traces, D, shares)):
        width = t.hF.shape[1]
        if low is not None and l == last:
            # D1 = E P1^T: the solve is linear in its right-hand side, so it runs on the k columns of
            # s E, and Theta_F and the fit A_F Theta_F are those results times P1^T.
            E, P1 = low
            theta_k, fit_k = solve(2 * l, s * E)
            theta_F = (P1 @ theta_k.mT).mT  # (M + 1, d/2), stored transposed as above
            cross = _cross_term(b, t, fit_k, P1)
        else:
            theta_F, dY1 = solve(2 * l, s * D1)  # dY1 = A_F Theta_F, how F's update moves Y1
            cross = _cross_term(b, t, dY1)
        theta_G, _ = solve(2 * l + 1, s * D2 - cross)
        if residual:
            sketched += _sketch(t.hF, s * D1, shards) + _sketch(t.hG, s * D2 - cross, shards)
        deltas.append(BlockDelta(theta_F[:width].mT, theta_F[width], theta_G[:width].mT, theta_G[width]))
    if shards is not None:  # the one all_reduce: sum_r of every rank's shares [A_r, 1]^T U_r
        summed = iter(shards.sum_tensors([t for d in deltas for t in d] + sketched))
        deltas = [BlockDelta(*(next(summed) for _ in d)) for d in deltas]
        sketched = list(summed)
    report = {"damping": lam, **solve.report()}
    if residual:
        report["residual"] = _sketch_residuals(deltas, sketched)
    return deltas, report


SKETCH_PROBES = 4


def _sketch(A: torch.Tensor, R: torch.Tensor, shards) -> list:
    """[S^T [A, 1], S^T R] for a Gaussian S (n x SKETCH_PROBES), drawn from a fixed seed (per rank, so
    that the ranks' rows are independent): p n M + p n k multiply-adds, against the solve's k n M."""
    g = torch.Generator(device=A.device).manual_seed(0 if shards is None else 1 + shards.rank)
    S = torch.randn(A.shape[0], SKETCH_PROBES, generator=g, dtype=A.dtype, device=A.device)
    return [torch.cat([S.mT @ A, S.sum(0)[:, None]], 1), S.mT @ R]


def _sketch_residuals(deltas: list, sketched: list) -> torch.Tensor:
    """Per half-layer ||S^T (A Theta - R)|| / ||S^T R|| (the absolute miss where R = 0). For a Gaussian S
    the squared sketch norm of a matrix X has mean p ||X||^2 and is a chi-square of >= p degrees of
    freedom times ||X||_2^2, so a miss of a few percent cannot show as a residual near rounding."""
    out = []
    for d, (PF, QF, PG, QG) in zip(deltas, zip(*[iter(sketched)] * 4)):
        for W, b, P, Q in ((d.WF, d.bF, PF, QF), (d.WG, d.bG, PG, QG)):
            miss = torch.linalg.matrix_norm(P[:, :-1] @ W.mT + P[:, -1:] * b - Q)
            scale = torch.linalg.matrix_norm(Q)
            out.append(torch.where(scale > 0, miss / scale, miss))
    return torch.stack(out)
