"""Learning rates of the EGN comparison: the grids searched on a validation split, the choice from
their scores, and the rates stored with the package (``tuned/egn_tasks.json``)."""
from __future__ import annotations

import os

from ..common import protocol
from .problems import lower_is_better

TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


# Centres of the tuning grids when no stored rate exists (the grid spans centre / 10 .. centre * 10).
GRID_CENTRES = {"egn": 0.3, "egn-ls": 1.0, "egn-ad": 0.3, "egn-mom": 0.3, "sgd": 0.03, "adam": 3e-3,
                "sgn": 0.3, "lbfgs": 1.0}
# Diamonds keeps its target in dollars, so first-order gradients are ~1e4 times larger than elsewhere.
TASK_GRID_CENTRES = {("diamonds", "sgd"): 1e-6, ("diamonds", "adam"): 0.1}
DEFAULTS_NAME = "egn_tasks"


def stored_path() -> str:
    """The stored rates' file, ``egn_paper/tuned/egn_tasks.json``."""
    return protocol.tuned_path(TUNED_DIR, DEFAULTS_NAME)


def stored_rates() -> dict:
    return protocol.load_tuned(stored_path())


def grid_for(task: str, optimizer: str) -> list:
    """The tuning grid: fixed centres (not the stored rates), so that ``--tune`` re-derives the stored file."""
    return protocol.lr_grid(TASK_GRID_CENTRES.get((task, optimizer), GRID_CENTRES[optimizer]), num=5)


def pick_lr(task: str, optimizer: str, scores: dict, val_losses: dict) -> tuple:
    """(chosen lr, {lr: Stat}) by validation metric; ties (common for accuracy on small validation
    sets) go to the lower validation loss. Every rate diverged: the smallest, flagged."""
    lower = lower_is_better(task)
    try:
        best, stats = protocol.select_best(scores, lower_is_better=lower)
    except ValueError:
        stats = {k: protocol.aggregate(v) for k, v in scores.items()}
        return min(scores), stats, True
    tied = [k for k, s in stats.items() if s.diverged == 0 and s.mean == stats[best].mean]
    if len(tied) > 1:
        best = min(tied, key=lambda k: protocol.aggregate(val_losses[k]).mean)
    return best, stats, False
