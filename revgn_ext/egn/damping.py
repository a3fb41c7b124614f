"""EGN's adaptive damping (Levenberg-Marquardt's trust-region rule, as in the authors' code).

The gain ratio rho = actual / predicted decrease compares the loss change of a step of size alpha
along d with the quadratic model's, predicted = -(alpha g^T d + alpha^2 / 2 ||S^T J d||^2 / b).
lambda grows by ``damping_increase`` when rho < 0.25 (the model was too optimistic), shrinks by
``damping_decrease`` when rho > 0.75, and stays within [``min_damping``, ``max_damping``].
"""
from __future__ import annotations

import math

__all__ = ["gain_ratio", "next_damping"]


def gain_ratio(loss0: float, new_loss, alpha: float, gTd: float, quad: float) -> float:
    """rho; -inf when the model predicts no decrease or the new loss is missing or not finite."""
    predicted = -(alpha * gTd + 0.5 * alpha ** 2 * quad)
    actual = float(loss0 - new_loss) if new_loss is not None else -math.inf
    return actual / predicted if predicted > 0 and math.isfinite(actual) else -math.inf


def next_damping(lam: float, rho: float, group: dict) -> float:
    """lambda for the next step from this step's rho, under the group's factors and bounds."""
    if rho < 0.25:
        lam *= group["damping_increase"]
    elif rho > 0.75:
        lam *= group["damping_decrease"]
    return min(max(lam, group["min_damping"]), group["max_damping"])
