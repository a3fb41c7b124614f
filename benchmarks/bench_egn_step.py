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

Suites (``--suite``, default ``mlp``; ``models`` runs the rest, single thread, one process, medians):

* ``mlp``: the rows above.
* ``cnn``: CNN 32c3-pool-32c3-pool-64-10 on 1x28x28, CE, b = 128: EGN (layer rules) vs the naive step
  and BackPACK's exact GGN route (``SqrtGGNExact``: per-parameter S^T J materialised, then the same
  Gram, Cholesky and back-projection), when BackPACK is installed. Peak memory of each from a fresh
  subprocess (VmHWM from /proc, and its growth over the RSS after the set-up).
* ``transformer``: Embedding(V, 32) on T = 16 token ids, LayerNorm, MLP 32-64-32 on (b, T, d) with a
  residual, LayerNorm, mean over positions, Linear(32, 4); MSE, b = 64, vocabulary V = 64 and 1000:
  EGN vs naive.
* ``classes``: MLP 64-256-c, CE, b = 256, c in {10, 100, 1000}: EGN with curvature exact / sampled /
  true-class, step time and held-out accuracy after ``--steps`` steps on a synthetic many-class task
  (Gaussian class means in R^64). The exact curvature's (b c)^2 system is skipped where it exceeds the
  memory limit or would take minutes per step on this machine (said in the table).
* ``batch``: the CNN at b in {32, 128, 512, 2048}: the step's time split (``stats["time"]``) and peak
  memory per b, for curvature exact (up to ``--max-exact-batch``) and sampled.
* ``gram``: the Gram's cost, every case in fresh interpreters alternating round by round between the
  trees of ``--trees`` (label:path, empty path = the installed package) and the methods: the exact CE
  b = 1024 Gram's peak memory, the sampled k = 1 step on MLP 64-256-1000 (b = 256) against Adam, and the
  CNN (b = 128, exact) against the naive step, time and memory (``--rounds``, ``--repeat``).

Usage: python benchmarks/bench_egn_step.py [--suite mlp|models|cnn|transformer|classes|batch|gram]
       [--repeat 10] [--out benchmarks/results/egn.md] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
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
try:
    import backpack as _backpack
    from backpack import backpack as _backpack_ctx, extend as _extend
    from backpack.extensions import SqrtGGNExact
except ImportError:
    _backpack = None


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
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    f = functional_call(model, params, (x,)).reshape(x.shape[0], -1)
    b, c = f.shape
    jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],)).reshape(-1)),
               in_dims=(None, 0))(params, x)
    J = torch.cat([j.reshape(b, c, -1) for j in jac.values()], -1)            # (b, c, d)
    factor = LOSS_FACTORS[loss](f, y if loss == "cross_entropy" else y.reshape(b, c))
    A = torch.einsum("iba,ibk->iak", factor_matrix(factor), J).reshape(-1, J.shape[-1])  # S^T J (b m, d)
    K = A @ A.T + b * damping * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    L = torch.linalg.cholesky(K)
    u = torch.cholesky_solve(factor.target.reshape(-1, 1), L)
    direction = -(A.T @ u).reshape(-1)
    with torch.no_grad():
        offset = 0
        for p in params.values():
            p.add_(direction[offset:offset + p.numel()].view_as(p), alpha=lr)
            offset += p.numel()


