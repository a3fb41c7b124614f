"""Every row of the GPU goals, side by side in one process, written to one folder.

Rows (``--only`` takes a comma list; default all but ``graphs``):

* ``egn``: one EGN step (line search off) against the naive ``vmap(jacrev)`` step of
  ``bench_egn_step.naive_egn_step``, on the MLP 8-32-64-32-1 (MSE, b = 1024) and the CNN
  32c3-pool-32c3-pool-64-10 on 1x28x28 (cross-entropy, b = 128, synthetic images and labels).
  Goal: naive / EGN >= 3x.
* ``syncs``: host synchronisations of one warm EGN step (line search off) and one RevGN step. On CUDA,
  the warnings of ``torch.cuda.set_sync_debug_mode("warn")``; on every device, the reads of tensor
  values from Python (``.item()``, ``bool``, ``float``, ``.tolist()``, ...) with the line that made
  each, which is what a sync-free step has to remove. Goal for EGN: 0.
* ``revgn``: one RevGN step against one Adam step on the same RevMLP (``bench_revgn_step.bench``),
  d = 784, L = 2, M = 8000, n = 1024. Goal: RevGN / Adam <= 1.5x.
* ``gram``: ``gram_cholesky_solve`` (kernel) against the eager reference, B = 12, m = 8000, k = 392,
  n in {64, 128, 256, 1024}, with the compute and memory floors from the measured SGEMM rate and copy
  bandwidth of this device. Goals: >= 2x at n = 256, >= 1.2x at n = 1024.
* ``tf32``: error against float64 of the RevGN direction and of the Gram solve in float32 and with
  TF32 matmuls allowed, and their times (opt-in precision; nothing here changes a default).
* ``profile``: ``torch.profiler`` breakdown of ``gram_cholesky_solve`` at n = 256 and 1024.
* ``compiled``: ``torch.compile`` of the EGN step (a row of its own, so that a caller can bound its
  compile time with a timeout).
* ``graphs``: capture of one EGN step in a CUDA graph (CUDA only; run it in a process of its own,
  since a failed capture can leave the CUDA context unusable).
* ``ncu_target``: no timing; one warm ``gram_cholesky_solve`` per profile size inside the NVTX range
  ``gram_n<n>``, for Nsight Compute (``ncu --nvtx --nvtx-include gram_n256/``).

``--quick`` runs every row at tiny sizes (a CPU check of the script itself, well under a minute).

Usage: python benchmarks/bench_gpu.py [--device cuda|cpu] [--quick] [--only egn,revgn,...]
           [--out DIR]      (DIR defaults to $OUT, else /tmp/revgn_gpu)
Writes DIR/bench_<row>.json, DIR/summary_<row>.md and DIR/profile_*.txt; ``--summarize`` joins the
json files of DIR into DIR/summary.md with a verdict per goal.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import revgn_ext as rg  # noqa: E402
from revgn_ext import ops  # noqa: E402
from revgn_ext.ops.gram import gram_cholesky_solve_reference  # noqa: E402
from _machine import describe  # noqa: E402
from bench_egn_step import mlp, naive_egn_step  # noqa: E402
from bench_revgn_step import bench as revgn_vs_adam  # noqa: E402

ROWS = ("egn", "syncs", "revgn", "gram", "tf32", "profile", "compiled", "graphs", "ncu_target")
DEFAULT_ROWS = ("egn", "syncs", "revgn", "gram", "tf32", "profile")

# Full sizes (the issue's) and quick sizes (CPU check of the script).
FULL = dict(mlp_b=1024, cnn_b=128, revgn=dict(d=784, L=2, M=8000, n=1024), gram_B=12, gram_m=8000, gram_k=392,
            gram_n=(64, 128, 256, 1024), profile_n=(256, 1024), repeat=10, gemm=4096, copy_mb=512)
QUICK = dict(mlp_b=64, cnn_b=8, revgn=dict(d=64, L=2, M=256, n=64), gram_B=2, gram_m=256, gram_k=16,
             gram_n=(16, 32, 48, 64), profile_n=(32, 64), repeat=3, gemm=256, copy_mb=16)

GOALS = {"egn_speedup": 3.0, "revgn_over_adam": 1.5, "gram_256": 2.0, "gram_1024": 1.2}


# --------------------------------------------------------------------------------------------------
# Timing and helpers
# --------------------------------------------------------------------------------------------------

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn, device: str, repeat: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms, synchronised: a whole optimizer step, host work included."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_ms(fn, device: str, repeat: int) -> float:
    """Median device time in ms of fn() (triton's do_bench on CUDA when present, as bench_kernels)."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
        except ImportError:
            pass
    return wall_ms(fn, device, max(repeat, 5), warmup=1)


def attempt(fn, notes: list, what: str):
    """fn() or None; a failure is noted (with its reason) instead of hiding the other numbers."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - the note names it
        notes.append(f"{what} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        print("  " + notes[-1], flush=True)
        return None


@contextlib.contextmanager
def tf32(enabled: bool):
    """Allow TF32 in float32 matmuls (cuBLAS) inside the block; restores the previous setting."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def cnn() -> nn.Module:
    """The EGN paper's MNIST/Fashion-MNIST CNN: 32c3-pool-32c3-pool-64-10 on 1x28x28."""
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 32, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 10))


