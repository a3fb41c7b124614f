"""EGN: loss factors, Gram assembly and the LM direction against dense brute force, plus the step logic.

Brute force: J from torch.func.jacrev on the flattened parameters, Q_i from torch.func.hessian of the
per-sample loss, g from autograd, and the d x d solve (J^T Q J / b + lambda I) dir = -g.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import revgn_ext as rg
from revgn_ext.egn import gram as gram_mod
from revgn_ext.egn import loss_factors as lf
from revgn_ext.egn import EGN

from _dense import brute_gram, dense_problem, flat, per_sample_loss  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:.*reference.*:RuntimeWarning")

LOSSES = {"mse": 3, "cross_entropy": 4, "binary_cross_entropy": 1}   # loss -> number of outputs c


def make_batch(loss, c, b=6, d_in=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d_in, generator=g, dtype=torch.float64)
    if loss == "mse":
        y = torch.randn(b, c, generator=g, dtype=torch.float64)
    elif loss == "cross_entropy":
        y = torch.randint(0, c, (b,), generator=g)
    else:
        y = torch.randint(0, 2, (b, 1), generator=g).double()
    return x, y


def mlp(c, d_in=5, seed=0, inplace=False):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(inplace=inplace),
                         nn.Linear(6, c)).double()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------------------------------
# Loss factors
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", list(LOSSES))
def test_loss_factor_is_exact_square_root_of_hessian(loss):
    c = LOSSES[loss]
    b = 5
    f = torch.randn(b, c, dtype=torch.float64) * 2
    _, y = make_batch(loss, c, b=b, seed=1)
    fac = lf.LOSS_FACTORS[loss](f, y)
    S = lf.factor_matrix(fac)
    for i in range(b):
        H = hessian(lambda fi: per_sample_loss(loss, fi, y[i]))(f[i])
        e = torch.func.grad(lambda fi: per_sample_loss(loss, fi, y[i]))(f[i])
        assert torch.allclose(S[i] @ S[i].T, H, atol=1e-13), "S S^T != loss Hessian"
        assert torch.allclose(fac.residual[i], e, atol=1e-13), "residual != dl/df"
        assert torch.allclose(S[i] @ fac.target[i], e, atol=1e-12), "S t != e"
    expect = sum(per_sample_loss(loss, f[i], y[i]) for i in range(b)) / b
    assert torch.allclose(fac.loss, expect, atol=1e-13)
    assert S.shape == (b, c, c - 1 if loss == "cross_entropy" else c)   # Q_i has rank c - 1 for CE
    u = torch.randn(b, S.shape[2], dtype=torch.float64)
    v = torch.randn(b, c, dtype=torch.float64)
    assert torch.allclose(lf.apply_factor(fac, u), torch.einsum("iab,ib->ia", S, u), atol=1e-14)
    assert torch.allclose(lf.apply_factor_transpose(fac, v), torch.einsum("iba,ib->ia", S, v), atol=1e-14)


def test_cross_entropy_target_finite_for_confident_wrong_logits():
    f = torch.tensor([[60.0, -60.0, 0.0]], dtype=torch.float64)
    fac = lf.cross_entropy_factor(f, torch.tensor([1]))
    assert torch.isfinite(fac.target).all()
    assert torch.allclose(lf.apply_factor(fac, fac.target), fac.residual, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# Gram assembly
# --------------------------------------------------------------------------------------------------

class FrozenLastWeight(nn.Module):
    """Custom module with a no-bias layer, an in-place activation and a frozen weight."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 8, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.b = nn.Linear(8, 3)
        self.b.weight.requires_grad_(False)
        self.mid = nn.Linear(8, 8)

    def forward(self, x):
        h = self.act(self.a(x))
        return self.b(torch.tanh(self.mid(h)) + h)


