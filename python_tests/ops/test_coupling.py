"""Coupling block ops: forward / inverse / inverse tangent vs the references (fp32, fp64), dense
brute-force checks of the tangent and the gradient, opcheck, gradcheck, poisoned allocations,
non-contiguous inputs and bad inputs."""
import pytest
import torch

from revgn_ext import ops
from revgn_ext.ops.coupling import coupling_forward_reference, coupling_inverse_reference, coupling_inverse_tangent_reference
from revgn_ext.ops.activations import ACTIVATIONS
from conftest import DEVICES, rel_err, requires_cuda_kernels, requires_kernels, tol

ACTS = ACTIVATIONS
# (n, d/2, M): n = 1, M < n, M not a multiple of any tile size, d/2 = 1
SHAPES = [(1, 3, 5), (9, 4, 5), (6, 1, 7), (33, 6, 70), (64, 16, 130)]


def make_block(n, half, M, dtype, device, seed=0, contiguous=True):
    """Inputs and parameters of one block; with contiguous=False every tensor is a strided view."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, std=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype=dtype, device=device)
        if not contiguous:  # column-major matrices, vectors with stride 2 (made on the device: .to() densifies)
            t = t.mT.contiguous().mT if t.dim() == 2 else torch.stack([t, torch.zeros_like(t)], 1)[:, 0]
        return t

    x1, x2 = draw(n, half), draw(n, half)
    VF, VG = draw(half, M, std=M ** -0.5), draw(half, M, std=M ** -0.5)
    WF, WG = draw(half, M, std=0.3), draw(half, M, std=0.3)
    bF, bG = draw(half, std=0.1), draw(half, std=0.1)
    return x1, x2, VF, WF, bF, VG, WG, bG


def poison(device):
    """Fill freed allocator memory with NaN so that an unwritten output element shows up as NaN."""
    big = torch.full((1 << 20,), float("nan"), device=device)
    del big


def assert_close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    assert bool(torch.isfinite(got).all()), "non-finite output element"
    assert rel_err(got, want) < tol(dtype), rel_err(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_inverse_tangent_match_reference(shape, activation, dtype, device):
    x1, x2, VF, WF, bF, VG, WG, bG = make_block(*shape, dtype, device)
    poison(device)
    got = ops.coupling_forward(x1, x2, VF, WF, bF, VG, WG, bG, activation, return_features=True)
    want = coupling_forward_reference(x1, x2, VF, WF, bF, VG, WG, bG, activation, True)
    for g, w in zip(got, want):
        assert_close(g, w, dtype)
    y1, y2 = got[0], got[1]
    poison(device)
    inv = ops.coupling_inverse(y1, y2, VF, WF, bF, VG, WG, bG, activation)
    for g, w in zip(inv, coupling_inverse_reference(y1, y2, VF, WF, bF, VG, WG, bG, activation)):
        assert_close(g, w, dtype)
    assert rel_err(inv[0], x1) < 50 * tol(dtype) and rel_err(inv[1], x2) < 50 * tol(dtype)
    dy1, dy2 = torch.randn_like(y1), torch.randn_like(y2)
    poison(device)
    tan = ops.coupling_inverse_tangent(y1, x2, dy1, dy2, VF, WF, VG, WG, activation)
    for g, w in zip(tan, coupling_inverse_tangent_reference(y1, x2, dy1, dy2, VF, WF, VG, WG, activation)):
        assert_close(g, w, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_features_only_when_requested(device):
    args = make_block(5, 3, 11, torch.float64, device)
    y1, y2, hF, hG = ops.coupling_forward(*args, "tanh")
    assert hF is None and hG is None
    y1f, y2f, hF, hG = ops.coupling_forward(*args, "tanh", return_features=True)
    assert torch.equal(y1, y1f) and torch.equal(y2, y2f) and hF.shape == hG.shape == (5, 11)


@requires_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTS)
def test_kernels_accept_non_contiguous_inputs(activation, device):
    args = make_block(7, 5, 19, torch.float64, device, seed=2, contiguous=False)
    assert not any(t.is_contiguous() for t in args)
    dense = [t.contiguous() for t in args]
    got = torch.ops.revgn.coupling_forward(*args, activation, True)
    want = coupling_forward_reference(*dense, activation, True)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float64)
    y1, y2 = got[0].mT.contiguous().mT, got[1].mT.contiguous().mT
    x1, x2, VF, WF, bF, VG, WG, bG = args
    for g, w in zip(torch.ops.revgn.coupling_inverse(y1, y2, VF, WF, bF, VG, WG, bG, activation),
                    coupling_inverse_reference(y1, y2, *dense[2:], activation)):
        assert_close(g, w, torch.float64)
    dy1, dy2 = torch.randn_like(y1).mT.contiguous().mT, torch.randn_like(y2)
    got = torch.ops.revgn.coupling_inverse_tangent(y1, x2, dy1, dy2, VF, WF, VG, WG, activation)
    want = coupling_inverse_tangent_reference(y1, dense[1], dy1, dy2, dense[2], dense[3], dense[5], dense[6],
                                              activation)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTS)
def test_tangent_is_the_jvp_of_the_inverse(activation, device):
    # Brute force: torch.func.jvp of the reference inverse along (dy1, dy2).
    x1, x2, VF, WF, bF, VG, WG, bG = make_block(6, 4, 9, torch.float64, device, seed=4)
    y1, y2, _, _ = ops.coupling_forward(x1, x2, VF, WF, bF, VG, WG, bG, activation)
    dy1, dy2 = torch.randn_like(y1), torch.randn_like(y2)

    def inverse(a, b):
        return coupling_inverse_reference(a, b, VF, WF, bF, VG, WG, bG, activation)

    _, (jx1, jx2) = torch.func.jvp(inverse, (y1, y2), (dy1, dy2))
    dx1, dx2 = ops.coupling_inverse_tangent(y1, x2, dy1, dy2, VF, WF, VG, WG, activation)
    assert rel_err(dx1, jx1) < 1e-12 and rel_err(dx2, jx2) < 1e-12
    # With the forward's features act' is read off them (or, for GELU, recomputed): the same tangent.
    _, _, hF, hG = ops.coupling_forward(x1, x2, VF, WF, bF, VG, WG, bG, activation, return_features=True)
    fx1, fx2 = ops.coupling_inverse_tangent(y1, x2, dy1, dy2, VF, WF, VG, WG, activation, hF=hF, hG=hG)
    assert rel_err(fx1, jx1) < 1e-12 and rel_err(fx2, jx2) < 1e-12


def test_tangent_features_must_match_the_block():
    x1, x2, VF, WF, bF, VG, WG, bG = make_block(6, 4, 9, torch.float64, "cpu")
    y1, y2, hF, hG = ops.coupling_forward(x1, x2, VF, WF, bF, VG, WG, bG, "relu", return_features=True)
    with pytest.raises(ValueError, match="hG has size 8 in dimension 1"):
        ops.coupling_inverse_tangent(y1, x2, y1, y2, VF, WF, VG, WG, "relu", hF=hF, hG=hG[:, :8])
    with pytest.raises(ValueError, match="hF has size 5 in dimension 0"):
        ops.coupling_inverse_tangent(y1, x2, y1, y2, VF, WF, VG, WG, "relu", hF=hF[:5], hG=hG)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("return_features", [False, True])
def test_gradcheck(return_features, activation, device):
    args = [t.requires_grad_() for t in make_block(3, 2, 5, torch.float64, device, seed=5)]

    def fn(*a):
        out = ops.coupling_forward(*a, activation, return_features=return_features)
        return tuple(t for t in out if t is not None)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTS)
def test_gradient_matches_reference_autograd(activation, device):
    # Every output, features included, enters the loss, so every path of the backward is exercised.
    base = make_block(17, 6, 23, torch.float64, device, seed=6)
    weights = [torch.randn(s, dtype=torch.float64, device=device) for s in [(17, 6), (17, 6), (17, 23), (17, 23)]]

    def grads(fn):
        args = [t.clone().requires_grad_() for t in base]
        out = fn(*args, activation, True)
        loss = sum((o * w).sum() for o, w in zip(out, weights))
        return torch.autograd.grad(loss, args)

    got = grads(lambda *a: ops.coupling_forward(*a[:-2], a[-2], return_features=a[-1]))
    want = grads(coupling_forward_reference)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12


@requires_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    args = make_block(5, 3, 7, torch.float64, device, seed=8)
    x1, x2, VF, WF, bF, VG, WG, bG = args
    for activation in ACTS:
        for feats in (False, True):
            grad_args = tuple(t.clone().requires_grad_() for t in args)
            torch.library.opcheck(torch.ops.revgn.coupling_forward, (*grad_args, activation, feats))
        torch.library.opcheck(torch.ops.revgn.coupling_inverse, (*args, activation))
        torch.library.opcheck(torch.ops.revgn.coupling_inverse_tangent,
                              (x1, x2, torch.randn_like(x1), torch.randn_like(x2), VF, WF, VG, WG, activation))


@requires_kernels
def test_compiled_forward_matches_eager():
    args = make_block(8, 4, 12, torch.float64, "cpu", seed=9)
    fn = torch.compile(lambda *a: torch.ops.revgn.coupling_forward(*a, "gelu", True), backend="aot_eager",
                       fullgraph=True)
    for g, w in zip(fn(*args), torch.ops.revgn.coupling_forward(*args, "gelu", True)):
        assert torch.equal(g, w)


def test_bad_inputs_name_the_argument():
    x1, x2, VF, WF, bF, VG, WG, bG = make_block(4, 3, 6, torch.float64, "cpu")
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.coupling_forward(x1, x2, VF, WF, bF, VG, WG, bG, "sigmoid")
    with pytest.raises(ValueError, match="WF has size 5 in dimension 1"):
        ops.coupling_forward(x1, x2, VF, WF[:, :5], bF, VG, WG, bG)
    with pytest.raises(ValueError, match="x2 has size 3 in dimension 0"):
        ops.coupling_forward(x1, x2[:3], VF, WF, bF, VG, WG, bG)
    with pytest.raises(ValueError, match="bG has size 2 in dimension 0"):
        ops.coupling_inverse(x1, x2, VF, WF, bF, VG, WG, bG[:2])
    with pytest.raises(ValueError, match="VG has dtype torch.float32"):
        ops.coupling_forward(x1, x2, VF, WF, bF, VG.float(), WG, bG)
    bad = x2.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="x2 contains NaN or Inf"):
        ops.coupling_forward(x1, bad, VF, WF, bF, VG, WG, bG)
    with pytest.raises(ValueError, match="dy1 must have 2 dimensions"):
        ops.coupling_inverse_tangent(x1, x2, x1[0], x2, VF, WF, VG, WG)


def test_finite_check_names_the_argument_and_accepts_huge_finite_values():
    # The check screens with one sum per tensor; a sum that overflows from finite entries must fall back
    # to the exact test and pass, and a non-finite entry anywhere must name its tensor.
    x1, x2, VF, WF, bF, VG, WG, bG = make_block(4, 3, 6, torch.float32, "cpu")
    huge = torch.full_like(x1, 3e38)
    assert not torch.isfinite(huge.sum())
    y1, y2, _, _ = ops.coupling_forward(huge, x2, VF, WF, bF, VG, WG, bG)
    assert y1.shape == x1.shape
    for name, position in (("WG", 6), ("bF", 4), ("x1", 0), ("VF", 2)):
        args = [x1, x2, VF, WF, bF, VG, WG, bG]
        bad = args[position].clone()
        bad.view(-1)[-1] = float("-inf")
        args[position] = bad
        with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
            ops.coupling_forward(*args)
    with pytest.raises(ValueError, match="dy2 contains NaN or Inf"):
        ops.coupling_inverse_tangent(x1, x2, x1, torch.full_like(x2, float("nan")), VF, WF, VG, WG)


@requires_kernels
def test_kernels_reject_bad_inputs_directly():
    x1, x2, VF, WF, bF, VG, WG, bG = make_block(4, 3, 6, torch.float64, "cpu")
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.revgn.coupling_forward(x1, x2, VF, WF, bF, VG, WG, bG, "swish", False)
    with pytest.raises(ValueError, match="WG has shape"):
        torch.ops.revgn.coupling_inverse(x1, x2, VF, WF, bF, VG, WG[:, :4], bG, "relu")
    with pytest.raises(ValueError, match="bF must be"):
        torch.ops.revgn.coupling_forward(x1, x2, VF, WF, bF[:2], VG, WG, bG, "relu", False)
    with pytest.raises(ValueError, match="dy2 must match"):
        torch.ops.revgn.coupling_inverse_tangent(x1, x2, x1, x2.float(), VF, WF, VG, WG, "relu")


@requires_cuda_kernels
@pytest.mark.parametrize("activation", ACTS)
def test_cuda_matches_cpu_kernel_at_benchmark_like_shape(activation):
    # Wide hidden layer, M not a multiple of the GEMM tiles, and a batch that is not a power of two.
    args = make_block(100, 40, 1001, torch.float64, "cpu", seed=11)
    cuda_args = [t.cuda() for t in args]
    poison("cuda")
    for g, w in zip(torch.ops.revgn.coupling_forward(*cuda_args, activation, True),
                    torch.ops.revgn.coupling_forward(*args, activation, True)):
        assert_close(g.cpu(), w, torch.float64)
    y1, y2 = torch.randn(100, 40, dtype=torch.float64), torch.randn(100, 40, dtype=torch.float64)
    x1, x2, VF, WF, bF, VG, WG, bG = args
    for g, w in zip(torch.ops.revgn.coupling_inverse(y1.cuda(), y2.cuda(), *cuda_args[2:], activation),
                    torch.ops.revgn.coupling_inverse(y1, y2, *args[2:], activation)):
        assert_close(g.cpu(), w, torch.float64)
    got = torch.ops.revgn.coupling_inverse_tangent(y1.cuda(), x2.cuda(), y2.cuda(), x1.cuda(), VF.cuda(), WF.cuda(),
                                                   VG.cuda(), WG.cuda(), activation)
    want = torch.ops.revgn.coupling_inverse_tangent(y1, x2, y2, x1, VF, WF, VG, WG, activation)
    for g, w in zip(got, want):
        assert_close(g.cpu(), w, torch.float64)
