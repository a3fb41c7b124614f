"""Per-token (per-position) losses: outputs (b, ..., C) with labels (b, ...) and ignore_index padding,
the losses computed on views of the output (reshape, view, transpose, permute), per-element MSE / BCE.

Every direction is compared with the dense float64 LM solve of the user's own loss (torch.func:
python_tests/_dense.py), the reported loss with torch's loss, and the system's size with one row per
kept token and factor column.
"""
import copy
import math
from unittest import mock

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
B, T, V = 3, 5, 7     # batch, tokens, vocabulary (= classes)


class CausalLM(nn.Module):
    """Embedding -> TransformerEncoderLayer with a causal mask made in the forward -> Linear."""

    def __init__(self, vocab=V, d=8, heads=2, ff=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], dtype=self.head.weight.dtype)
        return self.head(self.enc(self.emb(ids), src_mask=mask, is_causal=True))


class PrefixMean(nn.Module):
    """Tokens coupled by a causal running mean, from rule-covered layers only (Embedding, Linear,
    LayerNorm): the whole Gram is layer-wise."""

    def __init__(self, vocab=V, d=6, classes=V):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        h = h.cumsum(1) / torch.arange(1, ids.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.head(self.norm(h))


class GRUTagger(nn.Module):
    """A tagger over feature sequences with a GRUCell recurrence (no layer rule: torch.func)."""

    def __init__(self, d_in=4, hidden=5, classes=V):
        super().__init__()
        self.cell = nn.GRUCell(d_in, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        states = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            states.append(h)
        return self.head(torch.stack(states, 1))


class TokenMLP(nn.Module):
    """Per-token features -> (b, T, c) outputs (for MSE / BCE targets of the output's shape)."""

    def __init__(self, d_in=4, c=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 6), nn.Tanh(), nn.Linear(6, c))

    def forward(self, x):
        h = self.net(x)
        return h + 0.5 * h.cumsum(1)   # couples the tokens of a sample


def lm(seed=0, cls=CausalLM, **kw):
    torch.manual_seed(seed)
    return cls(**kw).double()


def tokens(seed=1, pad=-100):
    """ids (B, T) and next-token-like labels (B, T): sample 0 padded at its end, sample 1 wholly
    padded, sample 2 with one padded token in the middle."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 3:] = pad
    y[1, :] = pad
    y[2, 2] = pad
    return x, y


def kept(y, pad=-100):
    return int((y != pad).sum())


# torch's spellings of a per-token cross-entropy, each as (the loss of (output, y), how the closure calls it)
C_LAYOUTS = {
    "reshape": lambda o, y, **kw: F.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1), **kw),
    "view": lambda o, y, **kw: F.cross_entropy(o.view(-1, o.shape[-1]), y.view(-1), **kw),
    "transpose": lambda o, y, **kw: F.cross_entropy(o.transpose(1, 2), y, **kw),
    "permute": lambda o, y, **kw: F.cross_entropy(o.permute(0, 2, 1), y, **kw),
    "nn_module": lambda o, y, **kw: nn.CrossEntropyLoss(**kw)(o.reshape(-1, o.shape[-1]), y.reshape(-1)),
    "batch_last": lambda o, y, **kw: F.cross_entropy(o.permute(1, 2, 0), y.T, **kw),   # (T, C, b): rows per sample
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("layout", list(C_LAYOUTS))
def test_closure_cross_entropy_layouts_equal_dense_lm_solve(layout, reduction):
    x, y = tokens()
    model = lm()
    loss_fn = lambda o, t: C_LAYOUTS[layout](o, t, reduction=reduction)  # noqa: E731
    ref = dense_lm_direction(copy.deepcopy(model), loss_fn, x, y, 0.3)
    want = float(loss_fn(model(x), y).detach())
    opt = EGN(model, lr=1.0, damping=0.3)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    d, returned = stepped(model, lambda: opt.step(closure))
    assert_directions_close(d, ref)
    assert float(returned.detach()) == pytest.approx(want, rel=1e-12)
    assert opt.last_stats["loss"] == pytest.approx(want, rel=1e-12)
    assert opt.last_stats["batch_size"] == kept(y) == 7


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_step_xy_with_token_labels_equals_dense_lm_solve(reduction, ignore_index):
    x, y = tokens(pad=ignore_index)
    model = lm()
    loss = nn.CrossEntropyLoss(reduction=reduction, ignore_index=ignore_index)
    ref = dense_lm_direction(copy.deepcopy(model), lambda o, t: loss(o.reshape(-1, V), t.reshape(-1)), x, y, 0.3)
    want = float(loss(model(x).reshape(-1, V), y.reshape(-1)).detach())
    opt = EGN(model, lr=1.0, damping=0.3, loss=loss)
    d, stats = stepped(model, lambda: opt.step(x, y))
    assert_directions_close(d, ref)
    assert stats["loss"] == pytest.approx(want, rel=1e-12)
    assert stats["batch_size"] == kept(y, ignore_index)


def test_named_loss_and_inferred_loss_mean_over_kept_tokens():
    x, y = tokens()
    model = lm()
    ref = dense_lm_direction(copy.deepcopy(model), C_LAYOUTS["reshape"], x, y, 0.3)
    for loss in ("cross_entropy", None):
        opt = EGN(copy.deepcopy(model), damping=0.3, loss=loss)
        assert_directions_close(opt.direction(x, y), ref)


def test_returned_output_target_pair_has_classes_last():
    x, y = tokens()
    model = lm()
    ref = dense_lm_direction(copy.deepcopy(model), C_LAYOUTS["reshape"], x, y, 0.3)
    opt = EGN(model, lr=1.0, damping=0.3, loss="cross_entropy")
    d, _ = stepped(model, lambda: opt.step(lambda: (model(x), y)))
    assert_directions_close(d, ref)
    model2 = lm()
    opt2 = EGN(model2, lr=1.0, damping=0.3, loss="cross_entropy")
    d2, _ = stepped(model2, lambda: opt2.step(lambda: (model2(x).view(-1, V), y.view(-1))))
    assert_directions_close(d2, ref)


def spy_system_size(opt, run):
    """The size of the damped system that the step factors."""
    sizes = []
    real = egn_optimizer.plain_factor   # called once per factorisation with the damped system

    def spy(K, *args):
        sizes.append(K.shape[-1])
        return real(K, *args)
    with mock.patch.object(egn_optimizer, "plain_factor", side_effect=spy):
        run()
    return sizes


@pytest.mark.parametrize("curvature, samples", [("exact", 1), ("sampled", 1), ("sampled", 3), ("true-class", 1)])
def test_system_has_one_row_per_kept_token_and_column(curvature, samples):
    x, y = tokens()
    opt = EGN(lm(), damping=0.3, loss="cross_entropy", curvature=curvature, samples=samples)
    sizes = spy_system_size(opt, lambda: opt.direction(x, y))
    per_token = {"exact": V - 1, "sampled": samples, "true-class": 1}[curvature]   # exact CE: rank V - 1
    assert sizes == [kept(y) * per_token]   # padding tokens (and the wholly padded sample) have no row


@pytest.mark.parametrize("samples", [1, 3])
def test_sampled_curvature_per_token_equals_dense_solve_of_same_draws(samples):
    x, y = tokens()
    model = lm()
    opt = EGN(model, damping=0.3, loss="cross_entropy", curvature="sampled", samples=samples)
    torch.manual_seed(7)
    d = flat(opt.direction(x, y))
    keep = (y != -100).reshape(-1)
    index = torch.arange(B * T * V).view(B * T, V)[keep]      # the kept tokens, sample-major
    f = model(x).detach().reshape(-1)[index]
    torch.manual_seed(7)
    S = lf.sampled_factor("cross_entropy", f, y.reshape(-1)[keep], samples).S
    ref = dense_direction(model, x, y.reshape(-1)[keep], "cross_entropy", 0.3, S=S, index=index)
    assert_directions_close([d], [ref])


def test_sampled_per_token_gram_is_unbiased():
    """E over draws of the sampled system's Gram S^T J J^T S summed on its diagonal equals the exact
    trace (2000 draws, seed 0): the per-token draws estimate the per-token Hessian."""
    x, y = tokens()
    model = lm(cls=PrefixMean)
    keep = (y != -100).reshape(-1)
    index = torch.arange(B * T * V).view(B * T, V)[keep]
    from _dense import jacobian
    J = jacobian(model, x).reshape(B * T * V, -1)[index]           # (P, C, d)
    f = model(x).detach().reshape(-1)[index]
    exact = torch.einsum("pca,pcd->pad", lf.factor_matrix(lf.cross_entropy_factor(f, y.reshape(-1)[keep])), J)
    gen = torch.Generator().manual_seed(0)
    draws = lf.sampled_factor("cross_entropy", f, y.reshape(-1)[keep], 2000, gen).S * math.sqrt(2000)
    traces = torch.einsum("pcs,pcd->psd", draws, J).square().sum((0, 2))    # one trace per single draw
    mean, sd = float(traces.mean()), float(traces.std()) / math.sqrt(2000)
    assert abs(mean - float(exact.square().sum())) < 4 * sd


def test_true_class_per_token_equals_dense_solve():
    x, y = tokens()
    model = lm()
    d = flat(EGN(model, damping=0.3, loss="cross_entropy", curvature="true-class").direction(x, y))
    keep = (y != -100).reshape(-1)
    index = torch.arange(B * T * V).view(B * T, V)[keep]
    f = model(x).detach().reshape(-1)[index]
    yk = y.reshape(-1)[keep]
    e = torch.softmax(f, 1) - F.one_hot(yk, V).double()
    assert_directions_close([d], [dense_direction(model, x, yk, "cross_entropy", 0.3, S=e[:, :, None], index=index)])


def test_label_smoothing_and_token_probabilities_equal_dense_lm_solve():
    x, y = tokens()
    model = lm()
    loss = nn.CrossEntropyLoss(label_smoothing=0.2)
    ref = dense_lm_direction(copy.deepcopy(model), lambda o, t: loss(o.transpose(1, 2), t), x, y, 0.3)
    opt = EGN(copy.deepcopy(model), damping=0.3)
    assert_directions_close(opt.direction(lambda: loss(opt.model(x).transpose(1, 2), y)), ref)
    q = torch.softmax(torch.randn(B, T, V, dtype=f64), -1)
    ref = dense_lm_direction(copy.deepcopy(model), lambda o, t: F.cross_entropy(o.reshape(-1, V), t.reshape(-1, V)),
                             x, q, 0.3)
    assert_directions_close(EGN(copy.deepcopy(model), damping=0.3, loss="cross_entropy").direction(x, q), ref)
    opt = EGN(copy.deepcopy(model), damping=0.3)   # probabilities in torch's layout (N, C, T) in a closure
    assert_directions_close(opt.direction(lambda: F.cross_entropy(opt.model(x).transpose(1, 2), q.transpose(1, 2))), ref)


@pytest.mark.parametrize("gram", ["auto", "layerwise", "functional"])
def test_gram_routes_per_token(gram):
    x, y = tokens()
    model = lm(cls=PrefixMean)
    ref = dense_lm_direction(copy.deepcopy(model), C_LAYOUTS["transpose"], x, y, 0.3)
    opt = EGN(model, damping=0.3, gram=gram)
    assert_directions_close(opt.direction(lambda: C_LAYOUTS["transpose"](opt.model(x), y)), ref)
    assert opt._assembler.method == {"auto": "layerwise", "layerwise": "layerwise", "functional": "functional"}[gram]


@pytest.mark.parametrize("gram", ["auto", "functional"])
def test_causal_transformer_routes_per_token(gram):
    x, y = tokens()
    model = lm()
    ref = dense_lm_direction(copy.deepcopy(model), C_LAYOUTS["reshape"], x, y, 0.3)
    assert_directions_close(EGN(model, damping=0.3, loss="cross_entropy", gram=gram).direction(x, y), ref)


def test_gru_tagger_through_torch_func_fallback():
    torch.manual_seed(3)
    model = GRUTagger().double()
    x = torch.randn(B, T, 4, dtype=f64)
    _, y = tokens()
    ref = dense_lm_direction(copy.deepcopy(model), C_LAYOUTS["permute"], x, y, 0.3)
    opt = EGN(model, lr=1.0, damping=0.3)
    d, _ = stepped(model, lambda: opt.step(lambda: C_LAYOUTS["permute"](model(x), y)))
    assert_directions_close(d, ref)
    assert {"cell.weight_ih", "cell.weight_hh"} <= set(opt._assembler.fallback_names)


# --------------------------------------------------------------------------------------------------
# Per-element MSE / BCE with targets of the output's shape
# --------------------------------------------------------------------------------------------------

E_LAYOUTS = {
    "direct": lambda fn: (lambda o, t, **kw: fn(o, t, **kw)),
    "transpose": lambda fn: (lambda o, t, **kw: fn(o.transpose(1, 2), t.transpose(1, 2), **kw)),
    "flat": lambda fn: (lambda o, t, **kw: fn(o.reshape(-1), t.reshape(-1), **kw)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("layout", ["xy"] + list(E_LAYOUTS))
@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_per_element_losses_equal_dense_lm_solve(loss, layout, reduction):
    torch.manual_seed(5)
    model = TokenMLP().double()
    x = torch.randn(B, T, 4, dtype=f64)
    if loss == "mse":
        fn, cls, y = F.mse_loss, nn.MSELoss, torch.randn(B, T, 3, dtype=f64)
    else:
        fn, cls, y = F.binary_cross_entropy_with_logits, nn.BCEWithLogitsLoss, torch.rand(B, T, 3, dtype=f64)
    loss_fn = (lambda o, t: fn(o, t, reduction=reduction)) if layout == "xy" else \
        (lambda o, t: E_LAYOUTS[layout](fn)(o, t, reduction=reduction))
    ref = dense_lm_direction(copy.deepcopy(model), loss_fn, x, y, 0.3)
    want = float(loss_fn(model(x), y).detach())
    if layout == "xy":
        opt = EGN(model, lr=1.0, damping=0.3, loss=cls(reduction=reduction))
        d, stats = stepped(model, lambda: opt.step(x, y))
    else:
        opt = EGN(model, lr=1.0, damping=0.3)
        d, _ = stepped(model, lambda: opt.step(lambda: loss_fn(model(x), y)))
        stats = opt.last_stats
    assert_directions_close(d, ref)
    assert stats["loss"] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("samples", [1, 2])
def test_sampled_bce_with_several_logits_equals_dense_solve_of_same_draws(samples):
    torch.manual_seed(5)
    model = TokenMLP().double()
    x = torch.randn(B, T, 4, dtype=f64)
    y = torch.rand(B, T, 3, dtype=f64)
    opt = EGN(model, damping=0.3, loss="binary_cross_entropy", curvature="sampled", samples=samples)
    torch.manual_seed(3)
    d = flat(opt.direction(x, y))
    f = model(x).detach().reshape(B, -1)
    torch.manual_seed(3)
    S = lf.sampled_factor("binary_cross_entropy", f, y.reshape(B, -1), samples).S
    assert S.shape == (B, T * 3, samples)
    assert_directions_close([d], [dense_direction(model, x, y.reshape(B, -1), "binary_cross_entropy", 0.3, S=S)])


# --------------------------------------------------------------------------------------------------
# Line search and damping updates on the per-token loss; refusals
# --------------------------------------------------------------------------------------------------

def test_line_search_and_adaptive_damping_use_the_per_token_loss():
    x, y = tokens()
    model = lm(cls=PrefixMean)
    opt = EGN(model, lr=1.0, damping=0.3, line_search=True, adaptive_damping=True,
              loss=nn.CrossEntropyLoss(reduction="sum"))
    losses = []
    for _ in range(4):
        stats = opt.step(x, y)
        after = float(F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1), reduction="sum"))
        assert stats["new_loss"] == pytest.approx(after, rel=1e-10)
        losses.append(stats["loss"])
    assert losses[-1] < losses[0]


def test_every_token_padded_is_refused():
    x, y = tokens()
    opt = EGN(lm(), loss="cross_entropy")
    with pytest.raises(ValueError, match="every label of the batch equals ignore_index=-100"):
        opt.step(x, torch.full_like(y, -100))
    with pytest.raises(ValueError, match="every label of the batch equals ignore_index=-100"):
        opt.step(lambda: C_LAYOUTS["transpose"](opt.model(x), torch.full_like(y, -100)))


def test_loss_rows_mixing_samples_are_refused():
    x, y = tokens()
    opt = EGN(lm())
    before = [p.detach().clone() for p in opt.model.parameters()]
    # (T, b, C): the batch is the class dimension, so each loss row reads the logits of every sample.
    with pytest.raises(ValueError, match="reads the logits of several samples"):
        opt.step(lambda: F.cross_entropy(opt.model(x).permute(1, 0, 2), torch.zeros(T, V, dtype=torch.long)))
    # rows of 2 V logits in a sample of T = 5 tokens: rows straddle two samples.
    with pytest.raises(ValueError, match="reads the logits of several samples"):
        opt.step(lambda: F.cross_entropy(opt.model(x[:2]).reshape(-1, 2 * V), torch.zeros(T, dtype=torch.long)))
    assert all(torch.equal(p, q) for p, q in zip(opt.model.parameters(), before))


def test_loss_on_a_slice_or_copy_of_the_output_is_refused():
    x, y = tokens()
    opt = EGN(lm())
    with pytest.raises(ValueError, match="not computed on the model's output"):
        opt.step(lambda: F.cross_entropy(opt.model(x)[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1)))
    with pytest.raises(ValueError, match="not computed on the model's output"):
        opt.step(lambda: F.cross_entropy(opt.model(x).transpose(1, 2).contiguous(), y))


def test_labels_that_do_not_fit_the_output_are_refused():
    x, y = tokens()
    opt = EGN(lm(), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"does not fit the output \(3, 5, 7\) \(classes last"):
        opt.step(x, torch.zeros(B, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, 7\)"):
        opt.step(x, torch.full((B, T), 9))


def test_view_index_finds_each_element_of_a_view_and_nothing_else():
    from revgn_ext.egn.sequence import view_index
    out = torch.randn(3, 4, 5)
    sliced = torch.randn(3, 4, 6)[..., :5]   # a non-contiguous output
    for o in (out, sliced):
        for inp in (o, o.reshape(-1, 5) if o.is_contiguous() else o, o.transpose(1, 2), o.permute(2, 0, 1),
                    o.unsqueeze(1), o.movedim(0, -1)):
            index = view_index(o, inp)
            assert torch.equal(o.reshape(-1)[index], inp)
    assert view_index(out, out[:, :-1]) is None                        # a slice
    assert view_index(out, out.transpose(1, 2).contiguous()) is None   # a copy
    assert view_index(out, out.expand(2, 3, 4, 5)) is None             # repeats elements
    assert view_index(out, out.clone()) is None


def test_columns_beyond_memory_limit_are_refused_before_the_backward_passes():
    x, y = tokens()
    # 3 samples x 4 kept positions at most x (V - 1) columns = 72 rows: 72^2 * 8 bytes > 40 000
    opt = EGN(lm(), loss="cross_entropy", memory_limit=40_000)
    with pytest.raises(UnsupportedModelError, match=r"kept positions .* memory_limit"):
        opt.step(x, y)


def test_position_columns_equal_their_dense_form():
    """The assemblers' columns, formed one at a time, against the dense (width m, b, c) tensor:
    column (s, a) of sample i is factor column a of its s-th kept token, at that token's logits."""
    from revgn_ext.egn.sequence import SequenceTargets, build_layout
    x, y = tokens()
    f = lm()(x).detach().reshape(B, -1)
    lay = build_layout(SequenceTargets(y, None, -1, -100), (B, T, V), f)
    assert lay.width == 4 and lay.index.shape == (kept(y), V)
    S = torch.randn(kept(y), V, 2, dtype=f64)
    cols = lay.columns(S)
    dense = torch.zeros(B, lay.width, 2, T * V, dtype=f64)
    for p in range(kept(y)):
        i, s = int(lay.sample[p]), int(lay.slot[p])
        dense[i, s, :, lay.index[p] - i * T * V] = S[p].T
    dense = dense.reshape(B, -1, T * V).permute(1, 0, 2)
    assert cols.shape == dense.shape
    assert all(torch.equal(cols[a], dense[a]) for a in range(cols.shape[0]))
    w = torch.randn(B, cols.shape[0], dtype=f64)
    assert torch.allclose(cols.weighted(w), torch.einsum("ia,aic->ic", w, dense), atol=1e-13, rtol=0)
    jac = torch.randn(B, T * V, 4, dtype=f64)
    assert torch.allclose(cols.rows(jac), torch.einsum("aik,ikd->iad", dense, jac), atol=1e-13, rtol=0)
