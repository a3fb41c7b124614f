"""EGN: exact Gauss-Newton / Levenberg-Marquardt for any ``nn.Module`` (arXiv 2405.14402).

* :mod:`.loss_factors`: per-sample square roots S_i of the loss Hessian (MSE, CE, binary CE);
* :mod:`.gram`: the output-space Gram S^T J J^T S, layer-wise or through torch.func;
* :mod:`.optimizer`: :class:`EGN`, the push-through LM step with line search, momentum and adaptive
  damping.
"""
from .optimizer import EGN

__all__ = ["EGN"]
