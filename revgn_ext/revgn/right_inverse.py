"""Right inverse of a RevMLP's Jacobian: Delta with J Delta = dZ (SPEC section 3, steps 2-6).

Z = X_L is the network output and J = dZ/dtheta. Block l takes a share s_l of the target (sum s_l = 1):

* transport: D_L = dZ, D_{l-1} = (dX_l/dX_{l-1})^{-1} D_l, the tangent of block l's inverse at X_l
  (:func:`revgn_ext.ops.coupling_inverse_tangent`, hand-written, no forward-mode autograd);
* per block, with A_F = [act(X2 V_F), 1] and A_G = [act(Y1 V_G), 1] (n x (M+1)):
      Theta_F = A_F^+ (s_l D_l^(1))
      K       = (act'(Y1 V_G) * ((A_F Theta_F) V_G)) W_G^T      (how F's update moves Y2 through G)
      Theta_G = A_G^+ (s_l D_l^(2) - K)
  where Theta stacks [dW^T; db^T], so block l moves its own output by exactly s_l D_l when each A has
  full row rank n, and by the least-squares fit otherwise;
* A^+ R = A^T (A A^T + lambda I)^{-1} R through the n x n Gram (ones column implicit:
  A A^T = H H^T + 1 1^T); all 2L Grams depend only on forward features, so they are factored in one
  batched :func:`revgn_ext.ops.gram_factor` call before the solves. The solves themselves run one
  half-layer at a time: torch's batched cholesky_solve on CUDA was 4-5x slower per matrix than
  single-matrix calls at n = 1024 (measured on an H100), and on the CPU batching gained nothing.

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

__all__ = ["SOLVERS", "BlockDelta", "transport_targets", "gram_damping", "right_inverse"]

SOLVERS = ("cholesky", "svd")


class BlockDelta(NamedTuple):
    """The update of one block, shaped like its parameters."""
    WF: torch.Tensor
    bF: torch.Tensor
    WG: torch.Tensor
    bG: torch.Tensor


def transport_targets(blocks: Sequence, traces: Sequence, dZ1: torch.Tensor, dZ2: torch.Tensor) -> list:
    """[(D_l^(1), D_l^(2)) for l = 1..L]: D_L = dZ, D_{l-1} = JVP of block l's inverse along D_l.

    ``blocks[l]`` has VF, WF, VG, WG, activation; ``traces[l]`` has the block's input half x2 and
    output half y1 (the linearisation point) and the features hF, hG, from which act' is read.
    """
    D = [None] * len(blocks)
    D[-1] = (dZ1, dZ2)
    for l in range(len(blocks) - 1, 0, -1):
        b, t = blocks[l], traces[l]
        D[l - 1] = coupling_inverse_tangent_unchecked(t.y1, t.x2, *D[l], b.VF, b.WF, b.VG, b.WG, b.activation,
                                                      t.hF, t.hG)
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
    """A_i^+ R = A_i^T (A_i A_i^T + 1 1^T + lambda_i I)^{-1} R with all B factors from one batched call.

    Also returns the fit A_i Theta. On the CPU it comes from the factor: with L L^T = A A^T + mu I
    (mu = lambda + jitter) and U = (L L^T)^{-1} R, A Theta = A A^T U = R - mu U, from the same solve
    that gives Theta, instead of an n x M x d/2 GEMM. On a GPU the GEMM is the faster of the two (measured on an
    H100), and it is also the only choice for a matrix whose retries all failed, whose diagonal
    stand-in factor breaks the identity.
    """

    def __init__(self, A: torch.Tensor, lam: torch.Tensor):
        self.factor = gram_factor_unchecked(A, lam.contiguous(), True)
        self.from_factor = A.device.type == "cpu"
        if self.from_factor:
            self.mu, self.failed = _shifts_and_failures(lam, self.factor.jitter, self.factor.info)

    def __call__(self, i: int, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.factor
        if not self.from_factor or self.failed[i]:
            one = GramFactor(f.A[i:i + 1], f.L[i:i + 1], f.info[i:i + 1], f.jitter[i:i + 1], True)
            theta = gram_solve_unchecked(one, R[None])[0]
            return theta, torch.addmm(theta[-1], f.A[i], theta[:-1])
        # One solve serves both: Theta = [A^T U; 1^T U] and the fit R - mu U. (L^T through mT is the
        # column-major upper factor LAPACK reads without a copy.)
        U = torch.cholesky_solve(R, f.L[i].mT, upper=True)
        M = f.A.shape[2]
        theta = U.new_empty(M + 1, U.shape[1])
        torch.mm(f.A[i].mT, U, out=theta[:M])
        torch.sum(U, 0, out=theta[M])
        return theta, R - self.mu[i] * U

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


def right_inverse(blocks: Sequence, traces: Sequence, dZ: torch.Tensor, shares: Sequence[float],
                  damping: float = 0.0, relative_damping: bool = True, solver: str = "cholesky",
                  rtol: float = 1e-2, atol: float = 1e-5, shards=None,
                  gram_route: str = "auto") -> tuple[list, dict]:
    """Delta with J Delta = dZ for a stack of coupling blocks (formulas in the module docstring).

    Args:
        blocks: per block, an object with VF, WF, VG, WG (V may be None) and ``activation``.
        traces: per block, the forward trace with x2, y1, hF = act(X2 V_F), hG = act(Y1 V_G).
        dZ: target at the output, (n, d).
        shares: s_l per block, summing to one.
        damping: lambda, relative to mean(diag(A A^T)) of each Gram unless ``relative_damping=False``.
        solver: "cholesky" (batched Gram factor) or "svd" (truncated pinv with ``rtol``, ``atol``).
        shards: a :class:`revgn_ext.distributed.ShardGroup` when traces and dZ hold this rank's rows of
            a global batch (see the module docstring); every rank then returns the same global Delta.
        gram_route: with ``shards`` and the Cholesky solver, how the global Grams are assembled:
            "gather_rows" (all_gather of the feature rows), "reduce_gram" (column all_to_all and an
            all_reduce of partial Grams) or "auto" (fewer bytes, :func:`revgn_ext.distributed.gram_route_bytes`).
    Returns:
        ([BlockDelta per block], report) where report holds per-Gram tensors in the order
        F_1, G_1, F_2, G_2, ...: "damping" (absolute lambda) and "info", "jitter" (Cholesky retries,
        see :class:`revgn_ext.ops.GramFactor`) or "rank" (SVD).
    """
    half = dZ.shape[1] // 2
    D = transport_targets(blocks, traces, dZ[:, :half], dZ[:, half:])
    A = torch.stack([h for t in traces for h in (t.hF, t.hG)])
    n = A.shape[1] if shards is None else shards.total
    route = None
    if shards is not None:
        route = "gather_rows" if solver == "svd" else choose_gram_route(gram_route, n, A.shape[2], shards.world,
                                                                         A.element_size())
    if route == "reduce_gram":
        G = shards.reduce_gram(A)
        lam = gram_damping(G.diagonal(dim1=-2, dim2=-1).sum(-1), n, damping, relative_damping)
        solve = _ReducedGramCholeskySolver(G, A, lam, shards)
    else:
        if route == "gather_rows":
            A = shards.gather_rows(A, dim=1)
        lam = gram_damping(torch.linalg.vector_norm(A.flatten(1), dim=1).square(), n, damping, relative_damping)
        if shards is None:
            solve = _CholeskySolver(A, lam) if solver == "cholesky" else _SVDSolver(A, lam, rtol, atol)
        elif solver == "cholesky":
            solve = _ShardedCholeskySolver(A, lam, shards)
        else:
            solve = _ShardedSVDSolver(A, lam, rtol, atol, shards)

    deltas = []
    for l, (b, t, (D1, D2), s) in enumerate(zip(blocks, traces, D, shares)):
        width = t.hF.shape[1]
        theta_F, dY1 = solve(2 * l, s * D1)  # dY1 = A_F Theta_F, how F's update moves Y1
        dzG = dY1 if b.VG is None else dY1 @ b.VG
        K = activation_grad_times(b.activation, dzG, lambda: t.y1 if b.VG is None else t.y1 @ b.VG,
                                            t.hG) @ b.WG.mT
        theta_G, _ = solve(2 * l + 1, s * D2 - K)
        deltas.append(BlockDelta(theta_F[:width].mT, theta_F[width], theta_G[:width].mT, theta_G[width]))
    if shards is not None:  # the one all_reduce: sum_r of every rank's shares [A_r, 1]^T U_r
        summed = iter(shards.sum_tensors([t for d in deltas for t in d]))
        deltas = [BlockDelta(*(next(summed) for _ in d)) for d in deltas]
    return deltas, {"damping": lam, **solve.report()}
