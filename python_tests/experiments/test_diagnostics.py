"""Diagnostics against brute-force dense computations on tiny models (float64)."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from revgn_ext.experiments.common import diagnostics as dg


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def dense_ntk(model, x, params=None):
    """K = J J^T with J the full (n*K) x P Jacobian of the flattened output."""
    params = params if params is not None else dg.trainable_params(model)
    names = list(params)

    def f(*theta):
        return functional_call(model, dict(zip(names, theta)), (x,)).flatten()

    jac = jacrev(f, argnums=tuple(range(len(names))))(*params.values())
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
    return J @ J.T


def perturb(model, scale, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("mode", ["functorch", "autograd", "auto"])
def test_ntk_matvec_matches_dense(mode):
    model = tiny_model()
    x = torch.randn(4, 3, dtype=torch.float64)
    v = torch.randn(4, 2, dtype=torch.float64)
    K = dense_ntk(model, x)
    Kv = dg.ntk_matvec(model, x, v, mode=mode)
    torch.testing.assert_close(Kv.flatten(), K @ v.flatten(), rtol=1e-12, atol=1e-12)


class _NoForwardMode(torch.autograd.Function):
    """tanh with a backward formula (itself differentiable) but no forward-mode rule, which
    torch.func.jvp cannot transform."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def test_ntk_matvec_falls_back_to_autograd():
    model = tiny_model()
    model[1] = type("Act", (nn.Module,), {"forward": lambda self, x: _NoForwardMode.apply(x)})()
    x = torch.randn(4, 3, dtype=torch.float64)
    v = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError):
        dg.ntk_matvec(model, x, v, mode="functorch")
    model_ref = tiny_model()
    K = dense_ntk(model_ref, x)
    torch.testing.assert_close(dg.ntk_matvec(model, x, v).flatten(), K @ v.flatten(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="mode must be"):
        dg.ntk_matvec(model, x, v, mode="dense")


def test_ntk_matvec_at_given_params_and_partly_frozen_model():
    model = tiny_model()
    model[0].weight.requires_grad_(False)      # J only over trainable parameters
    x = torch.randn(6, 3, dtype=torch.float64)
    params = {n: p + 0.3 for n, p in dg.trainable_params(model).items()}
    assert "0.weight" not in params
    v = torch.randn(6, 2, dtype=torch.float64)
    torch.testing.assert_close(dg.ntk_matvec(model, x, v, params).flatten(),
                               dense_ntk(model, x, params) @ v.flatten(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="v must have the model output's shape"):
        dg.ntk_matvec(model, x, v[:, :1])


def test_ntk_similarity_matches_dense():
    model = tiny_model()
    x = torch.randn(5, 3, dtype=torch.float64)
    probes = torch.randn(3, 5, 2, dtype=torch.float64)
    init = dg.trainable_params(model)
    K0 = dense_ntk(model, x)
    assert dg.ntk_similarity(model, init, x, probes) == pytest.approx(1.0, abs=1e-12)
    perturb(model, 0.5)
    Kt = dense_ntk(model, x)
    expect = sum(float(torch.cosine_similarity(K0 @ v.flatten(), Kt @ v.flatten(), dim=0)) for v in probes) / 3
    got = dg.ntk_similarity(model, init, x, probes)
    assert got == pytest.approx(expect, abs=1e-12)
    assert got < 0.999          # the perturbation really changed the kernel


def test_ntk_tracker_seeded_probes():
    model = tiny_model()
    x = torch.randn(5, 3, dtype=torch.float64)
    a = dg.NTKSimilarity(model, x, probes=2, seed=7)
    b = dg.NTKSimilarity(model, x, probes=2, seed=7)
    assert torch.equal(a.probes, b.probes) and a.probes.shape == (2, 5, 2)
    perturb(model, 0.2)
    assert a() == b() < 1
    with pytest.raises(ValueError, match="probes"):
        dg.NTKSimilarity(model, x, probes=0)


def hsic(K, L):
    n = K.shape[0]
    H = torch.eye(n, dtype=K.dtype) - 1.0 / n
    return torch.trace(K @ H @ L @ H)


def test_linear_cka_matches_hsic_definition():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(7, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(7, 9, generator=g, dtype=torch.float64) + X.sum(1, keepdim=True)
    K, L = X @ X.T, Y @ Y.T
    expect = hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L))
    assert dg.linear_cka(X, Y) == pytest.approx(float(expect), abs=1e-12)
    assert 0 < dg.linear_cka(X, Y) < 1


def test_linear_cka_invariances_and_errors():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(10, 3, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    assert dg.linear_cka(X, 2.5 * X @ Q + 4.0) == pytest.approx(1.0, abs=1e-12)
    assert dg.linear_cka(X.float(), X.float()) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="same samples"):
        dg.linear_cka(X, X[:5])
    with pytest.raises(ValueError, match="constant"):
        dg.linear_cka(X, torch.ones(10, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="Y contains NaN"):
        dg.linear_cka(X, torch.full((10, 2), math.nan))


def test_weight_change_matches_flat_vectors():
    model = tiny_model()
    init = [p.detach().clone() for p in model.parameters()]
    perturb(model, 0.1)
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    theta0 = torch.cat([p.flatten() for p in init])
    out = dg.weight_change(model.parameters(), init)
    assert out["norm_ratio"] == pytest.approx(float(theta.norm() / theta0.norm()), rel=1e-12)
    assert out["relative_change"] == pytest.approx(float((theta - theta0).norm() / theta0.norm()), rel=1e-12)
    assert out["cosine"] == pytest.approx(float(torch.cosine_similarity(theta, theta0, dim=0)), rel=1e-12)
    same = dg.weight_change(init, init)
    assert same == pytest.approx({"norm_ratio": 1.0, "relative_change": 0.0, "cosine": 1.0})
    with pytest.raises(ValueError, match="init_params has 3"):
        dg.weight_change(init, init[:3])
    with pytest.raises(ValueError, match=r"params\[0\] has shape"):
        dg.weight_change([init[0].T] + init[1:], init)


def test_ntk_matvec_on_revmlp_matches_dense_on_any_backend():
    # RevMLP runs through revgn_ext.ops (compiled kernels or references); the dense J comes from plain
    # autograd, one backward pass per output entry.
    from revgn_ext import RevMLP

    model = RevMLP(6, 3, num_blocks=2, hidden=10, activations=("tanh", "relu"), weight_std=0.3, seed=0,
                   dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    v = torch.randn(4, 3, generator=g, dtype=torch.float64)
    params = dg.trainable_params(model)
    names = list(params)

    def f(*theta):
        return functional_call(model, dict(zip(names, theta)), (x,))

    jac = torch.autograd.functional.jacobian(f, tuple(params.values()))
    J = torch.cat([j.reshape(12, -1) for j in jac], dim=1)
    torch.testing.assert_close(dg.ntk_matvec(model, x, v).flatten(), J @ (J.T @ v.flatten()),
                               rtol=1e-10, atol=1e-10)
