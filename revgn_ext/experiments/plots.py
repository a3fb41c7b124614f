"""matplotlib figures mirroring the paper's (arXiv 2411.07979, figures 2 to 5), one PNG per quantity.

``runs`` maps ``(optimizer, setting)`` to a run's history rows (see :mod:`.runner`); every figure
has one row of panels per setting present and one line per optimizer.
"""
from __future__ import annotations

import math
import os

from .config import OPTIMIZERS, SETTINGS

LABELS = {"gn": "GN (RevGN)", "adam": "Adam", "sgd": "SGD"}
COLORS = {"gn": "C0", "adam": "C1", "sgd": "C2"}
SETTING_TITLES = {"full": "full batch", "mini": "mini-batch"}


def series(history: list, key: str):
    """(epochs, values) of the rows that hold ``key`` (None, as read back from JSON, becomes NaN)."""
    xs, ys = [], []
    for row in history:
        if key in row:
            v = row[key]
            xs.append(row["epoch"])
            ys.append(math.nan if v is None else float(v))
    return xs, ys


def _grid(runs: dict, columns: list, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(k[1] == s for k in runs)]
    fig, axes = plt.subplots(len(settings), len(columns), figsize=(4.2 * len(columns), 3.2 * len(settings)),
                             squeeze=False)
    for i, setting in enumerate(settings):
        for j, (key, ylabel, log) in enumerate(columns):
            ax = axes[i][j]
            for opt in OPTIMIZERS:
                if (opt, setting) in runs:
                    xs, ys = series(runs[(opt, setting)], key)
                    ax.plot(xs, ys, color=COLORS[opt], label=LABELS[opt], lw=1.6)
            if log:
                ax.set_yscale("log")
            ax.set_title(f"{SETTING_TITLES[setting]}: {ylabel}", fontsize=10)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig, plt


def _save(fig, plt, path: str) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_figures(runs: dict, out_dir: str, title: str = "") -> dict:
    """Write every figure to ``out_dir``; returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = f"{title}: " if title else ""
    blocks = sorted({int(k[len("cka_block"):]) for h in runs.values() for row in h for k in row
                     if k.startswith("cka_block")})
    picks = sorted({blocks[0], blocks[(len(blocks) - 1) // 2], blocks[-1]}) if blocks else []
    names = {1: "first"} | ({blocks[-1]: "last"} if blocks else {})
    figures = {
        "losses": [("train_loss", "train loss", True), ("test_loss", "test loss", True),
                   ("test_acc", "test accuracy", False)],
        "loss_change": [("loss_change_pct", "% loss change on the same batch", False)],
        "ntk_similarity": [("ntk_similarity", "NTK similarity to init", False)],
        "cka": [(f"cka_block{l}", f"CKA to init, {names.get(l, 'middle')} block ({l})", False) for l in picks],
        "weight_change": [("weight_relative_change", "||theta - theta_0|| / ||theta_0||", True),
                          ("weight_cosine", "cos(theta, theta_0)", False)],
    }
    paths = {}
    for name, columns in figures.items():
        if columns:
            fig, plt = _grid(runs, columns, prefix + name.replace("_", " "))
            paths[name] = _save(fig, plt, os.path.join(out_dir, f"{name}.png"))
    return paths
