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
* :func:`compare` / :func:`verdict` turn mean ± std comparisons into REPRODUCED, NOT REPRODUCED or
  MIXED: a comparison counts only when the difference of the means exceeds one standard deviation of
  that difference, ``sqrt(s_a^2 + s_b^2)``; inside it the evidence is noise.
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

REPRODUCED = "REPRODUCED"
NOT_REPRODUCED = "NOT REPRODUCED"
MIXED = "MIXED"
NOT_RUN = "NOT RUN"


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

def compare(a: Stat, b: Stat, less: bool = True):
    """Whether ``a < b`` (or ``a > b`` with ``less=False``) beyond noise.

    True: the difference of the means is in the claimed direction and larger than
    ``sqrt(a.std^2 + b.std^2)`` (one std of the difference); False: the same in the opposite
    direction; None: within one std (noise) or either side has no finite value.
    """
    if not (finite(a.mean) and finite(b.mean)):
        return None
    diff = (b.mean - a.mean) if less else (a.mean - b.mean)
    noise = math.sqrt((a.std if finite(a.std) else 0.0) ** 2 + (b.std if finite(b.std) else 0.0) ** 2)
    if diff > noise:
        return True
    if diff < -noise:
        return False
    return None


def verdict(outcomes) -> str:
    """REPRODUCED if every outcome is True, NOT REPRODUCED if any is False, otherwise (some within
    noise) MIXED. An empty list is NOT RUN."""
    outcomes = list(outcomes)
    if not outcomes:
        return NOT_RUN
    if any(o is False for o in outcomes):
        return NOT_REPRODUCED
    if all(o is True for o in outcomes):
        return REPRODUCED
    return MIXED


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
