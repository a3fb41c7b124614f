"""pytest-benchmark: batched Gram-Cholesky solve, compiled kernel vs the pure-PyTorch reference.

    python -P -m pytest benchmarks/bench_gram.py --benchmark-json=gram.json
    python benchmarks/summarize.py gram.json benchmarks/results/gram_cpu.md

Runs on the GPU too when one is present (REVGN_BENCH_DEVICE=cuda). Nothing here asserts a time.
"""
import os

import pytest
import torch

from revgn_ext import ops
from revgn_ext.ops.gram import gram_cholesky_solve_reference

DEVICE = os.environ.get("REVGN_BENCH_DEVICE", "cpu")
DTYPE = torch.float32
CONFIGS = [(B, n, m) for B in (4, 12) for n in (64, 256, 1024) for m in (1024, 8000)]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def problem(B, n, m):
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(B, n, m, generator=g) / m ** 0.5).to(DEVICE, DTYPE)
    R = torch.randn(B, n, 10, generator=g).to(DEVICE, DTYPE)
    lam = torch.full((B,), 1e-3, dtype=DTYPE, device=DEVICE)
    return A, R, lam


def run_kernel(A, R, lam):
    out = torch.ops.revgn.gram_cholesky_solve(A, R, lam, True)[0]
    _sync()
    return out


def run_reference(A, R, lam):
    out = gram_cholesky_solve_reference(A, R, lam, True)[0]
    _sync()
    return out


@pytest.mark.skipif(ops.build_info()["load_path"] == "reference", reason="compiled ops not loaded")
@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("B,n,m", CONFIGS, ids=[f"B{B}-n{n}-m{m}" for B, n, m in CONFIGS])
def test_gram_cholesky_solve(benchmark, impl, B, n, m):
    A, R, lam = problem(B, n, m)
    fn = run_kernel if impl == "kernel" else run_reference
    fn(A, R, lam)  # warm-up
    benchmark.group = f"B={B} n={n} m={m}"
    benchmark.extra_info.update(impl=impl, B=B, n=n, m=m, device=DEVICE)
    rounds = 3 if B * n * n * m > 2e9 else 10
    benchmark.pedantic(fn, args=(A, R, lam), rounds=rounds, iterations=1, warmup_rounds=1)
