"""One run of the EGN comparison: the optimizers (:func:`build_optimizer`, :func:`train_step`), a run's
specification (:class:`RunSpec`), the run itself with its checkpoints (:func:`run_one`) and what is read
off its history (final value, time to a target, mean ± std curves).

Wall time (``time_s``) and process CPU time (``cpu_s``, :func:`time.process_time`: every thread of
the process, so at one thread it does not depend on what else the machine runs) count the optimizer
steps only (not batch assembly or evaluation). Runs write a checkpoint
at every evaluation; a resumed run continues from it and skips finished runs, and because the batch
order depends only on (seed, step) a resumed run ends with the same metrics as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from ... import EGN
from ..common import checkpoint, protocol
from ..common.records import CHECKPOINT, RunInterrupted, resolve_device, write_metrics
from . import lqr, tasks
from .problems import DAMPING, make_problem
from .sgn import SGN


OPTIMIZERS = ("egn", "egn-ls", "egn-ad", "egn-mom", "sgd", "adam", "sgn", "lbfgs")
EGN_FAMILY = ("egn", "egn-ls", "egn-ad", "egn-mom")
LABELS = {"egn": "EGN", "egn-ls": "EGN + line search", "egn-ad": "EGN + adaptive damping",
          "egn-mom": "EGN + momentum", "sgd": "SGD", "adam": "Adam", "sgn": "SGN (10 CG)", "lbfgs": "L-BFGS"}
MOMENTUM = 0.9            # beta of egn-mom
# L-BFGS runs 10 iterations on each mini-batch from a fresh memory (see :func:`train_step`).
LBFGS = dict(max_iter=10, history_size=10, line_search_fn="strong_wolfe")


def build_optimizer(name: str, model, loss: str, lr: float, damping: float):
    if name in EGN_FAMILY:
        return EGN(model, lr=lr, damping=damping, loss=loss, line_search=name == "egn-ls",
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
        value = tasks.batch_loss(loss, model(x).reshape(len(x), -1), y)
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


def finite_params(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def validate_checkpoint(path: str, payload) -> dict:
    """An ``egn`` run's checkpoint: its entries, and finite weights unless the run ended by diverging."""
    payload = checkpoint.validate_keys(path, payload, {"spec": dict, "model": dict, "optimizer": dict,
                                                      "problem": dict, "history": list, "done": bool})
    if not payload["history"] or not all(isinstance(r, dict) and "step" in r for r in payload["history"]):
        raise checkpoint.CheckpointError(f"checkpoint {path} is unusable: its history is malformed")
    history = payload["history"]
    for i, row in enumerate(history):
        if row.get("diverged"):
            if i != len(history) - 1 or not payload["done"]:
                raise checkpoint.unusable(path, f"history row {i} says the run diverged, yet the run goes on")
            if not (isinstance(row.get("metric"), float) and math.isnan(row["metric"])):
                raise checkpoint.unusable(path, f"history row {i} says the run diverged, but its metric "
                                                f"{row.get('metric')!r} is a number")
            continue
        # the metric and losses (an LQR row has no evaluation loss; its policy error may be NaN)
        for key in ("time_s", "metric") + (("loss",) if "loss" in row else ()) + (("train_loss",) if i else ()):
            value = row.get(key)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise checkpoint.unusable(path, f"history row {i} has {key} = {value!r} in a run that did not "
                                                "diverge")
        if i and not (isinstance(row["step"], int) and row["step"] > history[i - 1]["step"]):
            raise checkpoint.unusable(path, f"history row {i} has step {row['step']!r} after step "
                                            f"{history[i - 1]['step']!r}")
    if not history[-1].get("diverged"):
        checkpoint.validate_keys(path, payload, {}, finite=("model", "optimizer"))
    check_optimizer_state(path, payload["spec"], payload["optimizer"])
    return payload


