"""revgn_ext: exact Gauss-Newton optimisation for PyTorch.

* :class:`RevMLP` and :class:`RevGN`: exact, tractable GN for reversible MLPs (arXiv 2411.07979).
* :class:`EGN`: exact Gauss-Newton / Levenberg-Marquardt for any ``nn.Module`` (arXiv 2405.14402).
* :mod:`revgn_ext.ops`: the fused kernels (batched Gram-Cholesky solve, coupling layer), with
  pure-PyTorch references in :mod:`revgn_ext.reference`.
"""
from . import ops, reference
from . import data, diagnostics
from . import distributed
from .egn import EGN
from .model import RevMLP
from .revgn import RevGN

__version__ = "0.1.0"

__all__ = ["ops", "reference", "__version__", "EGN", "RevMLP", "RevGN", "data", "diagnostics", "distributed"]
