"""What RevGN and EGN share as ``torch.optim.Optimizer`` subclasses, so that the two agree.

* **Hyper-parameters are checked where they are read.** Each optimizer declares its numeric
  hyper-parameters and their bounds in ``HYPERPARAMETERS``; they are checked at construction and again
  at every ``step``/``direction``, because a scheduler, ``load_state_dict`` or user code may have
  written into ``param_groups`` since. A NaN ``lr`` therefore raises instead of reaching the
  parameters.
* **Conventions.** ``lr >= 0`` (0 computes the step's statistics and moves nothing, as schedulers
  that decay to zero expect); ``damping >= 0``; a step whose update is not finite is refused: the
  parameters and the optimizer state stay as they were, ``stats["refused"]`` is True and
  ``stats["reason"]`` says why, with a ``RuntimeWarning``.
* **The stats record.** Every step returns a dict with at least :data:`COMMON_STATS`: "loss" (the
  pre-step batch loss), "refused", "reason" (None unless refused), "lr" (of the first group),
  "direction_norm" (of the unscaled direction) and "batch_size".
"""
from __future__ import annotations

import warnings

import torch

from ._checks import check_number

__all__ = ["GaussNewtonOptimizer", "COMMON_STATS", "refuse"]

COMMON_STATS = ("loss", "refused", "reason", "lr", "direction_norm", "batch_size")


class GaussNewtonOptimizer(torch.optim.Optimizer):
    """Base class of :class:`~revgn_ext.RevGN` and :class:`~revgn_ext.EGN` (see the module docstring).

    ``HYPERPARAMETERS`` maps a numeric option to the keyword arguments of
    :func:`revgn_ext._checks.check_number` (bounds); a string value names another option that is the
    lower bound (e.g. ``max_damping >= min_damping``).
    """

    HYPERPARAMETERS: dict[str, dict] = {}

    def checked_group(self, index: int = 0) -> dict:
        """``param_groups[index]`` after re-checking its hyper-parameters; raises ValueError naming
        the entry (``param_groups[0]['lr']``) and leaves everything untouched."""
        group = self.param_groups[index]
        for name, bounds in self.HYPERPARAMETERS.items():
            bounds = dict(bounds)
            if isinstance(bounds.get("low"), str):
                bounds["low"] = group[bounds["low"]]
            check_number(f"param_groups[{index}]['{name}']", group[name], **bounds)
        return group

    def checked_groups(self) -> list[dict]:
        return [self.checked_group(i) for i in range(len(self.param_groups))]

    @classmethod
    def check_hyperparameters(cls, values: dict) -> None:
        """Construction-time check, naming the constructor argument."""
        for name, bounds in cls.HYPERPARAMETERS.items():
            if name not in values:
                continue
            bounds = dict(bounds)
            if isinstance(bounds.get("low"), str):
                bounds["low"] = values[bounds["low"]]
            check_number(name, values[name], **bounds)


def refuse(stats: dict, reason: str, who: str) -> dict:
    """Mark a step refused (parameters untouched) and warn once per call."""
    stats["refused"] = True
    stats["reason"] = reason
    warnings.warn(f"{who}: step refused, {reason}; parameters unchanged", RuntimeWarning, stacklevel=3)
    return stats