@pytest.mark.parametrize("make", [lambda: mlp(3, inplace=True), FrozenLastWeight])
@pytest.mark.parametrize("method", ["layerwise", "functional"])
def test_gram_paths_match_brute_force(make, method):
    model = make()
    model.double()
    x = torch.randn(6, 5, dtype=torch.float64)
    K = gram_mod.gram_matrix(model, x, method=method)
    assert torch.allclose(K, brute_gram(model, x), atol=1e-12)
    # With a loss factor: K = S^T J J^T S.
    f = model(x).detach()
    fac = lf.cross_entropy_factor(f, torch.tensor([0, 1, 2, 0, 1, 2]))
    S = lf.factor_matrix(fac)
    K = gram_mod.gram_matrix(model, x, columns=S.permute(2, 0, 1), method=method)
    assert torch.allclose(K, brute_gram(model, x, S), atol=1e-12)


class Scale(nn.Module):
    """A custom module with its own parameter: no layer rule covers it."""

    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, h):
        return h * self.gain


class CustomMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.scale = Scale(8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.scale(self.inp(x))))


def test_auto_falls_back_per_parameter_for_other_modules():
    model = CustomMLP().double()
    reason = gram_mod.layerwise_obstacle(model, list(model.parameters()))
    assert "scale.gain" in reason and "Scale" in reason
    opt = EGN(model, loss="mse")
    assert opt._assembler.method == "layerwise+functional"
    assert opt._assembler.fallback_names == ["scale.gain"]   # only that parameter leaves the layer rules
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.allclose(gram_mod.gram_matrix(model, x), brute_gram(model, x), atol=1e-12)
    # a 1-d parameter may be a linear call's bias: refused at the first forward, naming the op that uses it
    with pytest.raises(gram_mod.UnsupportedModelError,
                       match=r"'scale.gain'.*\(Scale\).*Tensor.mul.*gram='auto'.*torch.func"):
        EGN(model, gram="layerwise").direction(x, torch.randn(4, 2, dtype=torch.float64))


