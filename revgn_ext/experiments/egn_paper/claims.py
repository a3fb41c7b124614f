"""The EGN paper's claims C1-C4, each a list of tests on the recorded numbers, decided by the one verdict
rule of :mod:`..common.verdicts` (REPRODUCED when every test holds beyond the noise, NOT REPRODUCED when
any fails beyond it, MIXED only when some test is inside the noise), with every task's result listed.

Time to a target is counted in optimizer steps and in process CPU seconds (never wall time, which
depends on what else the machine runs). A seed that never reaches the target counts as its whole run
length (a lower bound on its true time), for EGN and the baseline alike, and EGN's time test fails when
EGN misses the target in more seeds than the baseline (:func:`time_tests`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..common import protocol
from ..common.verdicts import RULE, Test, claim_verdict, compare, per_task_lines
from . import lqr
from .tasks import SUPERVISED
from .problems import lower_is_better, metric_name
from .training import LABELS, TIME_KEYS, censored_time_to_target, final_value

# A classification task enters C1 only if one test error moves its accuracy by less than this.
C1_RESOLUTION = 0.005
C1_TIME_KEYS = ("step", "cpu_s")

@dataclass
class Claim:
    name: str
    claim: str
    test: str
    verdict: str
    evidence: list
    tests: list = field(default_factory=list)


def across(outcomes: list) -> str:
    """The one verdict rule on a list of test outcomes (True / False / None)."""
    return protocol.verdict(outcomes)


def as_error(task: str, value: float) -> float:
    """The metric as an error (lower is better): 1 - accuracy for classification."""
    return value if lower_is_better(task) else 1.0 - value


def best_baseline(results, task) -> str | None:
    """Of tuned SGD and Adam, the one with the better mean final metric (finite only)."""
    cands = [o for o in ("sgd", "adam") if (task, o) in results and protocol.finite(results[(task, o)]["final"].mean)]
    if not cands:
        return None
    sign = 1 if lower_is_better(task) else -1
    return min(cands, key=lambda o: sign * results[(task, o)]["final"].mean)


def eval_rows(histories: list) -> int | None:
    """How many samples the test metric was computed on (recorded by the evaluation), or None."""
    ns = [h[-1].get("n_eval") for h in histories if h and h[-1].get("n_eval")]
    return int(min(ns)) if ns else None


def c1_exclusion(task: str, results: dict) -> str | None:
    """Why a supervised task is left out of C1, or None: a classification task whose test set is so small
    that one test error moves the accuracy by :data:`C1_RESOLUTION` or more cannot tell optimizers apart."""
    if SUPERVISED[task].kind == "regression":
        return None
    n = eval_rows([h for (t, _), r in results.items() if t == task for h in r["histories"]])
    if n is None:
        return None
    if 1.0 / n >= C1_RESOLUTION:
        return (f"{task} is left out of C1: its {n} test samples make one test error {100.0 / n:.2g} percentage "
                f"points of accuracy (at least {100 * C1_RESOLUTION:g} needed to tell optimizers apart); its numbers "
                "stay in the tables, C2 and C3")
    return None


class TargetTimes:
    """Time to a target over seeds in one unit: the per-seed values (censored at the run length for a seed
    that never reaches it) and how many seeds missed."""

    def __init__(self, histories: list, target: float, lower: bool, key: str):
        pairs = [censored_time_to_target(h, target, lower, key) for h in histories] if protocol.finite(target) \
            else []
        self.key = key
        self.stat = protocol.aggregate([v for v, _ in pairs])
        self.missed = sum(1 for _, ok in pairs if not ok)
        self.n = len(pairs)

    def __format__(self, spec) -> str:
        if self.n == 0:
            return "-"
        unit = "steps" if self.key == "step" else "CPU s" if self.key == "cpu_s" else "s"
        s = f"{self.stat:.3g} {unit}"
        return s + (f" (missed in {self.missed} of {self.n} seeds: counted at the run length)" if self.missed else "")


def target_times(results: dict, tasks) -> None:
    """Set ``target`` (the better tuned first-order baseline's mean final metric) and ``ttt`` ({key:
    :class:`TargetTimes`} for steps, process CPU time and wall time) on every result."""
    for task in tasks:
        base = best_baseline(results, task)
        for (t, o), r in results.items():
            if t != task:
                continue
            r["target"] = results[(task, base)]["final"].mean if base else math.nan
            r["ttt"] = {k: TargetTimes(r["histories"], r["target"], lower_is_better(task), k) for k in TIME_KEYS}


def time_tests(task: str, mine: dict, base: dict, who: str, other: str) -> list:
    """EGN's time to the target against the baseline's, one :class:`Test` per unit (steps, CPU s): holds
    when EGN's mean is lower beyond the noise, fails when higher beyond it; fails whatever the times when
    EGN missed the target in more seeds than the baseline."""
    out = []
    for key in C1_TIME_KEYS:
        a, b = mine[key], base[key]
        if a.n == 0 or b.n == 0:
            continue
        if a.missed > b.missed:
            outcome = False
        else:
            outcome = compare(a.stat, b.stat, less=True)
        out.append(Test(task, f"{TIME_KEYS[key]} to target", outcome, f"{who} {a} vs {other} {b}"))
    return out


def claims(results: dict, tasks, study: dict | None, c4_task: str) -> list:
    out = []
    sup = [t for t in tasks if t in SUPERVISED]
    if any("ttt" not in r or not isinstance(r["ttt"], dict) for r in results.values()):
        target_times(results, tasks)

    # C1
    tests, ev = [], []
    for t in sup:
        base = best_baseline(results, t)
        if (t, "egn") not in results:
            continue
        why = c1_exclusion(t, results)
        if why is None and base is None:
            fine = protocol.finite(results[(t, "egn")]["final"].mean)
            if any((t, o) in results for o in ("sgd", "adam")):
                tests.append(Test(t, "final metric not worse than SGD and Adam", True if fine else None,
                                  "every SGD and Adam run diverged; EGN " + ("finished" if fine else "diverged too")))
            else:
                ev.append(f"{t}: no SGD or Adam run to compare with")
            continue
        if why:
            ev.append(why)
            continue
        e, b = results[(t, "egn")], results[(t, base)]
        c = compare(e["final"], b["final"], less=lower_is_better(t))
        tests.append(Test(t, f"final {metric_name(t)} not worse than {LABELS[base]}", False if c is False else True,
                          f"EGN {e['final']:.4g} vs {LABELS[base]} {b['final']:.4g}: "
                          f"{'better' if c else 'worse' if c is False else 'the same within the noise'}"))
        tests += time_tests(t, e["ttt"], b["ttt"], "EGN", LABELS[base])
        ev_target = f"{t}: target = {LABELS[base]}'s mean final {metric_name(t)} {e['target']:.4g}"
        ev.append(ev_target)
    out.append(Claim(
        "C1", "EGN matches or beats tuned SGD and Adam on each supervised task, by final test metric and by "
        "time to a target.",
        "Per supervised task, against the better of tuned SGD and Adam (by mean final metric), three tests: "
        "(a) EGN's final test metric is not worse (holds when better or the same within the noise, fails when "
        "worse beyond it: the claim is 'matches or beats'); (b) optimizer steps and (c) process CPU seconds "
        "of optimizer steps (at one thread, so the machine's load does not enter) until the first evaluation "
        "at or beyond the target, the baseline's mean final level. A seed that never reaches the target "
        "counts as its whole run length (all its steps, all its CPU time: a lower bound on its true time), "
        "for EGN and the baseline alike; (b) and (c) hold when EGN's mean is lower beyond the noise and fail "
        "when higher beyond it, and they fail whatever the times when EGN misses the target in more seeds "
        f"than the baseline. Classification tasks with so few test samples that one error moves the accuracy "
        f"by {100 * C1_RESOLUTION:g} percentage points or more are left out, with the reason. " + RULE,
        claim_verdict(tests), ev + per_task_lines(tests), tests))

    # C2
    adv = {}
    for t in tasks:
        base = best_baseline(results, t)
        if (t, "egn") not in results:
            continue
        e = results[(t, "egn")]["final"]
        em, es = as_error(t, e.mean), e.std
        if base is None:
            adv[t] = protocol.Stat(math.inf if protocol.finite(em) else math.nan, 0.0, 1)
            continue
        b = results[(t, base)]["final"]
        bm = as_error(t, b.mean)
        noise = math.sqrt((es if protocol.finite(es) else 0) ** 2 + (b.std if protocol.finite(b.std) else 0) ** 2)
        adv[t] = protocol.Stat((bm - em) / bm, noise / bm, 1) if bm > 0 else protocol.Stat(math.nan, math.nan, 0)
    reg = {t: a for t, a in adv.items() if t in lqr.PLANTS or SUPERVISED[t].kind == "regression"}
    cls = {t: a for t, a in adv.items() if t not in reg}
    tests = []
    for r, ra in reg.items():
        for c, ca in cls.items():
            if math.isinf(ra.mean) and math.isfinite(ca.mean):
                outcome = True
            else:
                outcome = compare(ra, ca, less=False)
            tests.append(Test(r, f"advantage > {c}'s", outcome, f"{ra.mean:+.3g} ± {ra.std:.2g} vs "
                                                                 f"{ca.mean:+.3g} ± {ca.std:.2g}"))
    out.append(Claim(
        "C2", "EGN's advantage is largest on regression and LQR.",
        "Advantage per task = relative error reduction of EGN against the better of tuned SGD and Adam, "
        "(err_base - err_EGN) / err_base with err = RMSE, ||H* - H||_F or 1 - accuracy (means over seeds; inf "
        "where both baselines diverged), with noise sqrt(s_EGN^2 + s_base^2) / err_base. One test per pair "
        "(regression or LQR task, classification task): the regression/LQR advantage exceeds the "
        "classification one. " + RULE, claim_verdict(tests),
        ["regression/LQR: " + ", ".join(f"{t} {a.mean:+.3g}" for t, a in reg.items()),
         "classification: " + ", ".join(f"{t} {a.mean:+.3g}" for t, a in cls.items())] + per_task_lines(tests),
        tests))

    # C3
    ev, tests = [], []
    for v, name in (("egn-ls", "line search"), ("egn-ad", "adaptive damping (with vs without the adaptive "
                                                            "lambda update)"), ("egn-mom", "momentum")):
        mine = []
        for t in tasks:
            if (t, v) in results and (t, "egn") in results:
                c = compare(results[(t, v)]["final"], results[(t, "egn")]["final"], less=lower_is_better(t))
                mine.append(Test(t, f"{LABELS[v]} better than EGN", c,
                                 f"{results[(t, v)]['final']:.4g} vs {results[(t, 'egn')]['final']:.4g}"))
        if mine:
            ev.append(f"{name}: {claim_verdict(mine)} over its tasks")
            tests += mine
    out.append(Claim(
        "C3", "Line search, adaptive damping and momentum help EGN.",
        "Per variant and task: the variant's final test metric is better than plain EGN's (both at their tuned "
        "rates). Every variant's tests on every task decide the claim together. " + RULE, claim_verdict(tests),
        ev + per_task_lines(tests), tests))

    # C4
    out.append(c4_claim(study, c4_task))
    return out


def c4_claim(study: dict | None, c4_task: str) -> Claim:
    text = ("The batch-size effect (paper: b = 32 and 128; here up to 2048): a larger batch gives EGN better "
            "steps at a higher cost per step.")
    if not study:
        return Claim("C4", text, "Needs --batch-sizes.", protocol.NOT_RUN, ["not run"])
    bs = sorted(study)
    lower = lower_is_better(c4_task)
    finals = {b: protocol.aggregate([final_value(h) for h in study[b]["histories"]]) for b in bs}
    ev = [f"b = {b}: final {metric_name(c4_task)} {finals[b]:.4g} after {study[b]['histories'][0][-1]['step']} "
          f"steps, {1e3 * study[b]['step_s']:.3g} ms/step (" +
          (", ".join(f"{k} {1e3 * v:.3g} ms" for k, v in study[b]["phases"].items()) or "no split") +
          f"), resident growth {study[b]['peak_bytes'] / 2**20:.3g} MiB, Gram + factor "
          f"{study[b]['gram_bytes'] / 2**20:.3g} MiB" for b in bs]
    tests = []
    if 32 in study and 128 in study:
        level = finals[32].mean
        reach = {b: {k: TargetTimes(study[b]["histories"], level, lower, k) for k in C1_TIME_KEYS} for b in bs}
        tests.append(Test("b = 128 vs 32", "final metric better at b = 128", compare(finals[128], finals[32], less=lower),
                          f"{finals[128]:.4g} vs {finals[32]:.4g}"))
        tests.append(Test("b = 128 vs 32", "step takes longer at b = 128",
                          study[128]["step_s"] > study[32]["step_s"],
                          f"{1e3 * study[128]['step_s']:.3g} vs {1e3 * study[32]['step_s']:.3g} ms (medians)"))
        a, b = reach[128]["step"], reach[32]["step"]
        tests.append(Test("b = 128 vs 32", "fewer steps to b = 32's final level at b = 128",
                          False if a.missed > b.missed else compare(a.stat, b.stat, less=True), f"{a} vs {b}"))
        ev.append(f"time to b = 32's mean final level {level:.4g}: " + "; ".join(
            f"b = {b}: {reach[b]['step']}, {reach[b]['cpu_s']}" for b in bs))
    return Claim("C4", text,
                 "At the same number of steps and the same tuned rate, b = 128 against b = 32: EGN's final test "
                 "metric is better, its step takes longer (median step time), and it reaches b = 32's mean final "
                 "level in fewer steps (a seed that never reaches it counts as its run length; fails when b = "
                 "128 misses in more seeds). The larger batches, the process CPU time to that level, the time "
                 "split and peak memory answer how far the effect goes. " + RULE,
                 claim_verdict(tests), ev + per_task_lines(tests), tests)


def format_time_to_target(ttt) -> str:
    """The time-to-target cell of the results table: steps and process CPU seconds."""
    if isinstance(ttt, dict):
        return "; ".join(format(ttt[k], "") for k in C1_TIME_KEYS if k in ttt)
    if ttt.n == 0:
        return "never"
    s = f"{ttt.mean:.3g} ± {ttt.std:.2g} s"
    return s + (f" (missed in {ttt.diverged} seed(s))" if ttt.diverged else "")
