"""Dense brute-force references that the tests compare the optimizers against, in one place.

Everything here forms the matrices the optimizers avoid (the Jacobian by ``torch.func.jacrev``, the
loss Hessian by ``torch.func.hessian``) and solves with ``torch.linalg``; use float64 models.

* :func:`jacobian`, :func:`brute_gram`: J (b, c, d) and K = S^T J J^T S;
* :func:`dense_direction`: the Gauss-Newton / LM direction -(J^T Q J / b + lambda I)^{-1} g of the
  optimizers' own mean loss, Q = S S^T for a given S, by default the exact Hessian from its closed form
  (:func:`loss_hessian`, which does not use the package's factors);
* :func:`dense_lm_direction`: the same for a user's loss function as given (any reduction), with its
  Hessian in the outputs: the reference for "the step of the loss you train with";
* :func:`dense_problem`: J, Q, g and L of a problem for the per-sample loss :func:`per_sample_loss`;
* :func:`revmlp_forward`: a RevMLP's output Z (and logits) from SPEC section 2, with its parameters
  given as a flat list, so that torch.func can differentiate it.

The model's input ``x`` is a tensor (``model(x)``), a tuple / list (``model(*x)``), a dict
(``model(**x)``) or a :class:`Call` holding both (``model(*args, **kwargs)``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from typing import NamedTuple

from torch.func import functional_call, hessian, jacrev



class Call(NamedTuple):
    """The arguments of a model call with both positional and keyword inputs."""
    args: tuple
    kwargs: dict


def call_args(x) -> tuple[tuple, dict]:
    """(args, kwargs) of ``model(x)``, ``model(*x)``, ``model(**x)`` or a :class:`Call`."""
    if isinstance(x, Call):
        return tuple(x.args), dict(x.kwargs)
    if isinstance(x, torch.Tensor):
        return (x,), {}
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    return (), dict(x)


def call_model(model, x, params=None):
    """model on the inputs x, at ``params`` (a dict of name -> tensor, by functional_call) if given."""
    args, kwargs = call_args(x)
    if params is None:
        return model(*args, **kwargs)
    return functional_call(model, params, args, kwargs)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def stepped(model, opt_step):
    """The parameter change of one step (lr 1: the direction), and what the step returned."""
    before = [p.detach().clone() for p in model.parameters()]
    out = opt_step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)], out


def assert_directions_close(got, want, tol=1e-10):
    """max |got - want| <= tol max(1, max |want|) over the flattened directions, want not trivial."""
    err = float((flat(got) - flat(want)).abs().max())
    scale = max(1.0, float(flat(want).abs().max()))
    assert err <= tol * scale, f"max error {err:.3g}"
    assert float(flat(want).abs().max()) > 1e-6   # not a trivial comparison


def _trainable(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return names, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def jacobian(model, x) -> torch.Tensor:
    """J (b, c, d) of the flattened outputs with respect to the trainable parameters (in order)."""
    names, params = _trainable(model)
    b = call_model(model, x).shape[0]
    jac = jacrev(lambda p: call_model(model, x, p).reshape(b, -1))(params)
    return torch.cat([jac[n].reshape(b, jac[n].shape[1], -1) for n in names], -1)


def brute_gram(model, x, S=None) -> torch.Tensor:
    """K = J J^T, or S^T J J^T S for per-sample factors S (b, c, m); rows sample-major."""
    J = jacobian(model, x)
    if S is not None:
        J = torch.einsum("ica,icd->iad", S, J)
    J = J.reshape(-1, J.shape[-1])
    return J @ J.T


def dense_direction(model, x, y, loss: str, damping: float, S=None, index=None) -> torch.Tensor:
    """-(J^T Q J / b + lambda I)^{-1} g, flat, for the mean loss ``loss`` ("mse", "cross_entropy",
    "binary_cross_entropy" of :mod:`revgn_ext.egn.loss_factors`) with Q = S S^T (default: the exact
    loss Hessian) and g = J^T e / b its gradient.

    ``index`` (P, C): per-position losses; row p of the loss reads the outputs ``model(x).reshape(-1)
    [index[p]]`` with target y[p], and b is P (the mean over positions, as torch's cross-entropy over
    the kept tokens)."""
    J = jacobian(model, x)
    b, c, d = J.shape
    f = call_model(model, x).detach().reshape(b, c)
    if index is not None:
        J, f = J.reshape(b * c, d)[index], f.reshape(-1)[index]
        b, c = index.shape
    e, Q = loss_hessian(loss, f, y)
    if S is not None:
        Q = S @ S.transpose(1, 2)
    g = torch.einsum("ic,icd->d", e, J) / b
    G = torch.einsum("icd,ice,ief->df", J, Q, J) / b
    return -torch.linalg.solve(G + damping * torch.eye(d, dtype=J.dtype), g)


def loss_hessian(loss: str, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e_i = dl/df_i (b, c) and Q_i = d^2 l / df_i^2 (b, c, c) from their closed forms, independent of
    :mod:`revgn_ext.egn.loss_factors`: MSE e = f - y, Q = I; cross-entropy (labels or class
    probabilities q) e = p - q, Q = diag p - p p^T; binary CE e = sigma - y, Q = diag sigma (1 - sigma)."""
    b, c = f.shape
    if loss == "mse":
        return f - y, torch.eye(c, dtype=f.dtype).expand(b, c, c)
    if loss == "cross_entropy":
        p = torch.softmax(f, 1)
        q = y if y.is_floating_point() else F.one_hot(y, c).to(f.dtype)
        return p - q, torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    sig = torch.sigmoid(f)
    return sig - y, torch.diag_embed(sig * (1 - sig))


