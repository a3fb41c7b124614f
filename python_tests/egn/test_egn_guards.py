"""EGN on what used to give silent wrong answers or unclear errors: padding labels (ignore_index),
losses that differ from the constructor's, the documented damping of nn.MSELoss, models that mix
samples or draw their own noise, the sampled curvature's memory check and its targets, and the
arguments and modules that are refused with a one-line error or work exactly.

Every direction is compared with the dense float64 LM solve of the user's own loss (python_tests/_dense.py).
"""
import copy
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from revgn_ext.egn import EGN
from revgn_ext.egn import loss_factors as lf
from revgn_ext.egn import optimizer as egn_optimizer
from revgn_ext.egn.gram import UnsupportedModelError

from _dense import assert_directions_close, dense_direction, dense_lm_direction, flat, stepped

pytestmark = pytest.mark.filterwarnings("ignore:.*reference.*:RuntimeWarning")

f64 = torch.float64


def mlp(d_in=5, c=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 7), nn.Tanh(), nn.Linear(7, c)).double()


# --------------------------------------------------------------------------------------------------
# ignore_index: padded positions contribute no row, the mean runs over the kept ones
# --------------------------------------------------------------------------------------------------

def padded_batch(pad, b=10, c=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 5, generator=g, dtype=f64)
    y = torch.randint(0, c, (b,), generator=g)
    if pad is not None:
        y[[1, 4, 7]] = pad
    return x, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore_index, pad", [(2, 2), (-100, -100), (2, None), (-100, None)])
def test_ignore_index_step_xy_equals_dense_solve_of_users_loss(reduction, ignore_index, pad):
    x, y = padded_batch(pad)
    loss_fn = nn.CrossEntropyLoss(ignore_index=ignore_index, reduction=reduction)
    model = mlp()
    ref = dense_lm_direction(copy.deepcopy(model), loss_fn, x, y, 0.3)
    want_loss = float(loss_fn(model(x), y).detach())
    opt = EGN(model, lr=1.0, damping=0.3, loss=loss_fn)
    d, stats = stepped(model, lambda: opt.step(x, y))
    assert_directions_close(d, ref)
    assert stats["loss"] == pytest.approx(want_loss, rel=1e-12)
    assert stats["batch_size"] == int((y != ignore_index).sum()) < (10 if pad is not None else 11)


@pytest.mark.parametrize("pad", [2, None])
def test_ignore_index_step_closure_equals_dense_solve_of_users_loss(pad):
    x, y = padded_batch(pad)
    model = mlp()
    ref = dense_lm_direction(copy.deepcopy(model), lambda out, t: F.cross_entropy(out, t, ignore_index=2), x, y, 0.3)
    opt = EGN(model, lr=1.0, damping=0.3)   # the loss is read off the closure, ignore_index included
    want_loss = float(F.cross_entropy(model(x), y, ignore_index=2).detach())

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y, ignore_index=2)
        loss.backward()
        return loss
    d, returned = stepped(model, lambda: opt.step(closure))
    assert_directions_close(d, ref)
    assert float(returned.detach()) == pytest.approx(want_loss, rel=1e-12)
    assert opt.last_stats["loss"] == pytest.approx(want_loss, rel=1e-12)
    assert opt.param_groups[0]["ignore_index"] == 2


def test_ignore_index_padding_labels_minus_100_by_loss_name_and_direction():
    """torch's default padding label -100 with loss="cross_entropy" (and the inferred loss) as torch's
    default nn.CrossEntropyLoss() treats it."""
    x, y = padded_batch(-100)
    model = mlp()
    ref = dense_lm_direction(copy.deepcopy(model), nn.CrossEntropyLoss(), x, y, 0.3)
    for loss in ("cross_entropy", None):
        opt = EGN(copy.deepcopy(model), damping=0.3, loss=loss)
        assert_directions_close(opt.direction(x, y), ref)


