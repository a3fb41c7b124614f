"""Per-sample square-root factors of the loss Hessian, for the EGN push-through solve.

For a batch of outputs f (b, c) and per-sample losses l(f_i, y_i), the mean loss is
L = (1/b) sum_i l(f_i, y_i). Each factor below returns

* e_i = dl/df_i, the per-sample residual (not divided by b),
* S_i with S_i S_i^T = d^2 l / df_i^2 = Q_i, the exact square root of the loss Hessian,
* t_i with S_i t_i = e_i, so that J^T e = (S^T J)^T t.

Diagonal factors (MSE, binary CE) are stored implicitly as ``S_i = diag(s_i) - p_i s_i^T`` (``s`` None
means S = I, ``p`` None means S_i = diag(s_i)), so applying S or S^T costs O(b c); the exact
cross-entropy factor has c - 1 columns (Q_i has rank c - 1) and is stored dense, (b, c, c - 1) in the
field ``S``. :func:`apply_factor`, :func:`apply_factor_transpose` and :func:`factor_matrix` read either.

Approximate curvatures (:func:`curvature_factor`) replace Q_i by a rank-k matrix S_i S_i^T with S_i a
dense c x k factor (field ``S``): the Monte-Carlo ("sampled") and the observed-label ("true-class")
Gauss-Newton matrices. Their formulas, bias and cost are in :func:`sampled_factor` and
:func:`true_class_factor`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["LossFactor", "mse_factor", "cross_entropy_factor", "binary_cross_entropy_factor",
           "LOSS_FACTORS", "apply_factor", "apply_factor_transpose", "factor_matrix", "CURVATURES",
           "sampled_factor", "true_class_factor", "curvature_factor"]


class LossFactor(NamedTuple):
    """Loss, residual e, target t and the factor S_i = diag(s_i) - p_i s_i^T of Q_i = S_i S_i^T.

    Shapes: ``loss`` scalar, ``residual``/``s``/``p`` (b, c); ``s``/``p`` may be None. ``S`` (b, c, k),
    when given, is a dense factor that replaces the (s, p) form; ``target`` (b, k) solves S_i t_i = e_i,
    or is None where e_i is not in the range of S_i (the sampled curvature).
    """
    loss: torch.Tensor
    residual: torch.Tensor
    target: torch.Tensor | None
    s: torch.Tensor | None
    p: torch.Tensor | None
    S: torch.Tensor | None = None


def mse_factor(f: torch.Tensor, y: torch.Tensor) -> LossFactor:
    """MSE, l = 0.5 ||f_i - y_i||^2: e_i = f_i - y_i, Q_i = I, so S_i = I and t_i = e_i.

    f, y: (b, c).
    """
    e = f - y
    loss = 0.5 * e.square().sum() / f.shape[0]
    return LossFactor(loss, e, e, None, None)


def cross_entropy_factor(f: torch.Tensor, y: torch.Tensor) -> LossFactor:
    """Softmax cross-entropy, l = -sum_a q_ia log softmax(f_i)_a, with p_i = softmax(f_i) and target
    distribution q_i (one-hot for a label; smoothed labels or class probabilities otherwise):

    e_i = p_i - q_i,  Q_i = diag p_i - p_i p_i^T  (the same for every q_i with 1^T q_i = 1).

    Q_i = diag(s_i) (I - s_i s_i^T) diag(s_i) with s_i = sqrt(p_i), |s_i| = 1, has rank c - 1, so the
    factor has c - 1 columns: with j = argmax_a s_ia, u_i = s_i + e_j and the Householder reflection
    H_i = I - 2 u_i u_i^T / |u_i|^2 (H_i s_i = -e_j), the columns V_i of H_i other than j are an
    orthonormal basis of s_i^perp (V_i V_i^T = I - H_i e_j e_j^T H_i = I - s_i s_i^T), and

    S_i = diag(s_i) V_i  (c x (c - 1)),  S_i S_i^T = diag(s_i) (I - s_i s_i^T) diag(s_i) = Q_i,
    t_i = V_i^T r_i with r_i = e_i / s_i:  S_i t_i = diag(s_i) (I - s_i s_i^T) r_i = e_i - p_i 1^T e_i = e_i
    (1^T e_i = 0: e_i lies in the range of Q_i).

    The Gram system is b (c - 1) instead of b c rows, with c - 1 backward passes. |u_i|^2 = 2 + 2 s_ij
    >= 2 (s_ij >= 1/sqrt(c)), so the reflection is well conditioned in float32. S is stored dense
    (b, c, c - 1); no c x c x b identity is formed.

    f: (b, c) logits, c >= 2; y: (b,) int64 class indices, or (b, c) floats q with rows summing to 1.
    Computed from log-probabilities, so t stays finite while log p does: r_ia = s_ia - q_ia / s_ia.
    """
    logp = torch.log_softmax(f, dim=1)
    p = logp.exp()
    s = (0.5 * logp).exp()
    b, c = f.shape
    if y.is_floating_point():
        q = y
        loss = -torch.where(q > 0, q * logp, torch.zeros_like(logp)).sum() / b
    else:
        q = F.one_hot(y, c).to(f.dtype)
        loss = -logp.gather(1, y[:, None]).sum() / b
    e = p - q
    r = s - q * (-0.5 * logp).exp()                               # e / s
    j = s.argmax(1, keepdim=True)                                 # (b, 1)
    u = s.scatter_add(1, j, torch.ones_like(s[:, :1]))            # s + e_j
    w = 2 / (u * u).sum(1, keepdim=True)                          # 2 / |u|^2, |u|^2 >= 2
    ar = torch.arange(c - 1, device=f.device)
    cols = ar + (ar >= j).to(ar.dtype)                            # (b, c - 1): the columns other than j
    u_cols = u.gather(1, cols)                                    # (b, c - 1)
    t = r.gather(1, cols) - u_cols * (w * (u * r).sum(1, keepdim=True))   # V^T r = (H r)[cols]
    # S[i, a, k] = s_ia (delta(a, cols_ik) - w_i u_ia u_i,cols_ik)
    delta = torch.arange(c, device=f.device)[None, :, None] == cols[:, None, :]
    S = s[:, :, None] * (delta.to(f.dtype) - (w * u)[:, :, None] * u_cols[:, None, :])
    return LossFactor(loss, e, t, None, None, S)


def binary_cross_entropy_factor(f: torch.Tensor, y: torch.Tensor) -> LossFactor:
    """Binary cross-entropy of logits, per element l = -y log sigma(f) - (1 - y) log(1 - sigma(f)),
    y in [0, 1], summed over a sample's elements (Q_i is diagonal):

    e = sigma(f) - y,  Q = q = sigma(f)(1 - sigma(f)),  S = sqrt(q),
    t = e / sqrt(q) = (1 - y) exp(f/2) - y exp(-f/2)   (since (1 - sigma)/sigma = exp(-f)).

    f, y: (b, c), one logit per element (the per-sample loss sums over them).
    """
    e = torch.sigmoid(f) - y
    s = (0.5 * (F.logsigmoid(f) + F.logsigmoid(-f))).exp()
    t = (1 - y) * (0.5 * f).exp() - y * (-0.5 * f).exp()
    loss = F.binary_cross_entropy_with_logits(f, y, reduction="sum") / f.shape[0]
    return LossFactor(loss, e, t, s, None)


LOSS_FACTORS = {
    "mse": mse_factor,
    "cross_entropy": cross_entropy_factor,
    "binary_cross_entropy": binary_cross_entropy_factor,
}


def apply_factor(factor: LossFactor, u: torch.Tensor) -> torch.Tensor:
    """S u per sample: S_i u_i = s_i * u_i - p_i (s_i . u_i). u: (b, k) -> (b, c)."""
    if factor.S is not None:
        return torch.einsum("ick,ik->ic", factor.S, u)
    if factor.s is None:
        return u
    out = factor.s * u
    if factor.p is not None:
        out = out - factor.p * (factor.s * u).sum(1, keepdim=True)
    return out


def apply_factor_transpose(factor: LossFactor, v: torch.Tensor) -> torch.Tensor:
    """S^T v per sample: S_i^T v_i = s_i * v_i - s_i (p_i . v_i). v: (b, c) -> (b, k)."""
    if factor.S is not None:
        return torch.einsum("ick,ic->ik", factor.S, v)
    if factor.s is None:
        return v
    out = factor.s * v
    if factor.p is not None:
        out = out - factor.s * (factor.p * v).sum(1, keepdim=True)
    return out


def factor_matrix(factor: LossFactor) -> torch.Tensor:
    """Dense S as (b, c, k), S[i] = S_i = diag(s_i) - p_i s_i^T. Column a of S_i is s_ia (e_a - p_i)."""
    if factor.S is not None:
        return factor.S
    b, c = factor.residual.shape
    eye = torch.eye(c, dtype=factor.residual.dtype, device=factor.residual.device)
    if factor.s is None:
        return eye.expand(b, c, c).clone()
    S = torch.diag_embed(factor.s)
    if factor.p is not None:
        S = S - factor.p[:, :, None] * factor.s[:, None, :]
    return S


# --------------------------------------------------------------------------------------------------
# Approximate curvatures for many outputs
# --------------------------------------------------------------------------------------------------

CURVATURES = ("exact", "sampled", "true-class")


def sampled_factor(loss: str, f: torch.Tensor, y: torch.Tensor, samples: int = 1,
                   generator: torch.Generator | None = None) -> LossFactor:
    """Monte-Carlo Gauss-Newton (Gauss-Newton-Bartlett): labels drawn from the model's own predictive
    distribution, y^_is ~ p(. | f_i), s = 1..k:

        S_i = [g_i1, ..., g_ik] / sqrt(k),   g_is = dl(f_i, y^_is)/df_i,   Q^_i = S_i S_i^T.

    For every loss here l is a negative log-likelihood of an exponential family in its natural
    parameter f (CE: categorical, y^ ~ softmax(f); binary CE: Bernoulli, y^ ~ sigmoid(f); MSE: Gaussian,
    y^ ~ N(f, I)), so E[g g^T] = Var(y^) = d^2 l / df^2 = Q_i (Bartlett's identity): **unbiased**,
    E[Q^_i] = Q_i and E[J^T Q^ J] = J^T Q J, with variance ~ 1/k. The LM direction itself is a non-linear
    function of Q^ and is not unbiased. Cost: a (b k) x (b k) system instead of (b c) x (b c), k
    backward passes for the Gram instead of c.

    e_i is generally not in the range of S_i, so ``target`` is None and the solve uses Woodbury's
    identity with the gradient instead of the push-through target (see ``EGN``). The draws use
    ``generator`` (None: torch's default generator). Only e depends on the targets, so label smoothing
    and class-probability targets work as for the exact factor.
    """
    b, c = f.shape
    if loss == "cross_entropy":
        # Only the loss and e at the observed targets, not the exact factor's S and t.
        logp = torch.log_softmax(f, 1)
        p = logp.exp()
        if y.is_floating_point():
            loss_value = -torch.where(y > 0, y * logp, torch.zeros_like(logp)).sum() / b
            e = p - y
        else:
            loss_value = -logp.gather(1, y[:, None]).sum() / b
            e = p.scatter_add(1, y[:, None], torch.full_like(p[:, :1], -1.0))
        base = LossFactor(loss_value, e, None, None, None)
        # Categorical draws by inverse CDF (torch.multinomial costs ~25x more at c = 1000): draw a with
        # probability (cdf_a - cdf_{a-1}) / cdf_c = p_a; a class of probability 0 is never drawn.
        cdf = p.cumsum(1)
        u = torch.rand(b, samples, generator=generator, dtype=f.dtype, device="cpu").to(f.device)
        draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max_(c - 1)        # (b, k)
        G = p[:, :, None].repeat(1, 1, samples).scatter_add_(                                 # (b, c, k)
            1, draws[:, None, :], p.new_full((b, 1, samples), -1.0))
    else:
        base = LOSS_FACTORS[loss](f, y)
        e = base.residual   # at the observed targets; the draws need none
        if loss == "binary_cross_entropy":   # one Bernoulli draw per logit
            q = torch.sigmoid(f)[:, :, None]                                                  # (b, c, 1)
            u = torch.rand(b, c, samples, generator=generator, dtype=f.dtype, device="cpu").to(f.device)
            G = q - (u < q).to(f.dtype)                                                       # (b, c, k)
        else:
            G = -torch.randn(b, c, samples, generator=generator, dtype=f.dtype, device="cpu").to(f.device)
    return LossFactor(base.loss, e, None, None, None, G / math.sqrt(samples) if samples > 1 else G)


def true_class_factor(loss: str, f: torch.Tensor, y: torch.Tensor) -> LossFactor:
    """The curvature of the observed label only (the empirical Fisher): the Monte-Carlo formula of
    :func:`sampled_factor` with the drawn label replaced by the observed one,

        S_i = e_i = dl(f_i, y_i)/df_i   (c x 1),   Q^_i = e_i e_i^T,   t_i = 1 (S_i t_i = e_i exactly).

    **Biased**: E over the data of e e^T is the Fisher of the data distribution, not of the model, so it
    equals the GGN only when the labels follow the model's predictive distribution; it scales with the
    squared residual (vanishing on fitted samples, large on misfit ones) rather than with the loss's
    curvature (Kunstner et al., 2019). Deterministic. Cost: a b x b system, one backward pass for the
    Gram; the push-through solve applies as for the exact curvature.
    """
    base = LOSS_FACTORS[loss](f, y)
    e = base.residual
    return LossFactor(base.loss, e, torch.ones_like(e[:, :1]), None, None, e[:, :, None])


def curvature_factor(loss: str, curvature: str, f: torch.Tensor, y: torch.Tensor, samples: int = 1,
                     generator: torch.Generator | None = None) -> LossFactor:
    """The loss factor for ``curvature`` in :data:`CURVATURES`."""
    if curvature == "exact":
        return LOSS_FACTORS[loss](f, y)
    if curvature == "sampled":
        return sampled_factor(loss, f, y, samples, generator)
    if curvature == "true-class":
        return true_class_factor(loss, f, y)
    raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
