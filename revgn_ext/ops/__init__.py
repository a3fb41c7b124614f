"""Public ops: the ``revgn`` custom ops with validated wrappers, one module per op family.

* :mod:`.gram`: the batched Gram-Cholesky solve (:func:`gram_factor`, :func:`gram_solve`,
  :func:`gram_cholesky_solve`, :func:`gram_factor_from_gram`);
* :mod:`.coupling`: the reversible coupling block (:func:`coupling_forward`, :func:`coupling_inverse`,
  :func:`coupling_inverse_tangent`);
* :mod:`.activations`: the activation registry the coupling block and csrc/activations.h share.

The compiled library registers each op once in ``TORCH_LIBRARY(revgn, ...)`` with CPU and CUDA
kernels under their dispatch keys; the dispatcher picks the kernel from the tensors' device. Where no
kernel exists (no extension, or a CPU-only build given CUDA tensors) the op family's pure-PyTorch
reference runs instead.
"""
from __future__ import annotations

import torch

from . import _loader, activations, coupling, gram
from .coupling import coupling_forward, coupling_inverse, coupling_inverse_tangent
from .gram import (CholeskyFactor, GramFactor, gram_cholesky_solve, gram_factor, gram_factor_from_gram,
                   gram_solve)

__all__ = ["backend", "build_info", "gram_cholesky_solve", "gram_factor", "gram_factor_from_gram", "gram_solve",
           "GramFactor", "CholeskyFactor",
           "coupling_forward", "coupling_inverse", "coupling_inverse_tangent", "activations", "coupling", "gram"]


def backend() -> str:
    """Which kernels are in use: "cuda" (CUDA kernels built and a GPU present), "cpp" or "reference"."""
    if _loader.load() == "reference":
        return "reference"
    if _loader.has_kernel("gram_factor", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpp"


def build_info() -> dict:
    """How the kernels were obtained: load path ("compiled", "jit", "reference"), library file, errors."""
    return _loader.info()
