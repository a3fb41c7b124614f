"""Models with several inputs: ``step(x, y)`` with x a tuple / list (``model(*x)``) or a dict
(``model(**x)``), and ``step(closure)`` reading every argument off the model's call. Per-sample tensors
(first dimension = the batch size) are sliced with the batch, everything else passes unchanged. Each
direction is checked against the dense float64 LM solve of the user's own loss (torch.func)."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revgn_ext as rg
from revgn_ext.egn import EGN
from revgn_ext.egn.gram import UnsupportedModelError, gram_matrix

from _dense import Call, brute_gram, dense_lm_direction, flat

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

TOL = 1e-10


def close(ours, ref):
    """max |ours - ref| relative to max |ref|."""
    return float((ours - ref).abs().max()) / float(ref.abs().max())


class TwoInputs(nn.Module):
    """model(a, b): two feature inputs of different widths, with a parameter no layer rule covers."""

    def __init__(self, da=3, db=2, h=6, c=3):
        super().__init__()
        self.la, self.lb, self.out = nn.Linear(da, h), nn.Linear(db, h), nn.Linear(h, c)
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(h))

    def forward(self, a, b):
        return self.out(torch.tanh(self.la(a) + self.lb(b)) * self.gain)


class Keywords(nn.Module):
    """model(features=, gate=, offset=, scale=, flip=): a per-sample float gate (not differentiated), a
    constant offset (1, c) without a batch dimension, and non-tensor options."""

    def __init__(self, d=4, h=5, c=2):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, h), nn.Linear(h, c)

    def forward(self, features, gate, offset=None, scale=1.0, flip=False):
        h = torch.tanh(self.l1(features)) * gate[:, None]
        out = self.l2(h) * scale + (0 if offset is None else offset)
        return -out if flip else out


class MaskedEncoder(nn.Module):
    """Token ids through nn.TransformerEncoderLayer with a (T, T) causal mask and a (b, T) padding mask,
    mean over the kept positions."""

    def __init__(self, vocab=12, d=8, heads=2, ff=16, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, ids, mask=None, padding=None, is_causal=False):
        h = self.enc(self.emb(ids), src_mask=mask, src_key_padding_mask=padding, is_causal=is_causal)
        keep = (~padding).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class Attention(nn.Module):
    """nn.MultiheadAttention called with key_padding_mask, attn_mask and need_weights."""

    def __init__(self, d=6, heads=2, c=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, c)

    def forward(self, x, key_padding_mask, attn_mask=None, need_weights=True):
        h, _ = self.attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=need_weights)
        return self.head(h[:, 0])


def padding_mask(lengths, T):
    return torch.arange(T)[None] >= torch.as_tensor(lengths)[:, None]


def causal_mask(T):
    return torch.triu(torch.ones(T, T, dtype=torch.bool), 1)


def two_input_batch(b=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, 3, generator=g, dtype=torch.float64)
    z = torch.randn(b, 2, generator=g, dtype=torch.float64)
    return a, z, torch.randint(0, 3, (b,), generator=g)


def encoder_batch(b=6, T=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 12, (b, T), generator=g)
    return ids, padding_mask([5, 3, 4, 2, 5, 1][:b], T), causal_mask(T), torch.randint(0, 3, (b,), generator=g)


# -- agreement with the dense LM solve --------------------------------------------------------------

@pytest.mark.parametrize("gram", ["auto", "functional"])
def test_two_input_mlp_equals_dense_solve_in_every_form(gram):
    torch.manual_seed(0)
    model = TwoInputs().double()
    a, z, y = two_input_batch()
    loss_fn = nn.CrossEntropyLoss()
    ref = flat(dense_lm_direction(model, loss_fn, (a, z), y, 0.3))
    opt = EGN(model, lr=1.0, damping=0.3, loss=loss_fn, gram=gram)
    forms = {"tuple": lambda: opt.direction((a, z), y), "list": lambda: opt.direction([a, z], y),
             "closure": lambda: opt.direction(lambda: loss_fn(model(a, z), y)),
             "closure, keyword": lambda: opt.direction(lambda: loss_fn(model(a, b=z), y)),
             "closure, pair": lambda: opt.direction(lambda: (model(b=z, a=a), y))}
    for form, direction in forms.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # the gain parameter goes to torch.func
            err = close(flat(direction()), ref)
        assert err <= TOL, (form, err)
    # The step itself: w + lr * dir, from the closure form.
    w0 = flat([p.detach() for p in model.parameters()])
    before = loss_fn(model(a, z), y).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loss = opt.step(lambda: loss_fn(model(a, z), y))
    assert torch.allclose(loss, before, rtol=1e-14) and not opt.last_stats["refused"]
    assert close(flat([p.detach() for p in model.parameters()]) - w0, ref) <= TOL


def test_dict_inputs_with_constants_and_options_equal_dense_solve():
    torch.manual_seed(0)
    model = Keywords().double()
    g = torch.Generator().manual_seed(3)
    b = 6
    x = dict(features=torch.randn(b, 4, generator=g, dtype=torch.float64),
             gate=torch.rand(b, generator=g, dtype=torch.float64) + 0.5,
             offset=torch.randn(1, 2, generator=g, dtype=torch.float64), scale=2.0, flip=True)
    y = torch.randn(b, 2, generator=g, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    ref = flat(dense_lm_direction(model, loss_fn, x, y, 0.2))
    opt = EGN(model, lr=0.5, damping=0.2, loss=loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # every parameter on the layer rules: nothing demoted
        assert close(flat(opt.direction(x, y)), ref) <= TOL
        assert close(flat(opt.direction(lambda: loss_fn(model(**x), y))), ref) <= TOL
    # The non-tensor options matter (flip changes the sign of the output): they are passed, not dropped.
    ref_plain = flat(dense_lm_direction(model, loss_fn, {**x, "flip": False}, y, 0.2))
    assert close(flat(opt.direction({**x, "flip": False}, y)), ref_plain) <= TOL
    assert close(ref_plain, ref) > 1e-3


@pytest.mark.parametrize("form", ["step", "closure"])
def test_transformer_encoder_with_padding_and_causal_masks_equals_dense_solve(form):
    torch.manual_seed(0)
    model = MaskedEncoder().double().eval()
    ids, padding, mask, y = encoder_batch()
    loss_fn = nn.CrossEntropyLoss()
    inputs = Call((ids,), dict(mask=mask, padding=padding, is_causal=True))
    ref = flat(dense_lm_direction(model, loss_fn, inputs, y, 0.5))
    opt = EGN(model, lr=0.1, damping=0.5, loss=loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # every parameter on the layer rules
        if form == "step":
            ours = opt.direction(dict(ids=ids, mask=mask, padding=padding, is_causal=True), y)
        else:
            ours = opt.direction(lambda: loss_fn(model(ids, mask, padding=padding, is_causal=True), y))
    assert close(flat(ours), ref) <= TOL
    assert opt._assembler.method == "layerwise"
    # Without the padding mask the solve is another one: the mask reaches the forward.
    other = flat(dense_lm_direction(model, loss_fn, Call((ids,), dict(mask=mask, padding=padding & False,
                                                                         is_causal=True)), y, 0.5))
    assert close(other, ref) > 1e-3


@pytest.mark.parametrize("gram", ["auto", "functional"])
def test_multihead_attention_with_masks_and_a_non_tensor_option_equals_dense_solve(gram):
    torch.manual_seed(0)
    model = Attention().double()
    g = torch.Generator().manual_seed(4)
    b, T = 5, 4
    x = torch.randn(b, T, 6, generator=g, dtype=torch.float64)
    kpm = padding_mask([4, 2, 3, 1, 4], T)
    y = torch.randn(b, 2, generator=g, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction="sum")
    inputs = Call((x, kpm), dict(attn_mask=causal_mask(T), need_weights=False))
    ref = flat(dense_lm_direction(model, loss_fn, inputs, y, 0.4))
    opt = EGN(model, lr=0.1, damping=0.4, loss=loss_fn, gram=gram)
    assert close(flat(opt.direction(lambda: loss_fn(model(x, kpm, attn_mask=causal_mask(T), need_weights=False),
                                                     y))), ref) <= TOL
    stats = opt.step((x, kpm, causal_mask(T), False), y)
    assert not stats["refused"] and stats["batch_size"] == b


def test_gram_matrix_takes_several_inputs():
    torch.manual_seed(0)
    model = MaskedEncoder().double().eval()
    ids, padding, mask, _ = encoder_batch()
    inputs = Call((ids,), dict(mask=mask, padding=padding, is_causal=True))
    K = gram_matrix(model, dict(ids=ids, mask=mask, padding=padding, is_causal=True))
    ref = brute_gram(model, inputs)
    assert (K - ref).abs().max() <= TOL * ref.abs().max()


class Packed(nn.Module):
    """The same function as TwoInputs with one input tensor: the columns of [a, b]."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x[:, :3], x[:, 3:])


