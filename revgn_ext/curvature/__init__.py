"""Former home of the curvature pieces, kept so that existing imports keep working.

RevGN's targets and right inverse now live in :mod:`revgn_ext.revgn`, EGN's Gram and loss factors in
:mod:`revgn_ext.egn`; ``revgn_ext.curvature.<name>`` is the same module object as the new one.
"""
import sys

from ..egn import gram, loss_factors
from ..revgn import right_inverse, targets

for _module in (gram, loss_factors, right_inverse, targets):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module

__all__ = ["gram", "loss_factors", "right_inverse", "targets"]
