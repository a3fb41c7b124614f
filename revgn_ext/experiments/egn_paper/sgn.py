"""SGN: the stochastic Gauss-Newton baseline of the EGN paper, an inexact solve of EGN's system.

On a batch of b samples with outputs f (b, c), residual e = dl/df and Q = blockdiag(d^2 l / df^2), the
damped Gauss-Newton direction solves

    (J^T Q J / b + lambda I) d = -g,    g = J^T e / b,

which :class:`revgn_ext.EGN` solves exactly through the (b c) x (b c) Gram. SGN instead runs at most
``cg_iters`` conjugate-gradient iterations in parameter space, each applying the matrix as one
Jacobian-vector product (``torch.func.jvp``), the loss Hessian Q, and one vector-Jacobian product (the
``torch.func.vjp`` function of the batch's forward pass, reused across iterations). J is never formed.
The step is w <- w + lr d.

With enough iterations (``cg_iters`` >= number of parameters, in exact arithmetic) d equals EGN's
direction; the paper's baseline uses at most 10.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp
from torch.optim import Optimizer

from ..._checks import check_number, check_tensor
from ..._warn import load_jvp_decompositions

__all__ = ["SGN", "loss_terms"]

LOSSES = ("mse", "cross_entropy", "binary_cross_entropy")


def loss_terms(loss: str, f: torch.Tensor, y: torch.Tensor):
    """(batch-mean loss, residual e = dl/df per sample, v -> Q v) for EGN's losses.

    * mse, l = 0.5 ||f - y||^2: e = f - y, Q = I.
    * cross_entropy (softmax, integer labels): e = p - onehot(y), Q v = p * v - p (p . v).
    * binary_cross_entropy (one logit, y in [0, 1]): e = s - y, Q v = s (1 - s) v, s = sigmoid(f).
    """
    if loss == "mse":
        r = f - y
        return 0.5 * r.square().sum(1).mean(), r, lambda v: v
    if loss == "cross_entropy":
        logp = torch.log_softmax(f, 1)
        p = logp.exp()
        e = p - torch.nn.functional.one_hot(y, f.shape[1]).to(f.dtype)
        return -logp.gather(1, y[:, None]).mean(), e, lambda v: p * v - p * (p * v).sum(1, keepdim=True)
    if loss == "binary_cross_entropy":
        s = torch.sigmoid(f)
        value = torch.nn.functional.binary_cross_entropy_with_logits(f, y)
        return value, s - y, lambda v: s * (1 - s) * v
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


class SGN(Optimizer):
    """Damped Gauss-Newton with a truncated conjugate-gradient solve (matrix-free).

    Args:
        model: the network; its trainable parameters are optimised. Samples must not interact.
        lr: step size. damping: lambda. loss: as in :class:`revgn_ext.EGN`.
        cg_iters: most CG iterations per step (the paper's baseline: 10).
        cg_tol: stop when the residual norm falls below ``cg_tol`` times ||g||.

    ``step(x, y)`` returns ``{"loss", "cg_iters", "cg_residual", "accepted"}``; a non-finite direction is
    refused and the parameters stay as they were.
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, damping: float = 1.0, loss: str = "mse",
                 cg_iters: int = 10, cg_tol: float = 1e-10):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        check_number("lr", lr, low=0.0, low_open=True)
        check_number("damping", damping, low=0.0)
        check_number("cg_tol", cg_tol, low=0.0)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if isinstance(cg_iters, bool) or not isinstance(cg_iters, int) or cg_iters < 1:
            raise ValueError(f"cg_iters must be a positive int, got {cg_iters!r}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (requires_grad=True)")
        super().__init__([p for _, p in named], dict(lr=lr, damping=damping, loss=loss, cg_iters=cg_iters,
                                                       cg_tol=cg_tol))
        self.model = model
        self.names = [n for n, _ in named]

    def _forward_fn(self, x: torch.Tensor):
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad}
        frozen.update(dict(self.model.named_buffers()))
        names, b = self.names, x.shape[0]

        def f(params):
            return functional_call(self.model, {**frozen, **dict(zip(names, params))}, (x,)).reshape(b, -1)
        return f

    def _check(self, x, y):
        check_tensor("x", x)
        check_tensor("y", y, float_only=False)
        if x.dim() == 0 or x.shape[0] == 0 or y.dim() == 0 or y.shape[0] != x.shape[0]:
            raise ValueError(f"x and y must share a non-empty batch dimension, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")

    def _solve(self, x, y):
        group = self.param_groups[0]
        self._check(x, y)
        params = tuple(p.detach() for p in group["params"])
        f = self._forward_fn(x)
        load_jvp_decompositions()
        out, pullback = vjp(f, params)
        b = out.shape[0]
        yy = y if group["loss"] == "cross_entropy" else y.reshape(out.shape).to(out.dtype)
        loss, e, hess = loss_terms(group["loss"], out.detach(), yy)
        lam = group["damping"]

        def flat(ts):
            return torch.cat([t.reshape(-1) for t in ts])

        shapes = [p.shape for p in params]
        sizes = [p.numel() for p in params]

        def unflat(v):
            return tuple(t.reshape(s) for t, s in zip(v.split(sizes), shapes))

        def matvec(v):  # (J^T Q J / b + lambda I) v
            Jv = jvp(f, (params,), (unflat(v),))[1]
            return flat(pullback(hess(Jv) / b)[0]) + lam * v

        g = flat(pullback(e / b)[0])
        # CG on A d = -g from d = 0
        d = torch.zeros_like(g)
        r = -g
        p = r.clone()
        rr = r.dot(r)
        stop = (group["cg_tol"] * g.norm()) ** 2
        iters = 0
        for iters in range(1, group["cg_iters"] + 1):
            Ap = matvec(p)
            pAp = p.dot(Ap)
            if not bool(pAp > 0):
                iters -= 1
                break
            alpha = rr / pAp
            d = d + alpha * p
            r = r - alpha * Ap
            rr_new = r.dot(r)
            if bool(rr_new <= stop):
                rr = rr_new
                break
            p = r + (rr_new / rr) * p
            rr = rr_new
        return loss.detach(), unflat(d), iters, float(rr.sqrt() / g.norm().clamp_min(1e-300))

    def direction(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The CG approximation of the damped GN direction on (x, y), one tensor per trainable parameter."""
        with torch.no_grad():
            return list(self._solve(x, y)[1])

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """One SGN step on (x, y); ``stats["loss"]`` is the pre-step loss."""
        group = self.param_groups[0]
        with torch.no_grad():
            loss, d, iters, res = self._solve(x, y)
            ok = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(t).all()) for t in d)
            if ok:
                for p, t in zip(group["params"], d):
                    p.add_(t, alpha=group["lr"])
        return {"loss": float(loss), "cg_iters": iters, "cg_residual": res, "accepted": ok}