def egn_workloads(size: dict, device: str):
    """(name, model factory, x, y, loss)."""
    g = torch.Generator().manual_seed(0)
    b = size["mlp_b"]
    x = torch.randn(b, 8, generator=g)
    y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3] + 0.1 * torch.randn(b, 1, generator=g)
    yield (f"MLP 8-32-64-32-1, MSE, b={b}", lambda: mlp([8, 32, 64, 32, 1]), x.to(device),
           ((y - y.mean()) / y.std()).to(device), "mse")
    b = size["cnn_b"]
    x = torch.randn(b, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (b,), generator=g)
    yield f"CNN 32c3-pool-32c3-pool-64-10, CE, b={b}", cnn, x.to(device), y.to(device), "cross_entropy"


def fresh(factory, device):
    torch.manual_seed(0)
    return factory().to(device)


def egn_optimizer(model, loss):
    return rg.EGN(model, lr=0.1, damping=1.0, loss=loss, line_search=False)


# --------------------------------------------------------------------------------------------------
# Host reads and syncs
# --------------------------------------------------------------------------------------------------

# Tensor methods that copy a value to the host (a sync on CUDA), and ops whose output size depends on
# the values (they sync to size their output).
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__", "numpy",
              "nonzero", "masked_select", "unique", "argwhere"}


class HostReads(TorchFunctionMode):
    """Records every read of tensor values by the host, with the innermost revgn_ext line behind it.

    With ``device="cuda"`` only reads of CUDA tensors count (a CPU tensor's value is no sync); on the
    CPU every read counts, as the list of what would sync were the tensors on the GPU.
    """

    def __init__(self, device: str):
        super().__init__()
        self.device = device
        self.reads: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        on_device = first is None or self.device == "cpu" or first.device.type != "cpu"
        if name in HOST_READS and on_device:
            self.reads.append((name, _package_line()))
        elif name in ("cpu", "to") and first is not None and first.device.type != "cpu":
            target = (args[1] if len(args) > 1 else (kwargs or {}).get("device"))
            if name == "cpu" or str(target).startswith("cpu"):
                self.reads.append((name, _package_line()))
        return func(*args, **(kwargs or {}))


def _package_line() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if f"{os.sep}revgn_ext{os.sep}" in path:
            return f"{path.split(os.sep + 'revgn_ext' + os.sep, 1)[1]}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "outside revgn_ext"


def host_reads(fn, device: str) -> list[tuple[str, str]]:
    with HostReads(device) as mode:
        fn()
    return mode.reads


