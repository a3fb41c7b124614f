"""Time one optimizer step, side by side: EGN, a naive pure-PyTorch EGN, torch-levenberg-marquardt, Adam.

Workloads: MLP 8-32-64-32-1 (ReLU) with MSE on standardised synthetic data at b in {64, 256, 1024},
and MLP 64-32-64-32-10 with cross-entropy on sklearn's digits (b = 256).

* EGN: ``revgn_ext.EGN`` (layerwise Gram, Cholesky, one VJP); also with adaptive damping, which adds
  the one forward pass that judges the step (torch-levenberg-marquardt makes the same check).
* naive: per-sample Jacobian with vmap(jacrev), dense Gram S^T J J^T S, Cholesky, dir = -J^T S u.
* tlm: the PyPI package torch-levenberg-marquardt (optional; skipped with a notice when missing), with
  its "cholesky" and default "qr" solvers. For cross-entropy it fits sqrt(loss_i) residuals, i.e. b
  rows instead of the b c rows of exact GN, so that row is a cheaper, different algorithm.
* Adam: forward, backward and ``Adam.step``.

Usage: python benchmarks/bench_egn_step.py [--repeat 10] [--out benchmarks/results/egn.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

import revgn_ext as rg
from _machine import describe
from revgn_ext.egn.loss_factors import LOSS_FACTORS, factor_matrix

try:
    import torch_levenberg_marquardt as tlm
except ImportError:
    tlm = None


def machine() -> str:
    return f"{describe()}; revgn_ext ops backend {rg.ops.backend()}"


def mlp(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def naive_egn_step(model, x, y, loss, lr, damping):
    """The textbook EGN step: materialise J per sample, then the dense Gram and Cholesky."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    f = functional_call(model, params, (x,)).reshape(x.shape[0], -1)
    b, c = f.shape
    jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],)).reshape(-1)),
               in_dims=(None, 0))(params, x)
    J = torch.cat([j.reshape(b, c, -1) for j in jac.values()], -1)            # (b, c, d)
    factor = LOSS_FACTORS[loss](f, y if loss == "cross_entropy" else y.reshape(b, c))
    A = torch.einsum("iba,ibk->iak", factor_matrix(factor), J).reshape(b * c, -1)  # S^T J
    K = A @ A.T + b * damping * torch.eye(b * c, dtype=A.dtype, device=A.device)
    L = torch.linalg.cholesky(K)
    u = torch.cholesky_solve(factor.target.reshape(-1, 1), L)
    direction = -(A.T @ u).reshape(-1)
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.add_(direction[offset:offset + p.numel()].view_as(p), alpha=lr)
            offset += p.numel()


def time_it(fn, repeat, warmup=2, sync=lambda: None):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def workloads(device):
    g = torch.Generator().manual_seed(0)
    for b in (64, 256, 1024):
        x = torch.randn(b, 8, generator=g)
        y = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3] + 0.1 * torch.randn(b, 1, generator=g)
        x = (x - x.mean(0)) / x.std(0)
        y = (y - y.mean()) / y.std()
        yield f"MSE 8-32-64-32-1, b={b}", [8, 32, 64, 32, 1], x.to(device), y.to(device), "mse"
    from sklearn.datasets import load_digits
    X, Y = load_digits(return_X_y=True)
    x = torch.tensor(X[:256], dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    yield "CE digits 64-32-64-32-10, b=256", [64, 32, 64, 32, 10], x.to(device), torch.tensor(Y[:256]).to(device), \
        "cross_entropy"


def run(repeat: int, device: str):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for name, sizes, x, y, loss in workloads(device):
        def fresh():
            torch.manual_seed(0)
            return mlp(sizes).to(device)

        row = {"workload": name}
        model = fresh()
        opt = rg.EGN(model, lr=0.1, damping=1.0, loss=loss)
        row["EGN"] = time_it(lambda: opt.step(x, y), repeat, sync=sync)
        model = fresh()
        opt_ad = rg.EGN(model, lr=0.1, damping=1.0, loss=loss, adaptive_damping=True)
        row["EGN adaptive"] = time_it(lambda: opt_ad.step(x, y), repeat, sync=sync)
        model = fresh()
        row["naive"] = time_it(lambda: naive_egn_step(model, x, y, loss, 0.1, 1.0), repeat, sync=sync)
        if tlm is not None:
            for solver in ("cholesky", "qr"):
                model = fresh()
                lossfn = tlm.loss.MSELoss() if loss == "mse" else tlm.loss.CrossEntropyLoss()
                module = tlm.training.LevenbergMarquardtModule(model, loss_fn=lossfn, learning_rate=1.0,
                                                               solve_method=solver)
                try:
                    row[f"tlm {solver}"] = time_it(lambda: module.training_step(x, y), repeat, sync=sync)
                except Exception as err:  # a third-party failure must not hide the other numbers
                    print(f"notice: torch-levenberg-marquardt ({solver}) failed on {name}: {err}")
        model = fresh()
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)

        def adam_step():
            adam.zero_grad()
            out = model(x)
            obj = 0.5 * (out - y).square().sum(1).mean() if loss == "mse" else F.cross_entropy(out, y)
            obj.backward()
            adam.step()
        row["Adam"] = time_it(adam_step, max(repeat, 20), sync=sync)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