def check_optimizer_state(path: str, spec: dict, state: dict) -> None:
    """An EGN variant's stored settings are those its name stands for (a checkpoint whose state
    contradicts its spec would resume another optimizer)."""
    name = spec.get("optimizer")
    if name not in EGN_FAMILY:
        return
    groups = state.get("param_groups")
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
        raise checkpoint.unusable(path, "the optimizer state must hold exactly one parameter group")
    want = {"line_search": name == "egn-ls", "adaptive_damping": name == "egn-ad",
            "momentum": MOMENTUM if name == "egn-mom" else 0.0, "lr": spec.get("lr")}
    task = spec.get("task")
    if task in tasks.SUPERVISED:
        want["loss"] = tasks.SUPERVISED[task].loss
    elif task in lqr.PLANTS:
        want["loss"] = "mse"
    if name != "egn-ad":
        want["damping"] = spec.get("damping")
    for key, value in want.items():
        if groups[0].get(key) != value:
            raise checkpoint.unusable(path, f"its optimizer state has {key} = {groups[0].get(key)!r}, the run "
                                            f"{name} asks for {value!r}")


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
        ckpt = checkpoint.load(ckpt_path, map_location=dev, validator=validate_checkpoint)
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
        history = [{"step": 0, "time_s": 0.0, "cpu_s": 0.0, "train_loss": None, **problem.evaluate(model)}]
    step, elapsed = history[-1]["step"], history[-1]["time_s"]
    cpu = history[-1].get("cpu_s", 0.0)
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
    saved, saving = (step if ckpt is not None else 0), None   # the step whose checkpoint is on disk
    label = f"{spec.task} {spec.optimizer} seed {spec.seed}"
    try:
        while budget_left():
            x, y = problem.next_batch(model, step)
            t0, c0 = time.perf_counter(), time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # refused EGN steps are counted in the stats
                before, stats = train_step(spec.optimizer, opt, model, problem.loss, x, y)
            elapsed += time.perf_counter() - t0
            cpu += time.process_time() - c0
            problem.after_update(model)
            step += 1
            done_here += 1
            bar.update(1)
            losses.append(before)
            for k, v in stats.items():
                stat_sums[k] = stat_sums.get(k, 0.0) + v
            diverged = not math.isfinite(before) or not finite_params(model)
            last = not budget_left()
            if step % spec.eval_every == 0 or last or diverged:
                row = {"step": step, "time_s": elapsed, "cpu_s": cpu, "train_loss": sum(losses) / len(losses)}
                row.update(problem.evaluate(model) if not diverged else {"metric": math.nan, "loss": math.nan})
                row.update({f"opt_{k}": v / len(losses) for k, v in stat_sums.items()})
                if diverged:
                    row["diverged"] = 1
                history.append(row)
                losses, stat_sums = [], {}
                write_metrics(out_dir, history)
                saving = step
                checkpoint.save(ckpt_path, {"spec": spec.to_dict(), "model": model.state_dict(),
                                            "optimizer": opt.state_dict(), "problem": problem.state_dict(),
                                            "history": history, "done": last or diverged})
                saved, saving = step, None
            if stop_after is not None and done_here >= stop_after:
                break
    except KeyboardInterrupt:
        bar.close()
        raise RunInterrupted(label, saved, ckpt_path, "step", lost=saving) from None
    bar.close()
    if len(history) == 1:
        write_metrics(out_dir, history)
    return history


def final_value(history: list, key: str = "metric") -> float:
    v = history[-1].get(key)
    return math.nan if v is None else float(v)


TIME_KEYS = {"step": "steps", "cpu_s": "process CPU s", "time_s": "wall s"}


def time_to_target(history: list, target: float, lower: bool, key: str = "time_s"):
    """``key`` (``"step"``, ``"cpu_s"`` or ``"time_s"``) at the first evaluation at or beyond ``target``;
    None if never reached."""
    if key not in TIME_KEYS:
        raise ValueError(f"key must be one of {', '.join(TIME_KEYS)}, got {key!r}")
    for row in history[1:]:
        v = row.get("metric")
        if v is not None and math.isfinite(v) and (v <= target if lower else v >= target):
            return row.get(key, math.nan)
    return None


def censored_time_to_target(history: list, target: float, lower: bool, key: str):
    """(value, reached): :func:`time_to_target`, or, for a run that never reaches ``target``, its whole
    length in ``key`` (all its steps or CPU time, a lower bound on the true time) with ``reached=False``."""
    t = time_to_target(history, target, lower, key)
    if t is not None:
        return float(t), True
    return float(history[-1].get(key, math.nan)), False


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
        st = protocol.aggregate(vals)
        xs.append(s if x_key == "step" else sum(times) / len(times))
        means.append(st.mean if st.diverged == 0 else math.nan)
        stds.append(st.std if st.diverged == 0 else math.nan)
    return xs, means, stds


def step_time(history: list) -> float:
    steps = history[-1]["step"]
    return history[-1]["time_s"] / steps if steps else math.nan
