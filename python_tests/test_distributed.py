"""Data-parallel RevGN and EGN on torch.distributed (gloo, 2 processes spawned on localhost).

Each test spawns two ranks that hold unequal shards (5 and 3 rows) of one float64 batch. The ranks
compare the distributed step with the single-process step on the concatenated batch, computed in the
same process from a copy of the model, and send the residuals back; the assertions run here. Every
process group has a short timeout and every join a deadline, so a hang fails the test instead of
stalling CI.
"""
import copy
import datetime
import multiprocessing
import os
import queue
import socket
import time
import traceback
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="revgn_ext: compiled kernels unavailable", category=RuntimeWarning)

import revgn_ext as rg  # noqa: E402

pytestmark = pytest.mark.slow  # spawns processes

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.fail("torch.distributed with gloo is required for these tests", pytrace=False)

f64 = torch.float64
WORLD = 2
SHARDS = (slice(0, 5), slice(5, 8))   # unequal on purpose: the gathers pad and slice
TOL = 1e-10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relative(a, b) -> float:
    """max |a - b| / max |b| over lists of tensors."""
    scale = max(float(t.abs().max()) for t in b)
    return max(float((s - t).abs().max()) for s, t in zip(a, b)) / scale


# --------------------------------------------------------------------------------------------------
# What each rank runs
# --------------------------------------------------------------------------------------------------

def _revgn_problem(seed=0):
    torch.manual_seed(seed)
    model = rg.RevMLP(10, 4, 2, 24, ("tanh", "relu"), weight_std=0.3, seed=seed, dtype=f64)
    x, y = torch.randn(8, 10, dtype=f64), torch.randint(0, 4, (8,))
    return model, x, y


