"""The fair reproduction behind ``reproduce``: tuned learning rates, several seeds, mini-batch runs as
long as Adam keeps improving.

1. **Tuning** (:func:`tune`): for every (optimizer, setting) a log-spaced grid of at least 5 rates
   centred on the paper's is run on a validation split carved from the training set
   (``RunConfig.validation``); the rate with the lowest mean final validation loss over the tuning
   seeds wins (diverged runs never do). A choice at the edge of the grid extends the grid one value
   further that way until the choice is interior or the next rate diverges
   (:func:`..common.protocol.extend_grid`, at most ``max_extend`` extensions).
2. **Length** (:func:`adam_plateau_epochs`): Adam at its tuned rate trains in mini-batch until its
   train loss stops improving (:func:`plateau`); every mini-batch run then gets that many epochs.
3. **Seeds** (:func:`run_seeds`): the final runs train on the whole training set at the tuned rates
   and are evaluated on the test set, once per seed.

The outcome of 1 and 2 is stored with :func:`..common.protocol.save_tuned` (rates, epochs, the set-up it is
valid for, every tuning score and the command) so later runs can reuse it without re-tuning.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace

from ..common import protocol as P
from ..common.records import CHECKPOINT, CONFIG_JSON, load_history
from .config import TUNED_DIR, RunConfig
from .runner import dataset_tensors, run

# Fields that must agree for stored rates to apply to a run.
SETUP_FIELDS = ("dataset", "model", "blocks", "hidden", "activations", "weight_std", "batch_size",
                "full_batch_size", "target", "damping", "loss", "dtype", "max_train", "schedule",
                "weight_decay", "standardize")
# A stored set-up written before a field existed had that field's default.
SETUP_DEFAULTS = {"standardize": "global"}


def setup_of(cfg: RunConfig) -> dict:
    d = cfg.to_dict()
    return {k: d[k] for k in SETUP_FIELDS}


def run_seeds(cfg: RunConfig, seeds, out_dir: str, label: str = "", cache: dict | None = None,
              progress: bool = False, device: str = "cpu", stop=None, reuse: bool = False) -> list:
    """Histories of ``cfg`` run once per seed, in ``out_dir/seed<k>``.

    ``reuse``: a seed directory whose checkpoint holds the same configuration is continued from it
    (read back as is when it already reached ``cfg.epochs``) instead of being run again.
    ``reuse="only"``: read finished runs back and train nothing; a missing or unfinished run raises
    :class:`NotCached`."""
    histories = []
    for s in seeds:
        one, where = replace(cfg, seed=s), os.path.join(out_dir, f"seed{s}")
        kw = dict(device=device, progress=progress, data_cache=cache, label=f"{label} seed {s}".strip(), stop=stop)
        if reuse == "only":
            histories.append(_finished(one, where))
            continue
        if reuse and os.path.isfile(os.path.join(where, CHECKPOINT)):
            try:
                histories.append(run(one, where, resume=True, **kw))
                continue
            except ValueError:
                pass  # another configuration was run there: run this one afresh
        histories.append(run(one, where, **kw))
    return histories


class NotCached(ValueError):
    """A run asked to be read back has not been run to its end in the output folder."""


def _finished(cfg: RunConfig, where: str) -> list:
    try:
        history = load_history(where)
        with open(os.path.join(where, CONFIG_JSON)) as f:
            import json
            saved = RunConfig.from_dict(json.load(f))
        cfg.check_resumable(saved)
    except (OSError, ValueError):
        raise NotCached(f"no finished run of this configuration in {where}") from None
    if history[-1]["epoch"] < cfg.epochs and not history[-1].get("diverged"):
        raise NotCached(f"the run in {where} stopped at epoch {history[-1]['epoch']} of {cfg.epochs}")
    return history


def final_score(history: list, key: str) -> float:
    """``key`` at the last epoch; NaN for a diverged run."""
    if history[-1].get("diverged"):
        return math.nan
    value = history[-1].get(key)
    return math.nan if value is None else float(value)


def tune(configs: dict, seeds=(0,), grid_size: int = 5, out_dir: str = "runs/tune", cache: dict | None = None,
         progress: bool = False, device: str = "cpu", max_extend: int = 8, log=print, reuse: bool = False):
    """Tune the learning rate of each config on the validation split.

    ``configs`` maps a key (e.g. ``("gn", "mini")``) to a RunConfig whose ``lr`` is the grid centre.
    Returns ``(rates, records)``: ``{key: chosen lr}`` and ``{key: {"grid", "scores", "chosen",
    "at_edge"}}`` with ``scores`` mapping each lr to the :class:`.protocol.Stat` of the final
    validation loss over ``seeds``, plus ``"stop"`` (why the extension ended) and ``"beyond"`` (the
    diverged rate that stopped it, if any).
    """
    rates, records = {}, {}
    for key, cfg in configs.items():
        tag = "-".join(key) if isinstance(key, tuple) else str(key)

        def score(lr, cfg=cfg, tag=tag):
            hs = run_seeds(replace(cfg, lr=lr, validation=True), seeds, os.path.join(out_dir, tag, f"lr{lr:g}"),
                           cache=cache, progress=progress, device=device, reuse=reuse)
            values = [final_score(h, "val_loss") for h in hs]
            log(f"  tune {tag}: lr {lr:g} -> val loss {P.aggregate(values)}")
            return values

        search = P.extend_grid(score, cfg.lr, num=grid_size, max_extend=max_extend)
        rates[key] = search.chosen
        records[key] = search.record()
        if search.at_edge:
            log(f"  tune {tag}: lr {search.chosen:g} {search.stop_text()}")
    return rates, records


def plateau(window: int = 5, rel_tol: float = 0.01, abs_tol: float = 1e-3):
    """``stop(history)``: True once the best train loss of the last ``window`` epochs improves on the
    best before them by less than ``rel_tol * best_before + abs_tol`` (needs 2 windows of epochs)."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")

    def stop(history: list) -> bool:
        ys = [r["train_loss"] for r in history if r["epoch"] > 0]
        if len(ys) < 2 * window:
            return False
        before, recent = min(ys[:-window]), min(ys[-window:])
        return before - recent < rel_tol * before + abs_tol
    return stop


