"""The EGN comparison's figures: test metric against wall time and steps, the LQR error curves, and
the batch-size study (C4)."""
from __future__ import annotations

import math

from ..common.figures import band, panels, save
from . import lqr
from .problems import lower_is_better, metric_name
from .training import LABELS, curve

# Opacity of the one-std bands: light enough that overlapping bands of several optimizers stay
# readable (at 0.18 those of breast-cancer, wine and diamonds merged into blocks of colour).
BAND_ALPHA = 0.07


COLORS = {"egn": "C0", "egn-ls": "C9", "egn-ad": "C4", "egn-mom": "C6", "sgd": "C2", "adam": "C1",
          "sgn": "C3", "lbfgs": "C7"}


def figure_metric(results: dict, tasks, optimizers, x_key: str, path: str, title: str) -> str:
    """One panel per task: the metric against wall time or steps, mean over seeds with a std band."""
    fig, plt, axes = panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for opt in optimizers:
            if (task, opt) in results:
                xs, m, s = curve(results[(task, opt)]["histories"], x_key)
                band(ax, xs, m, s, COLORS[opt], LABELS[opt], alpha=BAND_ALPHA)
        if lower_is_better(task):
            ax.set_yscale("log")
        if x_key == "time":
            ax.set_xscale("symlog", linthresh=0.1)
            ax.set_xlim(left=0)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("wall time of the steps (s)" if x_key == "time" else "step")
        ax.set_ylabel(metric_name(task))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    # One or two panels are narrower than the title: its parenthesis goes on a second line.
    fig.suptitle(title if len(axes) > 2 else title.replace(" (", "\n(", 1))
    fig.tight_layout()
    return save(fig, plt, path)


def figure_lqr(results: dict, tasks, optimizers, path: str) -> str:
    """Per plant: ||H* - H||_F and ||H_K - H||_F (the current policy's Q) against steps."""
    plants = [t for t in tasks if t in lqr.PLANTS]
    fig, plt, axes = panels(2 * len(plants))
    for i, task in enumerate(plants):
        for j, (key, name) in enumerate((("metric", "||H* - H||_F"), ("policy_error", "||H_K - H||_F"))):
            ax = axes[2 * i + j]
            for opt in optimizers:
                if (task, opt) in results:
                    hs = [[{**r, "metric": r.get(key)} for r in h] for h in results[(task, opt)]["histories"]]
                    xs, m, s = curve(hs, "step")
                    band(ax, xs, m, s, COLORS[opt], LABELS[opt], alpha=BAND_ALPHA)
            ax.set_yscale("log")
            ax.set_title(f"{task}: {name}", fontsize=10)
            ax.set_xlabel("update")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("LQR Q-learning: distance to the optimal and to the current policy's Q-matrix")
    fig.tight_layout()
    return save(fig, plt, path)


PHASES = (("gram", "forward + Jacobian/Gram", "C0"), ("factor", "Cholesky", "C1"), ("back", "back-projection", "C2"))


def step_split(entry: dict) -> dict:
    """{phase: ms} of one batch size's step: each phase's share of the phases' total (timed separately,
    outside the optimizer) times the whole step's measured time, so that the parts add up to the step.
    Empty when the phases were not timed."""
    phases = entry["phases"]
    total = sum(phases.get(key, math.nan) for key, _, _ in PHASES)
    if not phases or not (total > 0 and math.isfinite(total)):
        return {}
    return {key: 1e3 * entry["step_s"] * phases[key] / total for key, _, _ in PHASES}


def figure_batch(study: dict, task: str, path: str) -> str:
    fig, plt, axes = panels(2)
    bs = sorted(study)
    labels = [str(b) for b in bs]
    bottom = [0.0] * len(bs)
    splits = [step_split(study[b]) for b in bs]
    for key, name, color in PHASES:
        vals = [split.get(key, math.nan) for split in splits]
        axes[0].bar(labels, vals, bottom=bottom, color=color, label=name)
        bottom = [a + v for a, v in zip(bottom, vals)]
    axes[0].plot(labels, [1e3 * study[b]["step_s"] for b in bs], "k.-", label="whole EGN step")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("batch size")
    axes[0].set_ylabel("ms per step (log)")
    axes[0].set_title("EGN step time split (phase shares, scaled to the step)", fontsize=9)
    axes[0].legend(fontsize=7)
    for k, b in enumerate(bs):
        xs, m, s = curve(study[b]["histories"], "time")
        band(axes[1], xs, m, s, f"C{k}", f"b = {b}", alpha=BAND_ALPHA)
    axes[1].set_yscale("log")
    axes[1].set_xscale("symlog", linthresh=0.1)
    axes[1].set_xlim(left=0)
    axes[1].set_xlabel("wall time of the steps (s)")
    axes[1].set_ylabel(metric_name(task))
    axes[1].set_title(f"{task}: EGN at each batch size", fontsize=10)
    axes[1].legend(fontsize=7)
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, plt, path)