@pytest.mark.parametrize("options", [dict(line_search=True, adaptive_damping=True, momentum=0.5),
                                     dict(curvature="sampled", samples=2, lr=0.5),
                                     dict(curvature="true-class", line_search=True)])
def test_several_inputs_follow_the_one_input_trajectory(options):
    """Line search, adaptive damping, momentum and sampled curvature re-evaluate the model on the
    inputs: with several inputs the steps equal those of the same function taking one tensor."""
    torch.manual_seed(0)
    model = TwoInputs().double()
    packed = Packed(copy.deepcopy(model))
    options = {"lr": 1.0, "damping": 0.3, "loss": "cross_entropy", **options}
    ours, theirs = EGN(model, **options), EGN(packed, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for step in range(3):
            a, z, y = two_input_batch(seed=10 + step)
            torch.manual_seed(step)
            s1 = ours.step((a, z), y)
            torch.manual_seed(step)
            s2 = theirs.step(torch.cat([a, z], 1), y)
            for key in ("loss", "new_loss", "alpha", "next_damping", "rho", "direction_norm"):
                v1, v2 = s1[key], s2[key]
                assert (v1 is None and v2 is None) or math.isclose(v1, v2, rel_tol=1e-9, abs_tol=1e-12), (step, key)
    assert close(flat(model.parameters()).detach(), flat(packed.parameters()).detach()) <= TOL


def test_ignored_labels_drop_the_samples_of_every_per_sample_input():
    torch.manual_seed(0)
    model = MaskedEncoder().double().eval()
    ids, padding, mask, y = encoder_batch()
    y[[1, 4]] = -100
    loss_fn = nn.CrossEntropyLoss()
    ref = flat(dense_lm_direction(model, loss_fn, Call((ids,), dict(mask=mask, padding=padding)), y, 0.5))
    opt = EGN(model, lr=0.1, damping=0.5, loss=loss_fn)
    assert close(flat(opt.direction(lambda: loss_fn(model(ids, mask, padding), y))), ref) <= TOL
    assert opt.step((ids, mask, padding), y)["batch_size"] == 4


# -- refusals ---------------------------------------------------------------------------------------

def test_inputs_whose_batch_sizes_disagree_are_refused():
    model = TwoInputs().double()
    a, z, y = two_input_batch()
    opt = EGN(model, loss="cross_entropy")
    with pytest.raises(ValueError, match=r"x\[1\] \(5, 2\).*batch sizes disagree"):
        opt.step((a, z[:5]), y)
    with pytest.raises(ValueError, match=r"x\['b'\] \(5, 2\).*batch sizes disagree"):
        opt.step(dict(a=a, b=z[:5]), y)


def test_targets_of_another_batch_size_are_refused():
    model = TwoInputs().double()
    a, z, y = two_input_batch()
    with pytest.raises(ValueError, match=r"y must have the batch size of the inputs \(7, the first dimension "
                                         r"of x\[0\]\), got shape \(6,\)"):
        EGN(model, loss="cross_entropy").step((a, z), y[:6])


def test_non_finite_inputs_are_refused_by_name():
    model = TwoInputs().double()
    a, z, y = two_input_batch()
    opt = EGN(model, loss="cross_entropy")
    bad = z.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"x\[1\] contains NaN"):
        opt.step((a, bad), y)
    with pytest.raises(ValueError, match=r"x\['b'\] contains NaN"):
        opt.step(dict(a=a, b=bad), y)
    with pytest.raises(ValueError, match=r"model input 1 contains NaN"):
        opt.step(lambda: F.cross_entropy(model(a, bad), y))
    inf = a.clone()
    inf[0, 0] = math.inf
    with pytest.raises(ValueError, match=r"x\[0\] contains NaN or Inf"):
        opt.step((inf, z), y)
    with pytest.raises(ValueError, match=r"x\[1\] has dtype torch.float32 but the model's parameters have "
                                         r"torch.float64"):
        opt.step((a, z.float()), y)
    w0 = flat(model.parameters()).detach().clone()
    assert torch.equal(flat(model.parameters()).detach(), w0) and not opt.state


