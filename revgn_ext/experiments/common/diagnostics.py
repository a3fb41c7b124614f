"""How far training moves a network from its initialisation: NTK similarity, linear CKA, weight change.

These measure the "lazy" regime of the paper (arXiv 2411.07979, section 5): a network whose tangent
kernel and features stay close to their values at init behaves like its linearisation.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from ..._checks import check_tensor
from ..._warn import load_jvp_decompositions

__all__ = ["trainable_params", "ntk_matvec", "ntk_similarity", "NTKSimilarity", "linear_cka", "weight_change"]


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters that require grad, by name (the theta of J = df/dtheta)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _kv_functorch(f, primals, v):
    out, pullback = vjp(f, *primals)
    if v.shape != out.shape:
        raise ValueError(f"v must have the model output's shape {tuple(out.shape)}, got {tuple(v.shape)}")
    u = pullback(v.to(out.dtype))
    load_jvp_decompositions()
    return jvp(f, primals, u)[1]


def _kv_autograd(f, primals, v):
    """``J^T v`` by one backward pass, then ``J u`` by reverse mode only: ``g(w) = J^T w`` is linear
    in w, so ``d <g(w), u> / dw = J u``. For ops whose autograd formula is not visible to torch.func."""
    theta = tuple(p.detach().requires_grad_() for p in primals)
    with torch.enable_grad():
        out = f(*theta)
        if v.shape != out.shape:
            raise ValueError(f"v must have the model output's shape {tuple(out.shape)}, got {tuple(v.shape)}")
        u = torch.autograd.grad(out, theta, v.to(out.dtype), retain_graph=True)
        w = torch.zeros_like(out, requires_grad=True)
        g = torch.autograd.grad(out, theta, w, create_graph=True)
        (Ju,) = torch.autograd.grad(g, w, u)
    return Ju


def ntk_matvec(model: nn.Module, x: torch.Tensor, v: torch.Tensor,
               params: Mapping[str, torch.Tensor] | None = None, mode: str = "auto") -> torch.Tensor:
    """Empirical NTK product ``K v = J (J^T v)`` with ``J = d model(x) / d theta`` at ``params``.

    ``v`` has the output's shape ``(n, K)``. ``J^T v`` is one VJP and ``J u`` one JVP, so K (an
    ``nK x nK`` matrix) and J are never formed. ``params`` maps names of trainable parameters to values
    (default: the model's current ones); parameters not named keep the model's values.
    ``mode``: "functorch" (torch.func.vjp then torch.func.jvp), "autograd" (a backward pass, then
    ``J u`` as the gradient of ``<J^T w, u>`` in w: reverse mode only, for custom ops that torch.func
    cannot transform) or "auto" (functorch, falling back to autograd).
    """
    if mode not in ("auto", "functorch", "autograd"):
        raise ValueError(f"mode must be 'auto', 'functorch' or 'autograd', got {mode!r}")
    if params is None:
        params = trainable_params(model)
    names = list(params)
    primals = tuple(params[n].detach() for n in names)

    def f(*theta):
        return functional_call(model, dict(zip(names, theta)), (x,))

    if mode == "autograd":
        return _kv_autograd(f, primals, v).detach()
    try:
        return _kv_functorch(f, primals, v).detach()
    except (RuntimeError, NotImplementedError):
        if mode == "functorch":
            raise
    return _kv_autograd(f, primals, v).detach()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def ntk_similarity(model: nn.Module, init_params: Mapping[str, torch.Tensor], x: torch.Tensor,
                   probes: torch.Tensor) -> float:
    """Mean over probes v_p of ``cos(K_0 v_p, K_t v_p)``: 1 while the tangent kernel stays at init.

    ``K_0`` is the NTK at ``init_params``, ``K_t`` at the model's current parameters; ``probes`` is
    ``(P, n, K)``, typically standard normal in output space.
    """
    return NTKSimilarity(model, x, probes, init_params)()


class NTKSimilarity:
    """``mean_p cos(K_0 v_p, K_t v_p)`` with ``K_0 v_p`` computed once, for tracking during training.

    ``probes`` is ``(P, n, K)`` or an int P, in which case P standard-normal probes are drawn from a
    generator seeded with ``seed`` (so a resumed run sees the same probes). ``K0v`` (a list of P
    tensors) restores products saved from an earlier instance instead of recomputing them.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, probes, init_params=None, seed: int = 0,
                 K0v=None):
        self.model, self.x = model, x
        if isinstance(probes, int):
            if probes < 1:
                raise ValueError(f"probes must be a positive int or a (P, n, K) tensor, got {probes}")
            with torch.no_grad():
                shape = model(x).shape
            g = torch.Generator().manual_seed(seed)
            probes = torch.randn((probes, *shape), generator=g, dtype=torch.float64).to(x.device, x.dtype)
        check_tensor("probes", probes, ndim=3)
        self.probes = probes
        if K0v is not None:
            if len(K0v) != len(probes) or any(k.shape != v.shape for k, v in zip(K0v, probes)):
                raise ValueError("K0v must hold one product of each probe's shape")
            self.K0v = list(K0v)
        else:
            self.K0v = [ntk_matvec(model, x, v, init_params) for v in probes]

    def __call__(self) -> float:
        sims = [_cosine(k0v, ntk_matvec(self.model, self.x, v)) for k0v, v in zip(self.K0v, self.probes)]
        return sum(sims) / len(sims)


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n samples (Kornblith et al., 2019).

    With column-centred ``X`` (n, p) and ``Y`` (n, q):
    ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``, which equals
    ``HSIC(XX^T, YY^T) / sqrt(HSIC(XX^T, XX^T) HSIC(YY^T, YY^T))``. It lies in [0, 1], is 1 for
    representations equal up to rotation and isotropic scaling, and is computed in float64.
    """
    check_tensor("X", X, ndim=2)
    check_tensor("Y", Y, ndim=2)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same samples: X has {X.shape[0]} rows, Y has {Y.shape[0]}")
    X = X.double() - X.double().mean(dim=0)
    Y = Y.double() - Y.double().mean(dim=0)
    xx, yy = torch.linalg.matrix_norm(X.T @ X), torch.linalg.matrix_norm(Y.T @ Y)
    if xx == 0 or yy == 0:
        raise ValueError("X and Y must vary across samples; one of them is constant")
    return float(torch.linalg.matrix_norm(Y.T @ X) ** 2 / (xx * yy))


def weight_change(params: Iterable[torch.Tensor], init_params: Iterable[torch.Tensor]) -> dict[str, float]:
    """Distance of theta (all parameters, flattened) from its initial value theta_0.

    * ``norm_ratio``: ``||theta|| / ||theta_0||``
    * ``relative_change``: ``||theta - theta_0|| / ||theta_0||``
    * ``cosine``: ``<theta, theta_0> / (||theta|| ||theta_0||)``
    """
    params, init_params = list(params), list(init_params)
    if len(params) != len(init_params):
        raise ValueError(f"params has {len(params)} tensors but init_params has {len(init_params)}")
    for i, (p, p0) in enumerate(zip(params, init_params)):
        if p.shape != p0.shape:
            raise ValueError(f"params[{i}] has shape {tuple(p.shape)} but init_params[{i}] has {tuple(p0.shape)}")
    theta = torch.cat([p.detach().double().flatten().cpu() for p in params])
    theta0 = torch.cat([p.detach().double().flatten().cpu() for p in init_params])
    n0 = theta0.norm()
    if n0 == 0:
        raise ValueError("init_params are all zero; the ratios to init are undefined")
    return {"norm_ratio": float(theta.norm() / n0),
            "relative_change": float((theta - theta0).norm() / n0),
            "cosine": float(theta @ theta0 / (theta.norm() * n0))}