def adam_plateau_epochs(cfg: RunConfig, max_epochs: int, out_dir: str, window: int = 5, abs_tol: float = 1e-3,
                        cache: dict | None = None, progress: bool = False, device: str = "cpu",
                        reuse: bool = False) -> dict:
    """Train ``cfg`` (Adam, mini-batch, its tuned rate) on the training set for at most ``max_epochs``
    until :func:`plateau`; returns {"epochs", "stopped" (False: the cap was hit), "train_loss"}.
    ``reuse``: continue from the checkpoint in ``out_dir`` when there is one of this configuration."""
    kw = dict(device=device, progress=progress, data_cache=cache, label="adam length", stop=plateau(window, abs_tol=abs_tol))
    history = None
    if reuse and os.path.isfile(os.path.join(out_dir, CHECKPOINT)):
        try:
            history = run(replace(cfg, epochs=max_epochs), out_dir, resume=True, **kw)
        except ValueError:
            history = None           # another configuration was run there: run afresh
    if history is None:
        history = run(replace(cfg, epochs=max_epochs), out_dir, **kw)
    last = history[-1]
    return {"epochs": last["epoch"], "stopped": last["epoch"] < max_epochs, "train_loss": last["train_loss"],
            "window": window, "abs_tol": abs_tol, "rel_tol": 0.01, "max_epochs": max_epochs}


def key_name(key) -> str:
    return "-".join(key)


