"""matplotlib helpers shared by the figures of both papers (headless backend, panel grids, mean ± std
bands, saving)."""
from __future__ import annotations

import math


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def panels(n: int, width: float = 4.6, height: float = 3.5, max_cols: int = 3):
    """(figure, pyplot, axes) with ``n`` visible panels, at most ``max_cols`` per row."""
    plt = pyplot()
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, plt, list(axes.flat)


def band(ax, xs, mean, std, color, label, alpha: float = 0.18):
    """A mean line and a band of one std around it."""
    import numpy as np

    xs, m, s = np.asarray(xs, float), np.asarray(mean, float), np.asarray(std, float)
    ax.plot(xs, m, color=color, label=label, lw=1.5)
    ax.fill_between(xs, m - s, m + s, color=color, alpha=alpha, lw=0)


def save(fig, plt, path: str, dpi: int = 110) -> str:
    """Write ``fig`` to ``path``, close it, return ``path``."""
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
