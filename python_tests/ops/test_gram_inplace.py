"""The in-place factorisation of a ready-made Gram (``ops.gram.gram_factor_from_gram_``): the same factor,
retries and failures as the out-of-place op and a dense float64 solve, written into G itself (its strict
upper triangle kept), with no n x n temporary; on the active backend (kernel or reference) and, where the
kernel is loaded, the kernel against the reference."""
import pytest
import torch

from revgn_ext.ops import gram as og
from conftest import DEVICES, rel_err, requires_kernels, tol

# n below, at and across the block width (one, two and three blocks)
SIZES = [1, 7, og.IN_PLACE_BLOCK, og.IN_PLACE_BLOCK + 5, 2 * og.IN_PLACE_BLOCK + 77]


def psd(B, n, rank, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, n, rank, generator=g, dtype=torch.float64) / rank ** 0.5
    return (A @ A.mT).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_matches_out_of_place_and_dense_solve(n, dtype, device):
    G = psd(2, n, n + 3, dtype, device, seed=n)
    lam = torch.tensor([0.3, 1e-3], dtype=dtype, device=device)
    ref_L, ref_info, ref_jitter = og.gram_factor_from_gram_reference(G, lam)
    work = G.clone()
    out = og.gram_factor_from_gram_(work, lam)
    assert out.L is work and out.L.data_ptr() == work.data_ptr()       # written into G, no new storage
    L = work.tril()
    assert rel_err(L, ref_L) < tol(dtype)
    assert torch.equal(work.triu(1), G.triu(1))                        # the strict upper triangle is G's
    assert torch.equal(out.info.cpu(), ref_info.cpu()) and bool((out.info == 0).all())
    assert torch.equal(out.jitter.cpu(), ref_jitter.cpu())
    # the solve that reads the lower triangle only, against a dense float64 solve of G + lambda I
    R = torch.randn(2, n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype=dtype,
                                                                                                   device=device)
    u = og.cholesky_solve_lower(R, work)
    dense = torch.linalg.solve(G.double().cpu() + lam.double().cpu().reshape(2, 1, 1) * torch.eye(n, dtype=torch.float64),
                               R.double().cpu())
    assert rel_err(u, dense) < (1e-9 if dtype == torch.float64 else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [5, og.IN_PLACE_BLOCK + 40])
def test_singular_gram_is_retried_from_the_kept_triangle(n, device):
    # rank 2 with no damping: the first factorisation fails (in the first or a later block) and the
    # retries rebuild G from its strict upper triangle and the kept diagonal
    G = psd(1, n, 2, torch.float64, device, seed=3)
    zero = torch.zeros(1, dtype=torch.float64, device=device)
    ref_L, ref_info, ref_jitter = og.gram_factor_from_gram_reference(G, zero)
    work = G.clone()
    out = og.gram_factor_from_gram_(work, 0.0)
    assert int(out.info[0]) > 0 and int(out.info[0]) == int(ref_info[0])
    assert torch.equal(out.jitter.cpu(), ref_jitter.cpu())
    eye = torch.eye(n, dtype=torch.float64, device=device)
    L = work[0].tril()
    assert rel_err(L @ L.mT, G[0] + out.jitter[0] * eye) < 1e-12
    assert torch.equal(work.triu(1), G.triu(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["upper", "lower", "diagonal"])
def test_non_finite_entry_anywhere_fails_outright(where, device):
    n = og.IN_PLACE_BLOCK + 9
    G = psd(2, n, n, torch.float64, device, seed=5)
    i, j = {"upper": (3, n - 2), "lower": (n - 2, 3), "diagonal": (n - 1, n - 1)}[where]
    G[1, i, j] = float("inf")
    lam = torch.full((2,), 0.5, dtype=torch.float64, device=device)
    _, ref_info, _ = og.gram_factor_from_gram_reference(G, lam)
    work = G.clone()
    out = og.gram_factor_from_gram_(work, lam, check_finite=False)
    assert out.info.tolist() == ref_info.tolist() == [0, -1]
    assert bool(torch.isfinite(work[1].tril()).all()) and bool(torch.isfinite(out.jitter).all())
    assert torch.equal(work[1].tril(-1), torch.zeros_like(work[1].tril(-1)))   # the diagonal stand-in
    assert torch.equal(work[1].triu(1), G[1].triu(1))


def test_no_n_by_n_temporary():
    # The allocator's events during the factorisation (C++ kernel or reference alike): no single
    # allocation reaches half of G's bytes (the panels are n x IN_PLACE_BLOCK at most).
    n = 6 * og.IN_PLACE_BLOCK
    G = psd(1, n, 8, torch.float32, "cpu", seed=7)   # rank 8, no damping: the retry path is covered too
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = og.gram_factor_from_gram_inplace_unchecked(G, torch.zeros(1))
    assert int(out.info[0]) > 0
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert sizes, "the profiler recorded no allocation"
    assert max(sizes) < G.numel() * G.element_size() // 2


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="G must be contiguous"):
        og.gram_factor_from_gram_(torch.eye(4, dtype=torch.float64)[None].mT.expand(2, 4, 4), 0.1)
    with pytest.raises(ValueError, match="G must be symmetric"):
        og.gram_factor_from_gram_(torch.tensor([[[1.0, 2.0], [0.0, 1.0]]]), 0.1)
    with pytest.raises(ValueError, match="float32 or float64"):
        og.gram_factor_from_gram_(torch.eye(2, dtype=torch.float16)[None].clone(), 0.1)


@requires_kernels
@pytest.mark.parametrize("n", [9, og.IN_PLACE_BLOCK + 31])
def test_kernel_matches_reference_and_opcheck(n):
    G = psd(2, n, n // 2 + 1, torch.float64, "cpu", seed=n)   # rank-deficient: retries on both
    lam = torch.tensor([0.0, 0.7], dtype=torch.float64)
    a, b = G.clone(), G.clone()
    info_k, jitter_k = torch.ops.revgn.gram_factor_from_gram_inplace(a, lam)
    info_r, jitter_r = og.gram_factor_from_gram_inplace_reference(b, lam)
    assert info_k.tolist() == info_r.tolist() and int(info_k[0]) > 0
    assert rel_err(a.tril(), b.tril()) < 1e-10 and torch.equal(a.triu(1), G.triu(1))
    assert rel_err(jitter_k, jitter_r) < 1e-12
    torch.library.opcheck(torch.ops.revgn.gram_factor_from_gram_inplace, (G.clone(), lam))
