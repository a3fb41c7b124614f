"""One EGN step against its peers: the EGN authors' JAX code, torch-levenberg-marquardt, a dense J + Cholesky
step and Adam, on the cases of the EGN paper (float32, one thread, each case in a fresh process).

Methods (all with step size alpha = 0.1 and damping lambda = 1 for the timings):

* ``EGN``: ``revgn_ext.EGN(model, lr, damping, loss)`` (layer-wise Gram, Cholesky, one VJP).
* ``somax``: the authors' ``EGN`` solver from github.com/cor3bit/somax at its paper-era commit 7c107c5
  (``src/somax/gn/egn.py``, loaded from a checkout given by ``--somax``; its package ``__init__`` imports
  modules that need an older JAX, so only that file is loaded), ``jax.jit(solver.update)``. It runs in a
  separate interpreter (``--jax-python``, a venv with jax, jaxlib, jaxopt, optax, numpy; no torch).
  XLA on one thread: ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``.
* ``tlm``: the PyPI package torch-levenberg-marquardt (``--tlm-path``: a directory holding it, put on
  PYTHONPATH), ``LevenbergMarquardtModule.training_step`` with ``solve_method="cholesky"``, standard
  damping lambda kept fixed (inc/dec factors 1, one attempt: the step includes its one trial forward pass).
  Its residuals are those of exact Gauss-Newton (a loss class below), so that it solves the same system:
  MSE r = f - y; cross-entropy r = S^T (f - f0) + t with S S^T = diag(p) - p p^T, S t = p - onehot(y).
* ``naive``: the textbook step: J per sample by ``vmap(jacrev)``, A = S^T J ((b c) x d), K = A A^T + b lambda I,
  Cholesky, dir = -A^T u.
* ``Adam``: forward, backward and ``torch.optim.Adam.step``.

Cases: MLP 8-32-64-32-1 (ReLU) MSE at b = 32, 64, 128, 1024; MLP 784-256-10 CE at b = 128; the EGN paper's
CNN (32c3-pool-32c3-pool-64-10 on 1x28x28, no padding, as in the paper's Fashion-MNIST runs) CE at b = 128.

Every (case, method) runs in its own process, pinned to one core with ``taskset``; the processes are
interleaved over ``--rounds`` rounds. Each process reports the median CPU time (``time.process_time``) and
wall time of its timed steps after warm-up steps (which include JAX's compilation). The table gives the
median over rounds.

Check (``--check``, float64): from the same parameters and batch each method takes one step at lambda = 1
and lambda = 2^-10; the table gives max |dw_method - dw_EGN| / max |dw_EGN| over all parameters. The two
large cases are checked at b = 16 (their float64 Jacobians at b = 128 would take several GiB).

Usage: python benchmarks/bench_egn_peers.py --jax-python /tmp/jaxenv/bin/python --somax /tmp/somax
       --tlm-path /tmp/tlmpkg [--rounds 2] [--cases ...] [--methods ...] [--core 1]
       [--from-log LOG]   (the results file from the lines an earlier run printed, e.g. a run cut short)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ALPHA, LAMBDA = 0.1, 1.0

CASES = {
    "mlp-mse-b32": dict(arch="mlp", sizes=[8, 32, 64, 32, 1], loss="mse", b=32, steps=40),
    "mlp-mse-b64": dict(arch="mlp", sizes=[8, 32, 64, 32, 1], loss="mse", b=64, steps=40),
    "mlp-mse-b128": dict(arch="mlp", sizes=[8, 32, 64, 32, 1], loss="mse", b=128, steps=30),
    "mlp-mse-b1024": dict(arch="mlp", sizes=[8, 32, 64, 32, 1], loss="mse", b=1024, steps=8),
    "mlp784-ce-b128": dict(arch="mlp", sizes=[784, 256, 10], loss="ce", b=128, steps=3, check_b=16),
    "cnn-ce-b128": dict(arch="cnn", sizes=None, loss="ce", b=128, steps=3, check_b=16),
}
LABELS = {
    "mlp-mse-b32": "MLP 8-32-64-32-1 MSE b=32",
    "mlp-mse-b64": "MLP 8-32-64-32-1 MSE b=64",
    "mlp-mse-b128": "MLP 8-32-64-32-1 MSE b=128",
    "mlp-mse-b1024": "MLP 8-32-64-32-1 MSE b=1024",
    "mlp784-ce-b128": "MLP 784-256-10 CE b=128",
    "cnn-ce-b128": "the EGN paper's CNN, CE b=128",
}
METHODS = ["EGN", "somax", "tlm", "naive", "Adam"]   # and "EGN-compiled": EGN(compile=True), on request
CHECK_LAMBDAS = (1.0, 2.0 ** -10)


# --------------------------------------------------------------------------------------------------
# Data: made with torch in the driver, handed to every worker as an .npz (the JAX worker has no torch)
# --------------------------------------------------------------------------------------------------

def torch_model(spec):
    from torch import nn
    if spec["arch"] == "cnn":
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 32, 3), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 10))
    layers = []
    sizes = spec["sizes"]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_data(name, dtype, b, path):
    import torch
    spec = CASES[name]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = torch_model(spec)
    if spec["arch"] == "cnn":
        x = torch.randn(b, 1, 28, 28, generator=g)
    else:
        x = torch.randn(b, spec["sizes"][0], generator=g)
    if spec["loss"] == "mse":
        y = torch.sin(2 * x[:, :1]) + x[:, 1:2] * x[:, 2:3] + 0.1 * torch.randn(b, 1, generator=g)
        y = (y - y.mean()) / y.std()
    else:
        y = torch.randint(0, 10, (b,), generator=g)
    arrays = {"x": x.numpy().astype(dtype), "y": y.numpy() if spec["loss"] == "ce" else y.numpy().astype(dtype)}
    for i, p in enumerate(model.parameters()):
        arrays[f"p{i}"] = p.detach().numpy().astype(dtype)
    np.savez(path, **arrays)


def load(path):
    data = np.load(path)
    params = [data[f"p{i}"] for i in range(sum(k.startswith("p") for k in data.files))]
    return data["x"], data["y"], params


# --------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------

def _timed(step, warmup, steps, sync=lambda: None):
    for _ in range(warmup):
        step()
    sync()
    cpu, wall = [], []
    for _ in range(steps):
        c, w = time.process_time(), time.perf_counter()
        step()
        sync()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return {"cpu_ms": statistics.median(cpu) * 1e3, "wall_ms": statistics.median(wall) * 1e3}


def exact_gn_residual(out, y, loss):
    """Residuals whose Jacobian is S^T J and whose value is t, S S^T = Q, S t = e (exact Gauss-Newton)."""
    import torch
    if loss == "mse":
        return out - y.reshape(out.shape)
    f0 = out.detach()
    p = torch.softmax(f0, -1)
    sq = p.sqrt()
    onehot = (y[..., None] == torch.arange(p.shape[-1], device=y.device)).to(p.dtype)   # vmap-safe one_hot
    t = (p - onehot) / sq
    d = out - f0
    return sq * (d - (d * p).sum(-1, keepdim=True)) + t


def naive_step(model, x, y, loss, lr, damping):
    import torch
    from torch.func import functional_call, jacrev, vmap
    params = {n: p.detach() for n, p in model.named_parameters()}
    b = x.shape[0]

    def res(p, xi, yi):
        return exact_gn_residual(functional_call(model, p, (xi[None],)), yi[None], loss).reshape(-1)

    jac = vmap(jacrev(res), in_dims=(None, 0, 0))(params, x, y)
    A = torch.cat([j.reshape(j.shape[0] * j.shape[1], -1) for j in jac.values()], -1)      # (b c, d)
    with torch.no_grad():
        t = exact_gn_residual(functional_call(model, params, (x,)), y, loss).reshape(-1, 1)
        K = A @ A.T
        K.diagonal().add_(b * damping)
        u = torch.cholesky_solve(t, torch.linalg.cholesky(K))
        direction = -(A.T @ u).reshape(-1)
        offset = 0
        for p in model.parameters():
            p.add_(direction[offset:offset + p.numel()].view_as(p), alpha=lr)
            offset += p.numel()


def torch_worker(method, name, data_path, out_path, check, damping, warmup, steps):
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    spec = CASES[name]
    x, y, params = load(data_path)
    dtype = torch.float64 if check else torch.float32
    model = torch_model(spec).to(dtype)
    with torch.no_grad():
        for p, a in zip(model.parameters(), params):
            p.copy_(torch.from_numpy(a))
    x = torch.from_numpy(x)
    y = torch.from_numpy(y)
    loss = spec["loss"]
    if method in ("EGN", "EGN-compiled"):   # compiled: the warm-up's first step is eager, its second compiles
        import revgn_ext as rg
        opt = rg.EGN(model, lr=ALPHA, damping=damping, loss="mse" if loss == "mse" else "cross_entropy",
                     compile=method == "EGN-compiled")

        def step():
            opt.step(x, y)
    elif method == "naive":
        def step():
            naive_step(model, x, y, loss, ALPHA, damping)
    elif method == "tlm":
        import torch_levenberg_marquardt as tlm

        class ExactGN(tlm.loss.Loss):
            def forward(self, y_pred, y_true):
                if loss == "mse":
                    return 0.5 * (y_pred - y_true).square().sum(-1).mean()
                return F.cross_entropy(y_pred, y_true)

            def residuals(self, y_pred, y_true):
                return exact_gn_residual(y_pred, y_true, loss)

        damp = tlm.damping.StandardDampingStrategy(starting_value=damping, dec_factor=1.0, inc_factor=1.0)
        module = tlm.training.LevenbergMarquardtModule(model, loss_fn=ExactGN(), damping_strategy=damp,
                                                       learning_rate=ALPHA, attempts_per_step=1,
                                                       solve_method="cholesky")

        def step():
            module.training_step(x, y)
    elif method == "Adam":
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            adam.zero_grad()
            out = model(x)
            obj = 0.5 * (out - y).square().sum(1).mean() if loss == "mse" else F.cross_entropy(out, y)
            obj.backward()
            adam.step()
    else:
        raise ValueError(method)
    if check:
        step()
        np.savez(out_path, *[p.detach().numpy() for p in model.parameters()])
        return {}
    return _timed(step, warmup, steps)


def jax_worker(name, data_path, out_path, check, damping, warmup, steps, somax_dir):
    import importlib.util
    import jax
    if check:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    spec_ = importlib.util.spec_from_file_location("somax_egn", os.path.join(somax_dir, "src/somax/gn/egn.py"))
    somax_egn = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(somax_egn)
    spec = CASES[name]
    x, y, params = load(data_path)
    params = [jnp.asarray(p) for p in params]
    b = x.shape[0]

    def mlp(p, h):
        n = len(p) // 2
        for i in range(n):
            h = h @ p[2 * i].T + p[2 * i + 1]
            if i < n - 1:
                h = jax.nn.relu(h)
        return h

    def pool(h):
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    def conv(h, w, bias):
        out = jax.lax.conv_general_dilated(h, w, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return out + bias[None, :, None, None]

    def cnn(p, h):
        h = pool(jax.nn.relu(conv(h, p[0], p[1])))
        h = pool(jax.nn.relu(conv(h, p[2], p[3])))
        h = h.reshape(h.shape[0], -1)
        h = jax.nn.relu(h @ p[4].T + p[5])
        return h @ p[6].T + p[7]

    net = cnn if spec["arch"] == "cnn" else mlp
    if spec["loss"] == "mse":
        def predict(p, xi):                      # one sample -> a scalar (somax's MSE convention)
            return net(p, xi[None])[0, 0]
        targets = jnp.asarray(y.reshape(-1))
        solver = somax_egn.EGN(predict_fun=predict, loss_type="mse", learning_rate=ALPHA, regularizer=damping,
                               batch_size=b)
    else:
        def predict(p, xi):                      # one sample -> its logits
            return net(p, xi[None])[0]
        targets = jax.nn.one_hot(jnp.asarray(y), 10, dtype=params[0].dtype)
        solver = somax_egn.EGN(predict_fun=predict, loss_type="ce", learning_rate=ALPHA, regularizer=damping,
                               batch_size=b, n_classes=10)
    xj = jnp.asarray(x)
    update = jax.jit(solver.update)
    state = [params, solver.init_state(params)]

    def step():
        out = update(state[0], state[1], xj, targets)
        state[0], state[1] = out.params, out.state

    def sync():
        jax.block_until_ready(state[0])

    if check:
        step()
        sync()
        np.savez(out_path, *[np.asarray(p) for p in state[0]])
        return {}
    return _timed(step, warmup, steps, sync)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------

def run_worker(args, method, name, data_path, out_path, check, damping):
    spec = CASES[name]
    warmup = 2 if spec["steps"] > 3 else 1
    argv = ["--worker", json.dumps([method, name, data_path, out_path, check, damping, warmup, spec["steps"]])]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if method == "somax":
        python = args.jax_python
        argv += ["--somax", args.somax]
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        env["JAX_PLATFORMS"] = "cpu"
    else:
        python = sys.executable
        if method == "tlm":
            env["PYTHONPATH"] = os.pathsep.join([args.tlm_path, env.get("PYTHONPATH", "")])
    cmd = ["taskset", "-c", str(args.core), python, os.path.abspath(__file__)] + argv
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(HERE))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[-1])


def load_avg():
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def run_check(args, tmp):
    rows = []
    for name in args.cases:
        spec = CASES[name]
        b = spec.get("check_b", spec["b"])
        data_path = os.path.join(tmp, f"{name}-f64.npz")
        make_data(name, np.float64, b, data_path)
        _, _, p0 = load(data_path)
        for damping in CHECK_LAMBDAS:
            deltas = {}
            for method in [m for m in args.methods if m != "Adam"]:
                out_path = os.path.join(tmp, f"{name}-{method}-{damping}.npz")
                res = run_worker(args, method, name, data_path, out_path, True, damping)
                if "error" in res:
                    deltas[method] = res["error"]
                    continue
                new = np.load(out_path)
                deltas[method] = np.concatenate([(new[f"arr_{i}"] - p).reshape(-1) for i, p in enumerate(p0)])
            ref = deltas.get("EGN")
            cells = {}
            for method, d in deltas.items():
                if isinstance(d, str):
                    cells[method] = f"error: {d}"
                elif isinstance(ref, np.ndarray):
                    cells[method] = f"{np.abs(d - ref).max() / np.abs(ref).max():.1e}"
            rows.append((name, b, damping, cells))
            print("check", name, b, damping, cells, flush=True)
    return rows


def run_timing(args, tmp):
    results = {(n, m): [] for n in args.cases for m in args.methods}
    loads = []
    for r in range(args.rounds):
        for name in args.cases:
            data_path = os.path.join(tmp, f"{name}-f32.npz")
            if r == 0:
                make_data(name, np.float32, CASES[name]["b"], data_path)
            for method in args.methods:
                res = run_worker(args, method, name, data_path, os.devnull, False, LAMBDA)
                results[(name, method)].append(res)
                print(f"round {r} {name} {method}: {res} (load {load_avg()})", flush=True)
        loads.append(load_avg())
    return results, loads


def parse_log(args, path):
    """(checks, timing, loads, first load, last load) from the lines a run printed (a run cut short
    gives the rounds it finished; ``--rounds`` is set to the most rounds any case got)."""
    import ast
    import re
    checks, timing, loads = [], {(n, m): [] for n in args.cases for m in args.methods}, []
    rounds = 0
    for line in open(path):
        m = re.match(r"check (\S+) (\d+) (\S+) (\{.*\})$", line.strip())
        if m and m.group(1) in args.cases:
            checks.append((m.group(1), int(m.group(2)), float(m.group(3)), ast.literal_eval(m.group(4))))
        m = re.match(r"round (\d+) (\S+) (\S+): (\{.*?\}) \(load (.*)\)$", line.strip())
        if m and (m.group(2), m.group(3)) in timing:
            timing[(m.group(2), m.group(3))].append(ast.literal_eval(m.group(4)))
            loads.append(m.group(5))
            rounds = max(rounds, int(m.group(1)) + 1)
    args.rounds = rounds
    first, last = (f"load average {loads[0]}", f"load average {loads[-1]}") if loads else ("?", "?")
    return checks or None, timing, [], first, last


def cell(runs, key):
    ok = [x[key] for x in runs if key in x]
    if not ok:
        errs = [x.get("error", "?") for x in runs]
        return "error: " + (errs[0] if errs else "?"), None
    v = statistics.median(ok)
    return (f"{v:,.1f}" if v >= 10 else f"{v:.2f}"), v


def markdown(args, timing, loads, checks, machine, uptime_before, uptime_after):
    methods = args.methods
    lines = ["# EGN against its peers", "",
             "One optimizer step, float32, one thread (`torch.set_num_threads(1)`; XLA with "
             "`--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`), each (case, method) in a "
             f"fresh process pinned to core {args.core} with `taskset`, interleaved over {args.rounds} rounds; "
             "median per process after warm-up (JAX's compilation is in the warm-up), median over rounds. "
             "alpha = 0.1, lambda = 1. `python benchmarks/bench_egn_peers.py` (its docstring says what each "
             "method runs).", "",
             f"Machine: {machine}. Shared machine: `uptime` before: `{uptime_before}`; after: `{uptime_after}`; "
             f"load average after each round: {'; '.join(loads)}.", ""]
    if timing is not None:
        for key, title in (("cpu_ms", "CPU time"), ("wall_ms", "wall time")):
            lines += [f"## {title} per step, ms", "",
                      "| case | " + " | ".join(methods) + " | " +
                      " | ".join(f"{m} / EGN" for m in methods if m != "EGN") + " |",
                      "|---|" + "---:|" * (2 * len(methods) - 1)]
            for name in args.cases:
                vals = {m: cell(timing[(name, m)], key) for m in methods}
                egn = vals.get("EGN", (None, None))[1]
                ratios = [f"{vals[m][1] / egn:.2f}x" if egn and vals[m][1] else "-" for m in methods if m != "EGN"]
                lines.append(f"| {LABELS[name]} | " + " | ".join(vals[m][0] for m in methods) + " | " +
                             " | ".join(ratios) + " |")
            lines.append("")
    if checks:
        cm = [m for m in methods if m != "Adam"]
        lines += ["## Same update (float64)", "",
                  "One step from the same parameters and batch; max |dw - dw_EGN| / max |dw_EGN| over all "
                  "parameters.", "",
                  "| case | b | lambda | " + " | ".join(cm) + " |", "|---|---:|---:|" + "---:|" * len(cm)]
        for name, b, damping, cells in checks:
            lines.append(f"| {LABELS[name]} | {b} | {damping:g} | " + " | ".join(cells.get(m, "-") for m in cm) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jax-python", default="/tmp/jaxenv/bin/python")
    parser.add_argument("--somax", default="/tmp/somax", help="a checkout of cor3bit/somax at commit 7c107c5")
    parser.add_argument("--tlm-path", default="/tmp/tlmpkg", help="directory holding torch_levenberg_marquardt")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--core", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + ["EGN-compiled"])
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "egn_peers.md"))
    parser.add_argument("--from-log", default=None,
                        help="write the results file from the printed lines of an earlier run (its log)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, os.path.dirname(HERE))   # this checkout's revgn_ext, not an installed one
        method, name, data_path, out_path, check, damping, warmup, steps = json.loads(args.worker)
        if method == "somax":
            res = jax_worker(name, data_path, out_path, check, damping, warmup, steps, args.somax)
        else:
            res = torch_worker(method, name, data_path, out_path, check, damping, warmup, steps)
        print(json.dumps(res))
        return
    sys.path.insert(0, HERE)
    from _machine import cpu_name
    import torch
    def version(cmd, env=None):
        return subprocess.run(cmd, capture_output=True, text=True, env=env).stdout.strip() or "?"

    tlm_version = version([sys.executable, "-c", "import importlib.metadata as m; "
                           "print(m.version('torch-levenberg-marquardt'))"],
                          env=dict(os.environ, PYTHONPATH=args.tlm_path))
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"jax {version([args.jax_python, '-c', 'import jax; print(jax.__version__)'])}, "
               f"somax {version(['git', '-C', args.somax, 'rev-parse', '--short', 'HEAD'])}, "
               f"torch-levenberg-marquardt {tlm_version}")
    if args.from_log:
        checks, timing, loads, uptime_before, uptime_after = parse_log(args, args.from_log)
    else:
        uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        with tempfile.TemporaryDirectory() as tmp:
            checks = None if args.no_check else run_check(args, tmp)
            timing, loads = (None, []) if args.no_timing else run_timing(args, tmp)
        uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    text = markdown(args, timing, loads, checks, machine, uptime_before, uptime_after)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
