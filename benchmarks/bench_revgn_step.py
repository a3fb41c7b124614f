"""Wall time of one RevGN step against one Adam step (forward, backward, update) on the same RevMLP.

Configs (float32, activations identity then ReLU as in the paper):
* cpu:   d=784, L=2, M=2048, n=256  (CPU-scaled)
* mnist: d=784, L=2, M=8000, n=1024 (the paper's MNIST config; run only when CUDA is available)

Usage: python benchmarks/bench_revgn_step.py [--repeats 5] [--configs cpu,mnist] [--device cpu|cuda] [--out PATH]
Writes a markdown table (default benchmarks/results/revgn.md) naming the machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import revgn_ext as rg
from _machine import cpu_name

CONFIGS = {
    "cpu": dict(d=784, L=2, M=2048, n=256),
    "mnist": dict(d=784, L=2, M=8000, n=1024),
}


def machine(device: torch.device) -> str:
    desc = (f"{cpu_name()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
            f"torch {torch.__version__}, ops backend {rg.ops.backend()}")
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return desc


def timed(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(d, L, M, n, device, repeats):
    def model():
        return rg.RevMLP(d, 10, L, M, ("identity", "relu"), weight_std=1e-3, seed=0, device=device)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, d, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)

    adam_model = model()
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-4)

    def adam_step():
        adam.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(adam_model(x), y).backward()
        adam.step()

    gn = rg.RevGN(model(), lr=0.1, damping=1e-4)

    def gn_step():
        gn.step(x, y)

    # Interleave so both see the same machine load.
    t_adam, t_gn = [], []
    for _ in range(2):
        t_adam.append(timed(adam_step, device, repeats))
        t_gn.append(timed(gn_step, device, repeats))
    return min(t_adam), min(t_gn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default=None, help="comma list of " + ",".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "revgn.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = args.configs.split(",") if args.configs else (["cpu", "mnist"] if device.type == "cuda" else ["cpu"])

    load_before = os.getloadavg()[0]
    rows = []
    for name in names:
        cfg = CONFIGS[name]
        t_adam, t_gn = bench(**cfg, device=device, repeats=args.repeats)
        ratio = t_gn / t_adam
        print(f"{name}: {cfg} on {device.type}: Adam {t_adam * 1e3:.1f} ms, RevGN {t_gn * 1e3:.1f} ms, "
              f"RevGN/Adam = {ratio:.2f}x", flush=True)
        rows.append(f"| {name} | d={cfg['d']}, L={cfg['L']}, M={cfg['M']}, n={cfg['n']} | {device.type} | "
                    f"{t_adam * 1e3:.1f} ms | {t_gn * 1e3:.1f} ms | {ratio:.2f}x |")

    text = "\n".join([
        "# RevGN step vs Adam step",
        "",
        f"Machine: {machine(device)}. Load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}.",
        "",
        "One step = forward, backward (Adam) or right-inverse solve (RevGN), and the update, on the same",
        "RevMLP (float32, identity then ReLU, damping 1e-4 relative, Cholesky solver). Median of "
        f"{args.repeats} runs after 2 warm-ups, best of 2 interleaved rounds.",
        "Produced by `python benchmarks/bench_revgn_step.py`.",
        "",
        "| config | shape | device | Adam step | RevGN step | RevGN / Adam |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