def stored_plan(path: str, configs: dict):
    """(payload, why_not): the stored tuning if it exists and was made for the same set-up as
    ``configs`` (every key present, :data:`SETUP_FIELDS` equal), else (None, the reason)."""
    try:
        payload = P.load_tuned(path)
    except FileNotFoundError:
        return None, f"no stored tuning at {path}"
    stored = payload.get("details", {}).get("setup", {})
    for key, cfg in configs.items():
        name = key_name(key)
        if name not in stored:
            return None, f"{path} has no tuned rate for {name}"
        mine = setup_of(cfg)
        diff = [k for k in SETUP_FIELDS if _norm(stored[name].get(k, SETUP_DEFAULTS.get(k))) != _norm(mine[k])]
        if diff:
            return None, (f"{path} was tuned for another set-up ({', '.join(f'{k}={stored[name].get(k)!r}' for k in diff)}; "
                          f"this run has {', '.join(f'{k}={mine[k]!r}' for k in diff)})")
    return payload, ""


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def derive(configs: dict, seeds, grid_size: int, max_epochs: int, out_dir: str, cache: dict, progress: bool,
           device: str, window: int = 5, abs_tol: float = 1e-3, log=print, reuse: bool = False) -> dict:
    """Tune every config, find the mini-batch length from Adam's plateau (re-tuning the mini-batch
    rates once at that length when it differs from the tuning budget by more than half), and return
    ``{"rates": {name: lr}, "epochs": {name: epochs}, "details": {...}}`` for :func:`.protocol.save_tuned`."""
    tuning = {k: replace(c, diag_every=10 ** 6, eval_every=10 ** 6) for k, c in configs.items()}
    log(f"tuning {len(tuning)} runs x {grid_size}+ rates x {len(seeds)} seed(s) on a validation split "
        f"({int(100 * next(iter(configs.values())).val_fraction)}% of the training set)")
    rates, records = tune(tuning, seeds, grid_size, os.path.join(out_dir, "tune"), cache, progress, device, log=log,
                          reuse=reuse)
    details = {"setup": {key_name(k): setup_of(c) for k, c in configs.items()}, "tuning_seeds": list(seeds),
               "score": "final validation loss (mean over tuning seeds)",
               "budget_epochs": {key_name(k): c.epochs for k, c in configs.items()}}
    epochs = {key_name(k): c.epochs for k, c in configs.items()}
    mini = {k: c for k, c in configs.items() if c.setting == "mini"}
    if ("adam", "mini") in configs:
        length = adam_plateau_epochs(replace(configs[("adam", "mini")], lr=rates[("adam", "mini")],
                                             diag_every=10 ** 6, eval_every=10 ** 6), max_epochs, os.path.join(out_dir, "adam-length"),
                                     window, abs_tol, cache, progress, device, reuse)
        log(f"Adam's mini-batch train loss stopped improving after {length['epochs']} epochs"
            + ("" if length["stopped"] else f" (cap {max_epochs} reached)"))
        details["length"] = length
        budget = configs[("adam", "mini")].epochs
        if abs(length["epochs"] - budget) > 0.5 * budget:
            log(f"re-tuning the mini-batch rates at {length['epochs']} epochs (tuned at {budget})")
            again = {k: replace(c, epochs=length["epochs"]) for k, c in tuning.items() if k in mini}
            r2, rec2 = tune(again, seeds, grid_size, os.path.join(out_dir, "tune-at-length"), cache, progress,
                            device, log=log, reuse=reuse)
            details["first_pass"] = {key_name(k): records[k] for k in mini}
            adam_before = rates[("adam", "mini")]
            rates |= r2
            records |= rec2
            details["budget_epochs"] |= {key_name(k): length["epochs"] for k in mini}
            if rates[("adam", "mini")] != adam_before:  # the length belongs to Adam's final rate
                length = adam_plateau_epochs(replace(configs[("adam", "mini")], lr=rates[("adam", "mini")],
                                                     diag_every=10 ** 6, eval_every=10 ** 6), max_epochs,
                                             os.path.join(out_dir, "adam-length-retuned"), window, abs_tol, cache,
                                             progress, device, reuse)
                log(f"at Adam's re-tuned rate its train loss stopped improving after {length['epochs']} epochs")
                details["length"] = length
        epochs |= {key_name(k): length["epochs"] for k in mini}
    details["records"] = {key_name(k): r for k, r in records.items()}
    details["epochs"] = epochs
    return {"rates": {key_name(k): v for k, v in rates.items()}, "details": details}


