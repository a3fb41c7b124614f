"""EGN's layer rules against the brute-force torch.func Jacobian Gram (float64, 1e-10), tied / shared /
frozen parameters, refusals, and the curvature modes against dense computations of the same
approximation."""
import math
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import revgn_ext  # noqa: F401
from revgn_ext.egn import EGN
from revgn_ext.egn import gram as gram_mod
from revgn_ext.egn.gram import factors as gram_factors
from revgn_ext.egn import loss_factors as lf

from _dense import brute_gram, dense_direction, flat, jacobian  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:.*reference.*:RuntimeWarning")

TOL = 1e-10


def assert_close(K, ref, tol=TOL):
    scale = max(1.0, float(ref.abs().max()))
    err = float((K - ref).abs().max())
    assert err <= tol * scale, f"max error {err:.3g} (scale {scale:.3g})"


ROUTES = {"chosen": {"DEFAULT_BLOCK_BYTES": gram_factors.DEFAULT_BLOCK_BYTES}, "kronecker": {"kron_cost": lambda *a: 0}, "dense": {"dense_cost": lambda *a: 0}}


def check_layerwise(model, x, block_rows=None):
    """K = J J^T and K = S^T J J^T S (CE factor) from the layer rules only, against brute force, on
    each route: the cost model's choice, Kronecker form wherever a rule has one, dense everywhere."""
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    f = model(x).detach().reshape(x.shape[0], -1)
    y = torch.arange(x.shape[0]) % f.shape[1]
    S = lf.factor_matrix(lf.cross_entropy_factor(f, y))
    plain, with_S = brute_gram(model, x), brute_gram(model, x, S)
    for route, patches in ROUTES.items():
        with mock.patch.multiple(gram_factors, **patches):
            K = gram_mod.gram_matrix(model, x, method="layerwise", block_rows=block_rows)
            assert_close(K, plain)
            K = gram_mod.gram_matrix(model, x, columns=S.permute(2, 0, 1), method="layerwise", block_rows=block_rows)
            assert_close(K, with_S)


class Seq(nn.Module):
    """Applies a module to (b, T, d) and flattens the output per sample."""

    def __init__(self, *mods):
        super().__init__()
        self.body = nn.Sequential(*mods)

    def forward(self, x):
        return self.body(x).flatten(1)


def randomise_norm(module):
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(0.5, 1.5)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return module


# --------------------------------------------------------------------------------------------------
# Every layer type
# --------------------------------------------------------------------------------------------------

def test_linear_on_sequences_and_higher_rank():
    torch.manual_seed(0)
    check_layerwise(Seq(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)), torch.randn(5, 3, 4))
    check_layerwise(Seq(nn.Linear(4, 3, bias=False), nn.GELU(), nn.Linear(3, 2)), torch.randn(4, 2, 3, 4))


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(dilation=2, padding=2, bias=False),
                                dict(groups=2, stride=1, padding=1), dict(padding="same", dilation=2),
                                dict(kernel_size=4, padding="same")])