COLUMNS = ["EGN", "EGN adaptive", "naive", "tlm cholesky", "tlm qr", "Adam"]


def format_row(row):
    parts = [row["workload"]] + [f"{k} {row[k]:.2f} ms" for k in COLUMNS if k in row]
    egn = row["EGN"]
    ratios = [f"naive/EGN {row['naive'] / egn:.1f}x"]
    if "tlm cholesky" in row:
        ratios += [f"tlm-chol/EGN {row['tlm cholesky'] / egn:.1f}x", f"tlm-qr/EGN {row['tlm qr'] / egn:.1f}x"]
    ratios.append(f"EGN/Adam {egn / row['Adam']:.1f}x")
    return " | ".join(parts) + "\n    " + ", ".join(ratios)


def write_markdown(rows, path, repeat, device, append=False):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = [] if append else [
        "# EGN step benchmark", "",
        "Milliseconds per step, median after 2 warm-up steps (`python benchmarks/bench_egn_step.py`).", "",
        "* EGN: `revgn_ext.EGN(model, lr=0.1, damping=1.0)`, layerwise Gram S^T J J^T S (J never formed), "
        "Cholesky with jitter retry, one VJP. `EGN adaptive` adds `adaptive_damping=True` (one more forward "
        "pass to measure the actual decrease).",
        "* naive: per-sample J by `vmap(jacrev)`, dense Gram, `torch.linalg.cholesky`, dir = -J^T S u.",
        "* tlm: torch-levenberg-marquardt `LevenbergMarquardtModule.training_step` (includes its trial forward "
        "pass) with solve_method cholesky / qr. For CE it fits sqrt(loss_i) residuals (b rows instead of b c), "
        "a cheaper and different algorithm.",
        "* Adam: forward + backward + `torch.optim.Adam.step`."]
    tlm_version = getattr(tlm, "__version__", "?") if tlm else "not installed"
    lines += ["", f"## {device}: {machine()}", "",
              f"Median of {repeat} steps; torch-levenberg-marquardt {tlm_version}.", "",
              "| workload | " + " | ".join(cols) + " | naive / EGN | tlm cholesky / EGN | tlm qr / EGN | EGN / Adam |",
              "|" + "---|" * (len(cols) + 5)]
    for r in rows:
        egn = r["EGN"]
        cells = [f"{r[c]:.2f}" if c in r else "-" for c in cols]
        tl = [f"{r[k] / egn:.1f}x" if k in r else "-" for k in ("tlm cholesky", "tlm qr")]
        lines.append(f"| {r['workload']} | " + " | ".join(cells) +
                     f" | {r['naive'] / egn:.1f}x | {tl[0]} | {tl[1]} | {egn / r['Adam']:.1f}x |")
    with open(path, "a" if append else "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "egn.md"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--append", action="store_true", help="add a section to --out instead of rewriting it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if tlm is None:
        print("notice: torch-levenberg-marquardt is not installed; skipping it "
              "(pip install torch-levenberg-marquardt)")
    print(machine())
    rows = run(args.repeat, args.device)
    write_markdown(rows, args.out, args.repeat, args.device, args.append)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
