"""Linear maps of parameters called as functions (attention projections, ``x @ W``): the captured calls'
per-sample gradients give the layer-wise Gram of those parameters, checked against torch.func in float64."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

from revgn_ext.egn.capture import LinearCapture, resolve_layouts
from revgn_ext.egn.rules.functional_linear import linear_call_rows


class SelfAttention(nn.Module):
    def __init__(self, d=8, heads=2, batch_first=True):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.batch_first = batch_first
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = x if self.batch_first else x.transpose(0, 1)
        h, _ = self.attn(h, h, h, need_weights=False)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h.mean(1))


class CrossAttention(nn.Module):
    """Queries from the first positions, keys and values from the rest (in_proj split in two)."""

    def __init__(self, d=8, heads=2, q_len=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.q_len = q_len

    def forward(self, x):
        q, kv = x[:, :self.q_len], x[:, self.q_len:]
        return self.attn(q, kv, kv, need_weights=False)[0].sum(1)


class TransformerClassifier(nn.Module):
    def __init__(self, vocab=50, d=32, heads=4, ff=64, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


class HandAttention(nn.Module):
    """x @ W.T, F.linear on row blocks of one parameter, x @ W with W stored (in, out)."""

    def __init__(self, d=6, out=2):
        super().__init__()
        self.wq = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.wkv = nn.Parameter(torch.randn(2 * d, d) / math.sqrt(d))
        self.bkv = nn.Parameter(torch.randn(2 * d) * 0.1)
        self.wo = nn.Parameter(torch.randn(d, out) / math.sqrt(d))   # stored (in, out)
        self.d = d

    def forward(self, x):
        q = x @ self.wq.T
        k = F.linear(x, self.wkv[:self.d], self.bkv[:self.d])
        v = F.linear(x, self.wkv[self.d:], self.bkv[self.d:])
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.d), -1)
        return torch.tanh(a @ v).mean(1) @ self.wo


def captured_gram(model, x, columns):
    """(K over the captured parameters, their names) from the capture and the rule."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    capture = LinearCapture(params, names)
    with capture:
        f = model(x)
    f = f.reshape(x.shape[0], -1)
    failed = resolve_layouts(f, capture.calls, torch.Generator().manual_seed(3))
    assert not failed
    rows = linear_call_rows(f, capture.calls, columns)
    m, b, _ = columns.shape
    K = f.new_zeros(b * m, b * m)
    for V in rows.values():
        V = V.reshape(b * m, -1)
        K += V @ V.T
    return K, sorted(names[pid] for pid in rows), capture.calls


def brute_gram(model, x, names, columns):
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def f(p, xi):
        return functional_call(model, p, (xi[None],), strict=False).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    b = x.shape[0]
    J = torch.cat([j.reshape(b, j.shape[1], -1) for j in jac.values()], -1)   # (b, c, d)
    A = torch.einsum("aik,ikd->iad", columns, J).reshape(b * columns.shape[0], -1)
    return A @ A.T


