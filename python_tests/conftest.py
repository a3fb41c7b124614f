"""Shared test configuration: backend report, kernel/CUDA markers and dtype-aware tolerances."""
import os
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    from revgn_ext import ops

HAS_KERNELS = ops.build_info()["load_path"] != "reference"
HAS_CUDA = torch.cuda.is_available()
HAS_CUDA_KERNELS = HAS_KERNELS and HAS_CUDA and ops.build_info()["cuda_kernels"]

requires_kernels = pytest.mark.skipif(not HAS_KERNELS, reason="compiled revgn ops not loaded (reference backend)")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")
requires_cuda_kernels = pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="no CUDA GPU or no CUDA kernels built")

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_report_header(config):
    info = ops.build_info()
    return (f"revgn_ext: backend={ops.backend()} load_path={info['load_path']} "
            f"cuda_kernels={info['cuda_kernels']} cuda_available={HAS_CUDA} torch={torch.__version__}")


def pytest_sessionstart(session):
    # CI sets this so that a broken build fails the run instead of skipping every kernel test.
    if os.environ.get("REVGN_REQUIRE_EXT") == "1" and not HAS_KERNELS:
        raise pytest.UsageError("REVGN_REQUIRE_EXT=1 but the compiled revgn ops did not load: "
                                + str(ops.build_info()["error"]))


def tol(dtype: torch.dtype) -> float:
    """Relative tolerance for well-conditioned problems in this dtype."""
    return 1e-10 if dtype == torch.float64 else 2e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
