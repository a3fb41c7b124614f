"""``python -m revgn_ext.experiments egn``: the EGN paper's comparison (Korbit et al., arXiv 2405.14402).

For every task and optimizer it tunes the learning rate on a validation split carved from the training
data (:mod:`.protocol`), trains ``--seeds`` seeds on the full training split at the chosen rate, records
the test metric against steps and wall time (``DIR/<task>/<optimizer>/seed<k>/metrics.{jsonl,csv}``),
times EGN's step at several batch sizes, and writes ``DIR/figures/*.png`` and ``DIR/REPORT.md`` with a
verdict on each of the paper's claims C1-C4.

Wall time counts the optimizer steps only (not batch assembly or evaluation). Runs write a checkpoint
at every evaluation; ``--resume`` continues each run from it and skips finished runs, and because the
batch order depends only on (seed, step) a resumed run ends with the same metrics as an uninterrupted
one.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch

import revgn_ext as rg

from . import egn_tasks as T
from . import lqr as Q
from . import protocol as P
from .plots import _save
from .report import markdown_table
from . import checkpoint
from .runner import CHECKPOINT, _write_metrics, load_history, resolve_device
from .sgn import SGN

OPTIMIZERS = ("egn", "egn-ls", "egn-ad", "egn-mom", "sgd", "adam", "sgn", "lbfgs")
EGN_FAMILY = ("egn", "egn-ls", "egn-ad", "egn-mom")
TASKS = tuple(T.SUPERVISED) + tuple(Q.PLANTS)
ALIASES = {"lqr": tuple(Q.PLANTS), "all": TASKS}
DEFAULT_TASKS = ("diabetes", "diamonds", "breast-cancer", "wine", "lqr-stable", "lqr-unstable")
LABELS = {"egn": "EGN", "egn-ls": "EGN + line search", "egn-ad": "EGN + adaptive damping",
          "egn-mom": "EGN + momentum", "sgd": "SGD", "adam": "Adam", "sgn": "SGN (10 CG)", "lbfgs": "L-BFGS"}
COLORS = {"egn": "C0", "egn-ls": "C9", "egn-ad": "C4", "egn-mom": "C6", "sgd": "C2", "adam": "C1",
          "sgn": "C3", "lbfgs": "C7"}

MOMENTUM = 0.9            # beta of egn-mom
DAMPING = 1.0             # lambda of the GN methods: the authors' default ...
LQR_DAMPING = 1e-3        # ... except on the TD regression of the LQR task (see :func:`damping_for`)
# L-BFGS runs 10 iterations on each mini-batch from a fresh memory (see :func:`train_step`).
LBFGS = dict(max_iter=10, history_size=10, line_search_fn="strong_wolfe")
# Centres of the tuning grids when no stored rate exists (the grid spans centre / 10 .. centre * 10).
GRID_CENTRES = {"egn": 0.3, "egn-ls": 1.0, "egn-ad": 0.3, "egn-mom": 0.3, "sgd": 0.03, "adam": 3e-3,
                "sgn": 0.3, "lbfgs": 1.0}
# Diamonds keeps its target in dollars, so first-order gradients are ~1e4 times larger than elsewhere.
TASK_GRID_CENTRES = {("diamonds", "sgd"): 1e-6, ("diamonds", "adam"): 0.1}
DEFAULTS_NAME = "egn_tasks"
VAL_FRACTION = 0.2
C4_BATCHES = (32, 128, 512, 2048)


def damping_for(task: str) -> float:
    """lambda for the GN methods. The LQR task's TD regression has quadratic features whose covariance
    spans many orders of magnitude; lambda = 1 damps its small directions so much that policy
    evaluation has not converged when the policy is improved, and every GN variant diverges."""
    return LQR_DAMPING if task in Q.PLANTS else DAMPING


def task_dtype(task: str, dtype: str) -> torch.dtype:
    """The LQR task always runs in float64: its Gram is rank-deficient with entries over six orders of
    magnitude, and in float32 the Cholesky jitter swamps the damping."""
    return torch.float64 if task in Q.PLANTS else getattr(torch, dtype)


def expand_tasks(names) -> tuple:
    out = []
    for name in names:
        for t in ALIASES.get(name, (name,)):
            if t not in TASKS:
                raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS + tuple(ALIASES))}")
            if t not in out:
                out.append(t)
    return tuple(out)


# ------------------------------------------------------------------------------------------- problems

class Supervised:
    """A supervised task's run: fixed data, batches drawn from a per-epoch permutation of (seed, epoch)."""

    def __init__(self, task: str, data: T.TaskData, batch_size: int, seed: int, split: str):
        self.spec = T.SUPERVISED[task]
        self.loss = self.spec.loss
        self.lower_is_better = self.spec.lower_is_better
        x, y = data.x_train, data.y_train
        if split == "val":
            x, y, self.x_eval, self.y_eval = P.split_train(x, y, VAL_FRACTION, seed=0)
        else:
            self.x_eval, self.y_eval = data.x_test, data.y_test
        if batch_size > len(x):
            raise ValueError(f"--batch-size {batch_size} is larger than the {len(x)} training samples of task "
                             f"{task!r}{' after the validation split' if split == 'val' else ''}; use a smaller "
                             "batch")
        self.x, self.y, self.data, self.task = x, y, data, task
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = len(x) // batch_size  # drop the last partial batch: every step sees b samples

    def make_model(self, seed: int):
        return T.make_model(self.task, self.data, seed)

    def next_batch(self, model, step: int):
        epoch, k = divmod(step, self.per_epoch)
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        idx = order[k * self.batch_size:(k + 1) * self.batch_size].to(self.x.device)
        return self.x[idx], self.y[idx]

    def after_update(self, model) -> None:
        pass

    def evaluate(self, model) -> dict:
        return T.evaluate(self.spec, model, self.x_eval, self.y_eval, self.data.y_scale)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LQRRun:
    """The LQR task's run: :class:`.lqr.LQRProblem` with the step-indexed interface of :class:`Supervised`.
    Tuning ("val") uses independent episodes (another environment seed)."""
    loss = "mse"
    lower_is_better = True

    def __init__(self, task: str, batch_size: int, seed: int, split: str, dtype, device):
        self.problem = Q.LQRProblem(Q.PLANTS[task], batch_size, seed + (7919 if split == "val" else 0),
                                    dtype=dtype, device=device)
        self.task = task

    def make_model(self, seed: int):
        return self.problem.make_model(seed)

    def next_batch(self, model, step: int):
        return self.problem.next_batch(model)

    def after_update(self, model) -> None:
        self.problem.after_update(model)

    def evaluate(self, model) -> dict:
        return self.problem.evaluate(model)

    def state_dict(self) -> dict:
        return self.problem.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.problem.load_state_dict(state)


