"""RevGN guards: an honest ``stats["exact"]``, all-or-nothing steps, the memory refusal, and one-line
errors for bad input. J Delta is checked with torch.func.jvp through the dense forward of test_revgn."""
import math
import warnings

import pytest
import torch

import revgn_ext as rg
from revgn_ext.egn.gram import UnsupportedModelError
from test_revgn import J_times, make, rel_err, target_dZ

f64 = torch.float64


def _rank_deficient(in_features, seed, dtype):
    """Identity first block (rank <= d/2 + 1) with n = d/2 + 2 samples."""
    m, x, y = make(in_features=in_features, hidden=32, acts=("identity", "relu"), n=in_features // 2 + 2,
                   seed=seed, blocks=2, classes=4)
    return (m, x, y) if dtype == f64 else (m.float(), x.float(), y)


# Configurations whose rank-deficient Cholesky succeeds without jitter (info all 0) on each backend, so
# that the factorisation alone cannot reveal the rank deficiency.
CLEAN = {"cpp": [(12, 2, f64), (30, 15, f64), (16, 39, f64), (20, 25, torch.float32), (20, 37, torch.float32)],
         "reference": [(8, 22, f64), (16, 36, f64), (20, 9, f64), (12, 2, torch.float32), (30, 5, torch.float32)]}
REPORTED = CLEAN.get(rg.ops.backend(), CLEAN["cpp"])


@pytest.mark.parametrize("in_features,seed,dtype", REPORTED)
def test_exact_flag_false_on_rank_deficient_step_whose_cholesky_succeeds(in_features, seed, dtype):
    m, x, y = _rank_deficient(in_features, seed, dtype)
    delta = rg.RevGN(m, damping=0.0).direction(x, y)
    md = m.double()
    miss = rel_err(J_times(md, x.double(), [d.double() for d in delta]), target_dZ(md, x.double(), y))
    assert miss > 0.1, miss   # J Delta misses dZ
    m = m.to(dtype)
    opt = rg.RevGN(m, lr=0.0, damping=0.0)
    with pytest.warns(UserWarning, match="damping=0 but the step is not exact") as caught:
        stats = opt.step(x, y)
    assert stats["info"] == [0, 0, 0, 0]   # the Cholesky succeeded: only the residual test can tell
    assert stats["exact"] is False and max(stats["residual"]) > 0.1
    assert all(w.filename == __file__ for w in caught if "not exact" in str(w.message))


@pytest.mark.parametrize("hidden,acts,in_features,n", [
    (32, ("tanh", "gelu", "relu"), 20, 8), (32, ("identity", "relu"), 20, 8), (16, ("gelu",), 13, 16),
    (None, ("tanh", "relu"), 24, 10)])
@pytest.mark.parametrize("solver", ["cholesky", "svd"])
def test_exact_flag_true_on_well_posed_step_and_jvp_equals_target(hidden, acts, in_features, n, solver):
    m, x, y = make(in_features=in_features, hidden=hidden, acts=acts, n=n, blocks=len(acts))
    opt = rg.RevGN(m, lr=0.0, damping=0.0, solver=solver, rtol=1e-12, atol=0.0)
    delta = opt.direction(x, y)
    assert rel_err(J_times(m, x, delta), target_dZ(m, x, y)) < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = opt.step(x, y)
    assert stats["exact"] is True and max(stats["residual"]) < 1e-12


def test_exact_flag_false_and_no_residual_work_with_damping():
    m, x, y = make()
    stats = rg.RevGN(m, damping=1e-4).step(x, y)
    assert stats["exact"] is False and "residual" not in stats


# --------------------------------------------------------------------------------------------------
# All-or-nothing steps
# --------------------------------------------------------------------------------------------------

def _groups(m, lr_last):
    params = list(m.parameters())
    return [{"params": params[:4], "lr": 0.5}, {"params": params[4:], "lr": lr_last}]


@pytest.mark.parametrize("dtype,lr", [(torch.float32, 1e300), (torch.float32, 3e38), (f64, 1e307)])
def test_atomic_steps_overflowing_lr_leaves_every_parameter_bit_identical(dtype, lr):
    m, x, y = make(blocks=2, acts=("tanh", "relu"))
    m, x = m.to(dtype), x.to(dtype)
    before = [p.detach().clone() for p in m.parameters()]
    if lr > torch.finfo(dtype).max:
        with pytest.raises(ValueError, match=r"^lr = 1e\+300 overflows the float32 parameters"):
            rg.RevGN(_groups(m, 0.5), model=m, lr=lr)
        opt = rg.RevGN(_groups(m, 0.5), model=m)
        opt.param_groups[1]["lr"] = lr
        with pytest.raises(ValueError, match=r"param_groups\[1\]\['lr'\]"):
            opt.step(x, y)
    else:
        # MSE targets of 1e4 make |Delta| > 1 somewhere in block 1, so lr < the largest value still
        # takes theta - lr Delta past it there; block 0 (lr 0.5) alone would step fine.
        y = 1e4 * torch.randn(x.shape[0], 5, dtype=dtype)
        delta = rg.RevGN(m, damping=1e-3, loss="mse").direction(x, y)
        top = max(float(d.abs().max()) for d in delta[4:])
        lr = torch.finfo(dtype).max / top * 2
        assert lr < torch.finfo(dtype).max
        opt = rg.RevGN(_groups(m, lr), model=m, damping=1e-3, loss="mse")
        with pytest.warns(RuntimeWarning, match="would not be finite"):
            stats = opt.step(x, y)
        assert stats["refused"] is True
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert not any(opt.state[p] for p in m.parameters())


