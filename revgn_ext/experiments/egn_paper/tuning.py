"""Learning rates of the EGN comparison: the grids searched on a validation split (extended while the
choice is at an edge, :func:`..common.protocol.extend_grid`), the choice from their scores, and the
rates stored with the package (``tuned/egn_tasks.json``)."""
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


MAX_EXTEND = 8   # rates added at most beyond the first 5 (a factor 10^4 further out)


def grid_centre(task: str, optimizer: str) -> float:
    """The centre of the first grid: fixed (not the stored rates), so that ``--tune`` re-derives the stored file."""
    return TASK_GRID_CENTRES.get((task, optimizer), GRID_CENTRES[optimizer])


def grid_for(task: str, optimizer: str) -> list:
    """The first tuning grid (5 rates a factor sqrt(10) apart around :func:`grid_centre`)."""
    return protocol.lr_grid(grid_centre(task, optimizer), num=5)


def search(task: str, optimizer: str, run, max_extend: int = MAX_EXTEND) -> dict:
    """Tune one (task, optimizer): ``run(lr) -> ([validation metric per seed], [validation loss per seed])``
    on the first grid, extended while the choice is at an edge until it is interior or the next rate
    diverges. Returns ``{"grid", "stats", "lr", "all_diverged", "stop", "beyond", "search"}``."""
    losses = {}

    def score(lr):
        metrics, losses[lr] = run(lr)
        return metrics

    def select(values):
        best, stats, all_div = pick_lr(task, optimizer, values, losses)
        if all_div:
            raise ValueError("every rate diverged")
        return best, stats

    found = protocol.extend_grid(score, grid_centre(task, optimizer), num=5, lower_is_better=lower_is_better(task),
                                 max_extend=max_extend, select=select)
    return {"grid": found.grid, "stats": found.stats, "lr": found.chosen,
            "all_diverged": found.stop == protocol.STOP_ALL_DIVERGED, "stop": found.stop, "beyond": found.beyond,
            "search": found}


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
