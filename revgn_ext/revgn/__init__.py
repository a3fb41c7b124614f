"""RevGN: exact, tractable Gauss-Newton for reversible MLPs (arXiv 2411.07979).

* :mod:`.model`: :class:`RevMLP`, the reversible network (coupling blocks, fixed readout Q);
* :mod:`.targets`: function-space targets E in logit space (identity, newton, damped);
* :mod:`.right_inverse`: Delta with J Delta = dZ, through one batched Gram factorisation;
* :mod:`.optimizer`: :class:`RevGN`, the ``torch.optim.Optimizer`` that puts them together.
"""
from .model import RevMLP
from .optimizer import RevGN

__all__ = ["RevMLP", "RevGN"]