def lower_is_better(task: str) -> bool:
    return True if task in Q.PLANTS else T.SUPERVISED[task].lower_is_better


def metric_name(task: str) -> str:
    if task in Q.PLANTS:
        return "||H* - H||_F"
    return "test RMSE" + (" ($)" if task == "diamonds" else "") if T.SUPERVISED[task].metric == "rmse" \
        else "test accuracy"


# ------------------------------------------------------------------------------------------- optimizers

def build_optimizer(name: str, model, loss: str, lr: float, damping: float):
    if name in EGN_FAMILY:
        return rg.EGN(model, lr=lr, damping=damping, loss=loss, line_search=name == "egn-ls",
                      adaptive_damping=name == "egn-ad", momentum=MOMENTUM if name == "egn-mom" else 0.0)
    if name == "sgn":
        return SGN(model, lr=lr, damping=damping, loss=loss, cg_iters=10)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "lbfgs":
        return torch.optim.LBFGS(model.parameters(), lr=lr, **LBFGS)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def train_step(name: str, opt, model, loss: str, x, y):
    """One step; returns (pre-step batch loss, numeric stats)."""
    if name in EGN_FAMILY or name == "sgn":
        stats = opt.step(x, y)
        return float(stats["loss"]), {k: float(v) for k, v in stats.items()
                                      if isinstance(v, (int, float)) and k not in ("loss", "new_loss")}

    def closure():
        opt.zero_grad(set_to_none=True)
        value = T.batch_loss(loss, model(x).reshape(len(x), -1), y)
        value.backward()
        return value

    if name == "lbfgs":
        # Curvature pairs from different mini-batches are inconsistent: carried across batches they
        # shrink torch's L-BFGS steps to ~1e-6 of SGD's within a few batches. Each batch therefore
        # gets its own memory and max_iter iterations with a strong-Wolfe line search.
        opt.state.clear()
        return float(opt.step(closure).detach()), {}
    value = closure()
    opt.step()
    return float(value.detach()), {}


# ------------------------------------------------------------------------------------------- one run

@dataclass
class RunSpec:
    """Everything that determines one run (and must match when it is resumed)."""
    task: str
    optimizer: str
    lr: float
    seed: int
    batch_size: int
    steps: int | None = None            # None: run until time_budget
    time_budget: float | None = None    # seconds of optimizer steps
    dtype: str = "float32"
    split: str = "test"                 # "val": train on the fit part, score on the validation part
    eval_every: int = 10
    max_train: int | None = None
    max_test: int | None = None
    damping: float = DAMPING

    RESUMABLE_CHANGES = ("steps", "time_budget")

    def to_dict(self) -> dict:
        return asdict(self)

    def check_resumable(self, saved: dict) -> None:
        for key, value in self.to_dict().items():
            if key not in self.RESUMABLE_CHANGES and saved.get(key) != value:
                raise ValueError(f"cannot resume: the checkpoint was made with {key}={saved.get(key)!r}, this run "
                                 f"asks for {key}={value!r}; use another --out or drop --resume")


def make_problem(spec: RunSpec, device, cache: dict):
    dtype = task_dtype(spec.task, spec.dtype)
    if spec.task in Q.PLANTS:
        return LQRRun(spec.task, spec.batch_size, spec.seed, spec.split, dtype, device)
    data = T.load_task_data(spec.task, cache.get("data_dir"), spec.max_train, spec.max_test, dtype, device,
                            cache.setdefault("arrays", {}))
    return Supervised(spec.task, data, spec.batch_size, spec.seed, spec.split)


