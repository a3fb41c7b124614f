"""The two products with the Jacobian J = df/dw that EGN's step needs beyond the Gram, through the
autograd graph of the outputs f.

* :func:`vjp`: J^T v, one backward pass.
* :func:`jvp`: J d by double backward: with z a zero cotangent that requires grad, h(z) = J^T z is
  linear in z, so d/dz <h(z), d> = J d; one backward pass through the VJP's graph. (Forward-mode AD
  would need every module to support it; this works for anything autograd differentiates twice.)
"""
from __future__ import annotations

import contextlib

import torch

from .capture import math_attention

__all__ = ["vjp", "jvp", "twice_differentiable"]


def vjp(f: torch.Tensor, params, v: torch.Tensor) -> list[torch.Tensor]:
    """J^T v, one dense tensor per parameter (zeros for a parameter f does not depend on; an
    ``nn.Embedding(sparse=True)`` gradient densified); keeps f's graph."""
    grads = torch.autograd.grad(f, params, grad_outputs=v, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g for g, p in zip(grads, params)]


def jvp(f: torch.Tensor, params, tangents) -> torch.Tensor:
    """J d (shaped like f) for the tangent d given per parameter, by double backward; keeps f's graph."""
    z = torch.zeros_like(f, requires_grad=True)
    transposed = torch.autograd.grad(f, params, grad_outputs=z, create_graph=True, allow_unused=True)
    pairs = [(h, d) for h, d in zip(transposed, tangents) if h is not None]
    return torch.autograd.grad([h for h, _ in pairs], z, grad_outputs=[d for _, d in pairs])[0].detach()


def twice_differentiable(group: dict):
    """The step's forward with scaled_dot_product_attention on its math backend where the step
    differentiates twice (J d by double backward: curvature="sampled", a momentum direction's quadratic
    model): the fused CPU/CUDA attention kernels have no derivative of their backward."""
    double = group.get("curvature") == "sampled" or (group["momentum"] > 0 and (group["line_search"] or
                                                                                 group["adaptive_damping"]))
    return math_attention() if double else contextlib.nullcontext()