@pytest.mark.parametrize("shares", [(1.0,), (0.5, 0.25, 0.25), (0.5, float("nan")), "ab", (0.7, 0.7)])
def test_atomic_steps_wrong_shares_leave_parameters_bit_identical(shares):
    m, x, y = make(blocks=2, acts=("tanh", "relu"))
    opt = rg.RevGN(m, damping=1e-3)
    opt.step(x, y)
    before = [p.detach().clone() for p in m.parameters()]
    saved = opt.state_dict()
    saved["param_groups"][0]["shares"] = shares
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['shares'\] must be 2 non-negative numbers"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["shares"] == (0.5, 0.5)
    opt.param_groups[0]["shares"] = shares    # written directly: refused at the step, before any write
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['shares'\]"):
        opt.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(opt.state[p]["step"] == 1 for p in m.parameters())


def test_atomic_steps_large_but_finite_update_still_applies():
    # lr ||Delta|| beyond half the largest float64 takes the checked path (new values formed and
    # checked first); the update is finite, so it applies, equal to theta - lr Delta.
    m, x, y = make(blocks=2, acts=("tanh", "relu"))
    opt = rg.RevGN(m, damping=1e-3)
    delta = opt.direction(x, y)
    norm = float(torch.linalg.vector_norm(torch.cat([d.reshape(-1) for d in delta])))
    lr = torch.finfo(f64).max / norm * 0.6
    opt.param_groups[0]["lr"] = lr
    before = [p.detach().clone() for p in m.parameters()]
    stats = opt.step(x, y)
    assert stats["refused"] is False
    for b, d, p in zip(before, delta, m.parameters()):
        assert torch.equal(p.detach(), b - lr * d)
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())


# --------------------------------------------------------------------------------------------------
# Memory guard
# --------------------------------------------------------------------------------------------------

def test_memory_guard_refuses_a_huge_batch_before_the_forward(monkeypatch):
    m = rg.RevMLP(20, 4, 2, 32, dtype=f64)
    x = torch.zeros(32768, 20, dtype=f64)
    y = torch.zeros(32768, dtype=torch.long)
    opt = rg.RevGN(m)

    def no_forward(*args, **kwargs):
        raise AssertionError("the forward ran before the memory check")

    monkeypatch.setattr(m, "forward_with_trace", no_forward)
    with pytest.raises(UnsupportedModelError, match=r"batch of 32768 needs about .* GiB .*> memory_limit 4\.00 GiB; "
                                                    r"use a smaller batch .* or raise memory_limit"):
        opt.step(x, y)


def test_memory_guard_small_limit_refuses_and_a_larger_one_steps():
    m, x, y = make(blocks=2, acts=("tanh", "relu"), n=8)
    before = [p.detach().clone() for p in m.parameters()]
    # 4 half-layers x (8 x 32 features + 2 x 8 x 8) + 8 x 8, float64: 12,800 bytes.
    with pytest.raises(UnsupportedModelError, match="memory_limit 0.00 GiB"):
        rg.RevGN(m, memory_limit=12_799).step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert rg.RevGN(m, memory_limit=12_800).step(x, y)["refused"] is False
    with pytest.raises(ValueError, match=r"^memory_limit must be an int >= 1"):
        rg.RevGN(m, memory_limit=0)


# --------------------------------------------------------------------------------------------------
# The official damped target
# --------------------------------------------------------------------------------------------------

def _official_damped_batch(logits, y, mu):
    """The official form written out densely: Hbar^{-1} = mean_j inv(diag p_j - p_j p_j^T + mu I),
    E_i = Hbar^{-1} (p_i - e_{y_i})."""
    p = torch.softmax(logits.double(), 1)
    n, K = p.shape
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    inv = torch.linalg.inv(H + mu * torch.eye(K, dtype=f64)).mean(0)
    g = p - torch.nn.functional.one_hot(y, K).double()
    return g @ inv.mT