def test_ignore_index_every_label_ignored_is_refused():
    x, y = padded_batch(None)
    opt = EGN(mlp(), loss=nn.CrossEntropyLoss(ignore_index=3))
    with pytest.raises(ValueError, match="every label of the batch equals ignore_index=3"):
        opt.step(x, torch.full_like(y, 3))


def test_ignore_index_with_label_smoothing_equals_dense_solve():
    x, y = padded_batch(-100)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2)
    model = mlp()
    ref = dense_lm_direction(copy.deepcopy(model), loss_fn, x, y, 0.3)
    assert_directions_close(EGN(model, damping=0.3, loss=loss_fn).direction(x, y), ref)


# --------------------------------------------------------------------------------------------------
# Loss mismatches between the constructor and the closure
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("built, computed", [
    (nn.CrossEntropyLoss(), lambda o, t: F.cross_entropy(o, t, reduction="sum")),
    ("cross_entropy", lambda o, t: F.cross_entropy(o, t, reduction="sum")),
    (nn.CrossEntropyLoss(reduction="sum"), lambda o, t: F.cross_entropy(o, t)),
    (nn.CrossEntropyLoss(), lambda o, t: F.cross_entropy(o, t, ignore_index=1)),
    (nn.CrossEntropyLoss(ignore_index=1), lambda o, t: F.cross_entropy(o, t)),
    (nn.CrossEntropyLoss(), lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1)),
])
def test_loss_mismatch_closure_attribute_is_refused(built, computed):
    x, y = padded_batch(None)
    model = mlp()
    opt = EGN(model, loss=built)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="the closure computed"):
        opt.step(lambda: computed(model(x), y))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_loss_mismatch_mse_sum_against_mean_is_refused():
    model = mlp(c=2)
    x, y = torch.randn(6, 5, dtype=f64), torch.randn(6, 2, dtype=f64)
    opt = EGN(model, loss=nn.MSELoss())
    with pytest.raises(ValueError, match=r"nn.MSELoss\(reduction='sum'\)"):
        opt.step(lambda: F.mse_loss(model(x), y, reduction="sum"))