def _finite_params(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _validate_checkpoint(path: str, payload) -> dict:
    """An ``egn`` run's checkpoint: its entries, and finite weights unless the run ended by diverging."""
    payload = checkpoint.validate_keys(path, payload, {"spec": dict, "model": dict, "optimizer": dict,
                                                      "problem": dict, "history": list, "done": bool})
    if not payload["history"] or not all(isinstance(r, dict) and "step" in r for r in payload["history"]):
        raise checkpoint.CheckpointError(f"checkpoint {path} is unusable: its history is malformed")
    if not payload["history"][-1].get("diverged"):
        checkpoint.validate_keys(path, payload, {}, finite=("model", "optimizer"))
    return payload


def run_one(spec: RunSpec, out_dir: str, device="cpu", resume: bool = False, progress: bool = False,
            cache: dict | None = None, stop_after: int | None = None) -> list:
    """Train ``spec``, writing metrics and a checkpoint at every evaluation to ``out_dir``; returns the
    history rows. ``resume`` continues from the checkpoint (a finished run is returned as is).
    ``stop_after`` returns after that many steps of this call, as an interruption would."""
    from tqdm.auto import tqdm

    cache = {} if cache is None else cache
    dev = resolve_device(device)
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    ckpt = None
    if resume and os.path.isfile(ckpt_path):
        checkpoint.remove_stale_tmp(ckpt_path)
        ckpt = checkpoint.load(ckpt_path, map_location=dev, validator=_validate_checkpoint)
        spec.check_resumable(ckpt["spec"])
        if ckpt.get("done") and ckpt["spec"].get("steps") == spec.steps and \
                ckpt["spec"].get("time_budget") == spec.time_budget:
            return ckpt["history"]
    os.makedirs(out_dir, exist_ok=True)
    problem = make_problem(spec, dev, cache)
    model = problem.make_model(spec.seed)
    opt = build_optimizer(spec.optimizer, model, problem.loss, spec.lr, spec.damping)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            problem.load_state_dict(ckpt["problem"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {ckpt_path} is unusable: its state does not fit this "
                                             f"run ({type(e).__name__}: {e}). Delete it to start the run afresh") \
                from None
        history = ckpt["history"]
    else:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(spec.to_dict(), f, indent=1)
        history = [{"step": 0, "time_s": 0.0, "train_loss": None, **problem.evaluate(model)}]
    step, elapsed = history[-1]["step"], history[-1]["time_s"]
    diverged = bool(history[-1].get("diverged", 0))

    def budget_left():
        if diverged:
            return False
        if spec.steps is not None:
            return step < spec.steps
        return elapsed < spec.time_budget

    bar = tqdm(total=spec.steps, initial=step, disable=not progress, leave=False, dynamic_ncols=True,
               desc=f"{spec.task} {spec.optimizer} s{spec.seed}")
    losses, stat_sums, done_here = [], {}, 0
    while budget_left():
        x, y = problem.next_batch(model, step)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # refused EGN steps are counted in the stats
            before, stats = train_step(spec.optimizer, opt, model, problem.loss, x, y)
        elapsed += time.perf_counter() - t0
        problem.after_update(model)
        step += 1
        done_here += 1
        bar.update(1)
        losses.append(before)
        for k, v in stats.items():
            stat_sums[k] = stat_sums.get(k, 0.0) + v
        diverged = not math.isfinite(before) or not _finite_params(model)
        last = not budget_left()
        if step % spec.eval_every == 0 or last or diverged:
            row = {"step": step, "time_s": elapsed, "train_loss": sum(losses) / len(losses)}
            row.update(problem.evaluate(model) if not diverged else {"metric": math.nan, "loss": math.nan})
            row.update({f"opt_{k}": v / len(losses) for k, v in stat_sums.items()})
            if diverged:
                row["diverged"] = 1
            history.append(row)
            losses, stat_sums = [], {}
            _write_metrics(out_dir, history)
            checkpoint.save(ckpt_path, {"spec": spec.to_dict(), "model": model.state_dict(),
                                        "optimizer": opt.state_dict(), "problem": problem.state_dict(),
                                        "history": history, "done": last or diverged})
        if stop_after is not None and done_here >= stop_after:
            break
    bar.close()
    if len(history) == 1:
        _write_metrics(out_dir, history)
    return history


# ------------------------------------------------------------------------------------------- aggregation

def final_value(history: list, key: str = "metric") -> float:
    v = history[-1].get(key)
    return math.nan if v is None else float(v)


def time_to_target(history: list, target: float, lower: bool):
    """Wall time (s) of the first evaluation at or beyond ``target``; None if never reached."""
    for row in history[1:]:
        v = row.get("metric")
        if v is not None and math.isfinite(v) and (v <= target if lower else v >= target):
            return row["time_s"]
    return None


def curve(histories: list, x_key: str):
    """(x, mean, std) of the metric over seeds at the evaluation steps all seeds share; x is the step or
    the seeds' mean wall time at that step. A diverged seed contributes NaN from then on."""
    steps = sorted({r["step"] for h in histories for r in h})
    xs, means, stds = [], [], []
    for s in steps:
        vals, times = [], []
        for h in histories:
            row = next((r for r in h if r["step"] == s), None)
            if row is None:
                if h[-1].get("diverged") and h[-1]["step"] < s:
                    vals.append(math.nan)
                continue
            vals.append(math.nan if row.get("metric") is None else row["metric"])
            times.append(row["time_s"])
        if not times:
            continue
        st = P.aggregate(vals)
        xs.append(s if x_key == "step" else sum(times) / len(times))
        means.append(st.mean if st.diverged == 0 else math.nan)
        stds.append(st.std if st.diverged == 0 else math.nan)
    return xs, means, stds


def step_time(history: list) -> float:
    steps = history[-1]["step"]
    return history[-1]["time_s"] / steps if steps else math.nan


# ------------------------------------------------------------------------------------------- tuning

def stored_rates() -> dict:
    return P.load_tuned(P.tuned_path(DEFAULTS_NAME))


def grid_for(task: str, optimizer: str) -> list:
    """The tuning grid: fixed centres (not the stored rates), so that ``--tune`` re-derives the stored file."""
    return P.lr_grid(TASK_GRID_CENTRES.get((task, optimizer), GRID_CENTRES[optimizer]), num=5)


def pick_lr(task: str, optimizer: str, scores: dict, val_losses: dict) -> tuple:
    """(chosen lr, {lr: Stat}) by validation metric; ties (common for accuracy on small validation
    sets) go to the lower validation loss. Every rate diverged: the smallest, flagged."""
    lower = lower_is_better(task)
    try:
        best, stats = P.select_best(scores, lower_is_better=lower)
    except ValueError:
        stats = {k: P.aggregate(v) for k, v in scores.items()}
        return min(scores), stats, True
    tied = [k for k, s in stats.items() if s.diverged == 0 and s.mean == stats[best].mean]
    if len(tied) > 1:
        best = min(tied, key=lambda k: P.aggregate(val_losses[k]).mean)
    return best, stats, False


# ------------------------------------------------------------------------------------------- C4: batch size

def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _peak_bytes(fn, device) -> float:
    """Peak memory added while ``fn`` runs: CUDA's peak-allocation counter, or on CPU (Linux) the
    process's resident high-water mark, reset just before (``/proc/self/clear_refs``), minus the
    resident size at the start. NaN where neither is available."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _proc_status_kib("VmRSS")
        fn()
        return 1024.0 * (_proc_status_kib("VmHWM") - base)
    except OSError:
        fn()
        return math.nan


def phase_times(model, x, y, damping: float, repeats: int = 3) -> dict:
    """Median seconds of EGN's phases on (x, y) for MSE, timed from outside the optimizer with the same
    public pieces it uses: forward + Jacobian/Gram K = J J^T (layerwise, J never formed), Cholesky of
    K + b lambda I, and back-projection (triangular solves for u, then the VJP dir = -J^T u)."""
    from ..curvature.gram import gram_matrix

    params = [p for p in model.parameters() if p.requires_grad]
    b = x.shape[0]
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.device.type == "cuda" else (lambda: None)
    out = {"gram": [], "factor": [], "back": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        K = gram_matrix(model, x)
        sync()
        t1 = time.perf_counter()
        K.diagonal().add_(b * damping)
        chol = rg.ops.gram_factor_from_gram(K[None], 0.0)
        sync()
        t2 = time.perf_counter()
        f = model(x).reshape(b, -1)
        t3 = time.perf_counter()
        u = torch.cholesky_solve((f - y).detach().reshape(-1, 1), chol.L[0]).reshape(f.shape)
        torch.autograd.grad(f, params, grad_outputs=u)
        sync()
        t4 = time.perf_counter()
        out["gram"].append(t1 - t0)
        out["factor"].append(t2 - t1)
        out["back"].append(t4 - t3)
    return {k: statistics.median(v) for k, v in out.items()}


def batch_size_study(task: str, batches, lr: float, seeds, steps: int, dtype: str, device, out: str,
                     resume: bool, progress: bool, cache: dict, eval_every: int, max_train, max_test) -> dict:
    """EGN at each batch size: runs (test metric after ``steps`` steps, time per step) and the step's
    time split and peak memory."""
    dev = resolve_device(device)
    result = {}
    for b in batches:
        hist = []
        for seed in seeds:
            spec = RunSpec(task, "egn", lr, seed, b, steps=steps, dtype=dtype, eval_every=eval_every,
                           max_train=max_train, max_test=max_test, damping=damping_for(task))
            hist.append(run_one(spec, os.path.join(out, "batch_size", task, f"b{b}", f"seed{seed}"), dev,
                                resume, progress, cache))
        problem = make_problem(RunSpec(task, "egn", lr, 0, b, steps=1, dtype=dtype, max_train=max_train,
                                       max_test=max_test), dev, cache)
        model = problem.make_model(0)
        x, y = problem.next_batch(model, 0)
        opt = build_optimizer("egn", model, problem.loss, lr, damping_for(task))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step(x, y)  # warm-up
            steps_t = []
            for _ in range(3):
                t0 = time.perf_counter()
                opt.step(x, y)
                steps_t.append(time.perf_counter() - t0)
            phases = phase_times(model, x, y, damping_for(task)) if problem.loss == "mse" else {}
            peak = _peak_bytes(lambda: opt.step(x, y), dev)
        c = problem.data.outputs if isinstance(problem, Supervised) else 1
        gram_bytes = 2 * (b * c) ** 2 * x.element_size()   # the damped Gram and its Cholesky factor
        result[b] = {"histories": hist, "step_s": statistics.median(steps_t), "phases": phases, "peak_bytes": peak,
                     "gram_bytes": gram_bytes}
    return result


# ------------------------------------------------------------------------------------------- figures

def _band(ax, xs, m, s, color, label):
    import numpy as np

    xs, m, s = np.asarray(xs, float), np.asarray(m, float), np.asarray(s, float)
    ax.plot(xs, m, color=color, label=label, lw=1.5)
    ax.fill_between(xs, m - s, m + s, color=color, alpha=0.18, lw=0)


def _panels(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, plt, list(axes.flat)


def figure_metric(results: dict, tasks, optimizers, x_key: str, path: str, title: str) -> str:
    """One panel per task: the metric against wall time or steps, mean over seeds with a std band."""
    fig, plt, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for opt in optimizers:
            if (task, opt) in results:
                xs, m, s = curve(results[(task, opt)]["histories"], x_key)
                _band(ax, xs, m, s, COLORS[opt], LABELS[opt])
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
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, plt, path)


def figure_lqr(results: dict, tasks, optimizers, path: str) -> str:
    """Per plant: ||H* - H||_F and ||H_K - H||_F (the current policy's Q) against steps."""
    plants = [t for t in tasks if t in Q.PLANTS]
    fig, plt, axes = _panels(2 * len(plants))
    for i, task in enumerate(plants):
        for j, (key, name) in enumerate((("metric", "||H* - H||_F"), ("policy_error", "||H_K - H||_F"))):
            ax = axes[2 * i + j]
            for opt in optimizers:
                if (task, opt) in results:
                    hs = [[{**r, "metric": r.get(key)} for r in h] for h in results[(task, opt)]["histories"]]
                    xs, m, s = curve(hs, "step")
                    _band(ax, xs, m, s, COLORS[opt], LABELS[opt])
            ax.set_yscale("log")
            ax.set_title(f"{task}: {name}", fontsize=10)
            ax.set_xlabel("update")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("LQR Q-learning: distance to the optimal and to the current policy's Q-matrix")
    fig.tight_layout()
    return _save(fig, plt, path)


def figure_batch(study: dict, task: str, path: str) -> str:
    fig, plt, axes = _panels(2)
    bs = sorted(study)
    labels = [str(b) for b in bs]
    bottom = [0.0] * len(bs)
    for key, name, color in (("gram", "forward + Jacobian/Gram", "C0"), ("factor", "Cholesky", "C1"),
                             ("back", "back-projection", "C2")):
        vals = [1e3 * study[b]["phases"].get(key, math.nan) for b in bs]
        axes[0].bar(labels, vals, bottom=bottom, color=color, label=name)
        bottom = [a + v for a, v in zip(bottom, vals)]
    axes[0].plot(labels, [1e3 * study[b]["step_s"] for b in bs], "k.-", label="whole EGN step")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("batch size")
    axes[0].set_ylabel("ms")
    axes[0].set_title("EGN step time split", fontsize=10)
    axes[0].legend(fontsize=7)
    for k, b in enumerate(bs):
        xs, m, s = curve(study[b]["histories"], "time")
        _band(axes[1], xs, m, s, f"C{k}", f"b = {b}")
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
    return _save(fig, plt, path)


# ------------------------------------------------------------------------------------------- claims

@dataclass
class Claim:
    name: str
    claim: str
    test: str
    verdict: str
    evidence: list


def _across(outcomes: list) -> str:
    """Across tasks: every task supports the claim -> REPRODUCED, none -> NOT REPRODUCED, some -> MIXED."""
    if not outcomes:
        return P.NOT_RUN
    if all(outcomes):
        return P.REPRODUCED
    if not any(outcomes):
        return P.NOT_REPRODUCED
    return P.MIXED


def _stat(results, task, opt, key="final"):
    return results[(task, opt)][key] if (task, opt) in results else P.aggregate([])


def _error(task: str, value: float) -> float:
    """The metric as an error (lower is better): 1 - accuracy for classification."""
    return value if lower_is_better(task) else 1.0 - value


def best_baseline(results, task) -> str | None:
    """Of tuned SGD and Adam, the one with the better mean final metric (finite only)."""
    cands = [o for o in ("sgd", "adam") if (task, o) in results and P.finite(results[(task, o)]["final"].mean)]
    if not cands:
        return None
    sign = 1 if lower_is_better(task) else -1
    return min(cands, key=lambda o: sign * results[(task, o)]["final"].mean)


def claims(results: dict, tasks, study: dict | None, c4_task: str) -> list:
    out = []
    sup = [t for t in tasks if t in T.SUPERVISED]

    # C1
    ev, oks = [], []
    for t in sup:
        base = best_baseline(results, t)
        if (t, "egn") not in results or base is None:
            continue
        lower = lower_is_better(t)
        e, b = results[(t, "egn")], results[(t, base)]
        final_cmp = P.compare(e["final"], b["final"], less=lower)
        tt_e, tt_b = e["ttt"], b["ttt"]
        if tt_e.diverged:      # EGN missed the target in some seed
            time_cmp = False
        elif tt_b.diverged:
            time_cmp = True
        else:
            time_cmp = P.compare(tt_e, tt_b, less=True)
        ok = final_cmp is not False and time_cmp is not False
        oks.append(ok)
        ev.append(f"{t}: final {metric_name(t)} EGN {e['final']:.4g} vs {LABELS[base]} {b['final']:.4g} "
                  f"({'beats' if final_cmp else 'matches' if final_cmp is None else 'worse'}); time to "
                  f"{LABELS[base]}'s final level {e['target']:.4g}: EGN {_fmt_ttt(tt_e)} vs {LABELS[base]} "
                  f"{_fmt_ttt(tt_b)} -> {'holds' if ok else 'fails'}")
    out.append(Claim("C1", "EGN matches or beats tuned SGD and Adam on each supervised task, by final test "
                     "metric and by time to a target.",
                     "Per supervised task, against the better of tuned SGD and Adam (by mean final metric): EGN's "
                     "final test metric is not worse beyond one std of the difference (protocol.compare), and EGN "
                     "reaches that baseline's final mean level in every seed no later than the baseline (mean "
                     "wall time, same noise rule). REPRODUCED if this holds on every task, NOT REPRODUCED if on "
                     "none, MIXED otherwise.", _across(oks), ev))

    # C2
    adv = {}
    for t in tasks:
        base = best_baseline(results, t)
        if (t, "egn") not in results:
            continue
        e = _error(t, results[(t, "egn")]["final"].mean)
        if base is None:
            adv[t] = math.inf if P.finite(e) else math.nan   # every baseline diverged
            continue
        b = _error(t, results[(t, base)]["final"].mean)
        adv[t] = (b - e) / b if b > 0 else math.nan
    reg = {t: a for t, a in adv.items() if t in Q.PLANTS or T.SUPERVISED[t].kind == "regression"}
    cls = {t: a for t, a in adv.items() if t not in reg}
    fin = lambda d: [v for v in d.values() if not math.isnan(v)]  # noqa: E731
    if fin(reg) and fin(cls):
        if min(fin(reg)) > max(fin(cls)):
            v2 = P.REPRODUCED
        elif max(fin(reg)) < min(fin(cls)):
            v2 = P.NOT_REPRODUCED
        else:
            v2 = P.MIXED
    else:
        v2 = P.NOT_RUN
    out.append(Claim("C2", "EGN's advantage is largest on regression and LQR.",
                     "Advantage per task = relative error reduction of EGN against the better of tuned SGD and Adam, "
                     "(err_base - err_EGN) / err_base with err = RMSE, ||H* - H||_F or 1 - accuracy (means over "
                     "seeds; inf where both baselines diverged). REPRODUCED if every regression/LQR task's "
                     "advantage exceeds every classification task's, NOT REPRODUCED if every one is below, MIXED "
                     "otherwise.", v2,
                     ["regression/LQR: " + ", ".join(f"{t} {a:+.3g}" for t, a in reg.items()),
                      "classification: " + ", ".join(f"{t} {a:+.3g}" for t, a in cls.items())]))

    # C3
    ev, per_variant = [], {}
    for v, name in (("egn-ls", "line search"), ("egn-ad", "adaptive damping (with vs without the adaptive "
                                                            "lambda update)"), ("egn-mom", "momentum")):
        outcomes = []
        parts = []
        for t in tasks:
            if (t, v) in results and (t, "egn") in results:
                c = P.compare(results[(t, v)]["final"], results[(t, "egn")]["final"], less=lower_is_better(t))
                outcomes.append(c)
                parts.append(f"{t} {results[(t, v)]['final']:.4g} vs {results[(t, 'egn')]['final']:.4g} "
                             f"({'helps' if c else 'hurts' if c is False else 'within noise'})")
        if outcomes:
            verdict = _across([o is True for o in outcomes])
            per_variant[v] = verdict
            ev.append(f"{name}: {verdict}; " + "; ".join(parts))
    verdicts = set(per_variant.values())
    v3 = P.NOT_RUN if not verdicts else verdicts.pop() if len(verdicts) == 1 else P.MIXED
    out.append(Claim("C3", "Line search, adaptive damping and momentum help EGN.",
                     "Per variant and task: the variant's final test metric is better than plain EGN's (both at "
                     "their tuned rates) beyond one std of the difference. A variant helps (REPRODUCED) if that "
                     "holds on every task, NOT REPRODUCED if on none, MIXED otherwise; the claim's verdict is the "
                     "variants' common verdict, MIXED if they differ.", v3, ev))

    # C4
    if study:
        bs = sorted(study)
        lower = lower_is_better(c4_task)
        finals = {b: P.aggregate([final_value(h) for h in study[b]["histories"]]) for b in bs}
        ev = [f"b = {b}: final {metric_name(c4_task)} {finals[b]:.4g} after {study[b]['histories'][0][-1]['step']} "
              f"steps, {1e3 * study[b]['step_s']:.3g} ms/step (" +
              (", ".join(f"{k} {1e3 * v:.3g} ms" for k, v in study[b]["phases"].items()) or "no split") +
              f"), resident growth {study[b]['peak_bytes'] / 2**20:.3g} MiB, Gram + factor "
              f"{study[b]['gram_bytes'] / 2**20:.3g} MiB" for b in bs]
        paper = [b for b in (32, 128) if b in study]
        if len(paper) == 2:
            better = P.compare(finals[128], finals[32], less=lower)
            grows = study[128]["step_s"] > study[32]["step_s"]
            v4 = P.REPRODUCED if better and grows else P.NOT_REPRODUCED if better is False or not grows else P.MIXED
            level = finals[32].mean
            reach = {b: P.aggregate([time_to_target(h, level, lower) for h in study[b]["histories"]]) for b in bs}
            ev.append(f"time to b = 32's final level {level:.4g}: " + ", ".join(f"b = {b} {_fmt_ttt(reach[b])}"
                                                                                for b in bs))
        else:
            v4 = P.NOT_RUN
        out.append(Claim("C4", "The batch-size effect (paper: b = 32 and 128; here up to 2048): a larger batch "
                         "gives EGN better steps at a higher cost per step.",
                         "At a fixed number of steps and the same tuned rate, EGN's final test metric at b = 128 is "
                         "better than at b = 32 beyond one std of the difference, and its step takes longer. The "
                         "larger batches, the time split and peak memory answer the open question of how far this "
                         "goes (time to b = 32's final level).", v4, ev))
    else:
        out.append(Claim("C4", "The batch-size effect (b = 32, 128 up to 2048).", "Needs --batch-sizes.",
                         P.NOT_RUN, ["not run"]))
    return out


def _fmt_ttt(stat: P.Stat) -> str:
    if stat.n == 0:
        return "never"
    s = f"{stat.mean:.3g} ± {stat.std:.2g} s"
    return s + (f" (missed in {stat.diverged} seed(s))" if stat.diverged else "")


# ------------------------------------------------------------------------------------------- report

def machine() -> str:
    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "?"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), load average {load}")


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
        if t in Q.PLANTS:
            p = Q.PLANTS[t]
            L.append(f"  * `{t}`: {p.description}. Qc = I, Rc = {p.Rc[0][0]}, dt = {Q.DT} (zero-order hold). "
                     "Model Q(x, u) = [x; u]^T H [x; u], H symmetric (upper triangle learned), MSE on TD targets.")
        else:
            s = T.SUPERVISED[t]
            L.append(f"  * `{t}`: {s.source}; {'CNN 32c3-pool-32c3-pool-64-10' if t == 'fashion-mnist' else 'MLP 32-64-32'} "
                     f"({s.loss}); metric {metric_name(t)}.")
    L.append(f"* LQR learning set-up: {Q.LQRSetup().describe()}. Tuning runs on independent episodes (another "
             "environment seed).")
    L += ["", "## Tuning", ""]
    if tuning:
        L.append(f"Learning rates were searched on a validation split ({int(VAL_FRACTION * 100)}% of the training "
                 f"data, fixed seed; the test set is never used), {ctx['tune_seeds']} seed(s) per value, same "
                 "steps; score = final validation metric (ties: lower validation loss). Each grid has 5 rates a factor "
                 "sqrt(10) apart, centred on a fixed centre per optimizer (diamonds' SGD and Adam centred for its "
                 "dollar-scale gradients). `*` marks the "
                 "choice, `(edge)` a choice at the end of its grid.")
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
                flag = " (edge)" if P.at_grid_edge(info["grid"], info["lr"]) else ""
                flag += " (all diverged)" if info.get("all_diverged") else ""
                L.append(f"| {LABELS[o]} | {cells} | {info['lr']:g}{flag} |")
            L.append("")
    else:
        L.append(f"Not tuned in this run (`--no-tune`): the stored rates of `{ctx['defaults_path']}` were used "
                 f"(produced by `{ctx.get('defaults_command', '?')}`).")
        L.append("")
    L += ["## Results", "",
          "Final test metric, time to reach the better tuned first-order baseline's final level (the target), "
          "and time per step.", ""]
    rows = []
    for t in tasks:
        base = best_baseline(results, t)
        for o in optimizers:
            if (t, o) not in results:
                continue
            r = results[(t, o)]
            rows.append({"task": t, "optimizer": LABELS[o], "lr": r["lr"], "metric": metric_name(t),
                         "final": format(r["final"], ".4g"), "train loss": format(r["train_loss"], ".4g"),
                         "target": f"{r['target']:.4g}" if P.finite(r["target"]) else "-",
                         "time to target": _fmt_ttt(r["ttt"]) if base else "-",
                         "ms/step": format(r["ms_step"], ".3g"), "steps": r["steps"]})
    L.append(markdown_table(rows))
    L += ["## Claims", ""]
    for c in claim_list:
        L += [f"### {c.name}: {c.verdict}", "", f"*Claim.* {c.claim}", "", f"*Test.* {c.test}", "", "*Numbers.*", ""]
        L += [f"* {e}" for e in c.evidence] + [""]
    if study:
        L += ["## C4 detail: EGN's step by batch size", "",
              f"Task `{ctx['c4_task']}`, EGN at lr {ctx['c4_lr']:g}, {ctx['c4_steps']} steps, "
              f"{len(ctx['seeds'])} seeds. The time split is measured from outside the optimizer (EGN's stats do "
              "not report it) by running the same phases with the package's public pieces: "
              "`curvature.gram.gram_matrix` (forward + layerwise Gram), `ops.gram_factor_from_gram` (Cholesky), "
              "and `torch.cholesky_solve` + one VJP (back-projection); medians of 3. Peak memory: \"peak resident growth\" is what "
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
                         "final": format(P.aggregate([final_value(h) for h in s["histories"]]), ".4g")})
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


# ------------------------------------------------------------------------------------------- driver

def add_arguments(p) -> None:
    """The ``egn`` subcommand's options."""
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated from {', '.join(TASKS)}; 'lqr' = both plants, 'all' = every task "
                        f"(default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated from {', '.join(OPTIMIZERS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds per optimizer and task (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="mini-batch size, or transitions per LQR update "
                                                              "(default 32, the paper's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default per task)")
    g.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="seconds of optimizer steps per run instead of a step count")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default steps/25)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--tune", dest="tune", action="store_true", default=True,
                   help="search each optimizer's learning rate on a validation split (default)")
    p.add_argument("--no-tune", dest="tune", action="store_false",
                   help="use the stored rates (revgn_ext/experiments/tuned/egn_tasks.json)")
    p.add_argument("--tune-seeds", type=int, default=1, help="seeds per grid value when tuning (default 1)")
    p.add_argument("--batch-sizes", default=",".join(map(str, C4_BATCHES)),
                   help="C4: EGN batch sizes to time and train ('none' to skip; default 32,128,512,2048)")
    p.add_argument("--c4-task", default="diamonds", help="task of the batch-size study (default diamonds)")
    p.add_argument("--c4-steps", type=int, default=None, help="steps per batch-size run (default --steps)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--max-train", type=int, default=None, help="keep the first N training samples of each task")
    p.add_argument("--max-test", type=int, default=None, help="keep the first N test samples of each task")
    p.add_argument("--out", default=None, help="output folder (default runs/egn)")
    p.add_argument("--resume", action="store_true", help="continue the runs in --out from their checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive(name: str, value, kind=int) -> None:
    if value is not None and (not isinstance(value, kind) or value <= 0 or
                              (isinstance(value, float) and not math.isfinite(value))):
        raise ValueError(f"{name} must be a positive {'int' if kind is int else 'number'}, got {value!r}")


def _csv(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse(args) -> dict:
    """Validate every option (ValueError naming it) before any training."""
    tasks = expand_tasks(_csv(args.tasks))
    if not tasks:
        raise ValueError("--tasks is empty")
    optimizers = tuple(_csv(args.optimizers))
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad or not optimizers:
        raise ValueError(f"unknown optimizer(s) {bad or args.optimizers!r} in --optimizers; choose from "
                         f"{', '.join(OPTIMIZERS)}")
    _positive("--seeds", args.seeds)
    _positive("--batch-size", args.batch_size)
    _positive("--steps", args.steps)
    _positive("--eval-every", args.eval_every)
    _positive("--tune-seeds", args.tune_seeds)
    _positive("--c4-steps", args.c4_steps)
    _positive("--max-train", args.max_train)
    _positive("--max-test", args.max_test)
    if args.time_budget is not None and not (args.time_budget > 0 and math.isfinite(args.time_budget)):
        raise ValueError(f"--time-budget must be a positive number of seconds, got {args.time_budget!r}")
    batches = () if args.batch_sizes.strip().lower() == "none" else tuple(int(b) for b in _csv(args.batch_sizes)
                                                                         if b.lstrip("-").isdigit())
    if args.batch_sizes.strip().lower() != "none" and len(batches) != len(_csv(args.batch_sizes)):
        raise ValueError(f"--batch-sizes must be comma-separated positive ints or 'none', got {args.batch_sizes!r}")
    for b in batches:
        _positive("--batch-sizes entry", b)
    if batches and args.c4_task not in T.SUPERVISED:
        raise ValueError(f"--c4-task must be a supervised task ({', '.join(T.SUPERVISED)}), got {args.c4_task!r}")
    return {"tasks": tasks, "optimizers": optimizers, "batches": batches}


def execute(args, argv) -> int:
    from tqdm.auto import tqdm

    opts = parse(args)
    tasks, optimizers, batches = opts["tasks"], opts["optimizers"], opts["batches"]
    command = "python -m revgn_ext.experiments " + " ".join(shlex.quote(a) for a in argv)
    out = args.out or os.path.join("runs", "egn")
    device = resolve_device(args.device)
    seeds = list(range(args.seeds))
    # Bars only on a terminal; in a log (CI, nohup) one line per task and optimizer instead.
    interactive = not args.no_progress and sys.stderr.isatty()
    lines = not args.no_progress and not interactive
    progress = interactive
    cache = {"data_dir": args.data_dir}
    t_start = time.perf_counter()
    ctx = {"command": command, "machine_start": machine(), "tasks": tasks, "optimizers": optimizers,
           "seeds": seeds, "batch_size": args.batch_size, "device": str(device), "dtype": args.dtype,
           "tune_seeds": args.tune_seeds, "notes": []}

    def steps_for(task):
        return None if args.time_budget is not None else (args.steps or
                                                            (500 if task in Q.PLANTS else T.SUPERVISED[task].steps))

    def eval_every(task):
        n = steps_for(task)
        return args.eval_every or max(1, (n or 500) // 25)

    # Load every task's data and check the batch size against it before any training.
    for task in set(tasks) | ({args.c4_task} if batches else set()):
        for b in ({args.batch_size} | (set(batches) if task == args.c4_task else set())):
            for split in ("test", "val") if args.tune else ("test",):
                make_problem(RunSpec(task, "egn", 0.1, 0, b, steps=1, dtype=args.dtype, split=split,
                                     max_train=args.max_train, max_test=args.max_test), device, cache)
    stored = None
    try:
        stored = stored_rates()
        ctx["defaults_command"] = stored.get("command")
    except (FileNotFoundError, ValueError) as e:
        if not args.tune:
            raise type(e)(f"--no-tune needs the stored rates: {e}. Run `python -m revgn_ext.experiments egn "
                          "--tune` to derive rates") from None
        ctx["notes"].append(f"no stored rates ({e}); grids centred on built-in values")
    ctx["defaults_path"] = os.path.relpath(P.tuned_path(DEFAULTS_NAME), os.path.dirname(rg.__file__) + "/..")
    if args.time_budget is not None:
        ctx["steps_desc"] = f"each run has {args.time_budget:g} s of optimizer steps"
    else:
        ctx["steps_desc"] = "steps per run: " + ", ".join(f"{t} {steps_for(t)}" for t in tasks)

    os.makedirs(out, exist_ok=True)
    rates, tuning = {}, {}
    plan = [(t, o) for t in tasks for o in optimizers]
    if args.tune:
        bar = tqdm(plan, desc="tuning", disable=not progress, dynamic_ncols=True)
        for task, opt in bar:
            grid = grid_for(task, opt)
            scores, losses = {}, {}
            for lr in grid:
                scores[lr], losses[lr] = [], []
                for seed in range(args.tune_seeds):
                    spec = RunSpec(task, opt, lr, seed, args.batch_size, steps_for(task), args.time_budget,
                                   args.dtype, "val", eval_every(task), args.max_train, args.max_test,
                                   damping_for(task))
                    h = run_one(spec, os.path.join(out, "tuning", task, opt, f"lr{lr:g}", f"seed{seed}"), device,
                                args.resume, progress, cache)
                    scores[lr].append(final_value(h))
                    losses[lr].append(final_value(h, "loss"))
            lr, stats, all_div = pick_lr(task, opt, scores, losses)
            tuning[(task, opt)] = {"grid": grid, "stats": stats, "lr": lr, "all_diverged": all_div}
            rates.setdefault(task, {})[opt] = lr
        P.save_tuned(os.path.join(out, "tuned_rates.json"), rates, command,
                     {"grids": {f"{t}/{o}": v["grid"] for (t, o), v in tuning.items()},
                      "scores": {f"{t}/{o}": {str(k): s for k, s in v["stats"].items()} for (t, o), v in tuning.items()},
                      "batch_size": args.batch_size, "steps": {t: steps_for(t) for t in tasks},
                      "validation_fraction": VAL_FRACTION, "tune_seeds": args.tune_seeds})
    else:
        for task, opt in plan:
            lr = stored["rates"].get(task, {}).get(opt)
            if lr is None:
                raise ValueError(f"no stored learning rate for {opt} on {task} in {P.tuned_path(DEFAULTS_NAME)}; "
                                 "run with --tune")
            rates.setdefault(task, {})[opt] = lr

    results = {}
    bar = tqdm(plan, desc="runs", disable=not progress, dynamic_ncols=True)
    for task, opt in bar:
        hs = []
        for seed in seeds:
            spec = RunSpec(task, opt, rates[task][opt], seed, args.batch_size, steps_for(task), args.time_budget,
                           args.dtype, "test", eval_every(task), args.max_train, args.max_test, damping_for(task))
            hs.append(run_one(spec, os.path.join(out, task, opt, f"seed{seed}"), device, args.resume, progress, cache))
        if lines:
            print(f"{task} {opt}: {len(hs)} seeds, lr {rates[task][opt]:g}, final metric "
                  f"{P.aggregate([final_value(h) for h in hs])}", file=sys.stderr, flush=True)
        results[(task, opt)] = {"histories": hs, "lr": rates[task][opt],
                                "final": P.aggregate([final_value(h) for h in hs]),
                                "train_loss": P.aggregate([final_value(h, "train_loss") for h in hs]),
                                "ms_step": P.aggregate([1e3 * step_time(h) for h in hs]),
                                "steps": "/".join(sorted({str(h[-1]["step"]) for h in hs}))}
    for task in tasks:
        base = best_baseline(results, task)
        target = results[(task, base)]["final"].mean if base else math.nan
        for opt in optimizers:
            if (task, opt) in results:
                r = results[(task, opt)]
                r["target"] = target
                r["ttt"] = P.aggregate([time_to_target(h, target, lower_is_better(task)) if base else None
                                        for h in r["histories"]])

    study = None
    if batches:
        c4_lr = rates.get(args.c4_task, {}).get("egn")
        if c4_lr is None:
            c4_lr = (stored or {}).get("rates", {}).get(args.c4_task, {}).get("egn", GRID_CENTRES["egn"])
        c4_steps = args.c4_steps or steps_for(args.c4_task) or 200
        ctx.update(c4_task=args.c4_task, c4_lr=c4_lr, c4_steps=c4_steps)
        study = batch_size_study(args.c4_task, batches, c4_lr, seeds, c4_steps, args.dtype, device, out,
                                 args.resume, progress, cache, max(1, c4_steps // 25), args.max_train, args.max_test)

    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    figures = {
        "metric vs wall time": figure_metric(results, tasks, optimizers, "time",
                                             os.path.join(fig_dir, "metric_vs_time.png"),
                                             "Test metric against wall time (mean ± std over seeds)"),
        "metric vs steps": figure_metric(results, tasks, optimizers, "step",
                                         os.path.join(fig_dir, "metric_vs_steps.png"),
                                         "Test metric against steps (mean ± std over seeds)"),
    }
    if any(t in Q.PLANTS for t in tasks):
        figures["LQR error curves"] = figure_lqr(results, tasks, optimizers, os.path.join(fig_dir, "lqr_error.png"))
    if study:
        figures["batch size (C4)"] = figure_batch(study, args.c4_task, os.path.join(fig_dir, "batch_size.png"))
    claim_list = claims(results, tasks, study, args.c4_task)
    ctx["wall"] = time.perf_counter() - t_start
    if not args.tune:
        ctx["notes"].append("Rates from the stored file, not tuned in this invocation.")
    path = write_report(out, ctx, results, tuning, study, figures, claim_list)
    for c in claim_list:
        print(f"[{c.verdict}] {c.name}: {c.claim}")
    print(f"report:  {path}\nfigures: {fig_dir}/\nwall time: {ctx['wall']:.1f} s")
    return 0


def load_results(out: str, tasks, optimizers, seeds) -> dict:
    """The histories written by a finished ``egn`` invocation, {(task, optimizer): [history per seed]}."""
    return {(t, o): [load_history(os.path.join(out, t, o, f"seed{s}")) for s in seeds]
            for t in tasks for o in optimizers if os.path.isdir(os.path.join(out, t, o))}
