"""The activations of the coupling block: one registry for Python, mirrored by ``csrc/activations.h``.

Each entry names the activation and its id in the C++ enum, and gives act(z), act'(z) and, where act'
can be read off the features h = act(z) exactly, the product act'(z) * t from h (which saves forming the
pre-activation z = U V, one GEMM). ``python_tests/ops/test_activations.py`` parses csrc/activations.h and
fails if its names or ids differ from :data:`REGISTRY`.

Adding an activation touches three files: an entry here, one ``X(...)`` line plus its act'(z) case in
csrc/activations.h, and its ATen forms in csrc/coupling/coupling_cpu.cpp (docs/architecture.md).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Activation", "REGISTRY", "ACTIVATIONS", "get", "activation", "activation_grad",
           "activation_grad_times", "FEATURE_GRAD"]


class Activation(NamedTuple):
    name: str
    id: int                                      # value of revgn::Activation in csrc/activations.h
    f: Callable[[torch.Tensor], torch.Tensor]    # act(z)
    grad: Callable[[torch.Tensor], torch.Tensor]  # act'(z)
    # act'(z) * t given the features h = act(z), or None when act' is not a function of h (GELU).
    grad_times_from_features: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """Phi(z) + z phi(z), the derivative of the exact (erf) GELU."""
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


# ATen's activation backward kernels compute act'(z) * t from h in one pass.
REGISTRY: dict[str, Activation] = {a.name: a for a in (
    Activation("identity", 0, lambda z: z, torch.ones_like, lambda t, h: t),
    Activation("relu", 1, torch.relu, lambda z: (z > 0).to(z.dtype),
               lambda t, h: torch.ops.aten.threshold_backward(t, h, 0.0)),   # act' = [z > 0] = [h > 0]
    Activation("tanh", 2, torch.tanh, lambda z: 1.0 - torch.tanh(z) ** 2,
               lambda t, h: torch.ops.aten.tanh_backward(t, h)),              # act' = 1 - h^2
    Activation("gelu", 3, F.gelu, _gelu_grad, None),
)}

ACTIVATIONS = tuple(REGISTRY)
# Activations whose act' is read off the features.
FEATURE_GRAD = tuple(name for name, a in REGISTRY.items() if a.grad_times_from_features is not None)


def get(name: str) -> Activation:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}") from None


def activation(name: str, z: torch.Tensor) -> torch.Tensor:
    """act(z), elementwise."""
    return get(name).f(z)


def activation_grad(name: str, z: torch.Tensor) -> torch.Tensor:
    """act'(z), elementwise."""
    return get(name).grad(z)


def activation_grad_times(name: str, t: torch.Tensor, pre: Callable[[], torch.Tensor],
                          h: torch.Tensor | None = None) -> torch.Tensor:
    """act'(z) * t. Given the features h = act(z), act' is read off h where that is exact; otherwise
    z = pre() is computed."""
    act = get(name)
    if act.name == "identity":
        return t
    if h is not None and act.grad_times_from_features is not None:
        return act.grad_times_from_features(t, h)
    return act.grad(pre()) * t
