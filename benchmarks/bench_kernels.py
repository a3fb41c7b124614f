"""Fused kernels against the eager pure-PyTorch reference and torch.compile of the reference.

Ops: coupling_forward / coupling_inverse / coupling_inverse_tangent (ReLU, float32) and
gram_cholesky_solve (float32, ones column, damping 1e-3 * mean diag, k = 392 right-hand sides = d/2
of the MNIST config). On CUDA it also times the fused Gram path against the library path (cuSOLVER)
for n around the crossover (REVGN_GRAM_FUSED_MAX_N=0 forces the library path).

Sizes (from the task): coupling n in {256, 1024}, d/2 in {392, 1536}, M in {2048, 8000}; Gram B in
{4, 12}, n in {64, 128, 256, 512, 1024}, m = 8000. CPU runs use reduced sizes (see CPU_*) so that a
run stays within a few minutes on a small machine.

Timing: CUDA uses triton.testing.do_bench (CUDA events, median) when Triton is present, else CUDA
events with the median of repeats; CPU uses the minimum of perf_counter repeats (a shared CPU only adds
noise upwards).

Usage: python benchmarks/bench_kernels.py [--device cpu|cuda] [--out benchmarks/results/kernels.md]
The results table for the device replaces that device's section of the output file.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from _machine import cpu_name
from revgn_ext import ops
from revgn_ext.ops.gram import gram_cholesky_solve_reference
from revgn_ext.ops.coupling import coupling_forward_reference, coupling_inverse_reference, coupling_inverse_tangent_reference

GPU_COUPLING = [(n, h, M) for n in (256, 1024) for h in (392, 1536) for M in (2048, 8000)]
CPU_COUPLING = [(256, 392, 2048), (256, 392, 8000), (1024, 392, 2048)]
GPU_GRAM = [(B, n, 8000) for B in (4, 12) for n in (64, 128, 256, 512, 1024)]
CPU_GRAM = [(4, n, 2000) for n in (64, 128, 256)] + [(12, 128, 2000)]
GRAM_K = 392
CROSSOVER_N = (64, 96, 128, 160, 176, 192, 208, 224)


def machine(device: str) -> str:
    desc = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"ops backend {ops.backend()}")
    if device == "cuda":
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc


def timer(device: str):
    """Median wall time in ms of fn()."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return lambda fn: do_bench(fn, warmup=10, rep=40, return_mode="median")
        except ImportError:
            pass

        def cuda_events(fn, repeats=20):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)

        return cuda_events

    def cpu_clock(fn, budget_s=0.6, min_repeats=5, max_repeats=15):
        # The minimum, not the median: on a shared CPU other jobs only ever add time.
        fn()
        times = []
        t_all = time.perf_counter()
        while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - t_all < budget_s):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return min(times)

    return cpu_clock


