"""The stored factors of the layer-wise Gram and its assembly in row blocks.

A factor holds the per-sample gradients V_p[(i, a)] of some parameters, for every sample i and output
column a, in one of two forms:

* :class:`KronFactor`: ``sum_t G[i, a, t] (x) X[i, t]`` over positions t, never formed; its Gram is
  ``sum_{t,s} (x_it . x_js)(g_iat . g_jbs)`` (for one position, the Hadamard product of an input
  kernel (b x b) and an output-gradient kernel (b m x b m));
* :class:`DenseFactor`: V (b, m, d_p) itself.

:func:`kron_cost` and :func:`dense_cost` count the multiply-adds of the two forms; the layer-wise
assembler picks the cheaper per parameter. :func:`assemble` sums the factors' Grams in blocks of rows.
"""
from __future__ import annotations

import torch

from ..rules import KronInput, kron_per_sample

__all__ = ["KronFactor", "DenseFactor", "kron_cost", "dense_cost", "assemble", "DEFAULT_BLOCK_BYTES"]

DEFAULT_BLOCK_BYTES = 256 * 2**20


def kron_cost(b, m, T, p, q, ids):
    return b * b * T * T * (1 if ids else p) + (b * m * T) ** 2 * q + ((b * m) ** 2 * T * T if T > 1 else 0)


def dense_cost(b, m, T, p, q):
    return b * m * T * p * q + (b * m) ** 2 * p * q


class KronFactor:
    """Per-sample gradients sum_t G[i, a, t] (x) X[i, t] of parameters sharing one Kronecker form.

    X: (b, T, p) features or (b, T) ids; G: (b, m, T, q). ``parts``: (param, first column, last column
    of X) for features (one use's weight and bias share G: X = [x, 1]); for ids one part.
    """

    def __init__(self, kron: KronInput, parts, G: torch.Tensor):
        self.kron, self.parts, self.G = kron, parts, G
        self.G_rows = None    # G as (b m T, q) where its filler has it (then G is never written again)
        self._X_rows = None   # X as (b T, p), formed once (X is never written)

    def _rows(self):
        """(X, G) as (b T, p) and (b m T, q) matrices for features."""
        if self._X_rows is None:
            self._X_rows = self.kron.X.reshape(-1, self.kron.X.shape[2])
        return self._X_rows, self.G.reshape(-1, self.G.shape[3]) if self.G_rows is None else self.G_rows

    @property
    def positions(self):
        return self.G.shape[2]

    def nbytes(self):
        return self.kron.X.numel() * self.kron.X.element_size() + self.G.numel() * self.G.element_size()

    def row_bytes(self, b):
        """Temporary bytes per sample row of a block."""
        m, T = self.G.shape[1], self.positions
        return (m * T * b * m * T + T * b * T) * self.G.element_size()

    def gather(self, ranks):
        X, G = ranks.gather_rows(self.kron.X), ranks.gather_rows(self.G)
        if X is not self.kron.X or G is not self.G:
            self.kron, self.G, self.G_rows, self._X_rows = KronInput(X, self.kron.vocab), G, None, None

    def _input_kernel(self, i0, i1, j1):
        X = self.kron.X
        if self.kron.kind == "ids":   # (x_it . x_js) = [id_it = id_js], ids -1 match nothing
            A, B = X[i0:i1], X[:j1]
            return ((A[:, :, None, None] == B[None, None]) & (A[:, :, None, None] >= 0)).to(self.G.dtype)
        T = self.positions
        return (X[i0:i1].reshape(-1, X.shape[2]) @ X[:j1].reshape(-1, X.shape[2]).T).view(i1 - i0, T, j1, T)

    def add_block(self, K, i0, i1, j1):
        """K[(i0..i1, :), (0..j1, :)] += this factor's Gram block."""
        b, m, T, q = self.G.shape
        if T == 1 and self.kron.kind == "features":   # one position: two matrix products and one addcmul
            X, G = self._rows()
            whole = i0 == 0 and i1 == j1 == b
            Xi, Gi = (X, G) if whole else (X[i0:i1], G[i0 * m:i1 * m])
            Xj, Gj = (X, G) if whole else (X[:j1], G[:j1 * m])
            Kx, Kg = torch.mm(Xi, Xj.t()), torch.mm(Gi, Gj.t())
            rows = K if whole else K[i0 * m:i1 * m, :j1 * m]
            if m == 1:
                rows.addcmul_(Kx, Kg)
            else:
                rows.view(i1 - i0, m, j1, m).addcmul_(Kx.view(i1 - i0, 1, j1, 1), Kg.view(i1 - i0, m, j1, m))
            return
        Kx = self._input_kernel(i0, i1, j1)
        rows = K[i0 * m:i1 * m, :j1 * m].view(i1 - i0, m, j1, m)
        if T == 1:
            Kg = (self.G[i0:i1].reshape(-1, q) @ self.G[:j1].reshape(-1, q).T).view(i1 - i0, m, j1, m)
            rows.addcmul_(Kx[:, 0, :, 0][:, None, :, None], Kg)
        else:
            Kg = (self.G[i0:i1].reshape(-1, q) @ self.G[:j1].reshape(-1, q).T).view(i1 - i0, m, T, j1, m, T)
            rows.add_((Kg * Kx[:, None, :, :, None, :]).sum((2, 5)))   # sum_{t,s}; einsum would copy Kg

    def apply(self, v):
        """(b, m): each row's product with a parameter-space vector v ({id(param): tensor}), that is
        sum_t G[i, a, t] . (v x_it), without forming the rows."""
        b, m, T, q = self.G.shape
        if self.kron.kind == "ids":
            (p, _, _), = self.parts
            table = torch.cat([v[id(p)].reshape(self.kron.vocab, q), self.G.new_zeros(1, q)])   # row vocab: id -1
            H = table[torch.where(self.kron.X < 0, self.kron.vocab, self.kron.X)]                # (b, T, q)
        else:
            X = self.kron.X
            if len(self.parts) == 1 and self.parts[0][1:] == (0, X.shape[2]):
                W = v[id(self.parts[0][0])].reshape(q, X.shape[2])
            else:
                W = X.new_zeros(q, X.shape[2])
                for p, lo, hi in self.parts:
                    W[:, lo:hi] = v[id(p)].reshape(q, hi - lo)
            H = X @ W.T                                                                        # (b, T, q)
        if m == 1:   # b products of 1-row matrices: elementwise is faster than bmm
            return (self.G.reshape(b, T * q) * H.reshape(b, T * q)).sum(1, keepdim=True)
        return torch.bmm(self.G.reshape(b, m, T * q), H.reshape(b, T * q, 1)).view(b, m)

    def weighted_gradients(self, w):
        """{param: sum_{i,a} w_ia grad_ia} from the factor (for the verification)."""
        b, m, T, q = self.G.shape
        if self.kron.kind == "features" and T == 1 and m == 1:   # one row per sample: G (b, q) scaled by w
            X, G = self._rows()
            full = torch.mm((G * (w if w.shape == (b, 1) else w.reshape(b, 1))).t(), X)
            return {p: _columns(full, lo, hi, p.shape) for p, lo, hi in self.parts}
        if m == 1:
            Gw = self.G.reshape(b, T * q) * w.reshape(b, 1)
        else:
            Gw = torch.bmm(w.reshape(b, 1, m), self.G.reshape(b, m, T * q))   # sum_a w_ia G[i, a]
        if self.kron.kind == "ids":
            (p, _, _), = self.parts
            return {p: kron_per_sample(self.kron, Gw.view(b, T, q), p.shape).sum(0)}
        full = Gw.reshape(b * T, q).t() @ self.kron.X.reshape(b * T, -1)                 # sum_{i,t} Gw (x) X
        return {p: _columns(full, lo, hi, p.shape) for p, lo, hi in self.parts}


