"""Batched Gram-Cholesky solve: public op vs a dense float64 solve, kernels vs the reference,
factor/solve split, failure handling, opcheck, gradcheck and bad inputs."""
import pytest
import torch

from revgn_ext import ops
from revgn_ext.ops.gram import gram as gram_matrix_reference, gram_factor_reference, gram_factor_from_gram_reference, gram_solve_reference
from conftest import DEVICES, rel_err, requires_cuda_kernels, requires_kernels, tol

# (B, n, m, k): n = 1, m < n, k = 1, odd sizes
SHAPES = [(1, 1, 1, 1), (3, 1, 5, 2), (2, 5, 3, 1), (4, 7, 13, 3), (2, 16, 40, 1), (3, 33, 70, 5), (1, 64, 64, 2)]


def dense_solution(A, R, lam, append_ones):
    """A1^T (A1 A1^T + lambda I)^{-1} R in float64, A1 = [A, 1] with append_ones."""
    A, R, lam = A.double().cpu(), R.double().cpu(), lam.double().cpu()
    if append_ones:
        A = torch.cat([A, torch.ones(*A.shape[:2], 1, dtype=A.dtype)], dim=-1)
    G = A @ A.mT + lam.reshape(-1, 1, 1) * torch.eye(A.shape[1], dtype=A.dtype)
    return A.mT @ torch.linalg.solve(G, R)


