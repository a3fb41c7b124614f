"""EGN on a one-layer transformer classifier against the naive step: time and peak memory of one step.

Model: Embedding(50, 32) on b = 64 sequences of T = 16 token ids, TransformerEncoderLayer(d_model 32, 4 heads,
feed-forward 64, dropout 0, batch_first, eval mode), mean over positions, Linear(32, 4); cross-entropy.

* EGN: ``revgn_ext.EGN(model, lr=0.1, damping=1.0, loss="cross_entropy")`` (exact curvature), and with
  ``curvature="sampled"`` (one drawn label per sample: a b x b system, one backward pass for the Gram);
* the same from another source tree (``--before TREE``, e.g. ``git archive main | tar -x -C TREE`` with
  the compiled ``revgn_ext/_C*.so`` copied in), labelled "before";
* naive: J per sample by ``vmap(jacrev)`` of the exact Gauss-Newton residual, dense (b c)^2 Gram,
  Cholesky, dir = -A^T u (``bench_egn_peers.naive_step``);
* the exact cross-entropy factor has c - 1 columns (Q_i = diag p_i - p_i p_i^T has rank c - 1;
  ``revgn_ext.egn.loss_factors.cross_entropy_factor``): a b (c - 1) system and c - 1 backward passes.

Each method runs in its own process (one thread, float32): CPU time per step (median after 2 warm-up steps),
and, in another fresh process, the peak resident memory of one step (VmHWM) and its growth over the resident
memory after the set-up. ``--rounds`` interleaves the methods.

Usage: python benchmarks/bench_egn_attention.py [--rounds 2] [--steps 10] [--before TREE]
       [--out FILE (appends a section)]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def model_and_batch():
    import torch
    from torch import nn

    class TransformerClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 32)
            self.enc = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.head = nn.Linear(32, 4)

        def forward(self, ids):
            return self.head(self.enc(self.emb(ids)).mean(1))

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = TransformerClassifier().eval()
    return model, torch.randint(0, 50, (64, 16), generator=g), torch.randint(0, 4, (64,), generator=g)


def _status_mib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(method, what, steps, tree=None):
    sys.path.insert(0, tree or os.path.dirname(HERE))
    import torch
    torch.set_num_threads(1)
    model, x, y = model_and_batch()
    info = {}
    if method.startswith("EGN"):
        import revgn_ext as rg
        curvature = "sampled" if "sampled" in method else "exact"
        opt = rg.EGN(model, lr=0.1, damping=1.0, loss="cross_entropy", curvature=curvature)
        info["source"] = os.path.dirname(os.path.dirname(os.path.abspath(rg.__file__)))

        def step():
            info.update(gram=opt.step(x, y)["gram"])
    else:
        from bench_egn_peers import naive_step

        def step():
            naive_step(model, x, y, "ce", 0.1, 1.0)
    if what == "memory":
        base = _status_mib("VmRSS")
        step()
        peak = _status_mib("VmHWM")
        return {"peak_mib": peak, "growth_mib": peak - base, **info}
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        c = time.process_time()
        step()
        times.append(time.process_time() - c)
    return {"cpu_ms": statistics.median(times) * 1e3, **info}


def run(method, what, steps, tree=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps([method, what, steps, tree])]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--title", default="Transformer classifier: EGN vs naive")
    parser.add_argument("--out", default=None)
    parser.add_argument("--before", default=None, help="another source tree, timed as 'before'")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    sys.path.insert(0, HERE)
    from _machine import cpu_name
    import torch
    before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    methods = {"EGN": None, "EGN sampled": None, "naive": None}
    if args.before:
        methods = {"EGN before": args.before, "EGN": None, "EGN sampled before": args.before, "EGN sampled": None,
                   "naive": None}
    res = {m: {"time": [], "memory": []} for m in methods}
    for r in range(args.rounds):
        for method in (res if r % 2 == 0 else reversed(list(res))):
            for what in ("time", "memory"):
                out = run(method.replace(" before", ""), what, args.steps, methods[method])
                res[method][what].append(out)
                print(r, method, what, out, flush=True)
    after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    def med(method, what, key):
        vals = [o[key] for o in res[method][what] if key in o]
        return statistics.median(vals) if vals else float("nan")

    rows = {m: (med(m, "time", "cpu_ms"), med(m, "memory", "peak_mib"), med(m, "memory", "growth_mib"))
            for m in res}
    def gram(m):
        return next((o.get("gram") for o in res[m]["time"] if "gram" in o), "-")
    lines = ["", f"## {args.title}", "",
             "Embedding 50x32 -> TransformerEncoderLayer(d 32, 4 heads, ff 64, dropout 0, eval) -> mean over "
             "positions -> Linear 32->4, cross-entropy, b = 64 x 16 tokens, float32, 1 thread; each number from "
             f"a fresh process, median over {args.rounds} interleaved rounds "
             "(`python benchmarks/bench_egn_attention.py`).", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}. `uptime` before: "
             f"`{before}`; after: `{after}`." + (f" Before: `{args.before}`." if args.before else ""), "",
             "| method | Gram route | step CPU ms | naive / method | peak RSS MiB | growth in the step MiB | "
             "growth / naive's |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for m, (ms, peak, growth) in rows.items():
        lines.append(f"| {m} | {gram(m)} | {ms:.1f} | {rows['naive'][0] / ms:.2f}x | {peak:.0f} | {growth:.0f} | "
                     f"{growth / rows['naive'][2]:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