def coupling_inputs(n, h, M, device, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)

    def draw(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x1, x2 = draw(n, h), draw(n, h)
    VF, VG = draw(h, M, std=M ** -0.5), draw(h, M, std=M ** -0.5)
    WF, WG = draw(h, M, std=1e-2), draw(h, M, std=1e-2)
    bF, bG = draw(h, std=0.1), draw(h, std=0.1)
    return x1, x2, VF, WF, bF, VG, WG, bG


def compiled(fn):
    return torch.compile(fn, dynamic=True)


def bench_coupling(device, sizes, measure, rows):
    act = "relu"
    fwd_c = compiled(lambda *a: coupling_forward_reference(*a, act, False))
    inv_c = compiled(lambda *a: coupling_inverse_reference(*a, act))
    tan_c = compiled(lambda *a: coupling_inverse_tangent_reference(*a, act))
    for n, h, M in sizes:
        x1, x2, VF, WF, bF, VG, WG, bG = coupling_inputs(n, h, M, device)
        y1, y2, _, _ = coupling_forward_reference(x1, x2, VF, WF, bF, VG, WG, bG, act)
        dy1, dy2 = torch.randn_like(y1), torch.randn_like(y2)
        fwd = (x1, x2, VF, WF, bF, VG, WG, bG)
        inv = (y1, y2, VF, WF, bF, VG, WG, bG)
        tan = (y1, x2, dy1, dy2, VF, WF, VG, WG)
        cases = [
            ("coupling_forward", lambda: torch.ops.revgn.coupling_forward(*fwd, act, False),
             lambda: coupling_forward_reference(*fwd, act, False), lambda: fwd_c(*fwd)),
            ("coupling_inverse", lambda: torch.ops.revgn.coupling_inverse(*inv, act),
             lambda: coupling_inverse_reference(*inv, act), lambda: inv_c(*inv)),
            ("coupling_inverse_tangent", lambda: torch.ops.revgn.coupling_inverse_tangent(*tan, act),
             lambda: coupling_inverse_tangent_reference(*tan, act), lambda: tan_c(*tan)),
        ]
        with torch.no_grad():
            for name, kernel, eager, comp in cases:
                rows.append((name, f"n={n} d/2={h} M={M}", safe(measure, kernel), safe(measure, eager),
                             safe(measure, comp)))
                print(*rows[-1], flush=True)


# The RevGN shapes of issue "CPU speed" (d = 784, so d/2 = 392): (n, d/2, M).
CPU_DEFAULT_PATH = [(256, 392, 2048), (512, 392, 4096), (1024, 392, 8000)]


def bench_default_path_cpu(sizes, dtypes, threads, repeats):
    """The CPU default path against the eager expression it replaces, interleaved call by call in
    this one process (minimum of ``repeats`` rounds), ReLU:

    * forward: ``ops.coupling_forward`` as a user calls it (validation with the finite check
      included), the kernel alone (``torch.ops.revgn.coupling_forward``), and the eager expression
      ``x1 + relu(x2 @ VF) @ WF.T + bF`` with the G half;
    * inverse tangent at the forward's features, as RevGN's transport runs it: the kernel (four GEMMs,
      it recomputes the pre-activations), the reference with the features (two GEMMs, the routed
      path) and the reference without them.
    """
    act = "relu"
    rows = []
    for t in threads:
        # One thread: this process's CPU time, which leaves out the waits for a core on a loaded
        # machine; two threads: wall time (CPU time would add the threads up).
        clock = time.process_time if t == 1 else time.perf_counter
        torch.set_num_threads(t)
        for dtype in dtypes:
            for n, h, M in sizes:
                x1, x2, VF, WF, bF, VG, WG, bG = coupling_inputs(n, h, M, "cpu", dtype)
                fwd = (x1, x2, VF, WF, bF, VG, WG, bG)
                y1, y2, hF, hG = torch.ops.revgn.coupling_forward(*fwd, act, True)
                dy1, dy2 = torch.randn_like(y1), torch.randn_like(y2)
                tan = (y1, x2, dy1, dy2, VF, WF, VG, WG)

                def eager():
                    z1 = x1 + torch.relu(x2 @ VF) @ WF.T + bF
                    return z1, x2 + torch.relu(z1 @ VG) @ WG.T + bG

                cases = {
                    "wrapper": lambda: ops.coupling_forward(*fwd, act),
                    "kernel": lambda: torch.ops.revgn.coupling_forward(*fwd, act, False),
                    "eager": eager,
                    "tangent kernel": lambda: torch.ops.revgn.coupling_inverse_tangent(*tan, act),
                    "tangent ref+features": lambda: coupling_inverse_tangent_reference(*tan, act, hF, hG),
                    "tangent ref": lambda: coupling_inverse_tangent_reference(*tan, act),
                }
                best = {k: float("inf") for k in cases}
                with torch.no_grad():
                    for fn in cases.values():
                        fn()
                    for r in range(repeats):
                        for k in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
                            t0 = clock()
                            cases[k]()
                            best[k] = min(best[k], (clock() - t0) * 1e3)
                row = (t, str(dtype).replace("torch.", ""), f"n={n} d/2={h} M={M}", best)
                rows.append(row)
                print(t, row[1], row[2], {k: round(v, 2) for k, v in best.items()},
                      f"wrapper/eager {best['wrapper'] / best['eager']:.3f} kernel/eager "
                      f"{best['kernel'] / best['eager']:.3f} tangent kernel/ref+features "
                      f"{best['tangent kernel'] / best['tangent ref+features']:.3f}", flush=True)
    return rows


def default_path_section(rows, repeats) -> str:
    lines = ["## CPU default path", "", f"Machine: {machine('cpu')}. Load average (1/5/15 min) after the run: "
             + " / ".join(f"{v:.2f}" for v in os.getloadavg()) + ".", "",
             "`python benchmarks/bench_kernels.py --device cpu --only default-path`: minimum of "
             f"{repeats} interleaved calls in one process, ReLU, d/2 = 392; CPU time of the process at 1 "
             "thread, wall time at 2. Times in ms; ratios < 1 mean the first is faster.", "",
             "| threads | dtype | size | ops.coupling_forward (checked) | kernel | eager | checked / eager | "
             "kernel / eager | tangent kernel | tangent ref + features | tangent ref | "
             "kernel / ref + features |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t, dtype, size, b in rows:
        lines.append(f"| {t} | {dtype} | {size} | {b['wrapper']:.2f} | {b['kernel']:.2f} | {b['eager']:.2f} | "
                     f"{b['wrapper'] / b['eager']:.2f} | {b['kernel'] / b['eager']:.2f} | "
                     f"{b['tangent kernel']:.2f} | {b['tangent ref+features']:.2f} | {b['tangent ref']:.2f} | "
                     f"{b['tangent kernel'] / b['tangent ref+features']:.2f} |")
    return "\n".join(lines) + "\n"


def gram_inputs(B, n, m, device, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(1)
    A = (torch.randn(B, n, m, generator=g) / m ** 0.5).to(device=device, dtype=dtype)
    R = torch.randn(B, n, GRAM_K, generator=g).to(device=device, dtype=dtype)
    lam = torch.full((B,), 1e-3, device=device, dtype=dtype)
    return A, R, lam


def bench_gram(device, sizes, measure, rows):
    comp_fn = compiled(gram_cholesky_solve_reference)
    for B, n, m in sizes:
        A, R, lam = gram_inputs(B, n, m, device)
        with torch.no_grad():
            rows.append(("gram_cholesky_solve", f"B={B} n={n} m={m} k={GRAM_K}",
                         safe(measure, lambda: torch.ops.revgn.gram_cholesky_solve(A, R, lam, True)),
                         safe(measure, lambda: gram_cholesky_solve_reference(A, R, lam, True)),
                         safe(measure, lambda: comp_fn(A, R, lam, True))))
        print(*rows[-1], flush=True)


def bench_crossover(measure, B=12, m=8000):
    """Fused vs library path of the CUDA Gram solve (and the factorisation alone)."""
    out = []
    for n in CROSSOVER_N:
        A, R, lam = gram_inputs(B, n, m, "cuda")
        times = []
        for env in ("1024", "0"):  # fused up to its shared-memory limit, then library only
            os.environ["REVGN_GRAM_FUSED_MAX_N"] = env
            times.append(safe(measure, lambda: torch.ops.revgn.gram_cholesky_solve(A, R, lam, True)))
            times.append(safe(measure, lambda: torch.ops.revgn.gram_factor(A, lam, True)))
        os.environ.pop("REVGN_GRAM_FUSED_MAX_N", None)
        out.append((n, *times))
        print("crossover", *out[-1], flush=True)
    return out


def safe(measure, fn):
    try:
        return measure(fn)
    except Exception as exc:  # e.g. torch.compile failing on a given build; the table shows nan
        print("failed:", type(exc).__name__, str(exc)[:300], flush=True)
        return float("nan")


def section(device, rows, crossover) -> str:
    lines = [f"## {device.upper()}", "", f"Machine: {machine(device)}.", "",
             f"{'Median' if device == 'cuda' else 'Minimum'} wall time in ms (float32, ReLU). "
             "Ratios > 1 mean the kernel is faster.", "",
             "| op | size | kernel | eager ref | compiled ref | eager / kernel | compiled / kernel |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, size, k, e, c in rows:
        lines.append(f"| {name} | {size} | {k:.3f} | {e:.3f} | {c:.3f} | {e / k:.2f} | {c / k:.2f} |")
    if crossover:
        lines += ["", "Fused vs library Gram path (B=12, m=8000, k=392, float32; ms):", "",
                  "| n | fused solve | library solve | fused factor | library factor |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for n, fs, ff, ls, lf in crossover:
            lines.append(f"| {n} | {fs:.3f} | {ls:.3f} | {ff:.3f} | {lf:.3f} |")
    return "\n".join(lines) + "\n"


def write(path: Path, device: str, text: str) -> None:
    """Replace this device's section of the results file, keeping the others."""
    sections = {}
    if path.exists():
        current = None
        for line in path.read_text().splitlines(keepends=True):
            if line.startswith("## "):
                current = line[3:].strip()
                sections[current] = ""
            if current is not None:
                sections[current] += line
    sections[text.splitlines()[0][3:].strip() if text.startswith("## ") else device.upper()] = text
    head = ("# Fused kernels vs reference\n\nWritten by benchmarks/bench_kernels.py; "
            "each device's section is replaced by its latest run.\n\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + "\n".join(sections[k] for k in sorted(sections)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "kernels.md"))
    parser.add_argument("--only", choices=("all", "coupling", "gram", "default-path"), default="all",
                        help="time only these ops (the section then holds only them); default-path: the CPU "
                             "coupling default path against eager at the RevGN shapes, fp32/fp64, 1 and 2 threads")
    parser.add_argument("--repeats", type=int, default=7, help="default-path rounds")
    parser.add_argument("--sizes", default=None, help="default-path sizes, e.g. 256x2048,512x4096 (n x M)")
    args = parser.parse_args()
    if ops.backend() == "reference":
        raise SystemExit("compiled revgn ops not loaded; build them first (python setup.py build_ext --inplace)")
    if args.only == "default-path":
        sizes = CPU_DEFAULT_PATH if args.sizes is None else [
            (int(a), 392, int(b)) for a, b in (p.split("x") for p in args.sizes.split(","))]
        rows = bench_default_path_cpu(sizes, (torch.float32, torch.float64), (1, 2), args.repeats)
        text = default_path_section(rows, args.repeats)
        write(Path(args.out), "cpu", text)
        print(text)
        return
    torch._dynamo.config.cache_size_limit = 64
    device = args.device
    measure = timer(device)
    rows = []
    gpu = device == "cuda"
    if args.only in ("all", "coupling"):
        bench_coupling(device, GPU_COUPLING if gpu else CPU_COUPLING, measure, rows)
    if args.only in ("all", "gram"):
        bench_gram(device, GPU_GRAM if gpu else CPU_GRAM, measure, rows)
    crossover = bench_crossover(measure) if gpu and args.only in ("all", "gram") else []
    text = section(device, rows, crossover)
    write(Path(args.out), device, text)
    print(text)


if __name__ == "__main__":
    main()