class Shared(nn.Module):
    """Reuses one nn.Linear twice: its two uses' per-sample gradients are summed (cross terms included)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def test_reused_layer_is_exact_layerwise():
    torch.manual_seed(3)
    model = Shared().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(gram_mod.gram_matrix(model, x, method="layerwise"), brute_gram(model, x), atol=1e-12)
    opt = EGN(model, damping=0.3, gram="layerwise")
    d = flat(opt.direction(x, y))
    assert opt._assembler.method == "layerwise"
    J, Q, g, _ = dense_problem(model, x, y, "mse")
    ref = torch.linalg.solve(J.T @ Q @ J / 5 + 0.3 * torch.eye(J.shape[1], dtype=J.dtype), -g)
    assert (d - ref).abs().max() < 1e-10


def test_unsupported_modules_are_named():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1))
    opt = EGN(model)
    before = params_of(model)
    with pytest.raises(gram_mod.UnsupportedModelError, match=r"'1' \(BatchNorm1d\)"):
        opt.step(torch.randn(8, 4), torch.randn(8, 1))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    conv = nn.Sequential(nn.Conv1d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(12, 1))
    with pytest.raises(gram_mod.UnsupportedModelError, match=r"'0'.*Conv1d.*reflect.*gram='auto'"):
        EGN(conv, gram="layerwise")
    conv3 = nn.Sequential(nn.Conv3d(1, 2, 1), nn.Flatten(), nn.Linear(16, 1))
    with pytest.raises(gram_mod.UnsupportedModelError, match=r"'0.weight'.*Conv3d.*no layer rule"):
        EGN(conv3, gram="layerwise")


@pytest.mark.parametrize("gram", ["auto", "functional"])
def test_memory_guard(gram):
    model = CustomMLP()
    opt = EGN(model, memory_limit=10_000, gram=gram)
    with pytest.raises(gram_mod.UnsupportedModelError, match="memory_limit"):
        opt.step(torch.randn(32, 5), torch.randn(32, 2))


# --------------------------------------------------------------------------------------------------
# Exactness of the LM direction
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["layerwise", "functional"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_direction_equals_dense_parameter_space_solve(loss, method):
    c = LOSSES[loss]
    model = mlp(c)
    x, y = make_batch(loss, c)
    lam = 0.1
    opt = EGN(model, damping=lam, loss=loss, gram=method)
    d = flat(opt.direction(x, y))
    J, Q, g, _ = dense_problem(model, x, y, loss)
    b = x.shape[0]
    ref = torch.linalg.solve(J.T @ Q @ J / b + lam * torch.eye(J.shape[1], dtype=J.dtype), -g)
    err = float((d - ref).abs().max())
    assert err < 1e-10, f"{loss}/{method}: max |dir - dense| = {err:.2e}"
    assert ref.abs().max() > 1e-2   # the comparison is not between two near-zero vectors


def test_step_moves_parameters_by_lr_times_direction():
    model = mlp(3)
    x, y = make_batch("mse", 3)
    opt = EGN(model, lr=0.3, damping=0.5)
    d = flat(opt.direction(x, y))
    w0 = flat(params_of(model))
    stats = opt.step(x, y)
    assert stats["accepted"] and stats["alpha"] == 0.3 and stats["refused"] is False
    assert stats["loss"] == pytest.approx(dense_problem(mlp(3), x, y, "mse")[3], rel=1e-12)
    assert torch.allclose(flat(model.parameters()) - w0, 0.3 * d, atol=1e-14)


def test_step_reports_cholesky_retries_on_rank_deficient_gram():
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    x = torch.ones(8, 2, dtype=torch.float64)      # identical samples: K = J J^T has rank 1
    y = torch.randn(8, 1, dtype=torch.float64)
    opt = EGN(model, damping=0.0, lr=1.0)
    with pytest.warns(RuntimeWarning, match="jitter"):
        stats = opt.step(x, y)
    assert stats["cholesky_retries"] > 0 and stats["cholesky_jitter"] > 0 and stats["accepted"]


# --------------------------------------------------------------------------------------------------
# Line search, damping, momentum
# --------------------------------------------------------------------------------------------------

def test_armijo_accepted_steps_satisfy_condition():
    model = mlp(4, seed=2)
    x, y = make_batch("cross_entropy", 4, b=8, seed=2)
    opt = EGN(model, lr=5.0, damping=1e-2, loss="cross_entropy", line_search=True)
    alpha_prev, tries = None, []
    for _ in range(4):
        _, _, g, L0 = dense_problem(model, x, y, "cross_entropy")
        d = flat(opt.direction(x, y))
        stats = opt.step(x, y)
        assert 1 <= stats["line_search_tries"] <= 15
        alpha0 = 5.0 if alpha_prev is None else min(1.5 * alpha_prev, 5.0)
        assert stats["alpha"] == pytest.approx(alpha0 * 0.8 ** (stats["line_search_tries"] - 1), rel=1e-12)
        assert stats["accepted"], stats
        L1 = dense_problem(model, x, y, "cross_entropy")[3]
        assert L1 == pytest.approx(stats["new_loss"], rel=1e-12)
        assert L1 <= L0 + 0.1 * stats["alpha"] * float(g @ d) + 1e-14
        tries.append(stats["line_search_tries"])
        alpha_prev = stats["alpha"]
    assert opt.state[next(model.parameters())]["alpha"] == alpha_prev
    assert max(tries) > 1   # backtracking happened


def test_line_search_gives_up_after_max_tries_without_moving():
    model = mlp(3)
    x, y = make_batch("mse", 3)
    # armijo ~ 1 asks for the full linear decrease, which a convex-ish loss along d cannot give.
    opt = EGN(model, lr=1.0, damping=0.1, line_search=True, max_tries=2, armijo=0.999999)
    before = params_of(model)
    stats = opt.step(x, y)
    assert not stats["accepted"] and stats["line_search_tries"] == 2 and stats["alpha"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "step" not in opt.state[next(model.parameters())]


def predicted_decrease(model, x, y, loss, step):
    J, Q, g, _ = dense_problem(model, x, y, loss)
    return -(float(g @ step) + 0.5 * float(step @ J.T @ Q @ J @ step) / x.shape[0])


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_adaptive_damping_gain_ratio_and_updates(momentum):
    loss, c = "cross_entropy", 4
    x, y = make_batch(loss, c, b=8, seed=4)
    # Good step: tiny lr keeps the quadratic model accurate (rho ~ 1) -> damping falls.
    model = mlp(c, seed=4)
    opt = EGN(model, lr=1e-3, damping=0.2, loss=loss, adaptive_damping=True, momentum=momentum,
              damping_increase=2.0, damping_decrease=0.5)
    w0 = flat(params_of(model))
    probe = copy.deepcopy(model)
    stats = opt.step(x, y)
    step = flat(params_of(model)) - w0
    pred = predicted_decrease(probe, x, y, loss, step)
    assert stats["rho"] == pytest.approx((stats["loss"] - stats["new_loss"]) / pred, rel=1e-8)
    assert stats["rho"] > 0.75 and stats["next_damping"] == pytest.approx(0.1)
    assert opt.param_groups[0]["damping"] == pytest.approx(0.1)
    # Bad step: a huge lr overshoots (rho < 0.25) -> damping rises.
    model = mlp(c, seed=4)
    opt = EGN(model, lr=200.0, damping=0.2, loss=loss, adaptive_damping=True, momentum=momentum,
              damping_increase=2.0, damping_decrease=0.5)
    stats = opt.step(x, y)
    assert stats["rho"] < 0.25 and opt.param_groups[0]["damping"] == pytest.approx(0.4)


def test_momentum_is_bias_corrected():
    model = mlp(3)
    x, y = make_batch("mse", 3)
    x2, y2 = make_batch("mse", 3, seed=7)
    beta, lr = 0.9, 0.2
    opt = EGN(model, lr=lr, damping=0.5, momentum=beta)
    d1 = flat(opt.direction(x, y))
    w0 = flat(params_of(model))
    opt.step(x, y)
    # t = 1: m = (1 - beta) d1, corrected m / (1 - beta) = d1.
    assert torch.allclose(flat(model.parameters()) - w0, lr * d1, atol=1e-14)
    d2 = flat(opt.direction(x2, y2))
    w1 = flat(params_of(model))
    opt.step(x2, y2)
    m2 = beta * (1 - beta) * d1 + (1 - beta) * d2
    assert torch.allclose(flat(model.parameters()) - w1, lr * m2 / (1 - beta ** 2), atol=1e-14)
    assert opt.state[next(model.parameters())]["step"] == 2


def test_state_dict_round_trip_resumes_identically():
    loss, c = "cross_entropy", 4
    batches = [make_batch(loss, c, b=8, seed=s) for s in range(5)]
    kwargs = dict(lr=0.5, damping=0.3, loss=loss, line_search=True, momentum=0.5, adaptive_damping=True,
                  damping_increase=1.5, damping_decrease=0.7)
    model = mlp(c)
    opt = EGN(model, **kwargs)
    for x, y in batches[:3]:
        opt.step(x, y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    model2 = mlp(c, seed=11)
    model2.load_state_dict(saved_model)
    opt2 = EGN(model2, lr=0.1, loss=loss)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["damping"] == opt.param_groups[0]["damping"] != 0.3
    for x, y in batches[3:]:
        s1, s2 = opt.step(x, y), opt2.step(x, y)
        s1.pop("time"), s2.pop("time")
        assert s1 == s2
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


# --------------------------------------------------------------------------------------------------
# Bad input and refused steps
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-0.1), "lr"), (dict(lr=float("nan")), "lr"), (dict(damping=-1.0), "damping"),
    (dict(loss="hinge"), "loss"), (dict(momentum=1.0), "momentum"), (dict(line_search=1), "line_search"),
    (dict(damping_increase=0.5), "damping_increase"), (dict(damping_decrease=1.5), "damping_decrease"),
    (dict(gram="dense"), "gram"), (dict(max_tries=0), "max_tries"),
])
def test_bad_constructor_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EGN(mlp(1), **kwargs)
    with pytest.raises(ValueError, match="model"):
        EGN([torch.zeros(2, requires_grad=True)])


@pytest.mark.parametrize("loss, make, name", [
    ("mse", lambda x, y: (x.clone().fill_(float("nan")), y), "x"),
    ("mse", lambda x, y: (x.float(), y), "x"),
    ("mse", lambda x, y: ("x", y), "x"),
    ("mse", lambda x, y: (x, y[:-1]), "y"),
    ("mse", lambda x, y: (x, y[:, :2]), "y"),
    ("mse", lambda x, y: (x, y.clone().fill_(float("inf"))), "y"),
    ("cross_entropy", lambda x, y: (x, y + 4), "y"),
    ("cross_entropy", lambda x, y: (x, y.double()), "y"),
    ("binary_cross_entropy", lambda x, y: (x, y + 2), "y"),
])
def test_bad_inputs_raise_before_touching_parameters(loss, make, name):
    c = LOSSES[loss]
    model = mlp(c)
    x, y = make_batch(loss, c)
    opt = EGN(model, loss=loss, momentum=0.5)
    before = params_of(model)
    bx, by = make(x, y)
    with pytest.raises(ValueError, match=name):
        opt.step(bx, by)
    with pytest.raises(ValueError, match=name):
        opt.direction(bx, by)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(opt.state) == 0


def test_non_finite_update_is_refused():
    model = mlp(3).float()
    x, y = make_batch("mse", 3)
    x, y = x.float(), y.float()
    with torch.no_grad():
        model[4].weight.mul_(1e38)         # the loss overflows to inf in float32
    opt = EGN(model, momentum=0.5, line_search=True)
    before = params_of(model)
    with pytest.warns(RuntimeWarning, match="refused"):
        stats = opt.step(x, y)
    assert stats["refused"] and not stats["accepted"] and stats["alpha"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(opt.state) == 0
    with pytest.raises(RuntimeError, match="not finite"):
        opt.direction(x, y)


# --------------------------------------------------------------------------------------------------
# Convergence on bundled sklearn data (not timed)
# --------------------------------------------------------------------------------------------------

def train(make_model, x, y, loss, steps, batch, make_opt):
    torch.manual_seed(0)
    model = make_model()
    opt = make_opt(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(x.shape[0], generator=g)[:batch]
        if isinstance(opt, EGN):
            opt.step(x[idx], y[idx])
        else:
            opt.zero_grad()
            out = model(x[idx])
            obj = 0.5 * (out - y[idx]).square().sum(1).mean() if loss == "mse" else F.cross_entropy(out, y[idx])
            obj.backward()
            opt.step()
    with torch.no_grad():
        out = model(x)
        return float(0.5 * (out - y).square().sum(1).mean() if loss == "mse" else F.cross_entropy(out, y))


@pytest.mark.parametrize("task", ["diabetes", "digits"])
def test_egn_beats_adam_and_sgd_in_same_number_of_steps(task):
    datasets = pytest.importorskip("sklearn.datasets")
    if task == "diabetes":
        X, Y = datasets.load_diabetes(return_X_y=True)
        x = torch.tensor(X, dtype=torch.float32)
        y = torch.tensor(Y, dtype=torch.float32)[:, None]
        y = (y - y.mean()) / y.std()
        loss, c, steps, batch, lam = "mse", 1, 25, 128, 0.1
    else:
        X, Y = datasets.load_digits(return_X_y=True)
        x = torch.tensor(X, dtype=torch.float32)
        y = torch.tensor(Y)
        loss, c, steps, batch, lam = "cross_entropy", 10, 25, 64, 1.0
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)

    def make_model():
        return nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, c))

    results = {
        "egn": train(make_model, x, y, loss, steps, batch, lambda m: EGN(m, lr=1.0, damping=lam, loss=loss)),
        "adam": train(make_model, x, y, loss, steps, batch, lambda m: torch.optim.Adam(m.parameters(), lr=1e-2)),
        "sgd": train(make_model, x, y, loss, steps, batch, lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
    }
    assert results["egn"] < results["adam"] and results["egn"] < results["sgd"], results


def test_public_name():
    assert rg.EGN is EGN
