"""matplotlib figures mirroring the paper's (arXiv 2411.07979, figures 2 to 5), one PNG per quantity.

``runs`` maps ``(optimizer, setting)`` to a run's history rows (see :mod:`.runner`) or to a list of
them, one per seed; every figure has one row of panels per setting present and one line per optimizer
(the mean over seeds, with a band of one std when there are several).
"""
from __future__ import annotations

import math
import os

from ..common.figures import pyplot, save
from .config import OPTIMIZERS, SETTINGS

LABELS = {"gn": "GN (RevGN)", "adam": "Adam", "sgd": "SGD", "egn": "EGN", "lbfgs": "L-BFGS",
          "shampoo": "Shampoo", "soap": "SOAP"}
COLORS = {"gn": "C0", "adam": "C1", "sgd": "C2", "egn": "C3", "lbfgs": "C4", "shampoo": "C5", "soap": "C6"}
SETTING_TITLES = {"full": "full batch", "mini": "mini-batch"}
SYMLOG_LINEAR_PCT = 1.0   # the loss-change axis is linear within +-1 %, logarithmic beyond


def series(history: list, key: str):
    """(epochs, values) of the rows that hold ``key`` (None, as read back from JSON, becomes NaN)."""
    xs, ys = [], []
    for row in history:
        if key in row:
            v = row[key]
            xs.append(row["epoch"])
            ys.append(math.nan if v is None else float(v))
    return xs, ys


def mean_series(histories, key: str):
    """(epochs, mean, std) over seeds at the epochs every seed recorded ``key`` (NaN values skipped)."""
    if histories and isinstance(histories[0], dict):
        histories = [histories]
    per = [dict(zip(*series(h, key))) for h in histories]
    epochs = sorted(set.intersection(*(set(p) for p in per))) if per else []
    xs, means, stds = [], [], []
    for e in epochs:
        vals = [p[e] for p in per if not math.isnan(p[e])]
        if not vals:
            continue
        m = sum(vals) / len(vals)
        xs.append(e)
        means.append(m)
        stds.append(math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)
    return xs, means, stds


def plot_band(ax, histories, key: str, **kw):
    """Mean line and one-std band of ``key`` over seeds on ``ax``."""
    xs, m, s = mean_series(histories, key)
    line, = ax.plot(xs, m, lw=1.6, **kw)
    if any(v > 0 for v in s):
        ax.fill_between(xs, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=line.get_color(),
                        alpha=0.2, lw=0)
    return line


def _grid(runs: dict, columns: list, title: str):
    plt = pyplot()
    settings = [s for s in SETTINGS if any(k[1] == s for k in runs)]
    fig, axes = plt.subplots(len(settings), len(columns), figsize=(4.2 * len(columns), 3.2 * len(settings)),
                             squeeze=False)
    for i, setting in enumerate(settings):
        for j, (key, ylabel, log) in enumerate(columns):
            ax = axes[i][j]
            for opt in dict.fromkeys(list(OPTIMIZERS) + [k[0] for k in runs]):
                if (opt, setting) in runs:
                    plot_band(ax, runs[(opt, setting)], key, color=COLORS.get(opt), label=LABELS.get(opt, opt))
            axis_label = ylabel
            if log == "symlog":
                # A symmetric log axis: linear within +-SYMLOG_LINEAR_PCT %, logarithmic beyond, so that
                # one optimizer's spike (SGD's +100% in full batch) does not flatten the others' curves.
                ax.set_yscale("symlog", linthresh=SYMLOG_LINEAR_PCT)
                axis_label = f"{ylabel}\n(symmetric log: linear within ±{SYMLOG_LINEAR_PCT:g}%)"
            elif log:
                ax.set_yscale("log")
                axis_label = f"{ylabel} (log)"
            ax.set_title(f"{SETTING_TITLES[setting]}: {ylabel}", fontsize=10)
            ax.set_ylabel(axis_label, fontsize=8)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    width = 0.95 * 72 * 4.2 * len(columns)   # points across the figure; a character is about 0.6 x its size
    if 0.6 * 12 * len(title) > width:          # a long title over narrow panels: wrap it at ": "
        title = title.replace(": ", ":\n", 1)
    fig.suptitle(title, fontsize=min(12, width / (0.6 * max(1, *map(len, title.split("\n"))))))
    fig.tight_layout()
    return fig, plt


def _seeds(entry) -> list:
    return [entry] if entry and isinstance(entry[0], dict) else list(entry)


def make_figures(runs: dict, out_dir: str, title: str = "") -> dict:
    """Write every figure to ``out_dir``; returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = f"{title}: " if title else ""
    blocks = sorted({int(k[len("cka_block"):]) for h in runs.values() for run in _seeds(h) for row in run
                     for k in row if k.startswith("cka_block")})
    ev = "val" if any("val_loss" in row for h in runs.values() for run in _seeds(h) for row in run) else "test"
    picks = sorted({blocks[0], blocks[(len(blocks) - 1) // 2], blocks[-1]}) if blocks else []
    names = {1: "first"} | ({blocks[-1]: "last"} if blocks else {})
    figures = {
        "losses": [("train_loss", "train loss", True), (f"{ev}_loss", f"{ev} loss", True),
                   (f"{ev}_acc", f"{ev} accuracy", False)],
        "loss_change": [("loss_change_pct", "% loss change on the same batch", "symlog")],
        "ntk_similarity": [("ntk_similarity", "NTK similarity to init", False)],
        "cka": [(f"cka_block{l}", f"CKA to init, {names.get(l, 'middle')} block ({l})", False) for l in picks],
        "weight_change": [("weight_relative_change", "||theta - theta_0|| / ||theta_0||", True),
                          ("weight_cosine", "cos(theta, theta_0)", False)],
    }
    paths = {}
    for name, columns in figures.items():
        if columns:
            fig, plt = _grid(runs, columns, prefix + name.replace("_", " "))
            paths[name] = save(fig, plt, os.path.join(out_dir, f"{name}.png"))
    return paths
