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
    """Median seconds of EGN's phases on (x, y) for MSE, timed from outside the optimizer with the same
    public pieces it uses: forward + Jacobian/Gram K = J J^T (layerwise, J never formed), Cholesky of
    K + b lambda I, and back-projection (triangular solves for u, then the VJP dir = -J^T u)."""
    from ...egn.gram import gram_matrix

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
        chol = ops.gram_factor_from_gram(K[None], 0.0)
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
            peak = peak_bytes(lambda: opt.step(x, y), dev)
        c = problem.data.outputs if isinstance(problem, Supervised) else 1
        gram_bytes = 2 * (b * c) ** 2 * x.element_size()   # the damped Gram and its Cholesky factor
        result[b] = {"histories": hist, "step_s": statistics.median(steps_t), "phases": phases, "peak_bytes": peak,
                     "gram_bytes": gram_bytes}
    return result
