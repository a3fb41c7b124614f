"""revgn_ext: exact Gauss-Newton optimisation for PyTorch.

* :class:`RevMLP` and :class:`RevGN` (:mod:`revgn_ext.revgn`): exact, tractable GN for reversible MLPs
  (arXiv 2411.07979).
* :class:`EGN` (:mod:`revgn_ext.egn`): exact Gauss-Newton / Levenberg-Marquardt for any ``nn.Module``
  (arXiv 2405.14402).
* :mod:`revgn_ext.ops`: the fused kernels (batched Gram-Cholesky solve, coupling layer), each op family
  with its pure-PyTorch reference (gathered in :mod:`revgn_ext.reference`).
* :mod:`revgn_ext.experiments`: the paper reproductions, datasets (:mod:`revgn_ext.data`) and
  diagnostics (:mod:`revgn_ext.diagnostics`).

The layers depend one way: experiments -> optimizers (revgn, egn) -> ops -> kernels
(docs/architecture.md).
"""
import sys

from . import ops, reference
from . import distributed
from .egn import EGN
from .egn.gram import UnsupportedModelError
from .revgn import RevGN, RevMLP
from .revgn import model as _model
from .experiments import data, diagnostics

# Modules that moved: ``revgn_ext.model``, ``revgn_ext.data`` and ``revgn_ext.diagnostics`` still import.
for _name, _module in (("model", _model), ("data", data), ("diagnostics", diagnostics)):
    sys.modules[f"{__name__}.{_name}"] = _module

__version__ = "0.1.0"

__all__ = ["ops", "reference", "__version__", "EGN", "RevMLP", "RevGN", "UnsupportedModelError", "data", "diagnostics", "distributed"]