def random_problem(B, n, m, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, n, m, generator=g, dtype=torch.float64) / m ** 0.5
    R = torch.randn(B, n, k, generator=g, dtype=torch.float64)
    lam = 0.05 + torch.rand(B, generator=g, dtype=torch.float64)
    return A.to(dtype=dtype, device=device), R.to(dtype=dtype, device=device), lam.to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("append_ones", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_dense_solve(shape, append_ones, dtype, device):
    A, R, lam = random_problem(*shape, dtype, device)
    out, info = ops.gram_cholesky_solve(A, R, lam, append_ones=append_ones, return_info=True)
    B, n, m, k = shape
    assert out.shape == (B, m + append_ones, k) and out.dtype == dtype and out.device.type == device
    assert rel_err(out, dense_solution(A, R, lam, append_ones)) < tol(dtype)
    assert info.dtype == torch.int32 and bool((info == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factor_once_solve_many(dtype, device):
    A, R, lam = random_problem(3, 9, 20, 2, dtype, device)
    factor = ops.gram_factor(A, lam, append_ones=True)
    for seed in range(3):
        R2 = torch.randn(3, 9, 1 + seed, dtype=dtype, device=device)
        got = ops.gram_solve(factor, R2)
        assert rel_err(got, dense_solution(A, R2, lam, True)) < tol(dtype)
    L = factor.L.double()
    G = dense_solution  # noqa: F841  (the factor itself is checked below)
    A1 = torch.cat([A.double(), torch.ones(3, 9, 1, dtype=torch.float64, device=device)], -1)
    G = A1 @ A1.mT + lam.double().reshape(-1, 1, 1) * torch.eye(9, dtype=torch.float64, device=device)
    assert rel_err(L @ L.mT, G) < tol(dtype)
    assert bool((factor.L.triu(1) == 0).all())


def test_scalar_and_tensor_damping_agree():
    A, R, _ = random_problem(2, 4, 6, 2, torch.float64, "cpu")
    a = ops.gram_cholesky_solve(A, R, 0.3)
    b = ops.gram_cholesky_solve(A, R, torch.full((2,), 0.3, dtype=torch.float64))
    c = ops.gram_cholesky_solve(A, R, torch.tensor(0.3, dtype=torch.float64))
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_gram_is_retried_with_jitter(dtype, device):
    # Duplicated samples make A A^T singular; with damping 0 the first Cholesky must fail.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 4, 12, generator=g, dtype=torch.float64)
    A = torch.cat([base, base[:, :2]], dim=1).to(dtype=dtype, device=device)  # rows 4, 5 repeat 0, 1
    A[1] = 0  # an all-zero Gram as well
    R = (A.double() @ torch.randn(2, 12, 2, generator=g, dtype=torch.float64).to(device)).to(dtype)
    out, info = ops.gram_cholesky_solve(A, R, 0.0, return_info=True)
    factor = ops.gram_factor(A, 0.0)
    assert bool(torch.isfinite(out).all())
    assert bool((info > 0).all()), info
    assert torch.equal(factor.info, info) and bool((factor.jitter > 0).all())
    # R lies in the range of A, so the jittered solve is (nearly) the least-norm exact solution.
    assert rel_err(A[0] @ out[0], R[0]) < (1e-6 if dtype == torch.float64 else 1e-3)
    assert rel_err(out[0], torch.linalg.pinv(A[0].double()) @ R[0].double()) < (1e-5 if dtype == torch.float64 else 1e-2)
    assert float(out[1].abs().max()) == 0.0


@requires_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_never_returns_nan_for_non_finite_input(device):
    # The wrapper rejects NaN; called directly, the kernel still returns a finite factor and info = -1.
    A = torch.randn(2, 3, 4, device=device)
    A[1, 0, 0] = float("nan")
    L, info, jitter = torch.ops.revgn.gram_factor(A, torch.zeros(2, device=device), False)
    assert info.tolist() == [0, -1]
    assert bool(torch.isfinite(L).all()) and bool(torch.isfinite(jitter).all())


@requires_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("append_ones", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(shape, append_ones, dtype, device):
    A, R, lam = random_problem(*shape, dtype, device, seed=3)
    L, info, jitter = torch.ops.revgn.gram_factor(A, lam, append_ones)
    Lr, info_r, jitter_r = gram_factor_reference(A, lam, append_ones)
    assert rel_err(L, Lr) < tol(dtype)
    assert torch.equal(info.cpu(), info_r.cpu()) and torch.equal(jitter.cpu(), jitter_r.cpu())
    out = torch.ops.revgn.gram_solve(A, L, R, append_ones)
    assert rel_err(out, gram_solve_reference(A, Lr, R, append_ones)) < tol(dtype)
    fused, _, _ = torch.ops.revgn.gram_cholesky_solve(A, R, lam, append_ones)
    assert rel_err(fused, out) < tol(dtype)


@requires_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_accepts_non_contiguous_inputs(device):
    A_t, R, lam = random_problem(2, 12, 6, 3, torch.float64, device)
    A = torch.randn(2, 6, 12, dtype=torch.float64, device=device).mT  # (2, 12, 6), not contiguous
    R = torch.randn(2, 3, 12, dtype=torch.float64, device=device).mT
    assert not A.is_contiguous() and not R.is_contiguous()
    out, _, _ = torch.ops.revgn.gram_cholesky_solve(A, R, lam, True)
    assert rel_err(out, dense_solution(A, R, lam, True)) < 1e-10


@requires_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    A, R, lam = random_problem(3, 5, 8, 2, torch.float64, device)
    for append_ones in (False, True):
        torch.library.opcheck(torch.ops.revgn.gram_factor, (A, lam, append_ones))
        L, _, _ = torch.ops.revgn.gram_factor(A, lam, append_ones)
        torch.library.opcheck(torch.ops.revgn.gram_solve, (A, L, R, append_ones))
        args = (A.clone().requires_grad_(), R.clone().requires_grad_(), lam.clone().requires_grad_(), append_ones)
        torch.library.opcheck(torch.ops.revgn.gram_cholesky_solve, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("append_ones", [False, True])
def test_gradcheck(append_ones, device):
    A, R, lam = random_problem(2, 3, 5, 2, torch.float64, device, seed=7)
    A, R, lam = A.requires_grad_(), R.requires_grad_(), lam.requires_grad_()

    def fn(A, R, lam):
        return ops.gram_cholesky_solve(A, R, lam, append_ones=append_ones)

    assert torch.autograd.gradcheck(fn, (A, R, lam))


def test_bad_inputs_name_the_argument():
    A, R, lam = random_problem(2, 3, 5, 2, torch.float64, "cpu")
    bad_A = A.clone()
    bad_A[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="A contains NaN or Inf"):
        ops.gram_cholesky_solve(bad_A, R, 0.1)
    bad_R = R.clone()
    bad_R[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="R contains NaN or Inf"):
        ops.gram_cholesky_solve(A, bad_R, 0.1)
    with pytest.raises(ValueError, match="R has size 4 in dimension 1"):
        ops.gram_cholesky_solve(A, torch.randn(2, 4, 2, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="R has size 3 in dimension 0"):
        ops.gram_cholesky_solve(A, torch.randn(3, 3, 2, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="A must have 3 dimensions"):
        ops.gram_cholesky_solve(A[0], R, 0.1)
    with pytest.raises(ValueError, match="R is on meta but A is on cpu"):
        ops.gram_cholesky_solve(A, R.to("meta"), 0.1)
    with pytest.raises(ValueError, match="R has dtype torch.float32"):
        ops.gram_cholesky_solve(A, R.float(), 0.1)
    with pytest.raises(ValueError, match="A must be float32 or float64"):
        ops.gram_cholesky_solve(A.to(torch.int64), R, 0.1)
    with pytest.raises(ValueError, match=r"damping must be a float or a tensor of shape \(2,\)"):
        ops.gram_cholesky_solve(A, R, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="damping must be >= 0"):
        ops.gram_cholesky_solve(A, R, -1.0)
    with pytest.raises(ValueError, match="damping must be finite"):
        ops.gram_cholesky_solve(A, R, float("nan"))
    with pytest.raises(ValueError, match="factor must be the GramFactor"):
        ops.gram_solve((A, A), R)


@requires_cuda_kernels
def test_cuda_factor_reports_info_without_sync():
    # A rank-deficient batch on the GPU: the info tensor stays on the device and is correct.
    A = torch.randn(4, 8, 3, device="cuda", dtype=torch.float64)
    factor = ops.gram_factor(A, 0.0, check_finite=False)
    assert factor.info.device.type == "cuda"
    assert bool((factor.info.cpu() > 0).all())
    assert bool(torch.isfinite(factor.L).all())


@requires_cuda_kernels
@pytest.mark.parametrize("n", [1, 31, 64, 200])
def test_cuda_matches_cpu_kernel(n):
    A, R, lam = random_problem(3, n, 2 * n + 3, 2, torch.float64, "cpu", seed=n)
    cpu, _, _ = torch.ops.revgn.gram_cholesky_solve(A, R, lam, True)
    gpu, _, _ = torch.ops.revgn.gram_cholesky_solve(A.cuda(), R.cuda(), lam.cuda(), True)
    assert rel_err(gpu, cpu) < 1e-10


# ---- CUDA paths: fused shared-memory kernel (small n) and cuSOLVER + verify/retry (large n) ------------
# Sizes straddle the fused path's limit (n = 128, the measured crossover; shared memory would allow 224
# in float32 and 144 in float64), its register-row steps (n = 32, 64) and its column chunk (k = 32),
# and (forced through REVGN_GRAM_FUSED_MAX_N) its shared-memory caps; the last shape has
# more (matrix, chunk) blocks than SMs, which takes the factor-then-solve launch pair.
THRESHOLD_SHAPES = [(2, 32, 70, 32), (2, 33, 70, 33), (3, 64, 130, 1), (2, 65, 140, 64), (2, 128, 260, 31),
                    (2, 129, 260, 3), (2, 144, 300, 5), (2, 145, 300, 2), (1, 192, 400, 2), (1, 193, 400, 2),
                    (1, 256, 520, 1), (5, 40, 60, 960)]


def poison_cuda():
    """Fill freed CUDA allocator memory with NaN, so an output element the kernel never writes shows up."""
    big = torch.full((1 << 24,), float("nan"), device="cuda")
    del big


@requires_cuda_kernels
@pytest.mark.parametrize("fused_up_to_cap", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("append_ones", [False, True])
@pytest.mark.parametrize("shape", THRESHOLD_SHAPES)
def test_cuda_paths_across_threshold(shape, append_ones, dtype, fused_up_to_cap, monkeypatch):
    if fused_up_to_cap:
        monkeypatch.setenv("REVGN_GRAM_FUSED_MAX_N", "1024")
    A, R, lam = random_problem(*shape, dtype, "cuda", seed=sum(shape))
    want = dense_solution(A, R, lam, append_ones)
    poison_cuda()
    out, info, jitter = torch.ops.revgn.gram_cholesky_solve(A, R, lam, append_ones)
    assert bool(torch.isfinite(out).all()) and rel_err(out, want) < tol(dtype)
    assert info.tolist() == [0] * shape[0] and jitter.tolist() == [0.0] * shape[0]
    poison_cuda()
    L, info_f, _ = torch.ops.revgn.gram_factor(A, lam, append_ones)
    Lr, _, _ = gram_factor_reference(A, lam, append_ones)
    assert bool(torch.isfinite(L).all()) and rel_err(L, Lr) < tol(dtype) and torch.equal(info_f, info)
    assert bool((L.triu(1) == 0).all())
    poison_cuda()
    solved = torch.ops.revgn.gram_solve(A, L, R, append_ones)
    assert bool(torch.isfinite(solved).all()) and rel_err(solved, want) < tol(dtype)


@requires_cuda_kernels
@pytest.mark.parametrize("n", [20, 150])
def test_cuda_fused_and_library_paths_agree(n, monkeypatch):
    A, R, lam = random_problem(3, n, n + 30, 40, torch.float64, "cuda", seed=n)
    fused = torch.ops.revgn.gram_cholesky_solve(A, R, lam, True)
    monkeypatch.setenv("REVGN_GRAM_FUSED_MAX_N", "0")
    library = torch.ops.revgn.gram_cholesky_solve(A, R, lam, True)
    assert rel_err(fused[0], library[0]) < 1e-10
    assert torch.equal(fused[1], library[1]) and torch.equal(fused[2], library[2])


@requires_cuda_kernels
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_jitter_semantics_match_reference(dtype, fused, monkeypatch):
    # Duplicated rows and an all-zero Gram, with damping 0: the same retries and jitter as the reference.
    if not fused:
        monkeypatch.setenv("REVGN_GRAM_FUSED_MAX_N", "0")
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 24, 30, generator=g, dtype=torch.float64)
    A = torch.cat([base, base[:, :6]], dim=1).to(dtype=dtype, device="cuda")
    A[2] = 0
    R = torch.randn(3, 30, 4, generator=g, dtype=torch.float64).to(dtype=dtype, device="cuda")
    lam = torch.zeros(3, dtype=dtype, device="cuda")
    for append_ones in (False, True):
        L, info, jitter = torch.ops.revgn.gram_factor(A, lam, append_ones)
        Lr, info_r, jitter_r = gram_factor_reference(A, lam, append_ones)
        assert torch.equal(info.cpu(), info_r.cpu()) and bool((info > 0).all()), (info, info_r)
        assert torch.allclose(jitter, jitter_r, rtol=1e-5, atol=0)
        assert rel_err(L, Lr) < (1e-6 if dtype == torch.float64 else 1e-2)
        out, info_s, _ = torch.ops.revgn.gram_cholesky_solve(A, R, lam, append_ones)
        assert torch.equal(info_s, info) and bool(torch.isfinite(out).all())


@requires_cuda_kernels
def test_cuda_library_path_never_returns_nan_for_non_finite_input(monkeypatch):
    monkeypatch.setenv("REVGN_GRAM_FUSED_MAX_N", "0")
    A = torch.randn(2, 3, 4, device="cuda")
    A[1, 0, 0] = float("nan")
    L, info, jitter = torch.ops.revgn.gram_factor(A, torch.zeros(2, device="cuda"), False)
    assert info.tolist() == [0, -1]
    assert bool(torch.isfinite(L).all()) and bool(torch.isfinite(jitter).all())


@requires_cuda_kernels
@pytest.mark.parametrize("n", [40, 170])
def test_cuda_non_contiguous_inputs_both_paths(n):
    A = torch.randn(2, n + 20, n, dtype=torch.float64, device="cuda").mT  # (2, n, n + 20), column-major
    R = torch.randn(2, 37, n, dtype=torch.float64, device="cuda").mT     # (2, n, 37), column stride n
    lam = torch.full((2,), 0.3, dtype=torch.float64, device="cuda")
    assert not A.is_contiguous() and not R.is_contiguous()
    out, _, _ = torch.ops.revgn.gram_cholesky_solve(A, R, lam, True)
    assert rel_err(out, dense_solution(A, R, lam, True)) < 1e-10
    L, _, _ = torch.ops.revgn.gram_factor(A, lam, True)
    assert rel_err(torch.ops.revgn.gram_solve(A, L.mT.contiguous().mT, R, True),
                   dense_solution(A, R, lam, True)) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factor_from_gram_matches_factor_from_A(dtype, device):
    A, _, lam = random_problem(3, 9, 20, 1, dtype, device, seed=11)
    G = gram_matrix_reference(A, append_ones=True)
    from_G = ops.gram_factor_from_gram(G, lam)
    from_A = ops.gram_factor(A, lam, append_ones=True)
    assert rel_err(from_G.L, from_A.L) < tol(dtype)
    assert torch.equal(from_G.info, from_A.info) and bool((from_G.info == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_factor_from_gram_retries_a_singular_gram(device):
    M = torch.ones(1, 3, 3, dtype=torch.float64, device=device)   # rank one
    f = ops.gram_factor_from_gram(M, 0.0)
    assert int(f.info[0]) > 0 and float(f.jitter[0]) > 0
    eye = torch.eye(3, dtype=torch.float64, device=device)
    assert rel_err(f.L[0] @ f.L[0].mT, M[0] + f.jitter[0] * eye) < 1e-12
    ref = gram_factor_from_gram_reference(M, torch.zeros(1, dtype=torch.float64, device=device))
    assert torch.equal(f.info.cpu(), ref[1].cpu()) and torch.equal(f.jitter.cpu(), ref[2].cpu())


@requires_kernels
def test_factor_from_gram_kernel_opcheck_and_non_finite():
    A, _, lam = random_problem(2, 5, 8, 1, torch.float64, "cpu")
    G = gram_matrix_reference(A)
    torch.library.opcheck(torch.ops.revgn.gram_factor_from_gram, (G, lam))
    bad = G.clone()
    bad[1, 0, 0] = float("nan")
    L, info, jitter = torch.ops.revgn.gram_factor_from_gram(bad, lam)
    assert info.tolist() == [0, -1] and bool(torch.isfinite(L).all()) and bool(torch.isfinite(jitter).all())


def test_factor_from_gram_bad_inputs():
    with pytest.raises(ValueError, match=r"G must be a non-empty batch of square matrices"):
        ops.gram_factor_from_gram(torch.ones(1, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="G must have 3 dimensions"):
        ops.gram_factor_from_gram(torch.ones(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="G contains NaN or Inf"):
        ops.gram_factor_from_gram(torch.full((1, 2, 2), float("inf"), dtype=torch.float64))


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("append_ones", [False, True])
@pytest.mark.parametrize("shape", [(2, 192, 400, 2), (1, 257, 600, 1)])
def test_cpu_blocked_gram_matches_reference(shape, append_ones, dtype):
    # From 192 rows the CPU kernel forms only the lower block triangle of A A^T (uneven blocks at 257).
    A, R, lam = random_problem(*shape, dtype, "cpu", seed=5)
    L, info, _ = torch.ops.revgn.gram_factor(A, lam, append_ones)
    Lr, info_r, _ = gram_factor_reference(A, lam, append_ones)
    assert torch.equal(info, info_r)
    assert rel_err(L @ L.mT, Lr @ Lr.mT) < tol(dtype)
    out, _, _ = torch.ops.revgn.gram_cholesky_solve(A, R, lam, append_ones)
    assert rel_err(out, dense_solution(A, R, lam, append_ones)) < (1e-9 if dtype == torch.float64 else 1e-3)


def _non_finite_grams(dtype, device, seed=0):
    """Symmetric and one-sided +-Inf / NaN entries, on and off the diagonal, next to a clean Gram."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for value in (float("inf"), float("-inf"), float("nan")):
        for n in (1, 2, 5):
            for i, j, both in ((0, 0, True), (n - 1, 0, True), (n - 1, 0, False), (0, n - 1, False)):
                A = torch.randn(2, n, n + 2, generator=g, dtype=torch.float64)
                G = A @ A.mT
                G[1, i, j] = value
                if both:
                    G[1, j, i] = value
                cases.append(G.to(dtype=dtype, device=device))
    return cases


@requires_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_edge_non_finite_gram_same_info_on_every_backend(dtype, device, monkeypatch):
    # A Gram with +-Inf or NaN anywhere fails outright on every backend: info -1, the finite diagonal
    # stand-in factor, the same jitter; +Inf on the diagonal used to report info 0 with an Inf factor,
    # and an entry in one triangle only gave answers that depended on the triangle a backend reads.
    paths = ["fused", "library"] if device == "cuda" else ["cpu"]
    for path in paths:
        if path == "library":
            monkeypatch.setenv("REVGN_GRAM_FUSED_MAX_N", "0")
        for G in _non_finite_grams(dtype, device):
            for lam in (0.0, 1e-3):
                damping = torch.full((2,), lam, dtype=dtype, device=device)
                L, info, jitter = torch.ops.revgn.gram_factor_from_gram(G, damping)
                Lr, info_r, jitter_r = gram_factor_from_gram_reference(G, damping)
                assert info.tolist() == info_r.tolist() == [0, -1], (path, G[1], info, info_r)
                assert bool(torch.isfinite(L).all()) and bool(torch.isfinite(Lr).all())
                assert torch.equal(L[1].cpu(), Lr[1].cpu()) and torch.equal(jitter.cpu(), jitter_r.cpu())
        # A non-finite damping, and a non-finite A through gram_factor, report the same too.
        A = torch.randn(2, 3, 4, dtype=dtype, device=device)
        for value in (float("inf"), float("-inf"), float("nan")):
            damping = torch.tensor([0.0, value], dtype=dtype, device=device)
            L, info, _ = torch.ops.revgn.gram_factor(A, damping, True)
            _, info_r, _ = gram_factor_reference(A, damping, True)
            assert info.tolist() == info_r.tolist() == [0, -1] and bool(torch.isfinite(L).all())


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_kernel_edge_reference_never_reports_a_clean_non_finite_factor(value):
    G = torch.eye(3, dtype=torch.float64)[None].repeat(2, 1, 1)
    G[1, 1, 1] = value
    L, info, jitter = gram_factor_from_gram_reference(G, torch.zeros(2, dtype=torch.float64))
    assert info.tolist() == [0, -1] and bool(torch.isfinite(L).all()) and bool(torch.isfinite(jitter).all())