def test_conv1d(kw):
    torch.manual_seed(1)
    k = kw.pop("kernel_size", 3)
    model = nn.Sequential(nn.Conv1d(2, 4, k, **kw), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(4, 2, 9)
    model(x)
    check_layerwise(model, x)


@pytest.mark.parametrize("kw", [dict(), dict(stride=(2, 1), padding=(1, 2)), dict(dilation=2, padding=1, bias=False),
                                dict(groups=2, padding=1), dict(padding="same"), dict(kernel_size=(2, 3), padding="same")])
def test_conv2d(kw):
    torch.manual_seed(2)
    k = kw.pop("kernel_size", 3)
    model = nn.Sequential(nn.Conv2d(2, 4, k, **kw), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(4, 2, 7, 6)
    model(x)
    check_layerwise(model, x)


@pytest.mark.parametrize("norm", ["layer", "layer_seq", "group", "batch_eval", "rms", "layer_no_bias"])
def test_norm_affines(norm):
    torch.manual_seed(3)
    if norm == "layer":
        model, x = nn.Sequential(nn.Linear(4, 6), randomise_norm(nn.LayerNorm(6)), nn.Tanh(), nn.Linear(6, 2)), torch.randn(5, 4)
    elif norm == "layer_seq":
        model, x = Seq(nn.Linear(4, 6), randomise_norm(nn.LayerNorm((3, 6))), nn.Linear(6, 1)), torch.randn(4, 3, 4)
    elif norm == "layer_no_bias":
        model, x = nn.Sequential(nn.Linear(4, 6), randomise_norm(nn.LayerNorm(6, bias=False)), nn.Linear(6, 2)), torch.randn(5, 4)
    elif norm == "group":
        model = nn.Sequential(nn.Conv2d(2, 4, 3), randomise_norm(nn.GroupNorm(2, 4)), nn.Tanh(), nn.Flatten(), nn.Linear(16, 2))
        x = torch.randn(4, 2, 4, 4)
    elif norm == "batch_eval":
        model = nn.Sequential(nn.Conv2d(2, 4, 3), randomise_norm(nn.BatchNorm2d(4)), nn.Tanh(), nn.Flatten(),
                              nn.Linear(16, 4), randomise_norm(nn.BatchNorm1d(4)), nn.Linear(4, 2)).eval()
        x = torch.randn(4, 2, 4, 4)
    else:
        if not hasattr(nn, "RMSNorm"):
            pytest.skip("nn.RMSNorm needs torch >= 2.4")
        model, x = nn.Sequential(nn.Linear(4, 6), randomise_norm(nn.RMSNorm(6)), nn.Linear(6, 2)), torch.randn(5, 4)
    check_layerwise(model, x)


class TinyLM(nn.Module):
    """Embedding (with padding_idx), LayerNorm and Linear on (b, T, d), mean over positions, head."""

    def __init__(self, vocab=7, d=4, c=3, tie=False, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.norm = randomise_norm(nn.LayerNorm(d))
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab if tie else c, bias=not tie)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        h = h + torch.tanh(self.mix(h))
        return self.head(h.mean(1))


def test_embedding_and_integer_inputs():
    torch.manual_seed(4)
    ids = torch.randint(0, 7, (5, 4))
    ids[0, 1] = 0   # padding_idx: no gradient
    check_layerwise(TinyLM(), ids)
    check_layerwise(nn.Sequential(nn.Embedding(6, 3), nn.Flatten(), nn.Linear(6, 2)), torch.randint(0, 6, (4, 2)))


def test_mixed_model_and_row_blocks():
    torch.manual_seed(5)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.gn = randomise_norm(nn.GroupNorm(2, 4))
            self.conv2 = nn.Conv2d(4, 4, 3, groups=2, stride=2)
            self.ln = randomise_norm(nn.LayerNorm(4))
            self.seq = nn.Linear(4, 3)
            self.out = nn.Linear(4 * 3, 3)

        def forward(self, x):
            h = F.max_pool2d(torch.relu(self.gn(self.conv(x))), 1)
            h = torch.tanh(self.conv2(h))                     # (b, 4, 2, 2)
            h = h.flatten(2).transpose(1, 2)                  # (b, 4, 4): a sequence
            return self.out(torch.tanh(self.seq(self.ln(h))).flatten(1))

    model, x = Mixed(), torch.randn(5, 1, 6, 6)
    for rows in (None, 1, 4, 7):
        check_layerwise(model, x, block_rows=rows)


# --------------------------------------------------------------------------------------------------
# The direction against the dense parameter-space solve
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_direction_on_lm_equals_dense_solve(loss):
    torch.manual_seed(6)
    model = TinyLM().double()
    ids = torch.randint(0, 7, (6, 4))
    y = torch.randn(6, 3, dtype=torch.float64) if loss == "mse" else torch.randint(0, 3, (6,))
    opt = EGN(model, damping=0.2, loss=loss, gram="layerwise")
    d = flat(opt.direction(ids, y))
    ref = dense_direction(model, ids, y, loss, 0.2)
    assert (d - ref).abs().max() < TOL * max(1.0, float(ref.abs().max()))
    stats = opt.step(ids, y)
    assert set(stats["time"]) == {"forward", "gram", "factor", "backproject"}
    assert all(v >= 0 for v in stats["time"].values())


# --------------------------------------------------------------------------------------------------
# Tied, shared and frozen parameters
# --------------------------------------------------------------------------------------------------

def tied_sequential():
    torch.manual_seed(7)
    l1, l2 = nn.Linear(4, 4), nn.Linear(4, 4)
    l2.weight = l1.weight
    return nn.Sequential(l1, nn.Tanh(), l2, nn.Tanh(), nn.Linear(4, 2)).double()


def test_tied_linear_weights_are_exact():
    """The issue's minimal case: the cross terms between the two uses must be in K."""
    model = tied_sequential()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    assert_close(gram_mod.gram_matrix(model, x, method="layerwise"), brute_gram(model, x))
    d = flat(EGN(model, damping=0.5, gram="layerwise").direction(x, y))
    d_func = flat(EGN(model, damping=0.5, gram="functional").direction(x, y))
    assert (d - d_func).abs().max() < TOL
    assert (d - dense_direction(model, x, y, "mse", 0.5)).abs().max() < TOL


class TransposedUse(nn.Module):
    """Reuses the encoder's weight outside any module: F.linear(h, enc.weight.t())."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 5)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        return self.out(torch.tanh(F.linear(h, self.enc.weight.t())))


def test_use_no_hook_sees_is_caught():
    torch.manual_seed(8)
    model = TransposedUse().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    with pytest.raises(gram_mod.UnsupportedModelError, match=r"'enc.weight'.*differs from autograd"):
        EGN(model, gram="layerwise").direction(x, y)
    opt = EGN(model, damping=0.4)
    with pytest.warns(RuntimeWarning, match=r"'enc.weight'.*torch.func"):
        d = flat(opt.direction(x, y))
    assert opt._assembler.fallback_names == ["enc.weight"]     # the bias stays on the layer rule
    assert (d - dense_direction(model, x, y, "mse", 0.4)).abs().max() < TOL
    d2 = flat(opt.direction(x, y))   # later steps go straight to the fallback
    assert (d2 - d).abs().max() < TOL


def test_tied_embedding_and_head_are_exact():
    torch.manual_seed(9)
    model = TinyLM(tie=True, padding_idx=None).double()
    ids = torch.randint(0, 7, (5, 3))
    check_layerwise(model, ids)
    y = torch.randint(0, 7, (5,))
    d = flat(EGN(model, damping=0.3, loss="cross_entropy", gram="layerwise").direction(ids, y))
    assert (d - dense_direction(model, ids, y, "cross_entropy", 0.3)).abs().max() < TOL


def test_frozen_parameters_are_skipped():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv1d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    model[3].bias.requires_grad_(False)
    model[5].requires_grad_(False)
    check_layerwise(model, torch.randn(5, 1, 6))


def test_batch_dim_not_first_is_caught():
    """A layer that sees (T, b, d) with T = b: the shapes pass, the per-sample weights of the check do not."""
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.out = nn.Linear(3, 1)

        def forward(self, x):            # x: (b, T, 3), T == b
            h = torch.tanh(self.lin(x.transpose(0, 1))).transpose(0, 1)
            return self.out(h).flatten(1)

    torch.manual_seed(11)
    model = SeqFirst().double()
    x = torch.randn(4, 4, 3, dtype=torch.float64)
    with pytest.raises(gram_mod.UnsupportedModelError, match="'lin.weight'"):
        gram_mod.gram_matrix(model, x, method="layerwise")
    with pytest.warns(RuntimeWarning, match="lin.weight"):
        K = gram_mod.gram_matrix(model, x)
    assert_close(K, brute_gram(model, x))


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------

def test_batchnorm_train_and_unsupported_modules_are_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 1))
    with pytest.raises(gram_mod.UnsupportedModelError, match=r"'1' \(BatchNorm2d\).*model.eval\(\)"):
        EGN(model).step(torch.randn(4, 1, 4, 4), torch.randn(4, 1))
    nostats = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, track_running_stats=False), nn.Linear(2, 1)).eval()
    with pytest.raises(gram_mod.UnsupportedModelError, match="track_running_stats"):
        EGN(nostats).step(torch.randn(4, 3), torch.randn(4, 1))
    emb = nn.Sequential(nn.Embedding(5, 2, max_norm=1.0), nn.Flatten(), nn.Linear(4, 1))
    with pytest.raises(gram_mod.UnsupportedModelError, match=r"'0.weight'.*Embedding.*max_norm.*gram='auto'"):
        EGN(emb, gram="layerwise")


def test_train_mode_dropout_is_refused():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    opt = EGN(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(gram_mod.UnsupportedModelError, match=r"'2' \(Dropout\).*model.eval\(\)"):
        opt.direction(x, y)
    with pytest.raises(gram_mod.UnsupportedModelError, match="Dropout"):
        opt.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()   # one deterministic function: direction() and step() agree
    d = opt.direction(x, y)
    opt.step(x, y)
    assert all(torch.allclose(p, b + 0.1 * di, atol=1e-6) for p, b, di in zip(model.parameters(), before, d))

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(F.dropout(x, 0.5, training=True))

    with pytest.raises(gram_mod.UnsupportedModelError, match="random numbers"):
        EGN(Functional()).direction(x, y)


def test_integer_inputs_need_an_embedding():
    ids = torch.randint(0, 5, (4, 3))
    with pytest.raises(ValueError, match=r"x holds integers.*nn.Embedding"):
        EGN(nn.Sequential(nn.Linear(3, 1))).step(ids, torch.randn(4, 1))
    with pytest.raises(ValueError, match="x must be"):
        EGN(nn.Sequential(nn.Linear(3, 1))).step(ids.bool(), torch.randn(4, 1))


# --------------------------------------------------------------------------------------------------
# Curvature modes
# --------------------------------------------------------------------------------------------------

def cls_problem(c=4, b=6, seed=12):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, c)).double()
    return model, torch.randn(b, 5, dtype=torch.float64), torch.randint(0, c, (b,))


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "binary_cross_entropy"])
def test_sampled_direction_equals_dense_solve_of_same_draws(loss, samples):
    model, x, y = cls_problem(c=1 if loss == "binary_cross_entropy" else 4)
    if loss == "mse":
        y = torch.randn(6, 4, dtype=torch.float64)
    elif loss == "binary_cross_entropy":
        y = (torch.arange(6) % 2).double()[:, None]
    opt = EGN(model, damping=0.3, loss=loss, curvature="sampled", samples=samples)
    torch.manual_seed(99)
    d = flat(opt.direction(x, y))
    f = model(x).detach()
    torch.manual_seed(99)
    S = lf.sampled_factor(loss, f, y, samples).S
    assert S.shape == (6, f.shape[1], samples)
    ref = dense_direction(model, x, y, loss, 0.3, S=S)
    assert (d - ref).abs().max() < TOL


@pytest.mark.parametrize("dtype,lam", [(torch.float64, 1e-7), (torch.float32, 1e-3), (torch.float32, 1e-7)])
def test_sampled_quadratic_model_terms_against_the_dense_problem(dtype, lam):
    """g^T d and ||S^T J d||^2 / b along the step's own direction d, as the line search and the gain
    ratio read them, against the float64 dense problem with the same draws. At small lambda the Woodbury
    difference g.g - (A g).u cancels when g lies in A's row space (32 draws of 3 classes: float32 read
    g^T d = 0 against -1.8) and mu u carries the solve's residual; those steps form the terms by a VJP
    and a JVP instead."""
    from revgn_ext._inputs import ModelInputs
    from _dense import dense_problem
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 3)).double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=gen)
    ours = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 3)).to(dtype)
    ours.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    opt = EGN(ours, damping=lam, loss="cross_entropy", line_search=True, curvature="sampled", samples=32)
    torch.manual_seed(99)
    with torch.enable_grad():
        sol = opt._solve(ModelInputs.of(x.to(dtype)), y, lam)
    gTd, quad = opt._model_terms(sol, sol.direction, False)
    torch.manual_seed(99)
    S = lf.sampled_factor("cross_entropy", ours(x.to(dtype)).detach(), y, 32).S.double()
    J, _, grad, _ = dense_problem(model, x, y, "cross_entropy")
    Q = torch.block_diag(*(s @ s.T for s in S))
    d = flat(sol.direction).double()
    tol = 1e-7 if dtype == torch.float64 else 1e-4   # float64 at lambda = 1e-7: ||K|| / mu ~ 1e6 is kept
    assert gTd == pytest.approx(float(grad @ d), rel=tol)
    assert quad == pytest.approx(float(d @ J.T @ Q @ J @ d) / 8, rel=tol)


def test_true_class_direction_equals_dense_solve():
    model, x, y = cls_problem()
    d = flat(EGN(model, damping=0.3, loss="cross_entropy", curvature="true-class").direction(x, y))
    f = model(x).detach()
    e = torch.softmax(f, 1) - F.one_hot(y, 4).double()
    ref = dense_direction(model, x, y, "cross_entropy", 0.3, S=e[:, :, None])
    assert (d - ref).abs().max() < TOL


def test_sampled_curvature_is_unbiased():
    """E[S S^T] = diag p - p p^T per sample and E[tr K_sampled] = tr K_exact, over 4000 draws (seed 0).

    Tolerance: 5 standard errors of the Monte-Carlo mean, estimated from the draws themselves.
    """
    model, x, y = cls_problem(c=5, b=4)
    f = model(x).detach()
    exact = lf.cross_entropy_factor(f, y)
    S = lf.factor_matrix(exact)
    Q = S @ S.transpose(1, 2)
    gen = torch.Generator().manual_seed(0)
    draws = 4000
    Qs = torch.stack([(lambda s: s @ s.transpose(1, 2))(lf.sampled_factor("cross_entropy", f, y, 2, gen).S)
                      for _ in range(draws)])
    se = Qs.std(0) / math.sqrt(draws)
    assert ((Qs.mean(0) - Q).abs() <= 5 * se + 1e-12).all()
    # Through the layer-wise Gram: the trace of K is ||S^T J||_F^2, linear in S S^T.
    Kexact = float(gram_mod.gram_matrix(model, x, columns=S.permute(2, 0, 1)).trace())
    traces = torch.tensor([float(gram_mod.gram_matrix(
        model, x, columns=lf.sampled_factor("cross_entropy", f, y, 1, gen).S.permute(2, 0, 1)).trace())
        for _ in range(300)], dtype=torch.float64)
    assert abs(float(traces.mean()) - Kexact) <= 5 * float(traces.std()) / math.sqrt(300)


def test_sampled_needs_damping_and_options_are_checked():
    model, _, _ = cls_problem()
    with pytest.raises(ValueError, match="damping > 0"):
        EGN(model, damping=0.0, curvature="sampled")
    with pytest.raises(ValueError, match="curvature must be one of"):
        EGN(model, curvature="fisher")
    with pytest.raises(ValueError, match="samples"):
        EGN(model, curvature="sampled", samples=0)
    with pytest.raises(ValueError, match="samples=2 applies to curvature='sampled'"):
        EGN(model, samples=2)
    with pytest.raises(ValueError, match="gram_block_rows"):
        EGN(model, gram_block_rows=0)


@pytest.mark.parametrize("curvature", ["exact", "sampled", "true-class"])
def test_curvature_modes_step_and_predict_decrease(curvature):
    """The quadratic model's terms reported by the solve match a dense evaluation along dir."""
    model, x, y = cls_problem()
    opt = EGN(model, damping=0.3, loss="cross_entropy", curvature=curvature, adaptive_damping=True)
    torch.manual_seed(3)
    with torch.enable_grad():
        sol = opt._solve(x, y, 0.3)
    d = flat(sol.direction)
    J = jacobian(model, x)
    b = J.shape[0]
    S = lf.factor_matrix(sol.factor)
    A = torch.einsum("ica,icd->iad", S, J).reshape(b, -1, J.shape[-1])
    g = torch.einsum("ic,icd->d", sol.factor.residual, J) / b
    assert abs(float(-sol.tKu / b) - float(g @ d)) < 1e-10
    assert torch.allclose(-sol.Ku, (A @ d), atol=1e-10)
    stats = opt.step(x, y)
    assert stats["accepted"] and stats["rho"] is not None


def test_hidden_use_appearing_later_is_caught_by_the_per_step_check():
    """The random-weight verification runs once per call pattern; a hidden use that appears later
    under the same pattern is caught by the free check of J^T S u, and the step is redone."""
    class Sometimes(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(3, 3)
            self.out = nn.Linear(3, 2)
            self.hidden = False

        def forward(self, x):
            h = torch.tanh(self.enc(x))
            if self.hidden:
                h = h + F.linear(h, self.enc.weight.t())
            return self.out(h)

    torch.manual_seed(13)
    model = Sometimes().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    opt = EGN(model, damping=0.4)
    opt.direction(x, y)
    assert opt._assembler.fallback_names == []
    model.hidden = True
    with pytest.warns(RuntimeWarning, match=r"'enc.weight'.*torch.func"):
        d = flat(opt.direction(x, y))
    assert opt._assembler.fallback_names == ["enc.weight"]
    assert (d - dense_direction(model, x, y, "mse", 0.4)).abs().max() < TOL


def test_row_blocks_through_the_optimizer():
    torch.manual_seed(14)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)).double()
    x, y = torch.randn(7, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    ref = flat(EGN(model, damping=0.2, loss="cross_entropy").direction(x, y))
    for rows in (1, 5, 9, 100):
        d = flat(EGN(model, damping=0.2, loss="cross_entropy", gram_block_rows=rows).direction(x, y))
        assert (d - ref).abs().max() < TOL


def test_layer_called_without_grad_contributes_nothing():
    class Partly(nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            with torch.no_grad():   # a trainable layer used as a fixed feature map
                h = torch.tanh(self.feat(x))
            return self.head(h) + self.feat(x)[:, :2]

    torch.manual_seed(15)
    check_layerwise(Partly(), torch.randn(5, 3))
