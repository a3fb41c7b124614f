"""The fair-comparison protocol shared by the experiments: tuning split, learning-rate grid, selection,
seed aggregation, verdicts and the stored tuned-rates files.

Dataset- and optimizer-agnostic: everything here takes plain numbers, tensors or dicts.

* :func:`validation_split` carves a validation set out of the *training* tensors with a fixed seed;
  it never sees the test set, so tuning cannot leak test information.
* :func:`lr_grid` / :func:`log_grid` give log-spaced learning-rate grids (at least 5 values).
* :func:`select_best` picks the grid value with the best validation score over seeds, treating a
  diverged run (NaN, inf or None) as the worst possible score.
* :class:`Stat` / :func:`aggregate` summarise one quantity over seeds as mean ± std (sample std,
  ``ddof=1``), printed ``"m ± s"``.
* :func:`compare` / :func:`verdict` are the one verdict rule of both reports, stated in
  :mod:`.verdicts` (REPRODUCED when every test holds beyond the noise, NOT REPRODUCED when any fails
  beyond it, MIXED only when some test is inside the noise).
* :func:`extend_grid` runs a learning-rate grid and extends it while the best rate sits at an edge,
  until the choice is interior or the next rate diverges (the one grid search of both papers).
* :func:`save_tuned` / :func:`load_tuned` read and write a tuned-rates JSON file that records the
  command which produced it; :func:`tuned_path` names the files each paper's package stores in its
  ``tuned/`` folder.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from . import verdicts as _verdicts
from .verdicts import MIXED, NOT_REPRODUCED, NOT_RUN, REPRODUCED  # noqa: F401  (the one rule's names)


# ------------------------------------------------------------------------------------------ tuning split

def validation_split(n_train: int, fraction: float = 0.2, seed: int = 0):
    """(fit_idx, val_idx): a seeded random partition of ``range(n_train)``, the training set only.

    The same (n_train, fraction, seed) always gives the same split; ``val_idx`` has
    ``round(fraction * n_train)`` elements (at least 1) and both parts are sorted.
    """
    if not isinstance(n_train, int) or n_train < 2:
        raise ValueError(f"n_train must be an int >= 2 to carve a validation split, got {n_train!r}")
    if not (0.0 < fraction < 1.0):
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    n_val = min(max(1, round(fraction * n_train)), n_train - 1)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


def split_train(x_train: torch.Tensor, y_train: torch.Tensor, fraction: float = 0.2, seed: int = 0):
    """(x_fit, y_fit, x_val, y_val) from the training tensors by :func:`validation_split`."""
    if len(x_train) != len(y_train):
        raise ValueError(f"x_train and y_train differ in length: {len(x_train)} vs {len(y_train)}")
    fit, val = validation_split(len(x_train), fraction, seed)
    return x_train[fit], y_train[fit], x_train[val], y_train[val]


# ------------------------------------------------------------------------------------------ grids

def log_grid(low: float, high: float, num: int = 5) -> list:
    """``num`` log-spaced values from ``low`` to ``high`` inclusive (num >= 5), rounded to 3 digits."""
    if not isinstance(num, int) or num < 5:
        raise ValueError(f"num must be an int >= 5 (a fair grid has at least 5 values), got {num!r}")
    if not (0 < low < high < math.inf):
        raise ValueError(f"need 0 < low < high < inf, got low={low!r}, high={high!r}")
    a, b = math.log10(low), math.log10(high)
    return [float(f"{10 ** (a + (b - a) * i / (num - 1)):.3g}") for i in range(num)]


def lr_grid(center: float, num: int = 5, factor: float = math.sqrt(10)) -> list:
    """``num`` log-spaced rates, ``factor`` apart, centred (in log space) on ``center``."""
    if not (0 < center < math.inf):
        raise ValueError(f"center must be a positive finite number, got {center!r}")
    if not (factor > 1):
        raise ValueError(f"factor must be > 1, got {factor!r}")
    half = (num - 1) / 2
    return log_grid(center * factor ** -half, center * factor ** half, num)


# ------------------------------------------------------------------------------------------ selection

def finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def select_best(scores: dict, lower_is_better: bool = True):
    """(best key, {key: Stat}) from ``{key: [score per seed]}`` (or one score per key).

    A key whose runs did not all finish with a finite score counts as diverged and is never chosen;
    among the rest the mean score decides (ties: the first key in order). ValueError if every
    key diverged.
    """
    if not scores:
        raise ValueError("scores is empty: nothing to select from")
    stats = {k: aggregate(v if isinstance(v, (list, tuple)) else [v]) for k, v in scores.items()}
    usable = {k: s for k, s in stats.items() if s.diverged == 0 and finite(s.mean)}
    if not usable:
        raise ValueError(f"every candidate diverged (non-finite validation score): {list(scores)}; "
                         "widen the grid towards smaller values")
    sign = 1.0 if lower_is_better else -1.0
    best = min(usable, key=lambda k: sign * usable[k].mean)
    return best, stats


def at_grid_edge(grid: list, chosen) -> bool:
    """True when ``chosen`` is the smallest or largest grid value: the grid may need widening."""
    return chosen in (min(grid), max(grid))


# Why an extended grid search stopped (:attr:`GridSearch.stop`).
STOP_INTERIOR = "interior"            # the choice has a tried rate on either side
STOP_DIVERGED = "next rate diverged"  # the choice is at an edge and the rate beyond it diverged
STOP_LIMIT = "extension limit"        # still at an edge after max_extend extensions
STOP_ALL_DIVERGED = "every rate diverged"


@dataclass
class GridSearch:
    """The outcome of :func:`extend_grid`: every rate tried (sorted), its per-seed scores and Stat, the
    choice, and why the search stopped (``stop``; ``beyond`` is the diverged rate that stopped it)."""
    grid: list
    scores: dict
    stats: dict
    chosen: float
    stop: str
    beyond: float | None = None

    @property
    def at_edge(self) -> bool:
        """The choice has no finite-scored tried rate on one side (it is at the edge of the grid, or
        the rate beyond it diverged)."""
        return self.stop != STOP_INTERIOR

    def stop_text(self) -> str:
        """How the search ended, for a report."""
        if self.stop == STOP_INTERIOR:
            return "interior"
        if self.stop == STOP_DIVERGED:
            return f"at the grid edge: the next rate {self.beyond:g} diverged"
        if self.stop == STOP_LIMIT:
            return "at the grid edge after the extension limit (widen the search)"
        return "every rate diverged"

    def record(self) -> dict:
        """JSON-able summary for a tuned-rates file."""
        return {"grid": self.grid, "scores": {f"{lr:g}": self.stats[lr] for lr in self.grid}, "chosen": self.chosen,
                "at_edge": self.at_edge, "stop": self.stop, "beyond": self.beyond}


def grid_rate(center: float, k: int, factor: float = math.sqrt(10)) -> float:
    """The k-th rate from ``center`` on a log grid of step ``factor`` (3 significant digits)."""
    return float(f"{center * factor ** k:.3g}")


def _diverged(values) -> bool:
    vals = values if isinstance(values, (list, tuple)) else [values]
    return any(not finite(v) for v in vals) or not vals


def extend_grid(score, center: float, num: int = 5, factor: float = math.sqrt(10), lower_is_better: bool = True,
                max_extend: int = 8, select=None) -> GridSearch:
    """Search ``num`` log-spaced rates around ``center``, then extend the grid while the best rate is at
    an edge: one rate further out on that side at a time, until the choice is interior, the new rate
    diverged (``STOP_DIVERGED``: the report says so) or ``max_extend`` rates were added (``STOP_LIMIT``).

    ``score(lr)`` returns the validation score of every tuning seed (a list; NaN, inf or None for a
    diverged seed). ``select(scores) -> (best, stats)`` picks among ``{lr: [scores]}`` (default
    :func:`select_best`). When every rate diverged the grid is extended downwards, up to the limit.
    """
    if not isinstance(num, int) or num < 5:
        raise ValueError(f"num must be an int >= 5 (a fair grid has at least 5 values), got {num!r}")
    if not isinstance(max_extend, int) or max_extend < 0:
        raise ValueError(f"max_extend must be an int >= 0, got {max_extend!r}")
    select = select or (lambda values: select_best(values, lower_is_better))
    half = (num - 1) // 2
    offsets = {}
    for k in range(-half, num - half):
        offsets.setdefault(grid_rate(center, k, factor), k)
    values = {}
    for lr in sorted(offsets):
        v = score(lr)
        values[lr] = list(v) if isinstance(v, (list, tuple)) else [v]

    def choose():
        try:
            return select(values)
        except ValueError:           # every rate diverged
            return None, {lr: aggregate(v) for lr, v in values.items()}

    stop, beyond = STOP_LIMIT, None
    for extension in range(max_extend + 1):
        best, stats = choose()
        grid = sorted(values)
        if best is None:
            side = -1                 # nothing finite yet: look at smaller rates
        elif not at_grid_edge(grid, best):
            stop = STOP_INTERIOR
            break
        else:
            side = 1 if best == grid[-1] and len(grid) > 1 else -1
        if extension == max_extend:
            break
        edge = grid[-1] if side > 0 else grid[0]
        k = offsets[edge] + side
        new = grid_rate(center, k, factor)
        while new in values:         # rounding collapsed two offsets: step once more
            k += side
            new = grid_rate(center, k, factor)
        offsets[new] = k
        v = score(new)
        values[new] = list(v) if isinstance(v, (list, tuple)) else [v]
        if best is not None and _diverged(values[new]):
            stop, beyond = STOP_DIVERGED, new    # a diverged rate is never chosen: the choice stays at its edge
            break
    best, stats = choose()
    grid = sorted(values)
    if best is None:
        return GridSearch(grid, values, stats, grid[0], STOP_ALL_DIVERGED)
    if stop == STOP_LIMIT and not at_grid_edge(grid, best):
        stop = STOP_INTERIOR
    return GridSearch(grid, values, stats, best, stop, beyond)


# ------------------------------------------------------------------------------------------ seeds

@dataclass
class Stat:
    """Mean ± std of one quantity over n seeds (sample std; 0 for one seed). ``diverged`` counts the
    values that were non-finite and left out."""
    mean: float
    std: float
    n: int
    diverged: int = 0
    values: list = field(default_factory=list)

    def __format__(self, spec: str) -> str:
        return fmt_pm(self.mean, self.std, spec or ".3g") + (f" ({self.diverged} diverged)" if self.diverged else "")

    def __str__(self) -> str:
        return format(self)

    def to_dict(self) -> dict:
        return _clean({"mean": self.mean, "std": self.std, "n": self.n, "diverged": self.diverged,
                       "values": self.values})


def aggregate(values) -> Stat:
    """:class:`Stat` of the finite values (None, NaN and inf are counted as diverged)."""
    values = [float(v) if v is not None else math.nan for v in values]
    ok = [v for v in values if math.isfinite(v)]
    if not ok:
        return Stat(math.nan, math.nan, 0, len(values), values)
    mean = sum(ok) / len(ok)
    std = math.sqrt(sum((v - mean) ** 2 for v in ok) / (len(ok) - 1)) if len(ok) > 1 else 0.0
    return Stat(mean, std, len(ok), len(values) - len(ok), values)


def aggregate_rows(rows: list) -> dict:
    """{key: Stat} over a list of dicts (one per seed); keys are those of the numeric values."""
    keys = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and (v is None or isinstance(v, (int, float)))
                 and not isinstance(v, bool)]
    return {k: aggregate([r.get(k) for r in rows]) for k in keys}


def fmt_pm(mean: float, std: float, spec: str = ".3g") -> str:
    """``"m ± s"`` with the same format spec for both; ``"-"`` when the mean is not finite."""
    if not finite(mean):
        return "-"
    return f"{mean:{spec}} ± {std:{spec}}" if finite(std) else f"{mean:{spec}}"


# ------------------------------------------------------------------------------------------ verdicts
# The rule is stated once, in :mod:`.verdicts`; these names stay here for the callers of the protocol.
compare = _verdicts.compare
verdict = _verdicts.verdict


# ------------------------------------------------------------------------------------------ stored rates

def tuned_path(folder: str, name: str) -> str:
    """Path of the tuned-rates file ``name`` in ``folder`` (a paper package's ``tuned/``: ``<folder>/<name>.json``)."""
    if not name or os.sep in name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a plain file stem like 'revgn_digits', got {name!r}")
    return os.path.join(folder, f"{name}.json")


def save_tuned(path: str, rates: dict, command: str, details: dict | None = None) -> str:
    """Write ``{"command", "rates", "details"}`` as JSON (atomically); returns ``path``.

    ``rates`` is any JSON-able mapping (e.g. ``{"mini": {"adam": 1e-3}}``); ``details`` can hold the
    grids, every run's score and the set-up, so that the file documents how the choice was made.
    """
    if not command:
        raise ValueError("command must name the command line that produced the rates")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = _clean({"command": command, "rates": rates, "details": details or {}})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, allow_nan=False, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_tuned(path: str) -> dict:
    """The payload written by :func:`save_tuned`; ValueError naming the file when it is malformed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tuned-rates file at {path}; create it with the tuning command "
                                "(e.g. `python -m revgn_ext.experiments reproduce --tune`)")
    try:
        with open(path) as f:
            payload = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("rates"), dict) or "command" not in payload:
        raise ValueError(f"{path}: expected an object with 'command' and 'rates' (written by save_tuned)")
    return payload


def _clean(obj):
    """JSON-able copy: Stats as dicts, non-finite floats as null (strict JSON), tuples as lists."""
    if isinstance(obj, Stat):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _jsonable(obj):
    if isinstance(obj, Stat):
        return obj.to_dict()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a tuned-rates file")