def _columns(full: torch.Tensor, lo: int, hi: int, shape) -> torch.Tensor:
    """Columns lo..hi of ``full`` (q, p) in a parameter's shape, with as few view operations as that takes."""
    if lo == 0 and hi == full.shape[1]:
        part = full
    elif hi - lo == 1 and len(shape) == 1:   # a bias beside its weight
        return full.select(1, lo)
    else:
        part = full[:, lo:hi]
    return part if part.shape == shape else part.reshape(shape)


class DenseFactor:
    """Materialised per-sample gradients V (b, m, d): of one parameter (``param``; None: torch.func rows,
    which the verification does not check), or of several side by side in one buffer (``parts``: (param,
    first column, last column)), so that their Gram is one matrix product."""

    def __init__(self, param, V, parts=None):
        self.param, self.V = param, V
        self.parts = parts if parts is not None else ([] if param is None else [(param, 0, V.shape[2])])

    def nbytes(self):
        return self.V.numel() * self.V.element_size()

    def row_bytes(self, b):
        return 0

    def gather(self, ranks):
        self.V = ranks.gather_rows(self.V)

    def add_block(self, K, i0, i1, j1):
        m = self.V.shape[1]
        K[i0 * m:i1 * m, :j1 * m].addmm_(self.V[i0:i1].reshape((i1 - i0) * m, -1), self.V[:j1].reshape(j1 * m, -1).T)

    def apply(self, v):
        """(b, m): the rows' products with a parameter-space vector v ({id(param): tensor}); the parts
        lie side by side in the buffer, in order."""
        b, m, d = self.V.shape
        vec = torch.cat([v[id(p)].reshape(-1) for p, _, _ in self.parts])
        return (self.V.reshape(b * m, d) @ vec).view(b, m)

    def weighted_gradients(self, w):
        b, m, d = self.V.shape
        full = (w.reshape(1, b * m) @ self.V.reshape(b * m, d)).reshape(d)
        return {p: full[lo:hi].reshape(p.shape) for p, lo, hi in self.parts}


def assemble(factors, b: int, m: int, like: torch.Tensor, block_rows, memory_limit: int) -> torch.Tensor:
    """K = sum of the factors' Grams, in blocks of rows: lower block triangle, then mirrored, so that a
    block's temporaries stay bounded (``block_rows`` rows, or 1/16 of ``memory_limit`` up to
    :data:`DEFAULT_BLOCK_BYTES`, and at most about 1/8 of K's rows) and the upper triangle is not computed."""
    n = b * m
    K = like.new_zeros(n, n)
    if block_rows is None:
        budget = min(memory_limit // 16, DEFAULT_BLOCK_BYTES)
        per_sample = max([fa.row_bytes(b) for fa in factors] + [m * b * like.element_size()])
        # At most about 1/8 of the rows per block (not under 64 rows): the lower block triangle then
        # costs (1 + 1/blocks) / 2 of the square's multiply-adds.
        block = max(1, min(budget // max(per_sample, 1), max(64, -(-n // 8)) // m))
    else:
        block = max(1, block_rows // m)
    starts = list(range(0, b, block))
    for i0 in starts:
        i1 = min(b, i0 + block)
        for fa in factors:
            fa.add_block(K, i0, i1, i1)
    for i0 in starts[:-1]:   # upper block triangle from the lower one (the last block row has none)
        i1 = min(b, i0 + block)
        K[i0 * m:i1 * m, i1 * m:] = K[i1 * m:, i0 * m:i1 * m].T
    return K
