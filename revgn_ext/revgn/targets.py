"""Function-space targets E (n x c) for a Gauss-Newton step in logit space (SPEC section 3, step 1).

The losses are per-sample and averaged over the batch:

* cross-entropy: l_i = -log softmax(z_i)[y_i], gradient g_i = p_i - e_{y_i}, Hessian H_i = diag p_i - p_i p_i^T;
* MSE: l_i = 0.5 ||z_i - y_i||^2, gradient g_i = z_i - y_i, Hessian H_i = I.

A GN step moves the logits by -lr * E (to first order), so E is the per-sample step in logit space.
"""
from __future__ import annotations

import torch

LOSSES = ("cross_entropy", "mse")
TARGETS = ("identity", "newton", "damped", "damped-batch")

__all__ = ["LOSSES", "TARGETS", "loss_value", "one_hot", "identity_target", "newton_target",
           "damped_target", "damped_batch_target", "function_space_target"]


def one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(y, num_classes).to(dtype)


def _dense_labels(y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """MSE regression targets (n, c): float targets as given, integer labels one-hot encoded."""
    if y.is_floating_point():
        return y.to(logits.dtype)
    return one_hot(y, logits.shape[1], logits.dtype)


def loss_value(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss over the batch: mean_i -log softmax(z_i)[y_i], or mean_i 0.5 ||z_i - y_i||^2."""
    if loss == "cross_entropy":
        return torch.nn.functional.cross_entropy(logits, y)
    return 0.5 * (logits - _dense_labels(y, logits)).pow(2).sum(1).mean()


def identity_target(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """E_i = g_i: softmax(z_i) - e_{y_i} for cross-entropy, z_i - y_i for MSE (the official runs)."""
    if loss == "cross_entropy":
        return torch.softmax(logits, dim=1) - one_hot(y, logits.shape[1], logits.dtype)
    return logits - _dense_labels(y, logits)


def newton_target(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """E_i = H_i^+ g_i, the per-sample Newton step in logit space.

    Cross-entropy with label y_i: E_i = (1 / p_{i,y_i}) (1/c 1 - e_{y_i}), which equals
    pinv(diag p_i - p_i p_i^T)(p_i - e_{y_i}) because H_i 1 = 0, 1^T g_i = 0 and
    H_i (1/c 1 - e_y) = p_y (p_i - e_y). p_{i,y_i} is clamped at the dtype's smallest normal number, so
    E stays finite (if huge) when a label's probability underflows. MSE: H_i = I, so E_i = z_i - y_i.
    """
    if loss == "mse":
        return identity_target(logits, y, loss)
    c = logits.shape[1]
    log_py = torch.log_softmax(logits, dim=1).gather(1, y[:, None])
    inv_py = torch.exp(-log_py).clamp_max(1.0 / torch.finfo(logits.dtype).tiny)
    return inv_py * (1.0 / c - one_hot(y, c, logits.dtype))


def damped_target(logits: torch.Tensor, y: torch.Tensor, loss: str, mu: float) -> torch.Tensor:
    """E_i = (H_i + mu I)^{-1} g_i.

    Cross-entropy, by Sherman-Morrison with D = diag(p_i + mu):
        (D - p p^T)^{-1} g = D^{-1} g + D^{-1} p (p^T D^{-1} g) / (1 - p^T D^{-1} p).
    Since 1^T p = 1 and 1^T g = 0: 1 - p^T D^{-1} p = mu 1^T D^{-1} p and p^T D^{-1} g = -mu 1^T D^{-1} g,
    so E_i = D^{-1} g - D^{-1} p (1^T D^{-1} g) / (1^T D^{-1} p), free of the cancellation (and of the
    1/mu) in the textbook form. MSE: E_i = g_i / (1 + mu). As mu -> 0 this tends to the Newton target.
    """
    g = identity_target(logits, y, loss)
    if loss == "mse":
        return g / (1.0 + mu)
    p = torch.softmax(logits, dim=1)
    Dg, Dp = g / (p + mu), p / (p + mu)
    return Dg - Dp * Dg.sum(1, keepdim=True) / Dp.sum(1, keepdim=True)


def damped_batch_target(logits: torch.Tensor, y: torch.Tensor, loss: str, mu: float) -> torch.Tensor:
    """E_i = Hbar^{-1} g_i with the batch average Hbar^{-1} = (1/n) sum_j (H_j + mu I)^{-1}: the official
    code's damped target, one averaged inverse for every sample (``damped_target`` is per sample).

    Cross-entropy: with r_j = 1 / (p_j + mu), v_j = p_j r_j and 1^T g_i = 0, the Sherman-Morrison form
    of :func:`damped_target` gives (H_j + mu I)^{-1} g_i = r_j * g_i - v_j (r_j . g_i) / (1^T v_j), so
    E = G * mean_j(r_j) - (G R^T) (V / (1^T v)) / n, n^2 c multiply-adds and no 1/mu. MSE: H_j = I, so
    the average is (1 + mu)^{-1} I, the same as the per-sample target.
    """
    g = identity_target(logits, y, loss)
    if loss == "mse":
        return g / (1.0 + mu)
    p = torch.softmax(logits, dim=1)
    r = 1.0 / (p + mu)
    v = p * r
    n = logits.shape[0]
    return g * r.mean(0) - (g @ r.mT) @ (v / v.sum(1, keepdim=True)) / n


def function_space_target(logits: torch.Tensor, y: torch.Tensor, loss: str, target: str,
                          mu: float = 1e-3) -> torch.Tensor:
    """Dispatch on ``target`` in :data:`TARGETS`; ``mu`` is the damped targets' mu."""
    if target == "identity":
        return identity_target(logits, y, loss)
    if target == "newton":
        return newton_target(logits, y, loss)
    if target == "damped":
        return damped_target(logits, y, loss, mu)
    if target == "damped-batch":
        return damped_batch_target(logits, y, loss, mu)
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
