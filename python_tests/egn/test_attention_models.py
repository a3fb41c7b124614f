"""Attention models on both layer-wise routes: ``gram="layerwise"`` accepts every model whose every
parameter use a rule covers (module rules, and linear calls seen by the capture), and refuses the rest
naming the parameter and the op; ``gram="auto"`` takes the same models. Each direction is checked against
the dense float64 LM solve of the user's own loss (torch.func), 1e-10."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revgn_ext as rg
from revgn_ext.egn.gram import UnsupportedModelError

from _dense import dense_lm_direction, flat

TOL = 1e-10


class MHAOnly(nn.Module):
    """nn.MultiheadAttention alone: its output, mean over positions, is the model's output."""

    def __init__(self, d=6, heads=2, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True, **kw)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0].mean(1)


class MHAKdim(nn.Module):
    """kdim / vdim != embed_dim: separate q, k, v projection weights (three F.linear calls)."""

    def __init__(self, d=6, kd=4, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True, kdim=kd, vdim=kd)
        self.kd = kd

    def forward(self, x):
        kv = x[:, :, :self.kd]
        return self.attn(x, kv, kv, need_weights=False)[0].sum(1)


class Encoder(nn.Module):
    def __init__(self, norm_first, d=8, heads=2, ff=12, classes=3, activation="relu", causal=False):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True, norm_first=norm_first,
                                              activation=activation)
        self.head = nn.Linear(d, classes)
        self.causal = causal

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype) if self.causal else None
        return self.head(self.enc(x, src_mask=mask, is_causal=self.causal).mean(1))


class HandAttention(nn.Module):
    """Hand-written attention: F.linear, x @ W.T, torch.matmul(x, W) with W stored (in, out), and either
    softmax(q k^T) v written out or F.scaled_dot_product_attention."""

    def __init__(self, d=6, out=3, sdpa=False):
        super().__init__()
        self.wq = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.bq = nn.Parameter(0.1 * torch.randn(d))
        self.wk = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.wv = nn.Parameter(torch.randn(d, d) / math.sqrt(d))      # stored (in, out): x @ W
        self.wo = nn.Parameter(torch.randn(out, d) / math.sqrt(d))
        self.sdpa = sdpa

    def forward(self, x):
        q = F.linear(x, self.wq, self.bq)
        k = x @ self.wk.T
        v = torch.matmul(x, self.wv)
        if self.sdpa:
            h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        else:
            h = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1) @ v
        return torch.tanh(h).mean(1) @ self.wo.T


class Gain(nn.Module):
    """A parameter used elementwise: no rule covers it."""

    def __init__(self, d=6):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return (self.attn(x, x, x, need_weights=False)[0] * self.gain).mean(1)


def _seq(b, T, d):
    return lambda g: torch.randn(b, T, d, generator=g, dtype=torch.float64)


MODELS = {
    "mha": (lambda: MHAOnly(), _seq(5, 4, 6)),
    "mha-no-bias": (lambda: MHAOnly(bias=False), _seq(5, 3, 6)),
    "mha-kdim": (lambda: MHAKdim(), _seq(4, 3, 6)),
    "encoder-post-norm": (lambda: Encoder(norm_first=False), _seq(5, 4, 8)),
    "encoder-pre-norm": (lambda: Encoder(norm_first=True, activation="gelu"), _seq(5, 4, 8)),
    "encoder-causal": (lambda: Encoder(norm_first=True, causal=True), _seq(4, 5, 8)),
    "hand-written": (lambda: HandAttention(), _seq(5, 4, 6)),
    "hand-written-sdpa": (lambda: HandAttention(sdpa=True), _seq(5, 4, 6)),
}


def _setup(name, loss):
    make, data = MODELS[name]
    torch.manual_seed(0)
    model = make().double().eval()
    g = torch.Generator().manual_seed(1)
    x = data(g)
    with torch.no_grad():
        c = model(x).shape[1]
    if loss == "cross_entropy":
        y, loss_fn = torch.randint(0, c, (x.shape[0],), generator=g), F.cross_entropy
    else:
        y = torch.randn(x.shape[0], c, generator=g, dtype=torch.float64)
        loss_fn = lambda o, t: 0.5 * (o - t).square().sum(1).mean()   # noqa: E731
    return model, x, y, loss_fn


@pytest.mark.parametrize("gram", ["layerwise", "auto"])
@pytest.mark.parametrize("name", list(MODELS))
def test_attention_model_direction_equals_dense_lm_solve(name, gram):
    loss = "cross_entropy" if name in ("encoder-post-norm", "hand-written", "mha-kdim") else "mse"
    model, x, y, loss_fn = _setup(name, loss)
    damping = 0.3
    opt = rg.EGN(model, lr=0.1, damping=damping, loss=loss, gram=gram)
    ref = flat(dense_lm_direction(model, loss_fn, x, y, damping))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no parameter may be demoted to torch.func
        for _ in range(2):               # the second solve replays the verified plan
            ours = flat(opt.direction(x, y))
            assert (ours - ref).abs().max() <= TOL * ref.abs().max()
    assert opt._assembler.method == "layerwise"


