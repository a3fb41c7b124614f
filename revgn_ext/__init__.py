"""revgn_ext: exact Gauss-Newton optimisation for PyTorch.

* :class:`RevMLP` and :class:`RevGN` (:mod:`revgn_ext.revgn`): exact, tractable GN for reversible MLPs
  (arXiv 2411.07979).
* :class:`EGN` (:mod:`revgn_ext.egn`): exact Gauss-Newton / Levenberg-Marquardt for any ``nn.Module``
  (arXiv 2405.14402).
* :mod:`revgn_ext.ops`: the fused kernels (batched Gram-Cholesky solve, coupling layer), each op family
  with its pure-PyTorch reference beside it (``*_reference`` in :mod:`revgn_ext.ops.gram` and
  :mod:`revgn_ext.ops.coupling`).
* :mod:`revgn_ext.distributed`: the data-parallel seam.

Importing the package needs torch and numpy only. The paper reproductions live in
:mod:`revgn_ext.experiments` (the ``[experiments]`` extra); they import this core, never the reverse,
and importing the core loads none of them (docs/architecture.md).
"""
from . import ops
from . import distributed
from .egn import EGN
from .egn.gram import UnsupportedModelError
from .revgn import RevGN, RevMLP

__version__ = "0.1.0"

__all__ = ["ops", "__version__", "EGN", "RevMLP", "RevGN", "UnsupportedModelError", "distributed"]
