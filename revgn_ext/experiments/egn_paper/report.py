"""REPORT.md of the EGN comparison: set-up, tuning tables, results, claims, the C4 detail and figures."""
from __future__ import annotations

import math
import os

from ..common import protocol
from ..common.markdown import markdown_table
from ..common.records import machine
from . import lqr
from .tasks import MODELS, SUPERVISED
from ..common.verdicts import RULE
from .claims import best_baseline, format_time_to_target
from .problems import DAMPING, LQR_DAMPING, VAL_FRACTION, metric_name
from .training import LABELS, LBFGS, MOMENTUM, final_value


def write_report(out: str, ctx: dict, results: dict, tuning: dict, study: dict | None, figures: dict,
                 claim_list: list) -> str:
    tasks, optimizers = ctx["tasks"], ctx["optimizers"]
    L = ["# EGN vs SGD, Adam, SGN and L-BFGS (arXiv 2405.14402)", "",
         f"Command: `{ctx['command']}`", "",
         f"Machine: {ctx['machine_start']} at the start; {machine()} at the end. Total wall time "
         f"{ctx['wall']:.0f} s.", "",
         "## Set-up", "",
         f"* Seeds: {len(ctx['seeds'])} ({', '.join(map(str, ctx['seeds']))}); every number is mean ± std over "
         "seeds (sample std). Batch size "
         f"{ctx['batch_size']}; " + (f"{ctx['steps_desc']}." if ctx.get("steps_desc") else ""),
         f"* Wall time counts only the optimizer steps, on {ctx['device']} in {ctx['dtype']} (LQR in float64).",
         f"* GN methods (EGN variants, SGN): damping lambda = {DAMPING} (the authors' default), {LQR_DAMPING} on "
         f"LQR; egn-ls: Armijo backtracking from min(1.5 alpha_prev, lr); egn-ad: lambda *= 1.01 / 0.99 by the "
         f"gain ratio; egn-mom: beta = {MOMENTUM}; SGN: at most 10 CG iterations on J^T Q J products "
         f"(jvp/vjp); L-BFGS: torch.optim.LBFGS with {LBFGS}, a fresh memory on every mini-batch (carried across batches, "
         "its curvature pairs mix batches and its steps shrink to nothing).",
         "* Tasks:"]
    for t in tasks:
        if t in lqr.PLANTS:
            p = lqr.PLANTS[t]
            L.append(f"  * `{t}`: {p.description}. Qc = I, Rc = {p.Rc[0][0]}, dt = {lqr.DT} (zero-order hold). "
                     "Model Q(x, u) = [x; u]^T H [x; u], H symmetric (upper triangle learned), MSE on TD targets.")
        else:
            s = SUPERVISED[t]
            L.append(f"  * `{t}`: {s.source}; {MODELS[s.model][1]} "
                     f"({s.loss}); metric {metric_name(t)}.")
    L.append(f"* LQR learning set-up: {lqr.LQRSetup().describe()}. Tuning runs on independent episodes (another "
             "environment seed).")
    L += ["", "## Tuning", ""]
    if tuning:
        L.append(f"Learning rates were searched on a validation split ({int(VAL_FRACTION * 100)}% of the training "
                 f"data, fixed seed; the test set is never used), {ctx['tune_seeds']} seed(s) per value, same "
                 "steps; score = final validation metric (ties: lower validation loss). Each grid starts with 5 rates a "
                 "factor sqrt(10) apart, centred on a fixed centre per optimizer (diamonds' SGD and Adam centred for "
                 "its dollar-scale gradients), and is extended one rate at a time while the best rate is at an "
                 "edge, until the choice is interior or the next rate diverges (`protocol.extend_grid`). `*` "
                 "marks the choice; a choice left at an edge says why.")
        L.append("")
        for t in tasks:
            L.append(f"**{t}** (validation {metric_name(t).replace('test ', '')}):")
            L.append("")
            L.append("| optimizer | grid: score | chosen |")
            L.append("|---|---|---|")
            for o in optimizers:
                if (t, o) not in tuning:
                    continue
                info = tuning[(t, o)]
                cells = ", ".join(f"{lr:g}{'*' if lr == info['lr'] else ''}: {info['stats'][lr]:.4g}"
                                  for lr in info["grid"])
                found = info.get("search")
                if found is not None:
                    flag = "" if not found.at_edge else f" ({found.stop_text()})"
                else:
                    flag = " (edge)" if protocol.at_grid_edge(info["grid"], info["lr"]) else ""
                    flag += " (all diverged)" if info.get("all_diverged") else ""
                L.append(f"| {LABELS[o]} | {cells} | {info['lr']:g}{flag} |")
            L.append("")
    else:
        L.append(f"Not tuned in this run (`--no-tune`): the stored rates of `{ctx['defaults_path']}` were used "
                 f"(produced by `{ctx.get('defaults_command', '?')}`).")
        L.append("")
    L += ["## Results", "",
          "Final test metric, time to reach the better tuned first-order baseline's mean final level (the "
          "target) in optimizer steps and in process CPU seconds (a seed that never reaches it is counted at "
          "its run length and named), and time per step.", ""]
    rows = []
    for t in tasks:
        base = best_baseline(results, t)
        for o in optimizers:
            if (t, o) not in results:
                continue
            r = results[(t, o)]
            rows.append({"task": t, "optimizer": LABELS[o], "lr": r["lr"], "metric": metric_name(t),
                         "final": format(r["final"], ".4g"), "train loss": format(r["train_loss"], ".4g"),
                         "target": f"{r['target']:.4g}" if protocol.finite(r["target"]) else "-",
                         "time to target": format_time_to_target(r["ttt"]) if base else "-",
                         "ms/step": format(r["ms_step"], ".3g"), "steps": r["steps"]})
    L.append(markdown_table(rows))
    if ctx.get("lstd"):
        L += lstd_markdown(ctx["lstd"], results)
    L += ["## Claims", "", RULE, ""]
    for c in claim_list:
        L += [f"### {c.name}: {c.verdict}", "", f"*Claim.* {c.claim}", "", f"*Test.* {c.test}", "", "*Numbers.*", ""]
        L += [f"* {e}" for e in c.evidence] + [""]
    if ctx.get("c4_note"):
        L += [ctx["c4_note"], ""]
    if study:
        L += ["## C4 detail: EGN's step by batch size", "",
              f"Task `{ctx['c4_task']}`, EGN at lr {ctx['c4_lr']:g}, {ctx['c4_steps']} steps, "
              f"{len(ctx['seeds'])} seeds. The time split is measured from outside the optimizer (EGN's stats do "
              "not report it) by running the same phases (on CPU in process CPU time, like the whole step, median "
              "of 3; on CUDA in synchronised wall time) with the package's public pieces: "
              "`egn.gram.gram_matrix` (forward + layerwise Gram), `ops.gram_factor_from_gram` (Cholesky), "
              "and `torch.cholesky_solve` + one VJP (back-projection); medians of 3. Timed separately, the phases "
              "need not add up to the whole step; the table gives them as measured, the figure's stacked bars "
              "give each phase's share of their total times the measured step, so that the parts add up to "
              "the whole. Peak memory: \"peak resident growth\" is what "
              "one step adds at its peak, on CPU the process's resident high-water mark (reset before the step) "
              "minus its resident size before it (0 when the step fits in memory the process already holds from "
              "earlier steps), on CUDA `max_memory_allocated` minus the allocation before the step; \"Gram + "
              "factor\" counts the two (b c) x (b c) matrices that dominate EGN's extra memory.", ""]
        rows = []
        for b in sorted(study):
            s = study[b]
            rows.append({"batch": b, "step ms": 1e3 * s["step_s"],
                         "Gram ms": 1e3 * s["phases"].get("gram", math.nan),
                         "Cholesky ms": 1e3 * s["phases"].get("factor", math.nan),
                         "back-projection ms": 1e3 * s["phases"].get("back", math.nan),
                         "peak resident growth MiB": s["peak_bytes"] / 2**20,
                         "Gram + factor MiB": s["gram_bytes"] / 2**20,
                         "final": format(protocol.aggregate([final_value(h) for h in s["histories"]]), ".4g")})
        L.append(markdown_table(rows))
    L += ["## Figures", ""]
    for name, path in figures.items():
        L += [f"![{name}]({os.path.relpath(path, out)})", ""]
    if ctx.get("notes"):
        L += ["## Notes", ""] + [f"* {n}" for n in ctx["notes"]]
    path = os.path.join(out, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")
    return path


def lstd_markdown(lstd: dict, results: dict) -> list:
    """The LQR table: every optimizer's final ||H* - H||_F and CPU time beside LSTD's on the same transitions."""
    L = ["### LQR: the least-squares baseline", "",
         "The Q-model is linear in H, so exact GN on the TD regression is least squares; LSTD-Q solves the "
         "least-squares fixed point directly (`lqr.lstd_q`) on the same transitions (same plant, seeds, "
         "exploration noise, b episodes per update, same number of updates), on every transition so far, "
         "with greedy policy improvement on the same schedule (least-squares policy iteration). CPU time: "
         "process CPU seconds of the solves (LSTD) or of the optimizer steps (the others).", "",
         "| task | method | final ||H* - H||_F | ||H_K - H||_F | process CPU s |", "|---|---|---|---|---|"]
    for task, row in lstd.items():
        for (t, o), r in results.items():
            if t != task:
                continue
            cpu = protocol.aggregate([h[-1].get("cpu_s") for h in r["histories"]])
            pol = protocol.aggregate([h[-1].get("policy_error") for h in r["histories"]])
            L.append(f"| {task} | {LABELS[o]} | {r['final']:.3g} | {pol:.3g} | {cpu:.3g} |")
        L.append(f"| {task} | **LSTD** ({row['steps']} updates x {row['batch_size']}) | {row['metric']:.3g} | "
                 f"{row['policy_error']:.3g} | {row['cpu_s']:.3g} |")
    return L + [""]