@pytest.mark.parametrize("loss_call", ["functional", "module"])
def test_loss_mismatch_broadcast_mse_shapes_are_refused(loss_call):
    # Output (b, 1) against a target (b,): torch broadcasts to (b, b) and computes another loss than the
    # per-sample one (1.1415 against 1.1578 on such a batch); the step must not solve the latter silently.
    model = mlp(c=1)
    x, y = torch.randn(6, 5, dtype=f64), torch.randn(6, dtype=f64)
    opt = EGN(model, loss="mse")
    before = [p.detach().clone() for p in model.parameters()]
    fn = (lambda out, t: F.mse_loss(out, t)) if loss_call == "functional" else nn.MSELoss()
    with pytest.warns(UserWarning, match="broadcast"), pytest.raises(ValueError, match=r"broadcasts"):
        opt.step(lambda: fn(model(x), y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # The same batch with matching shapes steps.
    opt.step(lambda: fn(model(x), y.unsqueeze(1)))

# --------------------------------------------------------------------------------------------------
# The damping docs/api.md documents for nn.MSELoss
# --------------------------------------------------------------------------------------------------

def _documented_mse_damping():
    """The expression of lambda and c after 'takes the same step as "mse" with damping' in docs/api.md."""
    text = " ".join((Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text().split())
    found = re.search(r'`nn\.MSELoss\(\)` with damping lambda takes the same step as `"mse"` with damping ([^.]*)\.', text)
    assert found, "docs/api.md no longer states the nn.MSELoss damping"
    return found.group(1)


def test_documented_mse_damping_formula():
    expr = _documented_mse_damping()
    c, lam = 3, 0.7
    value = eval(re.sub(r"(?<=[\w)])\s+(?=[\w(])", " * ", expr.replace("lambda", "lam")), {}, {"lam": lam, "c": c})
    model = mlp(c=c)
    x, y = torch.randn(6, 5, dtype=f64), torch.randn(6, c, dtype=f64)
    ref = dense_lm_direction(copy.deepcopy(model), nn.MSELoss(), x, y, lam)
    assert_directions_close(EGN(copy.deepcopy(model), damping=lam, loss=nn.MSELoss()).direction(x, y), ref)
    assert_directions_close(EGN(copy.deepcopy(model), damping=value, loss="mse").direction(x, y), ref)


# --------------------------------------------------------------------------------------------------
# Models no per-sample Jacobian describes: refused, never a direction
# --------------------------------------------------------------------------------------------------

class Centred(nn.Module):
    """h - h.mean(0): every sample's output depends on the whole batch."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0))


class PrivateNoise(nn.Module):
    def __init__(self, source):
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.source = source
        self.generator = torch.Generator().manual_seed(0)
        self.rng = np.random.default_rng(0)

    def forward(self, x):
        if self.source == "generator":
            noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype)
        else:
            noise = torch.as_tensor(self.rng.standard_normal(tuple(x.shape)), dtype=x.dtype)
        return self.a(x + 0.1 * noise)


@pytest.mark.parametrize("gram", ["auto", "layerwise", "functional"])
def test_sample_mixing_module_is_refused(gram):
    model = Centred().double()
    x, y = torch.randn(8, 5, dtype=f64), torch.randint(0, 3, (8,))
    opt = EGN(model, loss="cross_entropy", gram=gram)
    before = [p.detach().clone() for p in model.parameters()]
    for call in (lambda: opt.direction(x, y), lambda: opt.step(x, y)):
        with pytest.raises(UnsupportedModelError, match="Centred mixes the samples of a batch"):
            call()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("source", ["generator", "numpy"])
@pytest.mark.parametrize("gram", ["auto", "functional"])
def test_random_forward_private_generator_or_numpy_is_refused(source, gram):
    model = PrivateNoise(source).double()
    x, y = torch.randn(8, 5, dtype=f64), torch.randint(0, 3, (8,))
    opt = EGN(model, loss="cross_entropy", gram=gram)
    with pytest.raises(UnsupportedModelError, match="gave different outputs for the same x"):
        opt.direction(x, y)


# --------------------------------------------------------------------------------------------------
# Sampled curvature: the memory check comes first; smoothing and probability targets work
# --------------------------------------------------------------------------------------------------

def test_sampled_samples_memory_checked_before_draws():
    opt = EGN(mlp(), loss="cross_entropy", curvature="sampled", samples=10**7)
    x, y = padded_batch(None)
    with mock.patch.object(egn_optimizer, "curvature_factor", side_effect=AssertionError("draws made")):
        with pytest.raises(UnsupportedModelError, match=r"samples=10000000 drawn labels.*memory_limit"):
            opt.step(x, y)


@pytest.mark.parametrize("targets", ["label_smoothing", "probabilities"])
def test_sampled_curvature_with_label_smoothing_or_probabilities_equals_dense_solve(targets):
    x, y = padded_batch(None)
    model = mlp()
    c = 4
    if targets == "label_smoothing":
        loss = nn.CrossEntropyLoss(label_smoothing=0.1)
        q = F.one_hot(y, c).double() * 0.9 + 0.1 / c
        batch_y = y
    else:
        loss = "cross_entropy"
        q = torch.softmax(torch.randn(10, c, dtype=f64), 1)
        batch_y = q
    opt = EGN(model, damping=0.3, loss=loss, curvature="sampled", samples=3)
    torch.manual_seed(5)
    d = opt.direction(x, batch_y)
    torch.manual_seed(5)
    S = lf.sampled_factor("cross_entropy", model(x).detach(), q, 3).S
    ref = dense_direction(model, x, q, "cross_entropy", 0.3, S=S)
    assert_directions_close([flat(d)], [ref])


# --------------------------------------------------------------------------------------------------
# Arguments and modules: a one-line error naming them, or an exact step
# --------------------------------------------------------------------------------------------------

def test_max_tries_zero_is_refused_naming_it():
    with pytest.raises(ValueError, match="max_tries must be a positive int, got 0"):
        EGN(mlp(), loss="cross_entropy", line_search=True, max_tries=0)
    opt = EGN(mlp(), loss="cross_entropy", line_search=True)
    opt.param_groups[0]["max_tries"] = 0
    x, y = padded_batch(None)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['max_tries'\] must be an int >= 1, got 0"):
        opt.step(x, y)


def test_lr_overflowing_float32_is_refused_naming_lr():
    model = mlp().float()
    x, y = padded_batch(None)
    with pytest.raises(ValueError, match=r"lr\W* = 1e\+300 overflows the float32 parameters"):
        EGN(model, loss="cross_entropy", lr=1e300)
    opt = EGN(model, loss="cross_entropy")
    opt.param_groups[0]["lr"] = 1e300
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] = 1e\+300 overflows the float32 parameters"):
        opt.step(x.float(), y)


def test_model_mixing_float32_and_float64_is_refused():
    model = mlp()
    model[2].float()
    with pytest.raises(ValueError, match=r"parameters mix \['torch.float32', 'torch.float64'\]"):
        EGN(model, loss="cross_entropy")


def test_bare_module_returning_a_tuple_is_refused_naming_it():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 3)

        def forward(self, x):
            return self.a(x), x

    x, y = padded_batch(None, c=3)
    for gram in ("auto", "functional"):
        with pytest.raises(UnsupportedModelError, match="Pair returned a tuple"):
            EGN(Pair().double(), loss="cross_entropy", gram=gram).step(x, y)


class Bag(nn.Module):
    def __init__(self, sparse):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(10, 4, sparse=sparse)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


def test_sparse_embedding_step_equals_dense_solve():
    ids, y = torch.randint(0, 10, (6, 3)), torch.randint(0, 3, (6,))
    model = Bag(sparse=True).double()
    dense_twin = Bag(sparse=False).double()
    dense_twin.load_state_dict(model.state_dict())
    ref = dense_direction(dense_twin, ids, y, "cross_entropy", 0.3)
    d, stats = stepped(model, lambda: EGN(model, lr=1.0, damping=0.3, loss="cross_entropy").step(ids, y))
    assert not stats["refused"]
    assert_directions_close([flat(d)], [ref])


class Recurrent(nn.Module):
    def __init__(self, cls, frozen=False):
        super().__init__()
        torch.manual_seed(4)
        self.rnn = cls(5, 4, batch_first=True)
        self.head = nn.Linear(4, 3)
        self.rnn.requires_grad_(not frozen)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_gru_lstm_refused_naming_the_module_or_exact_when_frozen(cls):
    x, y = torch.randn(6, 2, 5, dtype=f64), torch.randint(0, 3, (6,))
    for gram in ("auto", "layerwise", "functional"):
        with pytest.raises(UnsupportedModelError, match=rf"module 'rnn' \({cls.__name__}\) is recurrent"):
            EGN(Recurrent(cls).double(), loss="cross_entropy", gram=gram)
    model = Recurrent(cls, frozen=True).double()
    ref = dense_direction(model, x, y, "cross_entropy", 0.3)
    assert_directions_close([flat(EGN(model, damping=0.3, loss="cross_entropy").direction(x, y))], [ref])


def test_line_search_after_a_step_at_lr_zero_starts_again_from_lr():
    # A warm-up schedule that starts at lr = 0 stores alpha = 0; min(1.5 alpha, lr) would then keep every
    # later step at 0 for ever, silently. After lr = 0 the search starts at lr, as a fresh optimizer's.
    x, y = torch.randn(8, 5, dtype=f64), torch.randn(8, 4, dtype=f64)
    model, fresh_model = mlp(), mlp()
    opt = EGN(model, loss="mse", lr=0.0, line_search=True)
    opt.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))
    opt.param_groups[0]["lr"] = 0.5
    stats = opt.step(x, y)
    fresh = EGN(fresh_model, loss="mse", lr=0.5, line_search=True).step(x, y)
    assert stats["accepted"] and stats["alpha"] > 0 and stats["alpha"] == fresh["alpha"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))