@pytest.mark.parametrize("mu", [1e-3, 0.1, 2.0])
def test_damped_batch_target_matches_official_formula(mu):
    from revgn_ext.revgn import targets as tg
    torch.manual_seed(0)
    logits, y = 3 * torch.randn(12, 5, dtype=f64), torch.randint(0, 5, (12,))
    E = tg.function_space_target(logits, y, "cross_entropy", "damped-batch", mu)
    want = _official_damped_batch(logits, y, mu)
    assert rel_err(E, want) < 1e-10
    per_sample = tg.function_space_target(logits, y, "cross_entropy", "damped", mu)
    assert rel_err(per_sample, want) > 1e-3   # a different target, not a new name for the same one
    yf = torch.randn(12, 5, dtype=f64)
    assert torch.allclose(tg.function_space_target(logits, yf, "mse", "damped-batch", mu), (logits - yf) / (1 + mu))


def test_damped_batch_target_through_revgn_is_exact():
    m, x, y = make()
    opt = rg.RevGN(m, damping=0.0, target="damped-batch", target_damping=0.05)
    delta = opt.direction(x, y)
    with torch.no_grad():
        dZ = _official_damped_batch(m(x), y, 0.05) @ m.Q.T
    assert rel_err(J_times(m, x, delta), dZ) < 1e-10


# --------------------------------------------------------------------------------------------------
# ignore_index: padding labels have no row
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ignore,reduction", [(-100, "mean"), (2, "mean"), (-100, "sum"), (4, "sum")])
@pytest.mark.parametrize("through", ["step", "closure"])
def test_ignore_index_sample_has_no_row_and_loss_is_torchs(ignore, reduction, through):
    m, x, y = make(n=9, blocks=2, acts=("tanh", "relu"))
    y[[1, 4, 7]] = ignore
    kept = y != ignore
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=ignore, reduction=reduction)
    with torch.no_grad():
        want_loss = loss_fn(m(x), y).item()
    # The dense check: J_kept Delta = n_kept dL/dz_kept Q^T from autograd of the user's own loss (with
    # reduction "sum" dL/dz is per sample already); the ignored samples put no row in the system.
    z = m(x).detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(z, y, ignore_index=ignore, reduction="mean").backward()
    E = z.grad[kept] * int(kept.sum())
    assert float(z.grad[~kept].abs().max()) == 0.0
    opt = rg.RevGN(m, lr=0.0, damping=0.0, loss=loss_fn if through == "step" else None)
    if through == "step":
        delta = opt.direction(x, y)
        stats = opt.step(x, y)
    else:
        closure = lambda: torch.nn.functional.cross_entropy(m(x), y, ignore_index=ignore, reduction=reduction)  # noqa: E731
        delta = opt.direction(closure)
        opt.step(closure)
        stats = opt.last_stats
    assert rel_err(J_times(m, x[kept], delta), E @ m.Q.T) < 1e-10
    assert stats["batch_size"] == int(kept.sum()) >= 3 and stats["exact"] is True
    assert stats["loss"] == pytest.approx(want_loss, rel=1e-12)
    # The same direction as on the batch without those samples.
    ref = rg.RevGN(m, damping=0.0, loss=loss_fn).direction(x[kept], y[kept])
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(delta, ref))


def test_ignore_index_refusals_mention_padding():
    m, x, y = make(n=6, blocks=2, acts=("tanh", "relu"))
    y[0] = -7
    with pytest.raises(ValueError, match=r"outside \[0, 5\).*ignore_index=-100 \(padding\)"):
        rg.RevGN(m, loss="cross_entropy").step(x, y)
    y[0] = -100
    with pytest.raises(ValueError, match=r"outside \[0, 5\).*padding"):
        rg.RevGN(m, loss="mse").step(x, y)
    with pytest.raises(ValueError, match="every label of y is ignore_index=-100"):
        rg.RevGN(m, loss="cross_entropy").step(x, torch.full_like(y, -100))
    # A closure whose ignore_index differs from the constructor's loss is refused.
    opt = rg.RevGN(m, loss=torch.nn.CrossEntropyLoss(ignore_index=3))
    with pytest.raises(ValueError, match="ignore_index"):
        opt.step(lambda: torch.nn.functional.cross_entropy(m(x), y))
    # EGN does not drop padded samples: it refuses them, naming the padding.
    net = torch.nn.Linear(4, 3).double()
    egn = rg.EGN(net, loss=torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"ignore_index=-100 \(padding\)"):
        egn.step(torch.randn(5, 4, dtype=f64), torch.tensor([0, 1, -100, 2, 0]))
    egn = rg.EGN(net, loss=torch.nn.CrossEntropyLoss(ignore_index=1))
    with pytest.raises(ValueError, match=r"ignore_index=1 \(padding\)"):
        egn.step(torch.randn(5, 4, dtype=f64), torch.tensor([0, 1, 2, 2, 0]))
