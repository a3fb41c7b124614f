"""Claim C4, EGN's batch-size effect: runs at each batch size, the step's time split into its phases
and its peak memory."""
from __future__ import annotations

import math
import os
import statistics
import time
import warnings

import torch

from ... import ops
from ..common.records import resolve_device
from .problems import Supervised, damping_for, make_problem
from .training import RunSpec, build_optimizer, run_one


C4_BATCHES = (32, 128, 512, 2048)
C4_STEPS = 300      # steps per batch size of the study (the paper's claim needs runs past the first epochs' noise)


def c4_length(given: int | None) -> tuple:
    """(steps per batch-size run, note for the report): ``given`` (``--c4-steps``) or :data:`C4_STEPS`; a
    shorter run is named as a demo length that cannot decide the claim."""
    steps = given or C4_STEPS
    note = "" if steps >= C4_STEPS else (
        f"C4 ran {steps} steps per batch size, a demo length below the study's {C4_STEPS}: its verdict is a smoke "
        f"test, not a reproduction (the study: `--c4-steps {C4_STEPS}` or more, the default).")
    return steps, note


def step_clock(device):
    """The clock of the step and phase times: process CPU time on CPU (at one thread it does not depend on
    what else the machine runs, and the phases and the whole step use the same clock), wall time with
    synchronisation on CUDA (the GPU's work is not the process's CPU time)."""
    return time.perf_counter if torch.device(device).type == "cuda" else time.process_time


def proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def peak_bytes(fn, device) -> float:
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
        base = proc_status_kib("VmRSS")
        fn()
        return 1024.0 * (proc_status_kib("VmHWM") - base)
    except OSError:
        fn()
        return math.nan


def phase_times(model, x, y, damping: float, repeats: int = 3) -> dict:
    """Median seconds (:func:`step_clock`) of EGN's phases on (x, y) for MSE, timed from outside the optimizer with the same
    public pieces it uses: forward + Jacobian/Gram K = J J^T (layerwise, J never formed), Cholesky of
    K + b lambda I, and back-projection (triangular solves for u, then the VJP dir = -J^T u)."""
    from ...egn.gram import gram_matrix

    params = [p for p in model.parameters() if p.requires_grad]
    b = x.shape[0]
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.device.type == "cuda" else (lambda: None)
    clock = step_clock(x.device)
    out = {"gram": [], "factor": [], "back": []}
    for _ in range(repeats):
        t0 = clock()
        K = gram_matrix(model, x)
        sync()
        t1 = clock()
        K.diagonal().add_(b * damping)
        chol = ops.gram_factor_from_gram(K[None], 0.0)
        sync()
        t2 = clock()
        f = model(x).reshape(b, -1)
        t3 = clock()
        u = torch.cholesky_solve((f - y).detach().reshape(-1, 1), chol.L[0]).reshape(f.shape)
        torch.autograd.grad(f, params, grad_outputs=u)
        sync()
        t4 = clock()
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
            clock = step_clock(dev)
            for _ in range(3):    # CPU: process CPU time, which at one thread does not depend on the load
                t0 = clock()
                opt.step(x, y)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                steps_t.append(clock() - t0)
            phases = phase_times(model, x, y, damping_for(task)) if problem.loss == "mse" else {}
            peak = peak_bytes(lambda: opt.step(x, y), dev)
        c = problem.data.outputs if isinstance(problem, Supervised) else 1
        gram_bytes = 2 * (b * c) ** 2 * x.element_size()   # the damped Gram and its Cholesky factor
        result[b] = {"histories": hist, "step_s": statistics.median(steps_t), "phases": phases, "peak_bytes": peak,
                     "gram_bytes": gram_bytes}
    return result
