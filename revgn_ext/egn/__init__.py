"""EGN: exact Gauss-Newton / Levenberg-Marquardt for any ``nn.Module`` (arXiv 2405.14402).

* :mod:`.optimizer`: :class:`EGN`, the step as a pipeline: solve -> momentum -> line search -> damping
  update (:mod:`.damping`; the phase clock and stats record in :mod:`.telemetry`);
* :mod:`.loss_factors`: per-sample square roots S_i of the loss Hessian (MSE, CE, binary CE);
* :mod:`.gram`: the output-space Gram S^T J J^T S, layer-wise (:mod:`.rules`) or through torch.func;
* :mod:`.linearisation`: J^T v and J d; :mod:`.inputs`: the checks of a batch.
"""
from .optimizer import EGN

__all__ = ["EGN"]