def dense_lm_direction(model, loss_fn, x, y, damping: float) -> list[torch.Tensor]:
    """-(J^T H J + lambda I)^{-1} g for the user's own ``loss_fn(output, y)``: H its Hessian in the
    outputs, g its gradient, J over every parameter; one tensor per parameter."""
    names = [n for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    w0 = torch.cat([p.reshape(-1) for p in params.values()])
    shapes = [p.shape for p in params.values()]

    def unflat(w):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            out[n] = w[i:i + k].reshape(s)
            i += k
        return out

    def f_of_w(w):
        return call_model(model, x, unflat(w))

    f = f_of_w(w0)
    shape = f.shape
    J = jacrev(f_of_w)(w0).reshape(f.numel(), -1)
    H = hessian(lambda o: loss_fn(o.reshape(shape), y))(f.reshape(-1)).reshape(f.numel(), f.numel())
    g = torch.autograd.functional.jacobian(lambda w: loss_fn(f_of_w(w), y), w0)
    G = J.T @ H @ J + damping * torch.eye(w0.numel(), dtype=w0.dtype)
    d = -torch.linalg.solve(G, g)
    return [t.reshape(s) for t, s in zip(d.split([math.prod(s) for s in shapes]), shapes)]


def per_sample_loss(loss: str, fi, yi):
    """l(f_i, y_i) of the optimizers' losses: 0.5 ||f - y||^2, softmax CE of a label, BCE of logits."""
    if loss == "mse":
        return 0.5 * (fi - yi).square().sum()
    if loss == "cross_entropy":
        return -torch.log_softmax(fi, 0)[yi]
    return F.binary_cross_entropy_with_logits(fi, yi, reduction="sum")


def dense_problem(model, x, y, loss: str):
    """J ((b c) x d), Q ((b c) x (b c)), g (d,), L for the trainable parameters and the mean of
    :func:`per_sample_loss`."""
    names, params = _trainable(model)
    shapes = [params[n].shape for n in names]
    w0 = torch.cat([params[n].reshape(-1) for n in names])

    def outputs(w):
        parts = torch.split(w, [s.numel() for s in shapes])
        return functional_call(model, {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}, (x,))

    f = outputs(w0).detach()
    b = f.shape[0]
    f = f.reshape(b, -1)
    c = f.shape[1]
    J = jacrev(lambda w: outputs(w).reshape(b * c))(w0)
    Q = torch.block_diag(*[hessian(lambda fi: per_sample_loss(loss, fi, y[i]))(f[i]) for i in range(b)])

    def total(w):
        fw = outputs(w).reshape(b, c)
        return sum(per_sample_loss(loss, fw[i], y[i]) for i in range(b)) / b

    w = w0.clone().requires_grad_(True)
    L = total(w)
    (g,) = torch.autograd.grad(L, w)
    return J, Q, g, float(L.detach())


ACTIVATIONS = {"identity": lambda t: t, "relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}


def revmlp_forward(model, x, params=None):
    """(Z, logits) of a RevMLP straight from SPEC section 2 (pad, split, couple, read out); ``params``:
    its trainable parameters as a flat list in ``model.parameters()`` order (default: its own)."""
    params = list(model.parameters()) if params is None else list(params)
    if model.in_features % 2:
        x = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)
    h = x.shape[1] // 2
    x1, x2 = x[:, :h], x[:, h:]
    for l, blk in enumerate(model.blocks):
        WF, bF, WG, bG = params[4 * l:4 * l + 4]
        uF = x2 if blk.VF is None else x2 @ blk.VF
        x1 = x1 + ACTIVATIONS[blk.activation](uF) @ WF.T + bF
        uG = x1 if blk.VG is None else x1 @ blk.VG
        x2 = x2 + ACTIVATIONS[blk.activation](uG) @ WG.T + bG
    z = torch.cat([x1, x2], 1)
    return z, z @ model.Q