def cuda_syncs(fn) -> list[str]:
    """The sync-debug warnings of fn() on CUDA (torch.cuda.set_sync_debug_mode("warn"))."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]


def summarise_reads(reads) -> list[str]:
    counts: dict[str, int] = {}
    for name, where in reads:
        key = f"{where}: {name}"
        counts[key] = counts.get(key, 0) + 1
    return [f"{k} (x{v})" if v > 1 else k for k, v in counts.items()]


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------

def row_egn(device, size, args, notes):
    out = []
    for name, factory, x, y, loss in egn_workloads(size, device):
        r = {"workload": name}
        opt = egn_optimizer(fresh(factory, device), loss)
        r["gram_method"] = opt._assembler.method
        r["egn_ms"] = wall_ms(lambda: opt.step(x, y), device, size["repeat"])
        model = fresh(factory, device)
        r["naive_ms"] = attempt(lambda: wall_ms(lambda: naive_egn_step(model, x, y, loss, 0.1, 1.0), device,
                                                size["repeat"]), notes, f"naive step on {name}")
        if r["naive_ms"]:
            r["naive_over_egn"] = r["naive_ms"] / r["egn_ms"]
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in r.items() if k != "workload"), flush=True)
        out.append(r)
        args.save(out, notes)
    return out


def row_syncs(device, size, args, notes):
    out = []
    for name, factory, x, y, loss in egn_workloads(size, device):
        opt = egn_optimizer(fresh(factory, device), loss)
        opt.step(x, y)  # warm: lazy initialisation (cuBLAS handles, hooks) is not a per-step cost
        sync(device)
        reads = host_reads(lambda: opt.step(x, y), device)
        r = {"step": f"EGN, line search off: {name}", "host_reads": summarise_reads(reads)}
        if device == "cuda":
            r["cuda_syncs"] = len(cuda_syncs(lambda: opt.step(x, y)))
        out.append(r)
    cfg = size["revgn"]
    model = rg.RevMLP(cfg["d"], 10, cfg["L"], cfg["M"], ("identity", "relu"), weight_std=1e-3, seed=0, device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(cfg["n"], cfg["d"], generator=g).to(device)
    y = torch.randint(0, 10, (cfg["n"],), generator=g).to(device)
    gn = rg.RevGN(model, lr=0.1, damping=1e-4)
    gn.step(x, y)
    sync(device)
    reads = host_reads(lambda: gn.step(x, y), device)
    r = {"step": "RevGN d={d} L={L} M={M} n={n}".format(**cfg), "host_reads": summarise_reads(reads)}
    if device == "cuda":
        r["cuda_syncs"] = len(cuda_syncs(lambda: gn.step(x, y)))
    out.append(r)
    for r in out:
        print(f"  {r['step']}: {len(r['host_reads'])} host-read sites"
              + (f", {r['cuda_syncs']} CUDA syncs" if "cuda_syncs" in r else ""), flush=True)
        for line in r["host_reads"]:
            print(f"    {line}", flush=True)
    return out


def row_revgn(device, size, args, notes):
    cfg = size["revgn"]
    t_adam, t_gn = revgn_vs_adam(**cfg, device=torch.device(device), repeats=size["repeat"])
    r = {"config": "d={d}, L={L}, M={M}, n={n}".format(**cfg), "adam_ms": t_adam * 1e3, "revgn_ms": t_gn * 1e3,
         "revgn_over_adam": t_gn / t_adam}
    print(f"  {r}", flush=True)
    return [r]


def gram_problem(B, n, m, k, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    A = (torch.randn(B, n, m, generator=g, dtype=torch.float64) / m ** 0.5)
    R = torch.randn(B, n, k, generator=g, dtype=torch.float64)
    lam = torch.full((B,), 1e-3, dtype=torch.float64)
    return A.to(device, dtype), R.to(device, dtype), lam.to(device, dtype)


def device_rates(device, size) -> dict:
    """Measured float32 GEMM rate (TF32 off) and copy bandwidth: the roofs behind the floors."""
    n = size["gemm"]
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    with tf32(False):
        ms = kernel_ms(lambda: torch.mm(a, b), device, 5)
    src = torch.empty(size["copy_mb"] * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    ms_copy = kernel_ms(lambda: dst.copy_(src), device, 5)
    return {"sgemm_tflops": 2 * n ** 3 / ms / 1e9, "copy_gbs": 2 * src.numel() * 4 / ms_copy / 1e6}


def gram_floors(B, n, m, k, rates) -> dict:
    """FLOPs (with the Gram as a symmetric rank-k update, n^2 m per matrix) and bytes of one solve."""
    flops = B * (n * n * m + 2 * n * m * k + n ** 3 / 3 + 2 * n * n * k)
    bytes_ = 4 * B * (2 * n * m + n * k + (m + 1) * k + 2 * n * n)
    compute = flops / (rates["sgemm_tflops"] * 1e9)
    memory = bytes_ / (rates["copy_gbs"] * 1e6)
    return {"gflop": flops / 1e9, "mbytes": bytes_ / 1e6, "compute_floor_ms": compute, "memory_floor_ms": memory,
            "bound": "compute" if compute >= memory else "memory"}


def row_gram(device, size, args, notes):
    if not ops._loader.has_kernel("gram_cholesky_solve", device):
        raise RuntimeError(f"no compiled gram_cholesky_solve kernel for {device}: build the extension first")
    rates = device_rates(device, size)
    print(f"  measured: {rates}", flush=True)
    out = []
    B, m, k = size["gram_B"], size["gram_m"], size["gram_k"]
    for n in size["gram_n"]:
        A, R, lam = gram_problem(B, n, m, k, device)
        with torch.no_grad(), tf32(False):
            t_kernel = kernel_ms(lambda: torch.ops.revgn.gram_cholesky_solve(A, R, lam, True), device, size["repeat"])
            t_eager = kernel_ms(lambda: gram_cholesky_solve_reference(A, R, lam, True), device, size["repeat"])
        r = {"size": f"B={B} n={n} m={m} k={k}", "n": n, "kernel_ms": t_kernel, "eager_ms": t_eager,
             "eager_over_kernel": t_eager / t_kernel, **gram_floors(B, n, m, k, rates), **rates}
        print(f"  n={n}: kernel {t_kernel:.3f} ms, eager {t_eager:.3f} ms, {t_eager / t_kernel:.2f}x; floors "
              f"{r['compute_floor_ms']:.3f} / {r['memory_floor_ms']:.3f} ms", flush=True)
        out.append(r)
    return out


def rel_err(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def row_tf32(device, size, args, notes):
    out = []
    cfg = size["revgn"]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(cfg["n"], cfg["d"], generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (cfg["n"],), generator=g)

    def direction(dtype):
        model = rg.RevMLP(cfg["d"], 10, cfg["L"], cfg["M"], ("identity", "relu"), weight_std=1e-3, seed=0,
                          dtype=dtype, device=device)
        gn = rg.RevGN(model, lr=0.1, damping=1e-4)
        xd, yd = x.to(device, dtype), y.to(device)
        return torch.cat([t.flatten() for t in gn.direction(xd, yd)]), lambda: gn.step(xd, yd)

    ref, _ = direction(torch.float64)
    for label, allow in (("float32", False), ("float32 + TF32", True)):
        with tf32(allow):
            d, step = direction(torch.float32)
            ms = wall_ms(step, device, size["repeat"])
        out.append({"what": "RevGN direction " + "d={d} L={L} M={M} n={n}".format(**cfg), "precision": label,
                    "rel_err_vs_float64": rel_err(d, ref), "step_ms": ms})
    n = size["gram_n"][-2] if len(size["gram_n"]) > 1 else size["gram_n"][0]
    A, R, lam = gram_problem(size["gram_B"], n, size["gram_m"], size["gram_k"], device, torch.float64)
    ref = gram_cholesky_solve_reference(A, R, lam, True)[0]
    A32, R32, lam32 = A.float(), R.float(), lam.float()
    for label, allow in (("float32", False), ("float32 + TF32", True)):
        with tf32(allow), torch.no_grad():
            got = torch.ops.revgn.gram_cholesky_solve(A32, R32, lam32, True)[0]
            ms = kernel_ms(lambda: torch.ops.revgn.gram_cholesky_solve(A32, R32, lam32, True), device, size["repeat"])
        out.append({"what": f"gram_cholesky_solve B={size['gram_B']} n={n} m={size['gram_m']} k={size['gram_k']}",
                    "precision": label, "rel_err_vs_float64": rel_err(got, ref), "step_ms": ms})
    if device != "cuda":
        notes.append("tf32: TF32 only changes cuBLAS float32 matmuls; on the CPU both rows run the same code")
    for r in out:
        print(f"  {r}", flush=True)
    return out


def row_profile(device, size, args, notes):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    out = []
    for n in size["profile_n"]:
        A, R, lam = gram_problem(size["gram_B"], n, size["gram_m"], size["gram_k"], device)
        fn = lambda: torch.ops.revgn.gram_cholesky_solve(A, R, lam, True)  # noqa: E731
        with torch.no_grad():
            for _ in range(3):
                fn()
            sync(device)
            with profile(activities=activities) as prof:
                for _ in range(5):
                    fn()
                sync(device)
        events = prof.key_averages()
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        if device == "cuda" and not hasattr(events[0], key):
            key = "self_cuda_time_total"
        table = events.table(sort_by=key, row_limit=20)
        path = Path(args.out) / f"profile_gram_n{n}_{device}.txt"
        path.write_text(table)
        total = sum(getattr(e, key) for e in events) or 1.0
        top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:6]
        r = {"size": f"B={size['gram_B']} n={n} m={size['gram_m']} k={size['gram_k']}", "table": path.name,
             "top": [{"name": e.key[:80], "share": getattr(e, key) / total, "ms_per_call": getattr(e, key) / 5 / 1e3}
                     for e in top]}
        print(f"  n={n}: " + "; ".join(f"{t['name']} {100 * t['share']:.0f}%" for t in r["top"]), flush=True)
        out.append(r)
    return out


def row_compiled(device, size, args, notes):
    out = []
    for name, factory, x, y, loss in egn_workloads(size, device):
        opt = egn_optimizer(fresh(factory, device), loss)
        eager = wall_ms(lambda: opt.step(x, y), device, size["repeat"])
        opt_c = egn_optimizer(fresh(factory, device), loss)
        step_c = torch.compile(opt_c.step)
        t0 = time.perf_counter()
        first = attempt(lambda: step_c(x, y), notes, f"torch.compile(EGN.step) on {name}")
        compile_s = time.perf_counter() - t0
        compiled = None if first is None else attempt(
            lambda: wall_ms(lambda: step_c(x, y), device, size["repeat"], warmup=2), notes,
            f"compiled EGN.step on {name}")
        r = {"workload": name, "egn_ms": eager, "egn_compiled_ms": compiled, "compile_s": compile_s}
        out.append(r)
        args.save(out, notes)  # a caller's timeout during the next compile keeps this workload's row
        print(f"  {r}", flush=True)
    return out


def row_ncu_target(device, size, args, notes):
    for n in size["profile_n"]:
        A, R, lam = gram_problem(size["gram_B"], n, size["gram_m"], size["gram_k"], device)
        with torch.no_grad():
            for _ in range(3):
                torch.ops.revgn.gram_cholesky_solve(A, R, lam, True)
            sync(device)
            if device == "cuda":
                torch.cuda.nvtx.range_push(f"gram_n{n}")
            torch.ops.revgn.gram_cholesky_solve(A, R, lam, True)
            if device == "cuda":
                torch.cuda.nvtx.range_pop()
            sync(device)
    return [{"profile_n": list(size["profile_n"])}]


def row_graphs(device, size, args, notes):
    if device != "cuda":
        notes.append("graphs: CUDA only")
        return []
    out = []
    for name, factory, x, y, loss in egn_workloads(size, device):
        opt = egn_optimizer(fresh(factory, device), loss)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                opt.step(x, y)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()

        def capture():
            with torch.cuda.graph(graph):
                opt.step(x, y)
            return wall_ms(graph.replay, device, size["repeat"])

        r = {"workload": name, "graph_replay_ms": attempt(capture, notes, f"CUDA graph capture of EGN.step on {name}")}
        out.append(r)
        print(f"  {r}", flush=True)
        if r["graph_replay_ms"] is None:
            break  # the context may be unusable after a failed capture
    return out


RUNNERS = {"egn": row_egn, "syncs": row_syncs, "revgn": row_revgn, "gram": row_gram, "tf32": row_tf32,
           "profile": row_profile, "compiled": row_compiled, "graphs": row_graphs, "ncu_target": row_ncu_target}


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------

def verdict(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "missed")


def summary(folder: Path) -> str:
    results = {}
    for row in ROWS:
        path = folder / f"bench_{row}.json"
        if path.exists():
            results[row] = json.loads(path.read_text())
    if not results:
        return "no bench_*.json in " + str(folder)
    head = next(iter(results.values()))
    lines = ["# GPU goals: measured", "", f"Machine: {head['machine']}. Load before: {head['load']}.",
             f"Sizes: {'quick (script check, not the goal sizes)' if head['quick'] else 'the issue sizes'}.", "",
             "| goal | measured | target | verdict |", "|---|---|---|---|"]
    for r in results.get("syncs", {}).get("rows", []):
        if r["step"].startswith("EGN"):
            syncs = r.get("cuda_syncs")
            ok = None if syncs is None else syncs == 0
            lines.append(f"| sync-free EGN step: {r['step']} | {syncs if syncs is not None else '-'} CUDA syncs, "
                         f"{len(r['host_reads'])} host-read sites | 0 | {verdict(ok)} |")
    for r in results.get("egn", {}).get("rows", []):
        ratio = r.get("naive_over_egn")
        lines.append(f"| EGN vs naive: {r['workload']}, {r.get('gram_method', '?')} Gram | EGN {r['egn_ms']:.2f} ms, "
                     f"naive {r['naive_ms'] or float('nan'):.2f} ms: {ratio or float('nan'):.2f}x | >= 3x | "
                     f"{verdict(None if ratio is None else ratio >= GOALS['egn_speedup'])} |")
    for r in results.get("compiled", {}).get("rows", []):
        ms = r.get("egn_compiled_ms")
        lines.append(f"| torch.compile(EGN.step): {r['workload']} | "
                     + ("failed" if ms is None else f"{ms:.2f} ms vs eager {r['egn_ms']:.2f} ms "
                                                    f"({r['egn_ms'] / ms:.2f}x)")
                     + f", first call {r['compile_s']:.0f} s | report | - |")
    for r in results.get("graphs", {}).get("rows", []):
        ms = r.get("graph_replay_ms")
        lines.append(f"| EGN step as a CUDA graph: {r['workload']} | "
                     f"{'capture failed' if ms is None else f'{ms:.2f} ms'} | report | - |")
    for r in results.get("revgn", {}).get("rows", []):
        lines.append(f"| RevGN vs Adam: {r['config']} | RevGN {r['revgn_ms']:.2f} ms, Adam {r['adam_ms']:.2f} ms: "
                     f"{r['revgn_over_adam']:.2f}x | <= 1.5x | "
                     f"{verdict(r['revgn_over_adam'] <= GOALS['revgn_over_adam'])} |")
    for r in results.get("gram", {}).get("rows", []):
        target = {256: GOALS["gram_256"], 1024: GOALS["gram_1024"]}.get(r["n"])
        floor = (f"; floors: compute {r['compute_floor_ms']:.3f} ms, memory {r['memory_floor_ms']:.3f} ms "
                 f"({r['bound']} bound)")
        lines.append(f"| gram_cholesky_solve {r['size']} | kernel {r['kernel_ms']:.3f} ms, eager "
                     f"{r['eager_ms']:.3f} ms: {r['eager_over_kernel']:.2f}x{floor} | "
                     f"{f'>= {target}x' if target else 'report'} | "
                     f"{verdict(None if target is None else r['eager_over_kernel'] >= target)} |")
    for r in results.get("tf32", {}).get("rows", []):
        lines.append(f"| {r['what']}, {r['precision']} | rel. error vs float64 {r['rel_err_vs_float64']:.2e}, "
                     f"{r['step_ms']:.3f} ms | report | - |")
    for r in results.get("profile", {}).get("rows", []):
        top = "; ".join(f"{t['name']} {100 * t['share']:.0f}%" for t in r["top"][:4])
        lines.append(f"| profile gram_cholesky_solve {r['size']} | {top} (`{r['table']}`) | report | - |")
    reads = [r for r in results.get("syncs", {}).get("rows", [])]
    if reads:
        lines += ["", "Host reads per step (each a sync on CUDA), innermost revgn_ext line:", ""]
        for r in reads:
            lines.append(f"* {r['step']}:" + ("" if r["host_reads"] else " none"))
            lines += [f"  * `{line}`" for line in r["host_reads"]]
    notes = [n for res in results.values() for n in res.get("notes", [])]
    if notes:
        lines += ["", "Notes:", ""] + [f"* {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a check of the script, not of the goals")
    parser.add_argument("--only", default=",".join(DEFAULT_ROWS), help="comma list of " + ",".join(ROWS))
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/revgn_gpu"))
    parser.add_argument("--summarize", action="store_true", help="only join DIR/bench_*.json into DIR/summary.md")
    args = parser.parse_args()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        text = summary(folder)
        (folder / "summary.md").write_text(text)
        print(text)
        return
    rows = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in rows if r not in RUNNERS]
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    size = QUICK if args.quick else FULL
    machine = f"{describe()}; ops backend {ops.backend()}"
    print(machine, flush=True)
    failed = []
    for row in rows:
        print(f"== {row}", flush=True)
        notes: list[str] = []
        load = f"{os.getloadavg()[0]:.2f}"
        t0 = time.perf_counter()

        def save(data, notes, partial=True):
            record = {"row": row, "device": args.device, "quick": args.quick, "machine": machine, "load": load,
                      "seconds": time.perf_counter() - t0, "rows": data,
                      "notes": notes + ([f"partial: the {row} row did not finish"] if partial else [])}
            (folder / f"bench_{row}.json").write_text(json.dumps(record, indent=1))
            return record

        args.save = save
        try:
            data = RUNNERS[row](args.device, size, args, notes)
        except Exception as exc:  # noqa: BLE001 - one row's failure must not hide the others
            traceback.print_exc()
            notes.append(f"{row} failed: {type(exc).__name__}: {exc}")
            data, _ = [], failed.append(row)
        record = save(data, notes, partial=False)
        print(f"   {row}: {record['seconds']:.1f} s", flush=True)
    text = summary(folder)
    (folder / "summary.md").write_text(text)
    print(text)
    if failed:
        raise SystemExit(f"rows failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