class MixesThroughSecondInput(nn.Module):
    """Sample i's output depends on the other samples' second input (its batch mean)."""

    def __init__(self):
        super().__init__()
        self.la, self.lb = nn.Linear(3, 3), nn.Linear(2, 3)

    def forward(self, a, b):
        return self.la(a) + self.lb(b).mean(0, keepdim=True)


def test_sample_mixing_through_a_second_input_is_refused():
    model = MixesThroughSecondInput().double()
    a, z, y = two_input_batch()
    with pytest.raises(UnsupportedModelError, match=r"mixes the samples of a batch.*per-sample \(first dimension "
                                                    r"= batch size 7\): x\[0\] \(7, 3\), x\[1\] \(7, 2\)"):
        EGN(model, loss="cross_entropy").step((a, z), y)
    with pytest.raises(UnsupportedModelError, match="mixes the samples of a batch"):
        EGN(model, loss="cross_entropy").step(lambda: F.cross_entropy(model(a, z), y))


class Positional(nn.Module):
    def __init__(self, d=3):
        super().__init__()
        self.lin = nn.Linear(d, 2)

    def forward(self, x, table):
        return self.lin(x + table).mean(1)


def test_a_constant_whose_first_dimension_equals_the_batch_size_is_refused_with_the_reason():
    """A (T, d) positional table with T = b is sliced with the batch like a per-sample input: the half
    batches then disagree with the whole, and the refusal says how the inputs were classified."""
    g = torch.Generator().manual_seed(0)
    model = Positional().double()
    x, y = torch.randn(4, 4, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)
    table = torch.randn(4, 3, generator=g, dtype=torch.float64)
    with pytest.raises(UnsupportedModelError, match=r"x\[1\] \(4, 3\).*sliced with the batch.*module buffer"):
        EGN(model, loss="mse").step((x, table), y)
    # With T != b the table is a constant, and the step is exact.
    x5, y5 = torch.randn(5, 4, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    ref = flat(dense_lm_direction(model, nn.MSELoss(), (x5, table), y5, 1.0))
    assert close(flat(EGN(model, loss=nn.MSELoss()).direction((x5, table), y5)), ref) <= TOL


def test_malformed_structured_inputs_are_refused():
    model = TwoInputs().double()
    a, z, y = two_input_batch()
    opt = EGN(model, loss="cross_entropy")
    with pytest.raises(ValueError, match="hold no tensor with a batch dimension"):
        opt.step((1.0, None), y)
    with pytest.raises(ValueError, match="empty tuple"):
        opt.step((), y)
    with pytest.raises(ValueError, match="keys must be the names"):
        opt.step({0: a}, y)
    with pytest.raises(ValueError, match=r"step\(x\) needs the targets"):
        opt.step((a, z))


def test_revgn_keeps_one_input():
    model = rg.RevMLP(4, 3, hidden=8).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    opt = rg.RevGN(model, lr=0.1)
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        opt.step((x, x), y)


class HeadMasks(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x, attn_mask):
        return self.head(self.attn(x, x, x, attn_mask=attn_mask, need_weights=False)[0].mean(1))


def test_a_per_sample_mask_without_the_batch_first_is_refused():
    """A 3-d attn_mask (b * heads, T, T) has no batch-size first dimension: it passes as a constant, the
    forward on half of the batch fails, and the refusal lists the classification."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = HeadMasks().double()
    x, y = torch.randn(6, 3, 4, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    mask = torch.rand(12, 3, 3, generator=g) < 0.3
    mask[..., 0] = False
    with pytest.raises(UnsupportedModelError, match=r"half of the batch failed.*constants: x\[1\] \(12, 3, 3\)"):
        EGN(model, loss="mse").step((x, mask), y)


class ProjectedTable(nn.Module):
    """A trainable layer applied to a constant input (no batch dimension): its rows are not per sample,
    so its parameters take the torch.func route, which passes the constant to every sample's call."""

    def __init__(self, d=3):
        super().__init__()
        self.proj, self.head = nn.Linear(d, d), nn.Linear(d, 2)

    def forward(self, x, table):
        return self.head(torch.tanh(x + self.proj(table))).mean(1)


def test_a_layer_on_a_constant_input_equals_dense_solve():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    model = ProjectedTable().double()
    x, table = torch.randn(6, 4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    ref = flat(dense_lm_direction(model, nn.MSELoss(), (x, table), y, 0.5))
    opt = EGN(model, loss=nn.MSELoss(), damping=0.5)
    with pytest.warns(RuntimeWarning, match="without the batch"):
        ours = flat(opt.direction((x, table), y))
    assert close(ours, ref) <= TOL
    assert close(flat(opt.direction(lambda: F.mse_loss(model(x, table=table), y))), ref) <= TOL
