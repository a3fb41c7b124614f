"""RevGN and EGN step times of source trees side by side, under the same load.

Each tree (a checkout with its extension built in place, e.g. ``git worktree add /tmp/old <commit>``)
is timed by the same harness below, through the public API only (RevMLP, RevGN, EGN, torch's Adam),
with 1 torch thread and the process's CPU time (minimum of the repeats), so that time spent waiting
for a core on a loaded machine is not counted,
in its own subprocess; the subprocesses alternate A, B, ..., then ..., B, A, so that drifting machine
load hits both alike. Each process also times an Adam step on the same model, so the ratio to Adam
measured inside one process is a second, load-independent comparison.

Usage: python benchmarks/compare_commits.py TREE [TREE ...] [--rounds 2] [--threads 1]
       [--revgn cpu,mid,mnist] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HARNESS = r'''
import json, statistics, sys, time
import torch
from torch import nn
import revgn_ext as rg

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
out = {"file": rg.__file__, "backend": rg.ops.backend()}

def timed(fn, repeats):
    # CPU time of this process (1 torch thread): waiting for a core on a loaded machine does not count.
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.process_time(); fn(); ts.append(time.process_time() - t0)
    return min(ts)

SHAPES = {"cpu": (2048, 256), "mid": (4096, 512), "mnist": (8000, 1024)}
for name in cfg["revgn"]:
    M, n = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 784, generator=g); y = torch.randint(0, 10, (n,), generator=g)
    mk = lambda: rg.RevMLP(784, 10, 2, M, ("identity", "relu"), weight_std=1e-3, seed=0)
    am = mk(); adam = torch.optim.Adam(am.parameters(), lr=1e-4)
    def adam_step():
        adam.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(am(x), y).backward()
        adam.step()
    gn = rg.RevGN(mk(), lr=0.1, damping=1e-4)
    t_gn = timed(lambda: gn.step(x, y), cfg["repeats"])
    t_adam = timed(adam_step, cfg["repeats"])
    out[f"revgn {name}"] = t_gn
    out[f"adam (revgn {name})"] = t_adam

# bench_egn_step.py's workloads: MLP 8-32-64-32-1 with MSE (b 256, 1024) and 64-32-64-32-10 with CE (b 256).
for name, sizes, b, loss in (("egn mse b256", (8, 32, 64, 32, 1), 256, "mse"),
                             ("egn mse b1024", (8, 32, 64, 32, 1), 1024, "mse"),
                             ("egn ce b256", (64, 32, 64, 32, 10), 256, "cross_entropy")):
    torch.manual_seed(0)
    layers = []
    for i, (a, c) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, c))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    x = torch.randn(b, sizes[0])
    y = torch.randn(b, 1) if loss == "mse" else torch.randint(0, sizes[-1], (b,))
    opt = rg.EGN(model, lr=0.1, damping=1.0, loss=loss)
    out[name] = timed(lambda: opt.step(x, y), cfg["repeats_egn"])
print("RESULT " + json.dumps(out))
'''


def run(tree: str, cfg: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=str(cfg["threads"]))
    proc = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(cfg)], env=env, cwd=tree,
                          capture_output=True, text=True, check=True)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    if not result["file"].startswith(os.path.abspath(tree)):
        raise RuntimeError(f"{tree}: imported revgn_ext from {result['file']}, not from the tree")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", help="source trees; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU time sums them)")
    parser.add_argument("--revgn", default="cpu,mid,mnist")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeats-egn", type=int, default=20)
    args = parser.parse_args()
    cfg = dict(threads=args.threads, revgn=[c for c in args.revgn.split(",") if c], repeats=args.repeats,
               repeats_egn=args.repeats_egn)
    trees = [os.path.abspath(t) for t in args.trees]
    best: dict = {t: {} for t in trees}
    print(f"load average before: {os.getloadavg()}", flush=True)
    for r in range(args.rounds):
        for tree in (trees if r % 2 == 0 else trees[::-1]):
            res = run(tree, cfg)
            print(f"round {r} {tree}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in res.items()
                                                   if isinstance(v, float)), flush=True)
            for k, v in res.items():
                if isinstance(v, float):
                    best[tree][k] = min(best[tree].get(k, float("inf")), v)
    print(f"load average after: {os.getloadavg()}")
    base = trees[0]
    print("\n| work | " + " | ".join(trees) + " | " + " | ".join(f"{t} / {base}" for t in trees[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(trees) - 1))
    for k in best[base]:
        cells = [f"{best[t][k] * 1e3:.1f} ms" for t in trees]
        ratios = [f"{best[t][k] / best[base][k]:.2f}x" for t in trees[1:]]
        print(f"| {k} | " + " | ".join(cells + ratios) + " |")
    for name in cfg["revgn"]:
        cells = [f"{best[t][f'revgn {name}'] / best[t][f'adam (revgn {name})']:.2f}x" for t in trees]
        print(f"| RevGN / Adam (same process), {name} | " + " | ".join(cells) + " |" + " |" * (len(trees) - 1))


if __name__ == "__main__":
    main()
