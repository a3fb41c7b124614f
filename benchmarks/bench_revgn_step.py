"""Wall time of one RevGN step against one Adam step (forward, backward, update) on the same RevMLP,
and (``--profile``) where each step's time goes.

Configs (float32, activations identity then ReLU as in the paper, d = 784, L = 2):
* cpu:   M=2048, n=256   (CPU-scaled)
* mid:   M=4096, n=512
* mnist: M=8000, n=1024  (the paper's MNIST config)

Both optimizers run in this one process, interleaved round by round, so they see the same machine
load; the ratio RevGN / Adam is the number to compare between runs on a shared machine.

Usage: python benchmarks/bench_revgn_step.py [--repeats 5] [--configs cpu,mid,mnist] [--threads 1,2]
       [--device cpu|cuda] [--profile] [--out PATH]
Writes a markdown table (default build/bench/revgn.md; the recorded one, with the analysis, is
benchmarks/results/revgn.md) naming the machine and the load.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

import revgn_ext as rg
from _machine import cpu_name

CONFIGS = {
    "cpu": dict(d=784, L=2, M=2048, n=256),
    "mid": dict(d=784, L=2, M=4096, n=512),
    "mnist": dict(d=784, L=2, M=8000, n=1024),
}


def machine(device: torch.device) -> str:
    desc = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, ops backend {rg.ops.backend()}"
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return desc


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median time of fn() in seconds, on ``clock`` (wall, or this process's CPU time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(clock() - t0)
    return statistics.median(times)


def setup(d, L, M, n, device):
    def model():
        return rg.RevMLP(d, 10, L, M, ("identity", "relu"), weight_std=1e-3, seed=0, device=device)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, d, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)

    adam_model = model()
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-4)

    def adam_step():
        with torch.profiler.record_function("[adam] zero_grad"):
            adam.zero_grad(set_to_none=True)
        with torch.profiler.record_function("[adam] forward + loss"):
            loss = torch.nn.functional.cross_entropy(adam_model(x), y)
        with torch.profiler.record_function("[adam] backward"):
            loss.backward()
        with torch.profiler.record_function("[adam] update"):
            adam.step()

    gn = rg.RevGN(model(), lr=0.1, damping=1e-4)

    def gn_step():
        gn.step(x, y)

    return adam_step, gn_step


def bench(d, L, M, n, device, repeats, rounds=2):
    adam_step, gn_step = setup(d, L, M, n, device)
    # Interleave so both see the same machine load; the best round of each.
    t_adam, t_gn = [], []
    for _ in range(rounds):
        t_adam.append(timed(adam_step, device, repeats))
        t_gn.append(timed(gn_step, device, repeats))
    return min(t_adam), min(t_gn)


# ------------------------------------------------------------------------------------------------
# Profile: the RevGN step's phases are marked by wrapping the functions the step calls (nothing in
# the package is changed); Adam's phases are marked in adam_step above.
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def phase_markers():
    from revgn_ext.revgn import model as model_mod
    from revgn_ext.revgn import optimizer as opt_mod
    from revgn_ext.revgn import right_inverse as ri

    patched = []

    def wrap(owner, name, label):
        original = getattr(owner, name)

        def marked(*args, **kwargs):
            with torch.profiler.record_function(label):
                return original(*args, **kwargs)
        setattr(owner, name, marked)
        patched.append((owner, name, original))

    wrap(model_mod.RevMLP, "forward_with_trace", "[revgn] forward (kept features)")
    wrap(opt_mod.tg, "loss_value", "[revgn] loss + target")
    wrap(opt_mod.tg, "function_space_target", "[revgn] loss + target")
    wrap(ri, "transport_targets", "[revgn] transport (inverse tangent)")
    wrap(ri, "gram_factor_unchecked", "[revgn] Gram + Cholesky factor")
    wrap(ri, "gram_factor_from_gram_unchecked", "[revgn] Gram + Cholesky factor")
    wrap(ri, "_identity_routes", "[revgn] Gram + Cholesky factor")
    wrap(ri, "_cross_term", "[revgn] cross-term K")
    wrap(ri._CholeskySolver, "__call__", "[revgn] solve + Theta = A^T U")
    wrap(opt_mod.RevGN, "checked_groups", "[revgn] hyper-parameter check")
    wrap(opt_mod.RevGN, "_check_batch", "[revgn] batch validation")
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def _self_by_phase(events, prefixes):
    """Self CPU time (us) of every op, attributed to the innermost marked phase that encloses it, and
    the per-op-name totals inside each phase."""
    phase_total = defaultdict(float)
    ops_in_phase = defaultdict(lambda: defaultdict(float))
    counts = defaultdict(int)
    for ev in events:
        if ev.name.startswith(prefixes):
            continue
        label = "other"
        parent = ev.cpu_parent
        while parent is not None:
            if parent.name.startswith(prefixes):
                label = parent.name
                break
            parent = parent.cpu_parent
        phase_total[label] += ev.self_cpu_time_total
        ops_in_phase[label][ev.name] += ev.self_cpu_time_total
        counts[ev.name] += 1
    return phase_total, ops_in_phase, counts


def profile(d, L, M, n, device, steps=2):
    """Per-phase self CPU time (ms per step) of the RevGN and the Adam step, and the counts of copies,
    allocations and host syncs."""
    adam_step, gn_step = setup(d, L, M, n, device)
    out = {}
    with phase_markers():
        for name, fn, prefix in (("adam", adam_step, "[adam] "), ("revgn", gn_step, "[revgn] ")):
            fn()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                wall = (time.perf_counter() - t0) / steps
            events = prof.events()
            phases, ops_in, counts = _self_by_phase(events, (prefix,))
            out[name] = dict(wall=wall, phases={k: v / 1e3 / steps for k, v in phases.items()},
                             ops={k: {o: t / 1e3 / steps for o, t in v.items()} for k, v in ops_in.items()},
                             counts={k: c / steps for k, c in counts.items()})
    return out


COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::stack", "aten::cat")
ALLOC_OPS = ("aten::empty", "aten::empty_strided", "aten::empty_like", "aten::zeros", "aten::ones")
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")


def profile_lines(name, cfg, prof) -> list[str]:
    lines = [f"### {name}: d={cfg['d']}, L={cfg['L']}, M={cfg['M']}, n={cfg['n']} "
             f"({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})", "",
             f"Wall time under the profiler: Adam {prof['adam']['wall'] * 1e3:.1f} ms, RevGN "
             f"{prof['revgn']['wall'] * 1e3:.1f} ms per step. Self time per phase as the profiler "
             "records it (wall clock, so on a loaded machine read the shares), with the phase's largest ops:", "",
             "| step | phase | ms | share | largest ops (ms) |", "|---|---|---:|---:|---|"]
    for opt in ("revgn", "adam"):
        phases = prof[opt]["phases"]
        total = sum(phases.values())
        for phase, ms in sorted(phases.items(), key=lambda kv: -kv[1]):
            top = sorted(prof[opt]["ops"][phase].items(), key=lambda kv: -kv[1])[:4]
            tops = ", ".join(f"{o.replace('aten::', '')} {t:.1f}" for o, t in top if t >= 0.05)
            lines.append(f"| {opt} | {phase} | {ms:.1f} | {ms / total:.0%} | {tops} |")
        c = prof[opt]["counts"]
        lines.append(f"| {opt} | (counts per step) | | | copies {sum(c.get(o, 0) for o in COPY_OPS):.0f}, "
                     f"allocations {sum(c.get(o, 0) for o in ALLOC_OPS):.0f}, "
                     f"host syncs {sum(c.get(o, 0) for o in SYNC_OPS):.0f}, "
                     f"GEMMs {sum(c.get(o, 0) for o in ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm')):.0f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved Adam/RevGN rounds (best is kept)")
    parser.add_argument("--configs", default=None, help="comma list of " + ",".join(CONFIGS))
    parser.add_argument("--threads", default=None, help="comma list of torch CPU thread counts (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--profile", action="store_true", help="also profile both steps (torch.profiler)")
    parser.add_argument("--clock", choices=tuple(CLOCK), default="wall",
                        help="cpu: this process's CPU time, which on a loaded machine leaves out the waits for "
                             "a core (use with 1 thread: with more it sums the threads' time)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "build" / "bench" / "revgn.md"))
    args = parser.parse_args()
    global clock
    clock = CLOCK[args.clock]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = args.configs.split(",") if args.configs else ["cpu", "mid", "mnist"]
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]

    load_before = os.getloadavg()
    rows, prof_lines = [], []
    for t in threads:
        torch.set_num_threads(t)
        for name in names:
            cfg = CONFIGS[name]
            t_adam, t_gn = bench(**cfg, device=device, repeats=args.repeats, rounds=args.rounds)
            ratio = t_gn / t_adam
            print(f"{name}: {cfg} on {device.type}, {t} thread(s): Adam {t_adam * 1e3:.1f} ms, "
                  f"RevGN {t_gn * 1e3:.1f} ms, RevGN/Adam = {ratio:.2f}x", flush=True)
            rows.append(f"| {name} | d={cfg['d']}, L={cfg['L']}, M={cfg['M']}, n={cfg['n']} | {device.type} | {t} | "
                        f"{t_adam * 1e3:.1f} ms | {t_gn * 1e3:.1f} ms | {ratio:.2f}x |")
            if args.profile:
                lines = profile_lines(name, cfg, profile(**cfg, device=device))
                print("\n".join(lines), flush=True)
                prof_lines += lines
    load_after = os.getloadavg()

    text = "\n".join([
        "# RevGN step vs Adam step",
        "",
        f"Machine: {machine(device)}. Load average (1/5/15 min) before: "
        f"{' / '.join(f'{v:.2f}' for v in load_before)}, after: {' / '.join(f'{v:.2f}' for v in load_after)}.",
        "",
        "One step = forward, backward (Adam) or right-inverse solve (RevGN), and the update, on the same",
        "RevMLP (float32, identity then ReLU, damping 1e-4 relative, Cholesky solver). Median of "
        f"{args.repeats} runs after a warm-up, best of {args.rounds} interleaved rounds, "
        + ("wall time." if args.clock == "wall" else "CPU time of the process (waits for a core left out)."),
        "Produced by `python benchmarks/bench_revgn_step.py" + (" --profile" if args.profile else "")
        + f" --clock {args.clock}`.",
        "",
        "| config | shape | device | threads | Adam step | RevGN step | RevGN / Adam |",
        "|---|---|---|---:|---|---|---|",
        *rows,
        "",
        *(["## Profile", ""] + prof_lines if prof_lines else []),
    ])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