def _egn_problem(loss, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(f64)
    x = torch.randn(8, 6, dtype=f64)
    y = torch.randint(0, 3, (8,)) if loss == "cross_entropy" else torch.randn(8, 3, dtype=f64)
    return model, x, y


class _TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.la, self.lb, self.out = torch.nn.Linear(4, 5), torch.nn.Linear(2, 5), torch.nn.Linear(5, 3)

    def forward(self, a, b, scale=1.0):
        return self.out(torch.tanh(self.la(a) + scale * self.lb(b)))


def _case_exact(rank):
    """Residuals of distributed versus single-process directions, steps and losses."""
    sl, out = SHARDS[rank], {}
    # Both ways of assembling the global Grams (the SVD path always gathers rows); relative damping
    # checks that both routes see the same global trace.
    for solver, route, damping in (("cholesky", "gather_rows", 0.0), ("cholesky", "reduce_gram", 0.0),
                                   ("cholesky", "reduce_gram", 1e-3), ("svd", "auto", 0.0)):
        name = f"revgn_{solver}_{route}_{damping}"
        model, x, y = _revgn_problem()
        single = rg.RevGN(copy.deepcopy(model), lr=0.5, damping=damping, solver=solver)
        ref_dir, ref_stats = single.direction(x, y), single.step(x, y)
        opt = rg.RevGN(model, lr=0.5, damping=damping, solver=solver, distributed=True, gram_route=route)
        out[f"{name}_direction"] = _relative(opt.direction(x[sl], y[sl]), ref_dir)
        stats = opt.step(x[sl], y[sl])
        out[f"{name}_step"] = _relative(list(model.parameters()), list(single.model.parameters()))
        out[f"{name}_loss"] = abs(stats["loss"] - ref_stats["loss"])
        if damping == 0.0:
            out[f"{name}_exact"] = stats["exact"] and stats["batch_size"] == 8
        out[f"{name}_norm"] = ref_stats["direction_norm"]
        out[f"{name}_route_ok"] = (opt.shards.traffic["all_to_all"] > 0) == (route == "reduce_gram")
    for loss in ("mse", "cross_entropy"):
        for gram in ("layerwise", "functional"):
            model, x, y = _egn_problem(loss)
            single = rg.EGN(copy.deepcopy(model), lr=0.3, damping=0.1, loss=loss, gram=gram)
            opt = rg.EGN(model, lr=0.3, damping=0.1, loss=loss, gram=gram, distributed=True)
            ref = single.direction(x, y)
            out[f"egn_{loss}_{gram}_direction"] = _relative(opt.direction(x[sl], y[sl]), ref)
            out[f"egn_{loss}_{gram}_norm"] = max(float(d.abs().max()) for d in ref)
        # Line search, adaptive damping and momentum: two steps, with the quadratic model terms.
        model, x, y = _egn_problem(loss)
        kw = dict(lr=1.0, damping=0.1, loss=loss, line_search=True, momentum=0.5, adaptive_damping=True)
        single = rg.EGN(copy.deepcopy(model), **kw)
        wrapped = torch.nn.parallel.DistributedDataParallel(model)   # unwrapped by the optimizer
        opt = rg.EGN(wrapped, **kw)
        for _ in range(2):
            ref_stats, stats = single.step(x, y), opt.step(x[sl], y[sl])
        out[f"egn_{loss}_options_step"] = _relative(list(model.parameters()), list(single.model.parameters()))
        out[f"egn_{loss}_options_loss"] = abs(stats["loss"] - ref_stats["loss"])
        out[f"egn_{loss}_options_damping"] = abs(stats["next_damping"] - ref_stats["next_damping"])
    # Several inputs: each rank holds its rows of both per-sample inputs; the option passes as it is.
    torch.manual_seed(0)
    model = _TwoInputs().to(f64)
    a, b, y = torch.randn(8, 4, dtype=f64), torch.randn(8, 2, dtype=f64), torch.randint(0, 3, (8,))
    single = rg.EGN(copy.deepcopy(model), lr=0.3, damping=0.1, loss="cross_entropy")
    opt = rg.EGN(model, lr=0.3, damping=0.1, loss="cross_entropy", distributed=True)
    ref = single.direction(dict(a=a, b=b, scale=2.0), y)
    out["egn_several_inputs_direction"] = _relative(opt.direction(dict(a=a[sl], b=b[sl], scale=2.0), y[sl]), ref)
    out["egn_several_inputs_norm"] = max(float(d.abs().max()) for d in ref)
    return out


def _case_bad_input(rank):
    """Rank 1 passes NaN x / an out-of-range label; every rank must raise the same ValueError."""
    sl, out = SHARDS[rank], {}
    model, x, y = _revgn_problem()
    opt = rg.RevGN(model, lr=0.5, distributed=True)
    before = [p.clone() for p in model.parameters()]
    xs, ys = x[sl].clone(), y[sl].clone()
    if rank == 1:
        xs[0, 0] = float("nan")
    try:
        opt.step(xs, ys)
        out["revgn"] = None
    except ValueError as err:
        out["revgn"] = str(err)
    out["revgn_untouched"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    model, x, y = _egn_problem("cross_entropy")
    opt = rg.EGN(model, loss="cross_entropy", distributed=True)
    ys = y[sl].clone()
    if rank == 1:
        ys[0] = 7
    try:
        opt.step(x[sl], ys)
        out["egn"] = None
    except ValueError as err:
        out["egn"] = str(err)
    # The group is still usable afterwards: a good step goes through on both ranks.
    out["after"] = opt.step(x[sl], y[sl])["accepted"]
    return out


def _case_rank_raises(rank):
    """Rank 1 dies before the step; rank 0's step must fail (not hang) well within the timeout."""
    model, x, y = _revgn_problem()
    opt = rg.RevGN(model, lr=0.5, distributed=True)
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    t0 = time.perf_counter()
    try:
        opt.step(x[SHARDS[0]], y[SHARDS[0]])
        return {"raised": None}
    except Exception as err:  # gloo reports a lost peer as RuntimeError / DistBackendError
        return {"raised": type(err).__name__, "seconds": time.perf_counter() - t0}


def _outcome(fn):
    """(exception type name, message) of fn(), or (None, result) with a result that is not a number,
    string or None replaced by its type name (the queue carries it back)."""
    try:
        result = fn()
    except Exception as err:
        return type(err).__name__, str(err)
    return None, result if isinstance(result, (bool, int, float, str, type(None))) else type(result).__name__


def _case_mismatch(rank):
    """Ranks built with different models or hyper-parameters, or whose hyper-parameters diverge later."""
    sl, out = SHARDS[rank], {}
    torch.manual_seed(0)
    x, y = torch.randn(8, 10, dtype=f64), torch.randint(0, 4, (8,))
    # A different hidden width: before, the weight broadcast aborted rank 0 inside gloo (SIGABRT).
    model = rg.RevMLP(10, 4, 2, 24 if rank == 0 else 32, seed=0, dtype=f64)
    out["hidden"] = _outcome(lambda: rg.RevGN(model, lr=0.5, distributed=True))
    model = rg.RevMLP(10, 4, 2, 24, seed=0, dtype=f64)
    out["lr"] = _outcome(lambda: rg.RevGN(model, lr=0.5 if rank == 0 else 0.4, distributed=True))
    # EGN compares its hyper-parameters at construction too.
    emodel, ex, ey = _egn_problem("mse")
    out["egn_damping"] = _outcome(lambda: rg.EGN(emodel, lr=0.3, damping=0.1 if rank == 0 else 0.2, loss="mse",
                                                 distributed=True))
    opt = rg.RevGN(model, lr=0.5, distributed=True)
    out["first"] = _outcome(lambda: opt.step(x[sl], y[sl])["refused"])
    if rank == 1:   # a scheduler or user code on one rank only
        opt.param_groups[0]["lr"] = 0.25
    out["diverged"] = _outcome(lambda: opt.step(x[sl], y[sl]))
    opt.param_groups[0]["lr"] = 0.5
    if rank == 1:
        opt.param_groups[0]["lr"] = float("nan")
    before = [p.clone() for p in model.parameters()]
    out["nan_lr"] = _outcome(lambda: opt.step(x[sl], y[sl]))
    out["untouched"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.param_groups[0]["lr"] = 0.5
    out["after"] = _outcome(lambda: opt.step(x[sl], y[sl])["refused"])
    return out


def _case_out_of_step(rank):
    """A rank that computes a direction where the others step: the ranks must raise together, not pair
    batch i of one rank with batch i+1 of another."""
    sl, out = SHARDS[rank], {}
    model, x, y = _egn_problem("mse")
    opt = rg.EGN(model, lr=0.3, damping=0.1, loss="mse", distributed=True)
    out["first"] = _outcome(lambda: opt.step(x[sl], y[sl])["accepted"])
    out["retry"] = _outcome(lambda: opt.step(x[sl] * 2, y[sl]) if rank == 0 else opt.direction(x[sl], y[sl]))
    model, x, y = _revgn_problem()
    opt = rg.RevGN(model, lr=0.5, distributed=True)
    out["skip"] = _outcome(lambda: opt.step(x[sl], y[sl]) if rank == 0 else opt.direction(x[sl], y[sl]))
    return out


def _case_rank_local_refusal(rank):
    """EGN refusals that one rank's own state decides (a NaN lr, a loss that cannot be inferred from its
    targets, a closure computing another loss): every rank raises the same error, in seconds, and the
    parameters stay as they were."""
    sl, out = SHARDS[rank], {}
    model, x, y = _egn_problem("mse")
    opt = rg.EGN(model, lr=0.3, damping=0.1, loss="mse", distributed=True)
    before = [p.clone() for p in model.parameters()]
    if rank == 1:
        opt.param_groups[0]["lr"] = float("nan")
    t0 = time.monotonic()
    out["nan_lr"] = _outcome(lambda: opt.step(x[sl], y[sl]))
    out["nan_lr_seconds"] = time.monotonic() - t0
    out["untouched"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.param_groups[0]["lr"] = 0.3
    out["after"] = _outcome(lambda: opt.step(x[sl], y[sl])["accepted"])

    loss_fn = torch.nn.MSELoss(reduction="sum" if rank == 1 else "mean")

    def closure():
        return loss_fn(model(x[sl]), y[sl])
    opt = rg.EGN(model, lr=0.3, damping=0.1, loss=torch.nn.MSELoss(), distributed=True)
    t0 = time.monotonic()
    out["closure"] = _outcome(lambda: opt.step(closure))
    out["closure_seconds"] = time.monotonic() - t0

    model, x, y = _egn_problem("mse")
    opt = rg.EGN(model, lr=0.3, damping=0.1, distributed=True)   # the loss is inferred from y
    targets = (y[sl] > 0).to(f64) if rank == 1 else y[sl]        # 0s and 1s: no loss can be inferred
    t0 = time.monotonic()
    out["infer"] = _outcome(lambda: opt.step(x[sl], targets))
    out["infer_seconds"] = time.monotonic() - t0
    return out


CASES = {"exact": _case_exact, "bad_input": _case_bad_input, "rank_raises": _case_rank_raises,
         "mismatch": _case_mismatch, "out_of_step": _case_out_of_step, "rank_local_refusal": _case_rank_local_refusal}


def _worker(rank, port, case, results, pg_timeout):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        results.put((rank, CASES[case](rank)))
    except BaseException:
        results.put((rank, {"error": traceback.format_exc()}))
        results.close()
        results.join_thread()
        os._exit(1)   # a dead rank, as in a crashed job: no orderly shutdown of the group
    results.close()
    results.join_thread()
    os._exit(0)


def _run(case, deadline=90.0, pg_timeout=30.0) -> dict:
    """Spawn WORLD ranks on ``case``; returns {rank: result}. Fails if a rank is still alive at the deadline."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, case, results, pg_timeout), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    out, end = {}, time.monotonic() + deadline
    try:
        while len(out) < WORLD and time.monotonic() < end:
            try:
                rank, value = results.get(timeout=0.5)
                out[rank] = value
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join(timeout=max(1.0, end - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {deadline} s"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return out


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------

def test_distributed_step_equals_single_process_step_on_the_concatenated_batch():
    out = _run("exact")
    for rank in range(WORLD):
        res = out[rank]
        assert "error" not in res, res.get("error")
        for key, value in res.items():
            if key.endswith("_norm"):
                assert value > 1e-3, f"rank {rank}: reference {key} is trivial ({value})"
            elif key.endswith("_exact") or key.endswith("_ok"):
                assert value, f"rank {rank}: {key}"
            else:
                assert value <= TOL, f"rank {rank}: {key} residual {value:.3e} > {TOL}"


def test_bad_input_on_one_rank_is_reported_on_all_ranks():
    out = _run("bad_input")
    assert "error" not in out[0] and "error" not in out[1], out
    for name, arg in (("revgn", "x"), ("egn", "y")):
        messages = {out[r][name] for r in range(WORLD)}
        assert len(messages) == 1, f"{name}: ranks report different errors {messages}"
        message = messages.pop()
        assert message is not None and message.startswith("rank 1: ") and arg in message, message
    assert out[0]["revgn_untouched"] and out[1]["revgn_untouched"]
    assert out[0]["after"] and out[1]["after"]


def test_a_rank_that_raises_does_not_hang_the_others():
    t0 = time.monotonic()
    out = _run("rank_raises", deadline=60.0, pg_timeout=10.0)
    assert "rank 1 fails on purpose" in out[1]["error"]
    assert out[0]["raised"] is not None, "rank 0's step completed without its peer"
    assert time.monotonic() - t0 < 60.0


def test_different_models_or_hyper_parameters_raise_on_every_rank():
    out = _run("mismatch", deadline=90.0, pg_timeout=20.0)
    assert "error" not in out[0] and "error" not in out[1], out
    for key, pattern in (("hidden", "models differ: rank 0 has 'parameter blocks.0.WF: shape (5, 24)"),
                         ("lr", "hyper-parameters differ: rank 0 has \"param_groups[0]['lr'] = 0.5\""),
                         ("egn_damping", "param_groups[0]['damping'] = 0.1"),
                         ("diverged", "param_groups[0]['lr'] = 0.5\", rank 1 has \"param_groups[0]['lr'] = 0.25"),
                         # A NaN lr on one rank: the ranks compare their groups before either checks
                         # its own, so every rank names rank 1's value.
                         ("nan_lr", "rank 1 has \"param_groups[0]['lr'] = nan\"")):
        assert out[0][key] == out[1][key], (key, out[0][key], out[1][key])
        kind, message = out[0][key]
        assert kind == "ValueError" and pattern in message, (key, message)
    assert out[0]["first"] == out[1]["first"] == (None, False)
    assert out[0]["untouched"] and out[1]["untouched"]
    assert out[0]["after"] == out[1]["after"] == (None, False)   # the group is still usable


def test_ranks_out_of_step_raise_on_every_rank():
    out = _run("out_of_step", deadline=90.0, pg_timeout=20.0)
    assert "error" not in out[0] and "error" not in out[1], out
    assert out[0]["first"] == out[1]["first"] == (None, True)
    for key in ("retry", "skip"):
        for rank in range(WORLD):
            kind, message = out[rank][key]
            assert kind == "RuntimeError" and "the ranks are out of step" in message, (key, rank, message)


def test_distributed_egn_rank_local_refusal_raises_on_every_rank_within_seconds():
    out = _run("rank_local_refusal", deadline=90.0, pg_timeout=30.0)
    assert "error" not in out[0] and "error" not in out[1], out
    for key, pattern in (("nan_lr", "rank 1: param_groups[0]['lr']"),
                         ("closure", "rank 1: EGN was built with loss=nn.MSELoss(reduction='mean')"),
                         ("infer", "rank 1: y holds only 0s and 1s")):
        assert out[0][key] == out[1][key], (key, out[0][key], out[1][key])
        kind, message = out[0][key]
        assert kind == "ValueError" and pattern in message, (key, message)
        for rank in range(WORLD):
            assert out[rank][f"{key}_seconds"] < 10.0, (key, rank, out[rank][f"{key}_seconds"])
    assert out[0]["untouched"] and out[1]["untouched"]
    assert out[0]["after"] == out[1]["after"] == (None, True)   # the group is still usable


def test_cli_sets_a_finite_process_group_timeout(monkeypatch):
    """--distributed used a fixed 10-minute timeout (PyTorch's gloo default is 30): --dist-timeout sets it."""
    from revgn_ext.experiments import cli
    from revgn_ext.experiments.revgn_paper import commands

    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    parser = cli.build_parser()
    assert commands.init_distributed(parser.parse_args(["train", "--distributed"])) == 0
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(seconds=300)
    commands.init_distributed(parser.parse_args(["train", "--distributed", "--dist-timeout", "42.5"]))
    assert seen["timeout"] == datetime.timedelta(seconds=42.5)
    for bad in ("0", "-1", "inf", "nan", "soon"):
        with pytest.raises(SystemExit):
            parser.parse_args(["train", "--distributed", "--dist-timeout", bad])