def backpack_egn_step(model, lossfn, x, y, lr, damping):
    """EGN on BackPACK's exact GGN square root: SqrtGGNExact gives S_i^T J_i per parameter (m, b, *shape),
    materialised for every parameter; then the same Gram, Cholesky and back-projection as the naive step.
    ``model`` and ``lossfn`` (reduction 'sum', so the factor carries no 1/sqrt(b)) must be extended."""
    out = model(x)
    b = out.shape[0]
    with _backpack_ctx(SqrtGGNExact()):
        lossfn(out, y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    V = torch.cat([p.sqrt_ggn_exact.reshape(p.sqrt_ggn_exact.shape[0], b, -1) for p in params], -1)   # (m, b, d)
    V = V.transpose(0, 1).reshape(-1, V.shape[-1])                                                      # (b m, d)
    logp = torch.log_softmax(out.detach(), 1)   # t = e / sqrt(p) for BackPACK's c x c factor
    t = (0.5 * logp).exp() - torch.nn.functional.one_hot(y, logp.shape[1]).to(logp.dtype) * (-0.5 * logp).exp()
    K = V @ V.T + b * damping * torch.eye(V.shape[0], dtype=V.dtype)
    L = torch.linalg.cholesky(K)
    u = torch.cholesky_solve(t.reshape(-1, 1), L)
    direction = -(V.T @ u).reshape(-1)
    with torch.no_grad():
        offset = 0
        for p in params:
            p.add_(direction[offset:offset + p.numel()].view_as(p), alpha=lr)
            offset += p.numel()
            p.grad = None


def _no_sync():
    return None


def time_it(fn, repeat, warmup=2, sync=_no_sync):
    """Median milliseconds per call. With one torch thread on the CPU this is the process's CPU time
    (time.process_time), so that waiting for a core on a shared, loaded machine does not count;
    otherwise wall time."""
    clock = time.process_time if torch.get_num_threads() == 1 and sync is _no_sync else time.perf_counter
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = clock()
        fn()
        sync()
        times.append(clock() - t)
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
    sync = torch.cuda.synchronize if device == "cuda" else _no_sync
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


# --------------------------------------------------------------------------------------------------
# Models people train: CNN, transformer-style block, many classes, large batches
# --------------------------------------------------------------------------------------------------

def cnn(classes=10):
    """32c3-pool-32c3-pool-64-C on 1x28x28 (the EGN paper's MNIST / Fashion-MNIST network)."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, classes))


class Block(nn.Module):
    """Transformer-style block without attention: Embedding, LayerNorm, MLP on (b, T, d), pooled head."""

    def __init__(self, vocab=64, d=32, hidden=64, out=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm1 = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.norm2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, out)

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(F.gelu(self.up(self.norm1(h))))
        return self.head(self.norm2(h).mean(1))


def case(name, b=None, curvature="exact"):
    """(model, x, y, loss) of a named case, seeded."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "cnn":
        b = b or 128
        return cnn(), torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g), "cross_entropy"
    if name == "mlp-ce":   # MLP 64-32-64-32-10, cross-entropy: an exact (10 b)^2 Gram (400 MiB at b = 1024)
        b = b or 1024
        return (mlp([64, 32, 64, 32, 10]), torch.randn(b, 64, generator=g), torch.randint(0, 10, (b,), generator=g),
                "cross_entropy")
    if name == "mlp-1000":   # MLP 64-256-1000, cross-entropy (many classes), b = 256
        b = b or 256
        return (mlp([64, 256, 1000]), torch.randn(b, 64, generator=g), torch.randint(0, 1000, (b,), generator=g),
                "cross_entropy")
    if name.startswith("transformer"):
        b = b or 64
        vocab = 1000 if name.endswith("v1000") else 64
        return (Block(vocab=vocab), torch.randint(0, vocab, (b, 16), generator=g), torch.randn(b, 4, generator=g),
                "mse")
    raise ValueError(name)


def peak_memory(args: list[str]) -> dict:
    """Run one measured step in a fresh interpreter; its peak RSS and the growth over the set-up."""
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-memory", json.dumps(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


