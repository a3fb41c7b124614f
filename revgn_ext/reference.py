"""Pure-PyTorch references for every op in :mod:`revgn_ext.ops`, under the ops' own names.

Each op family keeps its reference beside its kernels' wrappers (:mod:`revgn_ext.ops.gram`,
:mod:`revgn_ext.ops.coupling`, :mod:`revgn_ext.ops.activations`); this module gathers them for tests,
benchmarks and users who compare against the specification. Nothing in the package's fast paths
imports it.
"""
from .ops.activations import ACTIVATIONS, activation, activation_grad, activation_grad_times
from .ops.coupling import coupling_forward_reference as coupling_forward
from .ops.coupling import coupling_inverse_reference as coupling_inverse
from .ops.coupling import coupling_inverse_tangent_reference as coupling_inverse_tangent
from .ops.coupling import coupling_vjp
from .ops.gram import JITTER_GROWTH, JITTER_START, PIVOT_FLOOR, gram, jitter_schedule
from .ops.gram import gram_cholesky_solve_reference as gram_cholesky_solve
from .ops.gram import gram_factor_from_gram_reference as gram_factor_from_gram
from .ops.gram import gram_factor_reference as gram_factor
from .ops.gram import gram_solve_reference as gram_solve

__all__ = ["ACTIVATIONS", "activation", "activation_grad", "activation_grad_times", "coupling_forward",
           "coupling_inverse", "coupling_inverse_tangent", "coupling_vjp", "JITTER_GROWTH", "JITTER_START",
           "PIVOT_FLOOR", "gram", "jitter_schedule", "gram_cholesky_solve", "gram_factor_from_gram",
           "gram_factor", "gram_solve"]
