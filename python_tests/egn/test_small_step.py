"""The small-step path: a verified call pattern replays its factor plan, and the fused finiteness checks."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revgn_ext as rg
from revgn_ext.egn.optimizer import _all_finite

from _dense import dense_direction, flat


def mlp(out=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, out)).double()


class TwoCalls(nn.Module):
    """A Linear called twice (Kronecker factor over both uses), an embedding-free dense norm, a bias-free layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.b = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.b(self.norm(self.a(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("make,loss", [(mlp, "mse"), (lambda: TwoCalls().double(), "cross_entropy")])
def test_replayed_plans_give_the_dense_direction_at_every_step(make, loss):
    model = make()
    opt = rg.EGN(model, lr=0.3, damping=0.2, loss=loss)
    g = torch.Generator().manual_seed(1)
    c = model(torch.zeros(1, model[0].in_features if isinstance(model, nn.Sequential) else 4,
                          dtype=torch.float64)).shape[1]
    for _ in range(4):
        x = torch.randn(9, 5 if isinstance(model, nn.Sequential) else 4, generator=g, dtype=torch.float64)
        y = torch.randn(9, c, generator=g, dtype=torch.float64) if loss == "mse" else torch.randint(0, c, (9,), generator=g)
        ref = dense_direction(model, x, y, loss, 0.2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # a wrong replayed factor would be demoted with a warning
            ours = flat(opt.direction(x, y))
            opt.step(x, y)
        assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()
    assert len(opt._assembler._plans) == 1
    assert opt.last_stats["gram"] == "layerwise"


class Switch(nn.Module):
    """Once switched on, it also uses the first layer's weight in a way no hook sees."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)
        self.hidden_use = False

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        if self.hidden_use:
            h = h + F.linear(x, self.lin.weight.t())
        return self.head(h)


def test_a_use_that_appears_after_the_plan_is_cached_is_still_caught():
    torch.manual_seed(0)
    model = Switch().double()
    opt = rg.EGN(model, lr=0.1, damping=0.5, loss="mse")
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)
    opt.step(x, y)
    opt.step(x, y)   # the pattern is verified and its plan cached
    assert opt._assembler._plans
    model.hidden_use = True
    ref = dense_direction(model, x, y, "mse", 0.5)
    with pytest.warns(RuntimeWarning, match="torch.func"):
        ours = flat(opt.direction(x, y))
    assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_all_finite_sees_every_non_finite_entry(bad, where):
    tensors = [torch.ones(3), torch.full((2, 2), 3e38), torch.zeros(5, dtype=torch.float64), torch.ones(0)]
    assert _all_finite(tensors)
    tensors[where].view(-1)[-1] = bad
    assert not _all_finite(tensors)


def _op_accepts(G):
    from revgn_ext.ops.gram import gram_factor_from_gram_unchecked
    chol = gram_factor_from_gram_unchecked(G[None], G.new_zeros(1))
    return int(chol.info[0]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_cholesky_is_clean_exactly_when_the_factor_op_needs_no_retry(dtype):
    """The step factors the damped Gram with a plain Cholesky and calls the op (jitter retries) only when
    that factor fails the op's policy; both must agree on every matrix, borderline pivots included."""
    from revgn_ext.egn.cholesky import clean as _clean, plain_cholesky as _plain_cholesky
    from revgn_ext.ops.gram import PIVOT_FLOOR
    g = torch.Generator().manual_seed(0)
    eps = torch.finfo(dtype).eps
    cases = []
    for n in (1, 5, 33):
        A = torch.randn(n, 3, generator=g, dtype=dtype)
        cases += [A @ A.T + torch.eye(n, dtype=dtype), A @ A.T, torch.zeros(n, n, dtype=dtype),
                  -torch.eye(n, dtype=dtype)]
        # rank deficient plus a damping around the pivot floor: accepted on one side, retried on the other
        for k in (0.5, 0.9, 1.1, 2.0, 10.0):
            M = A @ A.T
            scale = float(M.diagonal().mean())
            cases.append(M + k * PIVOT_FLOOR * eps * scale * torch.eye(n, dtype=dtype))
        for bad in (math.nan, math.inf):
            M = A @ A.T + torch.eye(n, dtype=dtype)
            M[0, -1] = bad   # upper triangle only: the lower factor never reads it
            cases.append(M)
    seen = set()
    for G in cases:
        L, summary = _plain_cholesky(G)
        clean = _clean(summary.tolist(), dtype)
        assert clean == _op_accepts(G), G
        seen.add(clean)
        if clean:
            assert torch.allclose(L @ L.T, G, rtol=0, atol=100 * eps * float(G.abs().max()))
    assert seen == {True, False}


def test_a_step_whose_plain_factor_fails_takes_the_jittered_factor():
    """Rank-deficient Gram without damping: the plain factor fails, the op's retry is used, and the
    direction is the one of the jittered system (the step reports the retries)."""
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    x = torch.ones(8, 2, dtype=torch.float64)
    y = torch.randn(8, 1, dtype=torch.float64)
    opt = rg.EGN(model, damping=0.0, lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = opt.step(x, y)
    assert stats["cholesky_retries"] > 0 and stats["accepted"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_finite_update_writes_nothing():
    torch.manual_seed(0)
    model = mlp()
    opt = rg.EGN(model, lr=1e308, damping=1e-3, loss="mse")
    x = torch.randn(6, 5, dtype=torch.float64)
    y = 1e3 * torch.randn(6, 2, dtype=torch.float64)
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite parameters"):
        stats = opt.step(x, y)
    assert stats["refused"] and not stats["accepted"] and "non-finite parameters" in stats["reason"]
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    assert "step" not in opt.state.get(next(model.parameters()), {})


@pytest.mark.parametrize("b", [32, 64, 128])
def test_a_small_layer_keeps_weight_and_bias_in_one_factor(b):
    """The plan of the paper's MLP: one Kronecker factor per layer (weight and bias side by side), not a
    Kronecker weight beside a dense bias; and the step equals the dense float64 solve."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, 1)).double()
    opt = rg.EGN(model, lr=0.1, damping=1.0, loss="mse")
    x = torch.randn(b, 8, dtype=torch.float64)
    y = torch.randn(b, 1, dtype=torch.float64)
    opt.step(x, y)
    ref = dense_direction(model, x, y, "mse", 1.0)
    ours = flat(opt.direction(x, y))
    assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()
    (plan,) = opt._assembler._plans.values()
    assert [(spec[0], len(spec[3])) for spec in plan] == [("kron", 2)] * 4


@pytest.mark.parametrize("damping", [0.3, 0.0])
def test_the_factor_op_path_gives_the_same_step(monkeypatch, damping):
    """Off the CPU the step factors with the op (retries decided on the device) and reads its retries
    and jitter in the same one sync: forced here on the CPU, it gives the plain path's step, and the
    dense solve's direction where the Gram is regular."""
    import revgn_ext.egn.cholesky as egn_cholesky
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64)
    if damping == 0.0:
        x[:, 1:] = 0   # rank-deficient Gram: without damping the factor needs jitter
    y = torch.randn(7, 2, dtype=torch.float64)
    results = []
    for devices in (("cpu",), ()):
        monkeypatch.setattr(egn_cholesky, "PLAIN_FACTOR_DEVICES", devices)
        model = mlp()
        opt = rg.EGN(model, lr=0.5, damping=damping, loss="mse")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the jitter warning
            d = flat(opt.direction(x, y))
            stats = opt.step(x, y)
        results.append((d, stats, flat(model.parameters())))
    (d0, s0, w0), (d1, s1, w1) = results
    assert s0["cholesky_retries"] == s1["cholesky_retries"] and s0["accepted"] and s1["accepted"]
    assert (d0 - d1).abs().max() <= 1e-12 * d0.abs().max()
    assert (w0 - w1).abs().max() <= 1e-12 * w0.abs().max()
    if damping > 0:
        assert s0["cholesky_retries"] == 0
        ref = dense_direction(mlp(), x, y, "mse", damping)
        assert (d1 - ref).abs().max() <= 1e-10 * ref.abs().max()
    else:
        assert s0["cholesky_retries"] > 0 and s0["cholesky_jitter"] == s1["cholesky_jitter"]