def reproduce(args, configs: dict, explicit: set, command_line: str, log=print) -> dict:
    """The ``reproduce`` command after option parsing.

    ``configs``: {(optimizer, setting): RunConfig} with the paper's (or ``--lr``) rates and the preset
    lengths; ``explicit``: keys whose rate was given with ``--lr`` (kept as given). Returns
    {"runs", "configs", "source", "payload", "report"}.
    """
    from . import plots, report
    import time

    out = args.out
    cache, t0 = {}, time.perf_counter()
    dataset_tensors(next(iter(configs.values())), cache)  # a missing dataset is refused before any plan is printed
    path = args.tuned_file or P.tuned_path(TUNED_DIR, f"revgn_{args.dataset}")
    payload, source = None, ""
    if args.tune:
        derived = derive(configs, args.tune_seeds, args.grid_size, args.max_epochs, out, cache, not args.no_progress,
                         args.device, args.plateau_window, log=log, reuse=bool(getattr(args, "resume", False)))
        payload = {"command": command_line, **derived}
        P.save_tuned(path, derived["rates"], command_line, derived["details"])
        P.save_tuned(os.path.join(out, "tuned_rates.json"), derived["rates"], command_line, derived["details"])
        source = f"tuned by this command (stored in `{os.path.relpath(path)}`)"
        log(f"tuned rates written to {path}")
    elif not args.paper_rates:
        payload, why = stored_plan(path, configs)
        if payload is None:
            log(f"note: {why}; using the paper's rates and the preset lengths (run with --tune to tune them)")
            source = f"the paper's (converted to this package's GN convention): {why}"
        else:
            source = f"stored tuning `{os.path.relpath(path)}`, made by `{payload['command']}`"
    else:
        source = "the paper's (converted to this package's GN convention), as asked by --paper-rates"

    final = {}
    for key, cfg in configs.items():
        name = key_name(key)
        changes = {}
        if payload is not None:
            if key not in explicit:
                changes["lr"] = payload["rates"][name]
            # With --tune, --epochs is the mini-batch tuning budget and the derived length wins.
            given = args.full_epochs if key[1] == "full" else (None if args.tune else args.epochs)
            if given is None and not (key[1] == "full" and args.epochs is not None):
                changes["epochs"] = payload["details"]["epochs"][name]
        cfg = replace(cfg, **changes)
        if args.diag_every is None:
            cfg = replace(cfg, diag_every=max(1, cfg.epochs // 25))
        if getattr(args, "eval_every", None) is None:
            cfg = replace(cfg, eval_every=max(1, cfg.epochs // 25))
        final[key] = cfg

    runs = {}
    for key, cfg in final.items():
        log(f"{key_name(key)}: lr {cfg.lr:g}, {cfg.epochs} epochs, seeds {', '.join(map(str, args.seeds))}")
        runs[key] = run_seeds(cfg, args.seeds, os.path.join(out, key_name(key)), key_name(key), cache,
                              not args.no_progress, args.device, reuse=bool(getattr(args, "resume", False)))
    wall = time.perf_counter() - t0

    any_cfg = next(iter(final.values()))
    title = f"{args.dataset}, L={any_cfg.blocks}, M={any_cfg.hidden}, {len(args.seeds)} seeds"
    figures = plots.make_figures(runs, os.path.join(out, "figures"), title)
    sections = protocol_markdown(final, payload, source)
    rpath = report.write_report(runs, final, out, figures, command_line, sections=sections,
                                extra=f"Wall time of this invocation: {wall:.0f} s (device {args.device}).")
    return {"runs": runs, "configs": final, "source": source, "payload": payload, "report": rpath, "wall": wall}


def protocol_markdown(configs: dict, payload: dict | None, source: str) -> list:
    """REPORT.md section: where the rates came from, the tuning grids and scores, the run lengths."""
    from .report import tuning_markdown

    lines = ["## Protocol", "", f"Learning rates: {source}."]
    if payload is None:
        lines += ["", "These rates were not tuned for this set-up, so the verdicts below do not come from a "
                  "fair comparison; run with `--tune`."]
        return lines
    d = payload["details"]
    lines += ["", f"Each rate was chosen on a validation split of the training set (20%, seed "
              f"{RunConfig.SPLIT_SEED}; the test set is not loaded by tuning runs) by the {d.get('score')}, "
              f"tuning seeds {d.get('tuning_seeds')}, from a log grid of factor sqrt(10) centred on the paper's "
              "rate, extended one rate at a time while the best rate was at an edge, until it was interior or the "
              "next rate diverged (the table flags a choice left at an edge). Final runs train on the whole training set "
              "and are evaluated on the test set.", ""]
    length = d.get("length")
    if length:
        lines += [f"Mini-batch length: Adam at its tuned rate stopped improving its train loss after "
                  f"**{length['epochs']} epochs** (best train loss of the last {length['window']} epochs below the "
                  f"best before by less than {length['rel_tol']:g} x best + {length['abs_tol']:g}; cap "
                  f"{length['max_epochs']}{'' if length['stopped'] else ', reached'}; train loss then "
                  f"{length['train_loss']:.3g}). Every mini-batch run uses that length.", ""]
    budgets = d.get("budget_epochs", {})
    lines += ["Tuning budgets (epochs): " + ", ".join(f"{k} {v}" for k, v in budgets.items()) + ".", ""]
    lines += tuning_markdown(d.get("records", {}))
    if d.get("first_pass"):
        lines += ["", "First pass (mini-batch rates at the preset budget, before the length was known):", ""]
        lines += tuning_markdown(d["first_pass"])
    lines += ["", "Rates used: " + ", ".join(f"{key_name(k)} {c.lr:g}" for k, c in configs.items()) + "."]
    return lines
