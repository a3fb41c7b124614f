"""RevMLP: shapes, initialisation, exact inverse, reversible backprop against plain autograd, baselines.

Brute-force references are written out here from the formulas in SPEC section 2, independently of
revgn_ext.ops, so the model is checked against the math and not against itself.
"""
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="revgn_ext: compiled kernels unavailable", category=RuntimeWarning)

import revgn_ext as rg  # noqa: E402

from _dense import revmlp_forward  # noqa: E402

ACTS = ("identity", "relu", "tanh", "gelu")
f64 = torch.float64


def act(name, z):
    return {"identity": lambda t: t, "relu": torch.relu, "tanh": torch.tanh,
            "gelu": torch.nn.functional.gelu}[name](z)


dense_forward = revmlp_forward   # Z and logits straight from SPEC section 2


@pytest.mark.parametrize("hidden", [24, None])
def test_structure_and_init(hidden):
    m = rg.RevMLP(in_features=9, num_classes=4, num_blocks=3, hidden=hidden, activations=("identity", "relu"),
                  weight_std=1e-3, seed=0)
    assert m.dim == 10 and m.activations == ("identity", "relu", "relu")
    names = [n for n, _ in m.named_parameters()]
    assert names == [f"blocks.{l}.{p}" for l in range(3) for p in ("WF", "bF", "WG", "bG")]
    width = 5 if hidden is None else hidden
    for blk in m.blocks:
        assert blk.WF.shape == blk.WG.shape == (5, width) and blk.bF.shape == (5,)
        assert torch.all(blk.bF == 0) and torch.all(blk.bG == 0)
        if hidden is None:
            assert blk.VF is None and blk.VG is None
        else:
            assert not blk.VF.requires_grad and blk.VF.shape == (5, hidden)
    # Q has orthonormal columns; V and Q are buffers saved in the state_dict.
    assert torch.allclose(m.Q.T @ m.Q, torch.eye(4), atol=1e-6)
    assert "Q" in m.state_dict()
    if hidden is not None:
        assert "blocks.0.VF" in m.state_dict()
    # Same seed, same model; another seed, another model.
    m2 = rg.RevMLP(9, 4, 3, hidden, ("identity", "relu"), 1e-3, seed=0)
    m3 = rg.RevMLP(9, 4, 3, hidden, ("identity", "relu"), 1e-3, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert not torch.equal(m.blocks[0].WF, m3.blocks[0].WF)


def test_init_statistics():
    m = rg.RevMLP(64, 10, 2, hidden=4000, weight_std=1e-3, seed=3, dtype=f64)
    V, W = m.blocks[0].VF, m.blocks[0].WF
    assert abs(V.var().item() * 4000 - 1.0) < 0.02  # N(0, 1/M)
    assert abs(W.std().item() / 1e-3 - 1.0) < 0.02  # N(0, sigma_w^2)


@pytest.mark.parametrize("hidden", [16, None])
@pytest.mark.parametrize("activation", ACTS)
def test_forward_matches_formulas_and_inverse(hidden, activation):
    torch.manual_seed(0)
    m = rg.RevMLP(7, 3, 3, hidden, activation, weight_std=0.5, seed=1, dtype=f64)
    for p in m.parameters():  # non-zero biases so they are exercised
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(6, 7, dtype=f64)
    z_ref, logits_ref = dense_forward(m, x)
    torch.testing.assert_close(m.body(x), z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x), logits_ref, rtol=1e-12, atol=1e-12)
    x_rec = m.inverse(m.body(x))
    assert x_rec.shape == x.shape
    assert (x_rec - x).abs().max().item() < 1e-12


def test_trace_matches_forward():
    torch.manual_seed(0)
    m = rg.RevMLP(8, 3, 2, 12, ("tanh", "gelu"), weight_std=0.3, seed=0, dtype=f64)
    x = torch.randn(5, 8, dtype=f64)
    tr = m.forward_with_trace(x)
    torch.testing.assert_close(tr.logits, m(x), rtol=0, atol=0)
    x1, x2 = x[:, :4], x[:, 4:]
    for blk, t in zip(m.blocks, tr.blocks):
        assert torch.equal(t.x1, x1) and torch.equal(t.x2, x2)
        torch.testing.assert_close(t.hF, act(blk.activation, x2 @ blk.VF))
        torch.testing.assert_close(t.hG, act(blk.activation, t.y1 @ blk.VG))
        x1, x2 = t.y1, t.y2
    torch.testing.assert_close(tr.z, torch.cat([x1, x2], 1))


@pytest.mark.parametrize("hidden", [10, None])
@pytest.mark.parametrize("activations", [("identity", "relu"), ("tanh",), ("gelu", "tanh", "relu")])
def test_reversible_backprop_matches_plain(hidden, activations):
    torch.manual_seed(0)
    m = rg.RevMLP(9, 4, 3, hidden, activations, weight_std=0.4, seed=2, dtype=f64)
    x = torch.randn(6, 9, dtype=f64)
    w = torch.randn(6, 4, dtype=f64)

    def grads(reversible):
        m.reversible_backprop = reversible
        m.zero_grad()
        xg = x.clone().requires_grad_()
        (m(xg) * w).sum().backward()
        return [p.grad.clone() for p in m.parameters()] + [xg.grad.clone()]

    plain, rev = grads(False), grads(True)
    for a, b in zip(plain, rev):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # The input gradient is skipped, not wrong, when x does not need it.
    m.zero_grad()
    (m(x) * w).sum().backward()
    for a, p in zip(plain, m.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("optim", ["adam", "sgd"])
@pytest.mark.parametrize("reversible", [False, True])
def test_baselines_train(optim, reversible):
    torch.manual_seed(0)
    m = rg.RevMLP(10, 3, 2, 32, ("identity", "relu"), weight_std=1e-2, seed=0, reversible_backprop=reversible)
    x = torch.randn(32, 10)
    y = torch.randint(0, 3, (32,))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2) if optim == "adam" else \
        torch.optim.SGD(m.parameters(), lr=0.5)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.7 * first


def test_bad_arguments():
    with pytest.raises(ValueError, match="in_features"):
        rg.RevMLP(0, 3)
    with pytest.raises(ValueError, match="num_classes"):
        rg.RevMLP(4, 5, hidden=8)
    with pytest.raises(ValueError, match="hidden"):
        rg.RevMLP(4, 2, hidden=0)
    with pytest.raises(ValueError, match="activations"):
        rg.RevMLP(4, 2, 2, hidden=8, activations="softplus")
    with pytest.raises(ValueError, match="activations"):
        rg.RevMLP(4, 2, 2, hidden=8, activations=("relu", "relu", "relu"))
    with pytest.raises(ValueError, match="weight_std"):
        rg.RevMLP(4, 2, hidden=8, weight_std=float("nan"))
    m = rg.RevMLP(4, 2, 2, hidden=8)
    with pytest.raises(ValueError, match="x has 5 features"):
        m(torch.randn(3, 5))
    with pytest.raises(ValueError, match="x .*dtype"):
        m(torch.randn(3, 4, dtype=f64))
    with pytest.raises(ValueError, match="z has 3 features"):
        m.inverse(torch.randn(3, 3))
