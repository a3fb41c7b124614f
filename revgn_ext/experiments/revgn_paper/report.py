"""Final-number tables and the paper's findings, decided from the recorded metrics of several seeds.

``runs`` maps ``(optimizer, setting)`` to a list of history rows per seed (a single history is taken
as one seed); ``configs`` maps the same keys to the runs' :class:`~.config.RunConfig`. Every number is
a mean ± std over the seeds (:mod:`..common.protocol`), and each finding of the paper (section 5) is a test on
those numbers, written next to its verdict, decided by the one rule of :mod:`..common.verdicts`
(shared with the EGN claims): REPRODUCED when every check holds beyond the noise, NOT REPRODUCED when
any fails beyond it, MIXED only when some check is inside the noise.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from ..common import protocol as P
from ..common.markdown import markdown_table
from ..common.verdicts import RULE, outcome_text
from .config import OPTIMIZERS, SETTINGS
from .plots import LABELS, SETTING_TITLES, series


@dataclass
class Finding:
    claim: str
    test: str
    verdict: str          # protocol.REPRODUCED, NOT_REPRODUCED, MIXED or NOT_RUN
    evidence: str


def seeds_of(runs_entry) -> list:
    """A list of histories (one per seed) from either such a list or a single history."""
    if runs_entry and isinstance(runs_entry[0], dict):
        return [runs_entry]
    return list(runs_entry)


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


def value_at_level(history: list, key: str, level: float, at: str = "train_loss", window: int = 2) -> float:
    """Mean of ``key`` over the epochs within ``window`` of the first epoch where ``at`` is <= ``level``
    (epoch 0 excluded; NaN if the level is never reached)."""
    e = epochs_to_reach(history, at, level)
    if e is None:
        return math.nan
    ys = [v for x, v in zip(*series(history, key)) if x > 0 and abs(x - e) <= window and not math.isnan(v)]
    return sum(ys) / len(ys) if ys else math.nan


def saturation(history: list, key: str = "train_loss", fraction: float = 0.25) -> float:
    """Share of the total decrease of ``key`` (epoch 0 to the last epoch) already made at
    ``fraction`` of the epochs: near 1 when the curve flattens early (above 1 when it rises later)."""
    xs, ys = series(history, key)
    if len(xs) < 3 or ys[0] == ys[-1]:
        return math.nan
    at = ys[min(range(len(xs)), key=lambda i: abs(xs[i] - fraction * xs[-1]))]
    return (ys[0] - at) / (ys[0] - ys[-1])


def mean_log(history: list, key: str = "train_loss") -> float:
    """Mean of log10(key) over epochs 1..E: the area under the log curve, lower = faster overall."""
    ys = [v for e, v in zip(*series(history, key)) if e > 0]
    if not ys or any(not (v > 0) for v in ys):
        return math.nan
    return sum(math.log10(v) for v in ys) / len(ys)


def stat(runs_entry, fn) -> P.Stat:
    """Stat over seeds of ``fn(history)``."""
    return P.aggregate([fn(h) for h in seeds_of(runs_entry)])


def eval_key(runs_entry) -> str:
    """"test" or "val": which evaluation split the histories hold."""
    h = seeds_of(runs_entry)[0]
    return "val" if any("val_loss" in r for r in h) else "test"


def summary_rows(runs: dict, configs: dict) -> list:
    rows = []
    for setting in SETTINGS:
        for opt in list(OPTIMIZERS) + sorted({k[0] for k in runs} - set(OPTIMIZERS)):
            if (opt, setting) not in runs:
                continue
            hs, cfg = seeds_of(runs[(opt, setting)]), configs[(opt, setting)]
            ev = eval_key(hs)
            blocks = cka_blocks(hs[0])
            picks = sorted({blocks[0], blocks[(len(blocks) - 1) // 2], blocks[-1]}) if blocks else []
            steps = hs[0][-1]["step"]
            rows.append({
                "setting": SETTING_TITLES[setting], "optimizer": LABELS.get(opt, opt), "lr": f"{cfg.lr:.3g}",
                "seeds": len(hs), "epochs": hs[0][-1]["epoch"], "steps": steps,
                "train loss": stat(hs, lambda h: final(h, "train_loss")),
                f"{ev} loss": stat(hs, lambda h: final(h, f"{ev}_loss")),
                f"{ev} acc": stat(hs, lambda h: final(h, f"{ev}_acc")),
                f"gap ({ev} - train loss)": stat(hs, lambda h: final(h, f"{ev}_loss") - final(h, "train_eval_loss")),
                "mean % loss change": stat(hs, lambda h: mean_over_training(h, "loss_change_pct")),
                "NTK sim": stat(hs, lambda h: final(h, "ntk_similarity")),
                "CKA " + "/".join(f"b{l}" for l in picks): "/".join(
                    f"{stat(hs, lambda h, l=l: final(h, f'cka_block{l}')):.3f}" for l in picks) or "-",
                "ms / step": stat(hs, lambda h: 1000 * final(h, "time_s") / max(1, h[-1]["step"])),
            })
    return rows


def _pm(s: P.Stat, missing: str = "diverged", unit: str = "") -> str:
    """``m ± s`` (then ``unit``) over the seeds that have a value, naming how many have none and why."""
    text = P.fmt_pm(s.mean, s.std) + unit
    return text + (f" ({s.diverged} of {s.n + s.diverged} seeds {missing})" if s.diverged else "")


def _outcome_text(o) -> str:
    return outcome_text(o)


def _at_least(s: P.Stat, threshold: float):
    """True if s is above ``threshold`` by more than its std, False if below by more, else None."""
    return P.compare(s, P.Stat(threshold, 0.0, 1), less=False)


def findings(runs: dict) -> list:
    out = []

    def have(*keys):
        return all(k in runs for k in keys)

    # F1. GN is fastest in full batch.
    claim = "F1: GN is fastest in full batch."
    test = ("In full batch, over seeds, GN needs fewer epochs than Adam and than SGD to reach the train "
            "loss all three reach (the highest of their mean final train losses; a seed that never "
            "reaches it counts as epochs + 1), and GN's mean log10 train loss over the epochs is lower "
            "than Adam's and SGD's; each beyond one std of the difference.")
    keys = [(o, "full") for o in OPTIMIZERS]
    if have(*keys):
        level = max(stat(runs[k], lambda h: final(h, "train_loss")).mean for k in keys)

        def reach(h):
            e = epochs_to_reach(h, "train_loss", level * (1 + 1e-9))
            return h[-1]["epoch"] + 1 if e is None else e
        epochs = {o: stat(runs[(o, "full")], reach) for o in OPTIMIZERS}
        area = {o: stat(runs[(o, "full")], mean_log) for o in OPTIMIZERS}
        checks = {f"epochs GN < {LABELS[o]}": P.compare(epochs["gn"], epochs[o]) for o in ("adam", "sgd")}
        checks |= {f"mean log loss GN < {LABELS[o]}": P.compare(area["gn"], area[o]) for o in ("adam", "sgd")}
        ev = (f"epochs to train loss {level:.4g}: " + ", ".join(f"{LABELS[o]} {epochs[o]:.3g}" for o in OPTIMIZERS)
              + "; mean log10 train loss: " + ", ".join(f"{LABELS[o]} {area[o]:.3g}" for o in OPTIMIZERS)
              + "; " + ", ".join(f"{k}: {_outcome_text(v)}" for k, v in checks.items()))
        out.append(Finding(claim, test, P.verdict(checks.values()), ev))
    else:
        out.append(Finding(claim, test, P.NOT_RUN, "needs GN, Adam and SGD full-batch runs"))

    # F2. Mini-batch: GN saturates early, Adam ends lower.
    claim = "F2: In mini-batch, GN's train and test loss saturate early and Adam ends lower."
    test = ("In mini-batch, Adam's final train loss and final test loss are each below GN's beyond one "
            "std of the difference, and GN made at least 90% of its train-loss and of its test-loss "
            "decrease in the first quarter of the epochs (mean above 0.9 by more than one std).")
    if have(("gn", "mini"), ("adam", "mini")):
        gn, adam = runs[("gn", "mini")], runs[("adam", "mini")]
        ev_key = eval_key(gn)
        fin = {o: {k: stat(runs[(o, "mini")], lambda h, k=k: final(h, k)) for k in ("train_loss", f"{ev_key}_loss")}
               for o in ("gn", "adam")}
        sat = {k: stat(gn, lambda h, k=k: saturation(h, k)) for k in ("train_loss", f"{ev_key}_loss")}
        sat_adam = stat(adam, saturation)
        checks = {f"Adam {k} < GN": P.compare(fin["adam"][k], fin["gn"][k]) for k in fin["gn"]}
        checks |= {f"GN {k} saturation >= 0.9": _at_least(s, 0.9) for k, s in sat.items()}
        ev = ("final train loss GN {} vs Adam {}; final {} loss GN {} vs Adam {}; GN's share of its decrease "
              "made in the first quarter: train {}, {} {} (Adam train {})").format(
            fin["gn"]["train_loss"], fin["adam"]["train_loss"], ev_key, fin["gn"][f"{ev_key}_loss"],
            fin["adam"][f"{ev_key}_loss"], sat["train_loss"], ev_key, sat[f"{ev_key}_loss"], sat_adam)
        ev += "; " + ", ".join(f"{k}: {_outcome_text(v)}" for k, v in checks.items())
        out.append(Finding(claim, test, P.verdict(checks.values()), ev))
    else:
        out.append(Finding(claim, test, P.NOT_RUN, "needs GN and Adam mini-batch runs"))

    # F3. GN cuts the current batch's loss the most.
    claim = "F3: GN cuts the current batch's loss the most."
    test = ("In every setting run, with each optimizer at its own (tuned) rate, GN's mean percent change "
            "of the loss on the batch it just stepped on is more negative than Adam's and than SGD's, "
            "both averaged over training and at matched train loss (averaged over the epochs within 2 of "
            "the first epoch where the run reaches the highest of the three mean final train losses); "
            "each beyond one std.")
    settings = [s for s in SETTINGS if have(*[(o, s) for o in OPTIMIZERS])]
    if settings:
        parts, checks = [], {}
        for s in settings:
            change = {o: stat(runs[(o, s)], lambda h: mean_over_training(h, "loss_change_pct")) for o in OPTIMIZERS}
            level = max(stat(runs[(o, s)], lambda h: final(h, "train_loss")).mean for o in OPTIMIZERS)
            matched = {o: stat(runs[(o, s)], lambda h: value_at_level(h, "loss_change_pct", level * (1 + 1e-9)))
                       for o in OPTIMIZERS}
            for o in ("adam", "sgd"):
                checks[f"{SETTING_TITLES[s]} GN < {LABELS[o]}"] = P.compare(change["gn"], change[o])
                checks[f"{SETTING_TITLES[s]} at matched loss GN < {LABELS[o]}"] = P.compare(matched["gn"], matched[o])
            parts.append(f"{SETTING_TITLES[s]}: mean over training " + ", ".join(
                f"{LABELS[o]} {change[o]:.3g}%" for o in OPTIMIZERS) + f"; at train loss {level:.3g}: " + ", ".join(
                f"{LABELS[o]} {_pm(matched[o], 'never reached it', '%')}" for o in OPTIMIZERS))
        parts.append(", ".join(f"{k}: {_outcome_text(v)}" for k, v in checks.items()))
        out.append(Finding(claim, test, P.verdict(checks.values()), "; ".join(parts)))
    else:
        out.append(Finding(claim, test, P.NOT_RUN, "needs all three optimizers in one setting"))

    # F4. Lazy regime: GN's NTK and CKA stay near init, Adam's CKA falls.
    claim = "F4: NTK and CKA stay near init for GN (lazy regime), while Adam's CKA falls."
    test = ("In mini-batch, at the end GN's NTK similarity to init is higher than Adam's and GN's CKA to "
            "init is higher than Adam's in every block, each beyond one std of the difference.")
    if have(("gn", "mini"), ("adam", "mini")):
        gn, adam = runs[("gn", "mini")], runs[("adam", "mini")]
        blocks = cka_blocks(seeds_of(gn)[0])
        ntk = (stat(gn, lambda h: final(h, "ntk_similarity")), stat(adam, lambda h: final(h, "ntk_similarity")))
        cka = {l: (stat(gn, lambda h, l=l: final(h, f"cka_block{l}")), stat(adam, lambda h, l=l: final(h, f"cka_block{l}")))
               for l in blocks}
        checks = {"NTK GN > Adam": P.compare(*ntk, less=False)}
        checks |= {f"CKA block {l} GN > Adam": P.compare(g, a, less=False) for l, (g, a) in cka.items()}
        ev = (f"NTK similarity GN {ntk[0]:.3f} vs Adam {ntk[1]:.3f}; CKA per block (GN vs Adam): "
              + ", ".join(f"{l}: {g:.3f} vs {a:.3f}" for l, (g, a) in cka.items())
              + "; " + ", ".join(f"{k}: {_outcome_text(v)}" for k, v in checks.items()))
        out.append(Finding(claim, test, P.verdict(checks.values()) if blocks else P.NOT_RUN, ev))
    else:
        out.append(Finding(claim, test, P.NOT_RUN, "needs GN and Adam mini-batch runs"))
    return out


def findings_markdown(runs: dict) -> list:
    lines = []
    for f in findings(runs):
        lines += [f"* **{f.claim}** {f.verdict}.", f"  Test: {f.test}", f"  Evidence: {f.evidence}."]
    return lines


def tuning_markdown(records: dict, score: str = "final validation loss") -> list:
    """The grid, every rate's score (mean ± std over the tuning seeds) and the choice, per key."""
    lines = [f"| run | grid | {score} per rate | chosen |", "|---|---|---|---|"]
    for key, rec in records.items():
        name = " ".join(key) if isinstance(key, (tuple, list)) else str(key)
        scores = ", ".join(f"{lr}: {P.Stat(**{k: v for k, v in s.items() if k != 'values'}) if isinstance(s, dict) else s}"
                           for lr, s in rec["scores"].items())
        stop = rec.get("stop")
        if rec.get("at_edge"):
            edge = (f" (grid edge; the next rate {rec['beyond']:g} diverged)" if stop == P.STOP_DIVERGED
                    else " (grid edge)")
        else:
            edge = ""
        lines.append(f"| {name} | {', '.join(f'{g:g}' for g in rec['grid'])} | {scores} | "
                     f"**{rec['chosen']:g}**{edge} |")
    return lines


