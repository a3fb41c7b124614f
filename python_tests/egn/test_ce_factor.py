"""The exact cross-entropy factor with c - 1 columns: S_i S_i^T = Q_i = diag p_i - p_i p_i^T and S_i t_i = e_i
against Q and e formed here from their closed forms, and EGN's direction against a dense float64 LM solve
whose curvature is built here as diag p - p p^T (not from the package's factor), for hard labels, label
smoothing, class probabilities, several inputs and per-token losses."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from revgn_ext.egn import EGN
from revgn_ext.egn import loss_factors as lf

from _dense import flat, jacobian

pytestmark = pytest.mark.filterwarnings("ignore:.*reference.*:RuntimeWarning")

f64 = torch.float64


def closed_form(f, q):
    p = torch.softmax(f, 1)
    return p - q, torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def logits_and_targets(c, kind, dtype=f64, b=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = (torch.randn(b, c, generator=g, dtype=f64) * 3)
    f[0, c - 1] = 45.0                       # p_0 one-hot to 1e-19, the largest s at the last column
    f[1, 0] = 25.0                           # near-one-hot at the first column
    f[2] = 0.0                               # uniform p: every s_a equal, j the first of the ties
    labels = torch.randint(0, c, (b,), generator=g)
    labels[0] = 0                            # confidently wrong
    if kind == "labels":
        y, q = labels, F.one_hot(labels, c).to(f64)
    elif kind == "smoothing":
        q = 0.8 * F.one_hot(labels, c).to(f64) + 0.2 / c
        y = q
    else:
        q = torch.softmax(torch.randn(b, c, generator=g, dtype=f64) * 2, 1)
        y = q
    return f.to(dtype), (y if kind == "labels" else y.to(dtype)), q


@pytest.mark.parametrize("kind", ["labels", "smoothing", "probabilities"])
@pytest.mark.parametrize("c", [2, 3, 4, 10])
def test_factor_has_c_minus_1_columns_and_is_exact(c, kind):
    f, y, q = logits_and_targets(c, kind)
    fac = lf.cross_entropy_factor(f, y)
    e, Q = closed_form(f, q)
    S = lf.factor_matrix(fac)
    assert S.shape == (f.shape[0], c, c - 1) and fac.target.shape == (f.shape[0], c - 1)
    assert (S @ S.transpose(1, 2) - Q).abs().max() <= 1e-12
    assert (fac.residual - e).abs().max() <= 1e-12
    assert e.sum(1).abs().max() <= 1e-12   # e in the range of Q (its null space is the ones vector)
    assert torch.isfinite(fac.target).all()
    # S t = e, relative to t's size (t_a ~ q_a / sqrt(p_a) is large where p_a is tiny)
    assert (torch.einsum("ick,ik->ic", S, fac.target) - e).abs().max() <= 1e-12 * max(1.0, fac.target.abs().max())
    # the factor's own apply / transpose agree with its dense form
    u, v = torch.randn(f.shape[0], c - 1, dtype=f64), torch.randn(f.shape[0], c, dtype=f64)
    assert torch.allclose(lf.apply_factor(fac, u), torch.einsum("ick,ik->ic", S, u), atol=1e-14)
    assert torch.allclose(lf.apply_factor_transpose(fac, v), torch.einsum("ick,ic->ik", S, v), atol=1e-14)
    # the columns are orthogonal after removing diag(s): S = diag(s) V with V^T V = I
    s = torch.softmax(f, 1).sqrt()
    V = S / s[:, :, None]
    assert (V.transpose(1, 2) @ V - torch.eye(c - 1, dtype=f64)).abs().max() <= 1e-12


def test_two_classes_give_one_column():
    f = torch.tensor([[0.3, -1.2], [4.0, 4.0], [-30.0, 2.0]], dtype=f64)
    fac = lf.cross_entropy_factor(f, torch.tensor([1, 0, 0]))
    p = torch.softmax(f, 1)
    assert fac.S.shape == (3, 2, 1)
    # Q = p_0 p_1 [[1, -1], [-1, 1]]: the single column is +-sqrt(p_0 p_1) (1, -1)
    col = fac.S[:, :, 0]
    assert torch.allclose(col.abs(), (p[:, :1] * p[:, 1:]).sqrt().expand(3, 2), atol=1e-15, rtol=1e-12)
    assert torch.allclose(col[:, 0], -col[:, 1], atol=1e-15)


@pytest.mark.parametrize("kind", ["labels", "probabilities"])
def test_float32_factor_is_accurate(kind):
    f, y, q = logits_and_targets(50, kind, dtype=torch.float32, b=200, seed=3)
    fac = lf.cross_entropy_factor(f, y)
    e, Q = closed_form(f.double(), q)
    S = fac.S.double()
    assert fac.S.dtype == torch.float32 and torch.isfinite(fac.S).all() and torch.isfinite(fac.target).all()
    assert (S @ S.transpose(1, 2) - Q).abs().max() <= 1e-6
    St = torch.einsum("ick,ik->ic", S, fac.target.double())
    assert ((St - e).abs().max(1).values / fac.target.double().abs().max(1).values.clamp_min(1)).max() <= 1e-5


def dense_ce_direction(model, x, q, damping, c):
    """-(J^T Q J / P + lambda I)^{-1} J^T e / P over the P = numel / c rows of the model's output, with
    Q = diag p - p p^T and e = p - q formed here."""
    J = jacobian(model, x)
    d = J.shape[-1]
    J = J.reshape(-1, c, d)
    with torch.no_grad():
        out = model(*x) if isinstance(x, tuple) else model(x)
    e, Q = closed_form(out.reshape(-1, c), q)
    P = J.shape[0]
    G = torch.einsum("pcd,pce,pef->df", J, Q, J) / P
    g = torch.einsum("pc,pcd->d", e, J) / P
    return -torch.linalg.solve(G + damping * torch.eye(d, dtype=f64), g)


class TwoInputs(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(3, 8)
        self.head = nn.Linear(8, c)

    def forward(self, u, v):
        return self.head(torch.tanh(self.a(u) + self.b(v)))


class Tagger(nn.Module):
    """Per-token logits (b, T, c)."""
    def __init__(self, c):
        super().__init__()
        self.emb = nn.Linear(4, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, c)

    def forward(self, x):
        h = torch.tanh(self.emb(x))
        return self.head(h + torch.tanh(self.mix(h.cumsum(1))))


@pytest.mark.parametrize("kind", ["labels", "smoothing", "probabilities"])
@pytest.mark.parametrize("c", [2, 5])
def test_direction_equals_dense_solve(c, kind):
    torch.manual_seed(c)
    b = 6
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, c)).double()
    x = torch.randn(b, 4, dtype=f64)
    labels = torch.randint(0, c, (b,))
    if kind == "labels":
        q, loss = F.one_hot(labels, c).to(f64), "cross_entropy"
        ours = EGN(model, damping=0.3, loss=loss).direction(x, labels)
    elif kind == "smoothing":
        q = 0.9 * F.one_hot(labels, c).to(f64) + 0.1 / c
        ours = EGN(model, damping=0.3, loss=nn.CrossEntropyLoss(label_smoothing=0.1)).direction(x, labels)
    else:
        q = torch.softmax(torch.randn(b, c, dtype=f64), 1)
        ours = EGN(model, damping=0.3, loss="cross_entropy").direction(x, q)
    ref = dense_ce_direction(model, x, q, 0.3, c)
    assert (flat(ours) - ref).abs().max() <= 1e-10 * ref.abs().max()


def test_direction_with_several_inputs_equals_dense_solve():
    torch.manual_seed(1)
    c, b = 4, 7
    model = TwoInputs(c).double()
    x = (torch.randn(b, 5, dtype=f64), torch.randn(b, 3, dtype=f64))
    labels = torch.randint(0, c, (b,))
    opt = EGN(model, damping=0.2, loss="cross_entropy")
    ours = flat(opt.direction(lambda: F.cross_entropy(opt.model(*x), labels)))
    ref = dense_ce_direction(model, x, F.one_hot(labels, c).to(f64), 0.2, c)
    assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()


@pytest.mark.parametrize("kind", ["labels", "smoothing"])
def test_per_token_direction_equals_dense_solve(kind):
    torch.manual_seed(2)
    b, T, c = 3, 4, 5
    model = Tagger(c).double()
    x = torch.randn(b, T, 4, dtype=f64)
    y = torch.randint(0, c, (b, T))
    eps = 0.0 if kind == "labels" else 0.15
    q = (1 - eps) * F.one_hot(y.reshape(-1), c).to(f64) + eps / c
    opt = EGN(model, damping=0.3)
    ours = flat(opt.direction(lambda: F.cross_entropy(opt.model(x).reshape(-1, c), y.reshape(-1),
                                                      label_smoothing=eps)))
    ref = dense_ce_direction(model, x, q, 0.3, c)
    assert (ours - ref).abs().max() <= 1e-10 * ref.abs().max()
