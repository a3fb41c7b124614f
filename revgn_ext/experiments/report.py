"""Final-number tables and the paper's findings, decided from the recorded metrics.

``runs`` maps ``(optimizer, setting)`` to history rows; ``configs`` maps the same keys to the runs'
:class:`~.config.RunConfig`. Each finding of the paper (section 5) is turned into a test on the
metrics, stated next to its verdict with the numbers it used.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .config import OPTIMIZERS, SETTINGS
from .plots import LABELS, SETTING_TITLES, series


@dataclass
class Finding:
    claim: str
    test: str
    verdict: str          # "reproduced", "not reproduced" or "not run"
    evidence: str


def final(history: list, key: str) -> float:
    ys = series(history, key)[1]
    return ys[-1] if ys else math.nan


def mean_over_training(history: list, key: str) -> float:
    ys = [v for e, v in zip(*series(history, key)) if e > 0 and not math.isnan(v)]
    return sum(ys) / len(ys) if ys else math.nan


def cka_blocks(history: list) -> list:
    return sorted({int(k[len("cka_block"):]) for row in history for k in row if k.startswith("cka_block")})


def epochs_to_reach(history: list, key: str, level: float):
    for e, v in zip(*series(history, key)):
        if e > 0 and v <= level:
            return e
    return None


def saturation(history: list, key: str = "train_loss", fraction: float = 0.25) -> float:
    """Share of the total decrease of ``key`` (epoch 0 to the last epoch) already made at
    ``fraction`` of the epochs: near 1 when the curve flattens early."""
    xs, ys = series(history, key)
    if len(xs) < 3 or ys[0] == ys[-1]:
        return math.nan
    at = ys[min(range(len(xs)), key=lambda i: abs(xs[i] - fraction * xs[-1]))]
    return (ys[0] - at) / (ys[0] - ys[-1])


def _fmt(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def summary_rows(runs: dict, configs: dict) -> list:
    rows = []
    for setting in SETTINGS:
        for opt in OPTIMIZERS:
            if (opt, setting) not in runs:
                continue
            h, cfg = runs[(opt, setting)], configs[(opt, setting)]
            blocks = cka_blocks(h)
            picks = [blocks[0], blocks[(len(blocks) - 1) // 2], blocks[-1]] if blocks else []
            rows.append({
                "setting": SETTING_TITLES[setting], "optimizer": LABELS[opt], "lr": cfg.lr,
                "epochs": h[-1]["epoch"], "steps": h[-1]["step"],
                "train loss": final(h, "train_loss"), "test loss": final(h, "test_loss"),
                "test acc": final(h, "test_acc"), "best test acc": max(series(h, "test_acc")[1]),
                "mean % loss change": mean_over_training(h, "loss_change_pct"),
                "NTK sim": final(h, "ntk_similarity"),
                "CKA first/mid/last": "/".join(_fmt(final(h, f"cka_block{l}"), 3) for l in picks) or "-",
                "weight cos": final(h, "weight_cosine"), "time s": final(h, "time_s"),
            })
    return rows


def markdown_table(rows: list) -> str:
    if not rows:
        return "(no runs)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def findings(runs: dict) -> list:
    out = []

    def have(*keys):
        return all(k in runs for k in keys)

    # 1. GN is fastest in full batch.
    claim = "GN is fastest in full batch."
    test = ("In full batch, GN needs the fewest epochs to reach the train loss that all three "
            "optimizers reach (the highest final train loss among them).")
    keys = [(o, "full") for o in OPTIMIZERS]
    if have(*keys):
        level = max(final(runs[k], "train_loss") for k in keys)
        reach = {o: epochs_to_reach(runs[(o, "full")], "train_loss", level) for o in OPTIMIZERS}
        others = [reach[o] for o in ("adam", "sgd")]
        ok = reach["gn"] is not None and all(r is None or reach["gn"] < r for r in others)
        ev = f"train loss {level:.4g} reached at epoch " + ", ".join(
            f"{LABELS[o]} {reach[o] if reach[o] is not None else 'never'}" for o in OPTIMIZERS)
        out.append(Finding(claim, test, "reproduced" if ok else "not reproduced", ev))
    else:
        out.append(Finding(claim, test, "not run", "needs GN, Adam and SGD full-batch runs"))

    # 2. Mini-batch: GN saturates early, Adam ends lower.
    claim = "In mini-batch, GN's train and test loss saturate early and Adam ends lower."
    test = ("In mini-batch, Adam's final train and test losses are both below GN's, and GN made at "
            "least 90% of its train-loss decrease in the first quarter of the epochs.")
    if have(("gn", "mini"), ("adam", "mini")):
        gn, adam = runs[("gn", "mini")], runs[("adam", "mini")]
        lower = {k: final(adam, k) < final(gn, k) for k in ("train_loss", "test_loss")}
        sat = saturation(gn)
        ok = all(lower.values()) and sat >= 0.9
        ev = (f"final train loss GN {final(gn, 'train_loss'):.4g} vs Adam {final(adam, 'train_loss'):.4g}; "
              f"final test loss GN {final(gn, 'test_loss'):.4g} vs Adam {final(adam, 'test_loss'):.4g}; "
              f"GN's share of its decrease made in the first quarter {sat:.2f} "
              f"(Adam {saturation(adam):.2f})")
        out.append(Finding(claim, test, "reproduced" if ok else "not reproduced", ev))
    else:
        out.append(Finding(claim, test, "not run", "needs GN and Adam mini-batch runs"))

    # 3. GN cuts the current batch's loss the most.
    claim = "GN cuts the current batch's loss the most."
    test = ("In every setting run, GN's mean percent change of the loss on the batch it just stepped "
            "on is the most negative of the three optimizers.")
    settings = [s for s in SETTINGS if have(*[(o, s) for o in OPTIMIZERS])]
    if settings:
        parts, ok = [], True
        for s in settings:
            change = {o: mean_over_training(runs[(o, s)], "loss_change_pct") for o in OPTIMIZERS}
            ok &= all(change["gn"] < change[o] for o in ("adam", "sgd"))
            parts.append(f"{SETTING_TITLES[s]}: " + ", ".join(f"{LABELS[o]} {change[o]:.3g}%" for o in OPTIMIZERS))
        out.append(Finding(claim, test, "reproduced" if ok else "not reproduced", "; ".join(parts)))
    else:
        out.append(Finding(claim, test, "not run", "needs all three optimizers in one setting"))

    # 4. Lazy regime: GN's NTK and CKA stay near init, Adam's CKA falls.
    claim = "NTK and CKA stay near init for GN (lazy regime), while Adam's CKA falls."
    test = ("In mini-batch, at the end GN's NTK similarity to init is higher than Adam's and GN's CKA to "
            "init is higher than Adam's in every block.")
    if have(("gn", "mini"), ("adam", "mini")):
        gn, adam = runs[("gn", "mini")], runs[("adam", "mini")]
        blocks = cka_blocks(gn)
        ntk = (final(gn, "ntk_similarity"), final(adam, "ntk_similarity"))
        cka = {l: (final(gn, f"cka_block{l}"), final(adam, f"cka_block{l}")) for l in blocks}
        ok = ntk[0] > ntk[1] and bool(blocks) and all(g > a for g, a in cka.values())
        ev = (f"NTK similarity GN {ntk[0]:.3f} vs Adam {ntk[1]:.3f}; CKA per block (GN vs Adam): "
              + ", ".join(f"{l}: {g:.3f} vs {a:.3f}" for l, (g, a) in cka.items()))
        out.append(Finding(claim, test, "reproduced" if ok else "not reproduced", ev))
    else:
        out.append(Finding(claim, test, "not run", "needs GN and Adam mini-batch runs"))
    return out


def write_report(runs: dict, configs: dict, out_dir: str, figures: dict, command: str = "",
                 extra: str = "") -> str:
    """Write REPORT.md to ``out_dir``; returns its path."""
    any_cfg = next(iter(configs.values()))
    lines = ["# RevGN vs Adam vs SGD on RevMLP", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Dataset `{any_cfg.dataset}`, L = {any_cfg.blocks} blocks, M = {any_cfg.hidden}, "
              f"activations {', '.join(any_cfg.activations)}, full batch = first {any_cfg.full_batch_size} "
              f"training samples (one step per epoch), mini-batch size {any_cfg.batch_size}, seed "
              f"{any_cfg.seed}. GN learning rates are in this package's convention (official x L).", ""]
    if extra:
        lines += [extra, ""]
    lines += ["## Final numbers", "", markdown_table(summary_rows(runs, configs)), "## Paper findings", ""]
    for f in findings(runs):
        lines += [f"* **{f.claim}** {f.verdict.upper()}.", f"  Test: {f.test}", f"  Evidence: {f.evidence}."]
    lines += ["", "## Figures", ""]
    for name, path in figures.items():
        rel = os.path.relpath(path, out_dir)
        lines += [f"![{name}]({rel})", ""]
    path = os.path.join(out_dir, "REPORT.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