def random_columns(b, c, m, seed=0):
    return torch.randn(m, b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


CASES = {
    "mha-self": (lambda: SelfAttention(), lambda g: torch.randn(5, 4, 8, generator=g, dtype=torch.float64),
                 ["attn.in_proj_bias", "attn.in_proj_weight", "attn.out_proj.bias", "attn.out_proj.weight",
                  "head.bias", "head.weight"]),
    # T == b: the in-projection rows (T, b, E) have two dims of size b; the probe tells them apart
    "mha-self-seq-first-T-eq-b": (lambda: SelfAttention(batch_first=False),
                                  lambda g: torch.randn(4, 4, 8, generator=g, dtype=torch.float64), None),
    "mha-cross": (lambda: CrossAttention(), lambda g: torch.randn(6, 7, 8, generator=g, dtype=torch.float64),
                  ["attn.in_proj_bias", "attn.in_proj_weight", "attn.out_proj.bias", "attn.out_proj.weight"]),
    "transformer": (lambda: TransformerClassifier(),
                    lambda g: torch.randint(0, 50, (64, 16), generator=g),
                    ["enc.linear1.bias", "enc.linear1.weight", "enc.linear2.bias", "enc.linear2.weight",
                     "enc.self_attn.in_proj_bias", "enc.self_attn.in_proj_weight", "enc.self_attn.out_proj.bias",
                     "enc.self_attn.out_proj.weight", "head.bias", "head.weight"]),
    "hand-written": (lambda: HandAttention(), lambda g: torch.randn(5, 6, 6, generator=g, dtype=torch.float64),
                     ["bkv", "wkv", "wo", "wq"]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("m", [1, 3])
def test_captured_linear_gram_equals_torch_func(name, m):
    make, data, expected = CASES[name]
    torch.manual_seed(0)
    model = make().double().eval()
    x = data(torch.Generator().manual_seed(1))
    with torch.no_grad():
        c = model(x).reshape(x.shape[0], -1).shape[1]
    columns = random_columns(x.shape[0], c, m)
    K, names, _ = captured_gram(model, x, columns)
    if expected is not None:
        assert names == expected
    ref = brute_gram(model, x, names, columns)
    assert (K - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_attention_layouts_are_found():
    """nn.MultiheadAttention projects (T, b, E) rows in and (T b, E) position-major rows out."""
    torch.manual_seed(0)
    model = SelfAttention().double().eval()
    x = torch.randn(5, 4, 8, dtype=torch.float64)
    _, _, calls = captured_gram(model, x, random_columns(5, 3, 1))
    layouts = {c.name: c.layout for c in calls}
    assert layouts == {"attn.in_proj_weight": ("dim", 1), "attn.out_proj.weight": ("minor", 0),
                       "head.weight": ("dim", 0)}


def test_capture_leaves_functional_linear_as_it_was():
    original = F.linear
    model = CrossAttention().double()
    with LinearCapture(list(model.parameters())):
        model(torch.randn(2, 7, 8, dtype=torch.float64))
    assert F.linear is original


def test_weight_computed_from_a_parameter_is_not_claimed():
    """W * 2 is not a block of W: no call is recorded for it (its parameter goes elsewhere)."""
    w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    with LinearCapture([w]) as capture:
        F.linear(torch.randn(2, 4, dtype=torch.float64), w * 2)
    assert capture.calls == []


# --------------------------------------------------------------------------------------------------
# Through the assembler and the optimizer
# --------------------------------------------------------------------------------------------------

import warnings  # noqa: E402

import revgn_ext as rg  # noqa: E402
from revgn_ext.egn.gram import gram_matrix  # noqa: E402

from _dense import brute_gram as dense_gram, dense_direction, flat  # noqa: E402


@pytest.mark.parametrize("name", list(CASES))
def test_whole_model_gram_uses_the_captured_calls(name):
    """Every parameter of these models is covered without torch.func (module rules + captured calls),
    and K equals the dense J J^T."""
    make, data, _ = CASES[name]
    torch.manual_seed(0)
    model = make().double().eval()
    x = data(torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no parameter may be demoted to torch.func
        K = gram_matrix(model, x)
    ref = dense_gram(model, x)
    assert (K - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_transformer_classifier_step_equals_dense_lm_solve():
    """A small one-layer transformer (the parameter-space reference solve is d x d)."""
    torch.manual_seed(0)
    model = TransformerClassifier(vocab=20, d=8, heads=2, ff=16).double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 20, (12, 5), generator=g), torch.randint(0, 4, (12,), generator=g)
    opt = rg.EGN(model, lr=0.1, damping=0.5, loss="cross_entropy")
    ref = dense_direction(model, x, y, "cross_entropy", 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = flat(opt.direction(x, y))
        stats = opt.step(x, y)
    assert stats["gram"] == "layerwise"
    assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_hand_written_attention_steps_equal_dense_lm_solve_over_several_steps():
    """The layouts found on the first step are reused; each later direction is still exact."""
    torch.manual_seed(0)
    model = HandAttention().double()
    opt = rg.EGN(model, lr=0.5, damping=0.1, loss="mse")
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = torch.randn(5, 6, 6, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
        ref = dense_direction(model, x, y, "mse", 0.1)
        ours = flat(opt.direction(x, y))
        assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()
        opt.step(x, y)
    assert opt.last_stats["gram"] == "layerwise"


class HiddenUse(nn.Module):
    """w is used by F.linear and also elementwise: the captured call alone would miss a term."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

    def forward(self, x):
        return F.linear(x, self.w) + (x[:, :3] * self.w[:, 0]).sum(1, keepdim=True)


def test_parameter_with_an_uncaptured_use_goes_to_torch_func():
    torch.manual_seed(0)
    model = HiddenUse()
    x = torch.randn(6, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="torch.func"):
        K = gram_matrix(model, x)
    ref = dense_gram(model, x)
    assert (K - ref).abs().max() <= 1e-10 * ref.abs().max()