def _status_mib(field: str) -> float:
    """VmHWM (peak) or VmRSS of this process from /proc (per address space, so fresh after exec,
    unlike ru_maxrss, which Linux carries over from the parent)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _measure_memory(spec: list) -> None:
    method, name, b, curvature = spec
    torch.set_num_threads(1)
    model, x, y, loss = case(name, b)
    step = _step_fn(method, model, x, y, loss, curvature)
    base = _status_mib("VmRSS")
    t = time.process_time()
    stats = step()
    seconds = time.process_time() - t
    peak = _status_mib("VmHWM")
    print(json.dumps({"peak_mib": peak, "growth_mib": peak - base, "cpu_s": seconds,
                      "time": stats.get("time") if isinstance(stats, dict) else None}))


def _time_step(spec: list, repeat: int) -> None:
    """One case in this fresh interpreter: the median CPU ms of ``repeat`` steps after one warm-up step."""
    method, name, b, curvature = spec
    torch.set_num_threads(1)
    model, x, y, loss = case(name, b)
    step = _step_fn(method, model, x, y, loss, curvature)
    print(json.dumps({"ms": time_it(step, repeat, warmup=1)}))


def _fresh(flag: str, spec: list, tree: str, repeat: int = 1) -> dict:
    """Run ``--time-step`` / ``--measure-memory`` in a fresh interpreter importing revgn_ext from ``tree``
    ("" = the installed package)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    if tree:
        env["PYTHONPATH"] = tree
    cmd = [sys.executable, os.path.abspath(__file__), flag, json.dumps(spec), "--repeat", str(repeat)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


def run_gram_suite(trees: list[tuple[str, str]], rounds: int, repeat: int) -> list[str]:
    """The Gram's cost, side by side: every case in fresh interpreters, alternating over the trees and the
    methods round by round (CPU time of one thread; memory as peak growth over the set-up).

    * memory: exact CE b = 1024 on MLP 64-32-64-32-10 (a 10240^2 Gram), growth / the Gram's bytes;
    * sampled: MLP 64-256-1000, CE, b = 256, curvature="sampled" (k = 1): EGN step / Adam step;
    * cnn: the paper's CNN, CE, b = 128, exact: naive step / EGN step and EGN growth / naive growth."""
    load = [f"{os.getloadavg()[0]:.1f}"]
    times: dict = {}
    mems: dict = {}
    jobs = [("sampled", ["EGN", "mlp-1000", 256, "sampled"]), ("sampled", ["Adam", "mlp-1000", 256, "exact"]),
            ("cnn", ["EGN", "cnn", 128, "exact"]), ("cnn", ["naive", "cnn", 128, "exact"])]
    for r in range(rounds):
        for label, tree in (trees if r % 2 == 0 else trees[::-1]):
            for group, spec in (jobs if r % 2 == 0 else jobs[::-1]):
                key = (label, group, spec[0])
                if spec[0] == "naive" and key in times and len(times[key]) >= 2:
                    continue   # seconds per step: two rounds suffice
                res = _fresh("--time-step", spec, tree, repeat if spec[0] != "naive" else 1)
                times.setdefault(key, []).append(res.get("ms", float("nan")))
                print(label, spec, res, flush=True)
            for spec in (["EGN", "mlp-ce", 1024, "exact"], ["EGN", "cnn", 128, "exact"], ["naive", "cnn", 128, "exact"]):
                key = (label, spec[1], spec[0])
                if r < 2 and (spec[0] != "naive" or key not in mems):
                    res = _fresh("--measure-memory", spec, tree)
                    mems.setdefault(key, []).append(res.get("growth_mib", float("nan")))
                    print(label, spec, res, flush=True)
        load.append(f"{os.getloadavg()[0]:.1f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: min(v) for k, v in mems.items()}
    gram_mib = (10 * 1024) ** 2 * 4 / 2**20
    lines = ["", f"Load average (1 min) at the start and after each round: {', '.join(load)}.", "",
             "| tree | exact CE b=1024: growth / Gram | sampled EGN ms | Adam ms | EGN / Adam | CNN EGN ms | "
             "naive ms | naive / EGN | CNN EGN MiB | naive MiB | EGN / naive memory |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, _ in trees:
        g = mem.get((label, "mlp-ce", "EGN"), float("nan"))
        se, sa = med.get((label, "sampled", "EGN")), med.get((label, "sampled", "Adam"))
        ce, cn = med.get((label, "cnn", "EGN")), med.get((label, "cnn", "naive"))
        me, mn = mem.get((label, "cnn", "EGN"), float("nan")), mem.get((label, "cnn", "naive"), float("nan"))
        lines.append(f"| {label} | {g / gram_mib:.2f} ({g:.0f} MiB) | {se:.1f} | {sa:.1f} | {se / sa:.2f}x | "
                     f"{ce:.0f} | {cn:.0f} | {cn / ce:.2f}x | {me:.0f} | {mn:.0f} | {me / mn:.2f} |")
    return lines


def _step_fn(method, model, x, y, loss, curvature="exact"):
    if method == "Adam":
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)

        def adam_step():
            adam.zero_grad()
            out = model(x)
            obj = F.cross_entropy(out, y) if loss == "cross_entropy" else 0.5 * (out - y).square().sum(1).mean()
            obj.backward()
            adam.step()
        return adam_step
    if method == "EGN":
        opt = rg.EGN(model, lr=0.1, damping=1.0, loss=loss, curvature=curvature)
        return lambda: opt.step(x, y)
    if method == "naive":
        return lambda: naive_egn_step(model, x, y, loss, 0.1, 1.0)
    if method == "backpack":
        bp_model = _extend(model)
        lossfn = _extend(nn.CrossEntropyLoss(reduction="sum"))
        return lambda: backpack_egn_step(bp_model, lossfn, x, y, 0.1, 1.0)
    raise ValueError(method)


def run_models(suite: str, repeat: int, steps: int, max_exact_batch: int) -> list[str]:
    """Markdown lines of the ``models`` suites."""
    lines = []
    if suite in ("models", "cnn", "transformer"):
        lines += ["", "### Layer-wise Gram on convolutions and sequences", "",
                  "| case | method | step ms (median) | vs EGN | peak RSS MiB | growth in the step MiB |",
                  "|---|---|---:|---:|---:|---:|"]
        names = [n for n in ("cnn", "transformer", "transformer-v1000") if suite in ("models", n.split("-")[0])]
        for name in names:
            methods = ["EGN", "naive"] + (["backpack"] if name == "cnn" and _backpack is not None else [])
            times = {}
            for method in methods:
                model, x, y, loss = case(name)
                step = _step_fn(method, model, x, y, loss)
                times[method] = time_it(step, repeat if method == "EGN" else max(3, repeat // 3), warmup=1)
                print(f"{name} {method}: {times[method]:.1f} ms", flush=True)
            for method in methods:
                mem = peak_memory([method, name, None, "exact"])
                cells = ("-", "-") if "error" in mem else (f"{mem['peak_mib']:.0f}", f"{mem['growth_mib']:.0f}")
                print(f"{name} {method}: memory {mem}", flush=True)
                lines.append(f"| {name} | {method} | {times[method]:.1f} | {times[method] / times['EGN']:.1f}x | "
                             f"{cells[0]} | {cells[1]} |")
        if suite in ("models", "cnn") and _backpack is None:
            lines.append("\nBackPACK is not installed: its row is missing (pip install backpack-for-pytorch).")
    if suite in ("models", "classes"):
        lines += ["", f"### Many classes: MLP 64-256-c, CE, b = 256 ({steps} steps, held-out accuracy)", "",
                  "| c | curvature | system | step ms (median) | vs c = 10 | accuracy after steps | note |",
                  "|---:|---|---:|---:|---:|---:|---|"]
        base = {}
        for c in (10, 100, 1000):
            for curvature in ("exact", "sampled", "true-class"):
                n = 256 * (c if curvature == "exact" else 1)
                if curvature == "exact" and c > 10:
                    lines.append(f"| {c} | {curvature} | {n}^2 | - | - | - | skipped: a {n}^2 Cholesky "
                                 f"({n ** 3 / 3e12:.1f} TFLOP, {n * n * 4 / 2**30:.1f} GiB) per step |")
                    continue
                ms, acc = many_class_run(c, curvature, repeat, steps)
                base.setdefault(curvature, ms)
                print(f"classes c={c} {curvature}: {ms:.1f} ms, accuracy {acc:.3f}", flush=True)
                lines.append(f"| {c} | {curvature} | {n}^2 | {ms:.1f} | {ms / base[curvature]:.2f}x | {acc:.3f} | |")
    if suite in ("models", "batch"):
        lines += ["", "### Batch size on the CNN (one step each, fresh process)", "",
                  "| b | curvature | forward s | gram s | factor s | backproject s | peak RSS MiB | growth MiB |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for b in (32, 128, 512, 2048):
            for curvature in ("exact", "sampled"):
                if curvature == "exact" and b > max_exact_batch:
                    lines.append(f"| {b} | exact | - | - | - | - | - | - |")
                    continue
                mem = peak_memory(["EGN", "cnn", b, curvature])
                print(f"batch b={b} {curvature}: {mem}", flush=True)
                if "error" in mem:
                    lines.append(f"| {b} | {curvature} | error: {mem['error']} |||||||")
                    continue
                t = mem["time"]
                lines.append(f"| {b} | {curvature} | {t['forward']:.3f} | {t['gram']:.3f} | {t['factor']:.3f} | "
                             f"{t['backproject']:.3f} | {mem['peak_mib']:.0f} | {mem['growth_mib']:.0f} |")
    return lines


def many_class_data(c, n, generator):
    means = torch.randn(c, 64, generator=torch.Generator().manual_seed(1)) * 0.6
    y = torch.randint(0, c, (n,), generator=generator)
    return means[y] + torch.randn(n, 64, generator=generator), y


def many_class_run(c, curvature, repeat, steps):
    torch.manual_seed(0)
    model = mlp([64, 256, c])
    opt = rg.EGN(model, lr=1.0, damping=1.0, loss="cross_entropy", curvature=curvature, line_search=True)
    g = torch.Generator().manual_seed(0)
    batches = [many_class_data(c, 256, g) for _ in range(steps)]
    x_test, y_test = many_class_data(c, 4096, torch.Generator().manual_seed(123))
    times = []
    for x, y in batches:
        t = time.perf_counter()
        opt.step(x, y)
        times.append(time.perf_counter() - t)
    with torch.no_grad():
        acc = float((model(x_test).argmax(1) == y_test).double().mean())
    return statistics.median(times[1:]) * 1e3, acc


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
    # Not benchmarks/results/egn.md: that file gathers sections from several runs and suites by hand, and a
    # run without --append rewrites its --out.
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "build", "bench", "egn_step.md"),
                        help="markdown file to write (default build/bench/egn_step.md; rewritten unless --append)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--append", action="store_true", help="add a section to --out instead of rewriting it")
    parser.add_argument("--suite", default="mlp", choices=["mlp", "models", "cnn", "transformer", "classes", "batch", "gram"])
    parser.add_argument("--steps", type=int, default=20, help="steps of the many-class runs")
    parser.add_argument("--max-exact-batch", type=int, default=2048, help="largest b for the exact CNN batch rows")
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--time-step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trees", default="branch:",
                        help="gram suite: label:path pairs, comma-separated (empty path: the installed package)")
    parser.add_argument("--rounds", type=int, default=3, help="gram suite: rounds of fresh processes")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.measure_memory:
        _measure_memory(json.loads(args.measure_memory))
        return
    if args.time_step:
        _time_step(json.loads(args.time_step), args.repeat)
        return
    if args.suite == "gram":
        trees = [tuple(t.split(":", 1)) for t in args.trees.split(",")]
        lines = run_gram_suite(trees, args.rounds, args.repeat)
        print("\n".join(lines))
        with open(args.out, "a" if args.append else "w") as fh:
            fh.write("\n".join([f"## gram suite, cpu: {machine()}"] + lines) + "\n")
        print(f"wrote {args.out}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite != "mlp":
        print(machine())
        lines = run_models(args.suite, args.repeat, args.steps, args.max_exact_batch)
        load = os.getloadavg()
        head = [f"## {args.suite} suite, cpu: {machine()}", "",
                f"Load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on a shared machine; "
                f"BackPACK {getattr(_backpack, '__version__', 'installed') if _backpack else 'not installed'}."]
        with open(args.out, "a" if args.append else "w") as fh:
            fh.write("\n".join(head + lines) + "\n")
        print(f"wrote {args.out}")
        return
    if tlm is None:
        print("notice: torch-levenberg-marquardt is not installed; skipping it "
              "(pip install torch-levenberg-marquardt)")
    print(machine())
    rows = run(args.repeat, args.device)
    write_markdown(rows, args.out, args.repeat, args.device, args.append)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