def test_layerwise_refuses_a_parameter_no_rule_covers_naming_it_and_the_op():
    model, x, y, _ = _setup_gain()
    opt = rg.EGN(model, loss="mse", gram="layerwise")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsupportedModelError, match=r"'gain'.*mul.*gram='auto'"):
        opt.step(x, y)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def _setup_gain():
    torch.manual_seed(0)
    model = Gain().double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    y = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return model, x, y, None


def test_auto_takes_the_uncovered_parameter_to_torch_func_and_the_rest_layerwise():
    model, x, y, _ = _setup_gain()
    opt = rg.EGN(model, loss="mse", damping=0.3)
    ref = flat(dense_lm_direction(model, lambda o, t: 0.5 * (o - t).square().sum(1).mean(), x, y, 0.3))
    assert (flat(opt.direction(x, y)) - ref).abs().max() <= TOL * ref.abs().max()
    assert opt._assembler.fallback_names == ["gain"]


def test_layerwise_refuses_mha_bias_kv_naming_the_parameter():
    """add_bias_kv concatenates bias_k / bias_v (1, 1, E) to the keys and values: no linear call of theirs."""
    torch.manual_seed(0)
    model = MHAOnly(add_bias_kv=True).double().eval()
    with pytest.raises(UnsupportedModelError, match=r"'attn.bias_k'.*3 dims.*gram='auto'"):
        rg.EGN(model, loss="mse", gram="layerwise")


class Frozen2d(nn.Module):
    """A 2-d parameter used elementwise (not as a linear weight)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(1, 3))

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.scale


def test_layerwise_refuses_a_2d_parameter_used_elementwise():
    model = Frozen2d().double()
    opt = rg.EGN(model, loss="mse", gram="layerwise")
    with pytest.raises(UnsupportedModelError, match=r"'scale' of module 'Frozen2d'.*Tensor.mul"):
        opt.direction(torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64))


class RowBlocks(nn.Module):
    """One parameter in row blocks: rows 0..3 twice (repeated range: the second use adds), rows 2..5
    (overlapping), rows 6..7 never (zero), and a call whose output never reaches the loss."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4) / 2)
        self.b = nn.Parameter(0.1 * torch.randn(8))
        self.u = nn.Parameter(torch.randn(3, 4) / 2)

    def forward(self, x):
        h1 = torch.tanh(F.linear(x, self.w[:4], self.b[:4]))
        h2 = torch.tanh(F.linear(h1, self.w[:4], self.b[:4]))
        h3 = F.linear(x, self.w[2:6], self.b[2:6])
        F.linear(x, self.u)   # unused output
        return (h2 * h3).mean(1) + F.linear(x, self.u).mean(1).sin().sum(-1, keepdim=True)


class Tiled(nn.Module):
    """Row blocks that tile the parameter (filled by copy, no zeroing), one of them unused downstream."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4) / 2)

    def forward(self, x):
        a, b, c = F.linear(x, self.w[:2]), F.linear(x, self.w[2:5]), F.linear(x, self.w[5:])
        return torch.cat([torch.tanh(a), b.sin()], -1).mean(1) + 0 * c.detach().sum()


@pytest.mark.parametrize("make", [RowBlocks, Tiled])
@pytest.mark.parametrize("gram", ["layerwise", "auto"])
def test_row_blocks_of_a_parameter_are_exact(make, gram):
    from revgn_ext.egn.gram import gram_matrix
    from _dense import brute_gram
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    y = torch.randn(5, model(x).shape[1], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):
            K = gram_matrix(model, x, method=gram)
            ref = brute_gram(model, x)
            assert (K - ref).abs().max() <= TOL * ref.abs().max()
        opt = rg.EGN(model, lr=0.1, damping=0.3, loss="mse", gram=gram)
        ref = flat(dense_lm_direction(model, lambda o, t: 0.5 * (o - t).square().sum(1).mean(), x, y, 0.3))
        for _ in range(2):
            assert (flat(opt.direction(x, y)) - ref).abs().max() <= TOL * ref.abs().max()


class ModuleProjections(nn.Module):
    """nn.Linear projections (module rules cover every parameter: no capture) and F.scaled_dot_product_attention
    on (b, heads, T, d)."""

    def __init__(self, d=4, classes=3):
        super().__init__()
        self.q, self.k, self.v, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, classes)

    def forward(self, x):
        h = F.scaled_dot_product_attention(self.q(x)[:, None], self.k(x)[:, None], self.v(x)[:, None])[:, 0]
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("gram", ["layerwise", "auto"])
@pytest.mark.parametrize("make", [lambda: Encoder(norm_first=True, d=4, heads=2, ff=6), ModuleProjections])
def test_sampled_curvature_through_attention_on_many_positions(make, gram):
    """curvature='sampled' takes J g by double backward, which the fused CPU attention kernel does not
    have: on 40 positions (1600 query-key pairs) the step still equals the dense solve of the same draws."""
    from _dense import dense_direction
    from revgn_ext.egn import loss_factors as lf
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(3, 40, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    opt = rg.EGN(model, damping=0.3, loss="cross_entropy", curvature="sampled", gram=gram)
    torch.manual_seed(99)
    d = flat(opt.direction(x, y))
    torch.manual_seed(99)
    S = lf.sampled_factor("cross_entropy", model(x).detach(), y, 1).S
    ref = dense_direction(model, x, y, "cross_entropy", 0.3, S=S)
    assert (d - ref).abs().max() <= TOL * ref.abs().max()