def write_report(runs: dict, configs: dict, out_dir: str, figures: dict, command: str = "",
                 extra: str = "", sections: list | None = None, title: str = "RevGN vs Adam vs SGD on RevMLP") -> str:
    """Write REPORT.md to ``out_dir``; returns its path. ``sections``: extra markdown lines placed
    after the findings (tuning tables, notes)."""
    any_cfg = next(iter(configs.values()))
    seeds = sorted({len(seeds_of(h)) for h in runs.values()})
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    widths = {}
    for (_, setting), cfg in configs.items():
        widths.setdefault(setting, set()).add(cfg.hidden)
    width = str(any_cfg.hidden) if len(set().union(*widths.values())) == 1 else ", ".join(
        f"{'/'.join(map(str, sorted(w)))} ({SETTING_TITLES.get(s, s)})" for s, w in widths.items())
    stds = sorted({cfg.standardize for cfg in configs.values()})
    targets = sorted({cfg.target for (opt, _), cfg in configs.items() if opt == "gn"})
    gn_target = f"; GN's target: {', '.join(f'`{t}`' for t in targets)}" if targets else ""
    lines += [f"Dataset `{any_cfg.dataset}` (inputs standardised: {', '.join(stds)}), L = {any_cfg.blocks} blocks, "
              f"M = {width}, activations {', '.join(any_cfg.activations)}, full batch = first {any_cfg.full_batch_size} "
              f"training samples (one step per epoch), mini-batch size {any_cfg.batch_size}. GN learning rates "
              f"are in this package's convention (official x L){gn_target}. Every number is mean ± std (sample std) "
              f"over {'/'.join(map(str, seeds))} seeds.", ""]
    if extra:
        lines += [extra, ""]
    lines += ["## Final numbers", "", markdown_table(summary_rows(runs, configs)), "## Paper findings", "", RULE, ""]
    lines += findings_markdown(runs)
    if sections:
        lines += [""] + list(sections)
    lines += ["", "## Figures", "", "Lines are the mean over seeds, bands one std.", ""]
    for name, path in figures.items():
        rel = os.path.relpath(path, out_dir)
        lines += [f"![{name}]({rel})", ""]
    path = os.path.join(out_dir, "REPORT.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------- combined study

def read_runs(folder: str) -> tuple:
    """({(optimizer, setting): [history per seed]}, {key: RunConfig}) of a finished ``reproduce --out
    folder`` (its ``<optimizer>-<setting>/seed<k>/`` runs). ValueError when a run has not reached its
    configured length (and did not diverge): a report over it would read an unfinished run as a result."""
    import json

    from ..common.records import CONFIG_JSON, load_history
    from .config import RunConfig

    runs, configs = {}, {}
    for name in sorted(os.listdir(folder)):
        opt, _, setting = name.rpartition("-")
        seeds = sorted(d for d in os.listdir(os.path.join(folder, name)) if d.startswith("seed")) \
            if os.path.isdir(os.path.join(folder, name)) else []
        if setting not in SETTINGS or not seeds:
            continue
        histories = []
        for s in seeds:
            where = os.path.join(folder, name, s)
            with open(os.path.join(where, CONFIG_JSON)) as f:
                cfg = RunConfig.from_dict(json.load(f))
            history = load_history(where)
            last = history[-1] if history else {}
            if last.get("epoch", 0) < cfg.epochs and not last.get("diverged"):
                raise ValueError(f"{where} is unfinished (epoch {last.get('epoch', 0)} of {cfg.epochs}); "
                                 f"finish it with its reproduce command and --resume, or move it away")
            histories.append(history)
        runs[(opt, setting)] = histories
        configs[(opt, setting)] = replace(cfg, seed=0)
    if not runs:
        raise FileNotFoundError(f"no finished runs (<optimizer>-<setting>/seed<k>/) in {folder}")
    return runs, configs


def _tuning_of(folder: str) -> list:
    """Markdown lines: the tuning table of a ``reproduce --out`` folder's tuned_rates.json ([] without one)."""
    tuned = os.path.join(folder, "tuned_rates.json")
    if not os.path.isfile(tuned):
        return []
    payload = P.load_tuned(tuned)
    return ["", f"Tuning of `{folder}` (`{payload['command']}`):", ""] + tuning_markdown(payload["details"].get("records", {}))


def combined_report(parts: list, out: str, robustness: str | None = None, command: str = "",
                    title: str = "RevGN vs Adam vs SGD") -> str:
    """One REPORT.md over several ``reproduce`` folders (e.g. full batch at one width, mini-batch at
    another): the findings F1-F4 on the union of their runs, each part's tuning table, and F2 on the
    ``robustness`` folder (another input standardisation) as a robustness row, not a second verdict."""
    from . import plots

    runs, configs, tuning = {}, {}, []
    for folder in parts:
        r, c = read_runs(folder)
        runs |= r
        configs |= c
        tuning += _tuning_of(folder)
    sections = ["## Learning rates", ""] + (tuning or ["(no tuned_rates.json in the parts)"])
    if robustness:
        rr, rc = read_runs(robustness)
        f2 = next(f for f in findings(rr) if f.claim.startswith("F2"))
        std = next(iter(rc.values())).standardize
        sections += ["", "## Robustness: F2 under another input standardisation", "",
                     f"Runs of `{robustness}` (standardisation `{std}`); a robustness row, not a second verdict.", "",
                     f"* **{f2.claim}** {f2.verdict} under `{std}` standardisation.", f"  Evidence: {f2.evidence}.",
                     "", markdown_table(summary_rows(rr, rc))] + _tuning_of(robustness)
    figures = plots.make_figures(runs, os.path.join(out, "figures"), title)
    os.makedirs(out, exist_ok=True)
    extra = "Parts: " + ", ".join(f"`{p}`" for p in parts) + "."
    return write_report(runs, configs, out, figures, command, extra=extra, sections=sections, title=title)


if __name__ == "__main__":
    import argparse
    import shlex
    import sys

    ap = argparse.ArgumentParser(prog="python -m revgn_ext.experiments.revgn_paper.report",
                                 description="One REPORT.md over several finished `reproduce` output folders.")
    ap.add_argument("parts", nargs="+", help="reproduce --out folders whose runs enter the findings")
    ap.add_argument("--out", required=True, help="folder of the combined REPORT.md and figures")
    ap.add_argument("--robustness", default=None, help="a reproduce --out folder whose F2 is a robustness row")
    ap.add_argument("--title", default="RevGN vs Adam vs SGD")
    a = ap.parse_args()
    try:
        print(combined_report(a.parts, a.out, a.robustness, "python -m revgn_ext.experiments.revgn_paper.report "
                              + shlex.join(sys.argv[1:]), a.title))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
