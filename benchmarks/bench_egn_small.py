"""The small EGN step against Adam, for several source trees side by side (the paper's MLP at its batch sizes).

MLP 8-32-64-32-1 (ReLU), MSE, b in {32, 64, 128}, float32, 1 torch thread. Each tree (a checkout with its
extension in place) runs in its own process per round, trees interleaved (A, B, ..., then reversed); a
process times ``EGN.step`` and an Adam step (forward, backward, ``Adam.step``) on the same batch, CPU time,
median of ``--steps`` steps after 5 warm-up steps, and the median of the step's phases (``stats["time"]``:
forward, gram, factor, backproject; wall clock, short intervals). The EGN / Adam ratio comes from one
process, so it does not depend on the machine's load.

``--sketch``: instead, in one process per batch size, the arithmetic a verified step needs at least (the
forward with recording hooks, the backward pass for the Gram's factors, K, a plain Cholesky and solve,
the VJP, the direction check against the factors, the verdict read in one sync, the update), written
out for this MLP, eager and under ``torch.compile`` (``torch._dynamo.config.trace_autograd_ops = True``,
so that both ``autograd.grad`` calls are traced into one graph), next to Adam; with the compile time.

``--compile``: also ``EGN(compile=True)`` in the same process (its first step eager, its second compiles
the solve; both in the warm-up), with the compile time.

Usage: python benchmarks/bench_egn_small.py TREE [TREE ...] [--rounds 2] [--steps 300] [--compile]
       python benchmarks/bench_egn_small.py --sketch [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

COMMON = r'''
import json, math, statistics, sys, time
import torch
from torch import nn
cfg = json.loads(sys.argv[1])
torch.set_num_threads(1)
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 1))
def timed(fn, n):
    for _ in range(5):
        fn()
    ts = []
    for _ in range(n):
        t = time.process_time(); fn(); ts.append(time.process_time() - t)
    return statistics.median(ts) * 1e3
def adam_stepper(x, y):
    am = mlp(); adam = torch.optim.Adam(am.parameters(), lr=1e-3)
    def adam_step():
        adam.zero_grad()
        (0.5 * (am(x) - y).square().sum(1).mean()).backward()
        adam.step()
    return adam_step
'''

HARNESS = COMMON + r'''
import revgn_ext as rg
out = {"file": rg.__file__}
for b in cfg["batches"]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 8, generator=g); y = torch.randn(b, 1, generator=g)
    opt = rg.EGN(mlp(), lr=0.1, damping=1.0, loss="mse")
    phases = {}
    def egn_step():
        s = opt.step(x, y)
        for k, v in s["time"].items():
            phases.setdefault(k, []).append(v * 1e3)
    out[f"b={b}"] = {"egn": timed(egn_step, cfg["steps"]), "adam": timed(adam_stepper(x, y), cfg["steps"]),
                     "phases": {k: statistics.median(v) for k, v in phases.items()}}
    if cfg.get("compile"):   # EGN(compile=True): the first step eager, the second compiles (in the warm-up)
        copt = rg.EGN(mlp(), lr=0.1, damping=1.0, loss="mse", compile=True)
        t0 = time.time(); copt.step(x, y); copt.step(x, y)
        out[f"b={b}"]["compile_s"] = time.time() - t0
        out[f"b={b}"]["compiled"] = timed(lambda: copt.step(x, y), cfg["steps"])
        if "solve" not in copt.last_stats["time"]:
            raise RuntimeError("EGN(compile=True) did not take the compiled solve")
print("RESULT " + json.dumps(out))
'''

SKETCH = COMMON + r'''
torch._dynamo.config.trace_autograd_ops = True
b, n = cfg["batch"], cfg["steps"]
g = torch.Generator().manual_seed(1)
x = torch.randn(b, 8, generator=g); y = torch.randn(b, 1, generator=g)
model = mlp(); params = list(model.parameters())
tape, recording = [], [False]
def hook(mod, inputs, output):   # registered once: hooks added per call would change the compiled guards
    if recording[0]:
        tape.append((inputs[0].detach(), output))
        return output.clone()
for layer in model[::2]:
    layer.register_forward_hook(hook)
def solve(x, y, lam: float):
    tape.clear()
    f = model(x)
    e = (f - y).detach()
    outs = [o for _, o in tape]
    Gs = torch.autograd.grad(f, outs, torch.ones_like(f), retain_graph=True)
    Xs = [torch.cat([i, i.new_ones(b, 1)], 1) for i, _ in tape]
    tape.clear()
    K = torch.zeros(b, b)
    for X, G in zip(Xs, Gs):
        K = K + (X @ X.T) * (G @ G.T)
    K.diagonal().add_(b * lam)
    L, status = torch.linalg.cholesky_ex(K)
    piv = L.diagonal()
    u = torch.cholesky_solve(e, L)
    truth = torch.autograd.grad(f, params, u)
    mine = []
    for X, G in zip(Xs, Gs):
        full = (G * u).T @ X
        mine += [full[:, :-1], full[:, -1]]
    norms = torch.stack(torch._foreach_norm([*torch._foreach_sub(mine, truth), *mine, *truth])).view(3, -1)
    eps = torch.finfo(x.dtype).eps
    ok = norms[0] <= norms[1:].sum(0) * math.sqrt(eps) + 100 * eps * norms[1:].sum(0).norm()
    direction = [-t for t in truth]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(direction)))
    verdict = torch.stack([status.to(x.dtype), K.diagonal().mean(), (piv * piv).amin(), K.sum() + piv.sum(), norm,
                           0.5 * e.square().sum() / b])
    return torch.cat([verdict, ok.to(x.dtype)]), direction
def step(fn):
    recording[0] = True
    try:
        verdict, direction = fn(x, y, 1.0)
    finally:
        recording[0] = False
    verdict.tolist()
    with torch.no_grad():
        torch._foreach_copy_(params, torch._foreach_add(params, direction, alpha=0.0))  # lr 0: same point
out = {"b": b, "eager": timed(lambda: step(solve), n), "adam": timed(adam_stepper(x, y), n)}
t0 = time.time(); compiled = torch.compile(solve); step(compiled); out["compile_s"] = time.time() - t0
out["compiled"] = timed(lambda: step(compiled), n)
print("RESULT " + json.dumps(out))
'''


def sketch(steps):
    print("| b | sketch eager ms | sketch compiled ms | Adam ms | compiled / Adam | compile s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in (32, 64, 128):
        proc = subprocess.run([sys.executable, "-c", SKETCH, json.dumps({"batch": b, "steps": steps})],
                              env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, check=True)
        r = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        print(f"| {b} | {r['eager']:.2f} | {r['compiled']:.2f} | {r['adam']:.2f} | {r['compiled'] / r['adam']:.2f}x | "
              f"{r['compile_s']:.0f} |", flush=True)


def run(tree, cfg):
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(cfg)], env=env, cwd=tree,
                          capture_output=True, text=True, check=True)
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    if not res["file"].startswith(os.path.abspath(tree)):
        raise RuntimeError(f"{tree}: imported revgn_ext from {res['file']}")
    return res


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*")
    parser.add_argument("--sketch", action="store_true")
    parser.add_argument("--labels", nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--compile", action="store_true", help="also time EGN(compile=True) (after its compile)")
    args = parser.parse_args()
    if args.sketch:
        before = os.getloadavg()
        sketch(args.steps)
        print(f"\nLoad average before {before[0]:.1f}, after {os.getloadavg()[0]:.1f}.")
        return
    trees = [os.path.abspath(t) for t in args.trees]
    labels = args.labels or trees
    cfg = {"batches": [32, 64, 128], "steps": args.steps, "compile": args.compile}
    runs = {t: [] for t in trees}
    before = os.getloadavg()
    for r in range(args.rounds):
        for t in (trees if r % 2 == 0 else trees[::-1]):
            runs[t].append(run(t, cfg))
            print(f"round {r} {t}: {runs[t][-1]}", flush=True)
    after = os.getloadavg()
    print(f"\nLoad average before {before[0]:.1f} / {before[1]:.1f} / {before[2]:.1f}, "
          f"after {after[0]:.1f} / {after[1]:.1f} / {after[2]:.1f}; median over {args.rounds} rounds.\n")
    extra = " compiled ms | compiled / Adam | compile s |" if args.compile else ""
    print("| tree | b | EGN step ms | Adam step ms | EGN / Adam | forward | gram | factor | backproject | rest |" + extra)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (3 if args.compile else 0))
    for t, label in zip(trees, labels):
        for b in cfg["batches"]:
            rows = [x[f"b={b}"] for x in runs[t]]
            egn = statistics.median(r["egn"] for r in rows)
            adam = statistics.median(r["adam"] for r in rows)
            ratio = statistics.median(r["egn"] / r["adam"] for r in rows)
            ph = {k: statistics.median(r["phases"].get(k, float("nan")) for r in rows)
                  for k in ("forward", "gram", "factor", "backproject")}
            print(f"| {label} | {b} | {egn:.2f} | {adam:.2f} | {ratio:.2f}x | " +
                  " | ".join(f"{v:.2f}" for v in ph.values()) + f" | {egn - sum(ph.values()):.2f} |" +
                  (f" {statistics.median(r['compiled'] for r in rows):.2f} | "
                   f"{statistics.median(r['compiled'] / r['adam'] for r in rows):.2f}x | "
                   f"{statistics.median(r['compile_s'] for r in rows):.0f} |" if args.compile else ""))


if __name__ == "__main__":
    main()
