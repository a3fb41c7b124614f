"""The torch.optim calling conventions of EGN and RevGN: constructor forms, step(closure), torch.nn
losses with their reductions (checked against a dense Gauss-Newton solve of the user's own loss),
parameter groups, compiled models, autocast and the errors for what is not supported."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from revgn_ext import EGN, RevGN, RevMLP

from _dense import dense_lm_direction


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def mlp(out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, out))


def batch(n=8, out=3, kind="labels", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    if kind == "labels":
        y = torch.randint(0, out, (n,), generator=g)
    elif kind == "probs":
        y = torch.softmax(torch.randn(n, out, generator=g), 1)
    elif kind == "binary":
        y = torch.rand(n, generator=g)
    else:
        y = torch.randn(n, out, generator=g)
    return x, y


# --------------------------------------------------------------------------------------------------
# The done-when: an LBFGS training loop works with EGN by changing the constructor line
# --------------------------------------------------------------------------------------------------

def train(make_optimizer, steps=5):
    """A user's training loop written for torch.optim.LBFGS."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(32, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    optimizer = make_optimizer(model, loss_fn)
    losses = []
    for _ in range(steps):
        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        loss = optimizer.step(closure)
        losses.append(loss.item())
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    return losses, final


def test_lbfgs_loop_runs_with_egn_by_changing_the_constructor():
    lbfgs_losses, lbfgs_final = train(lambda model, loss_fn: torch.optim.LBFGS(model.parameters()))
    egn_losses, egn_final = train(lambda model, loss_fn: EGN(model.parameters(), model=model, loss=loss_fn,
                                                             lr=1.0, damping=0.1, line_search=True))
    assert egn_losses[0] == pytest.approx(lbfgs_losses[0])        # same model, same first loss
    assert egn_final < 0.5 * egn_losses[0]
    assert lbfgs_final < lbfgs_losses[0]


def test_closure_step_equals_batch_step():
    x, y = batch()
    model = mlp()
    twin = copy.deepcopy(model)
    opt = EGN(model.parameters(), model=model, loss=nn.CrossEntropyLoss(), lr=0.5, damping=0.1)
    ref = EGN(twin, loss="cross_entropy", lr=0.5, damping=0.1)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    returned = opt.step(closure)
    stats = ref.step(x, y)
    assert isinstance(returned, torch.Tensor) and float(returned) == pytest.approx(stats["loss"])
    assert opt.last_stats["loss"] == pytest.approx(stats["loss"])
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_closure_may_return_output_and_target():
    x, y = batch(kind="regression")
    model, twin = mlp(), mlp()
    opt = EGN(model, loss="mse", damping=0.2)
    out = opt.step(lambda: (model(x), y))
    ref = EGN(twin, loss="mse", damping=0.2).step(x, y)
    assert float(out) == pytest.approx(ref["loss"])
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_direction_accepts_a_closure():
    x, y = batch()
    model = mlp()
    opt = EGN(model, loss=nn.CrossEntropyLoss())
    d1 = opt.direction(lambda: F.cross_entropy(model(x), y))
    d2 = opt.direction(x, y)
    for a, b in zip(d1, d2):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------
# Losses: each torch.nn loss and reduction is the dense LM step of that very loss
# --------------------------------------------------------------------------------------------------

LOSSES = [
    (nn.MSELoss(), "regression"), (nn.MSELoss(reduction="sum"), "regression"),
    (nn.CrossEntropyLoss(), "labels"), (nn.CrossEntropyLoss(reduction="sum"), "labels"),
    (nn.CrossEntropyLoss(label_smoothing=0.2), "labels"), (nn.CrossEntropyLoss(), "probs"),
    (nn.CrossEntropyLoss(label_smoothing=0.1, reduction="sum"), "probs"),
    (nn.BCEWithLogitsLoss(), "binary"), (nn.BCEWithLogitsLoss(reduction="sum"), "binary"),
]


@pytest.mark.parametrize("loss_fn, kind", LOSSES, ids=lambda v: repr(v) if isinstance(v, nn.Module) else v)
def test_nn_loss_direction_matches_dense_solve_of_that_loss(loss_fn, kind):
    out = 1 if kind == "binary" else 3
    model = mlp(out)
    x, y = batch(out=out, kind=kind)
    damping = 0.3
    opt = EGN(model.parameters(), model=model, loss=loss_fn, damping=damping)
    target = y
    fn = (lambda o, t: loss_fn(o.reshape(-1), t)) if kind == "binary" else loss_fn
    dense = dense_lm_direction(model, fn, x, target, damping)
    # The closure form: the loss sees output.squeeze(1) for BCE, a view of the model output.
    got = opt.direction(lambda: fn(model(x), target))
    for a, b in zip(got, dense):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    stats = opt.step(x, target.reshape(-1, 1) if kind == "binary" else target)
    assert stats["loss"] == pytest.approx(float(fn(mlp(out)(x), target)))


def test_string_losses_keep_their_meaning():
    """'mse' is 0.5 ||f - y||^2 averaged over samples: the same step as nn.MSELoss with damping scaled."""
    model = mlp()
    x, y = batch(kind="regression")
    d_str = EGN(model, loss="mse", damping=0.3).direction(x, y)
    d_nn = EGN(model, loss=nn.MSELoss(), damping=0.3 * 2 / 3).direction(x, y)
    for a, b in zip(d_str, d_nn):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss, match", [
    (nn.MSELoss(reduction="none"), "reduction"), (nn.CrossEntropyLoss(weight=torch.ones(3)), "weight"),
    (nn.BCEWithLogitsLoss(pos_weight=torch.ones(1)), "pos_weight"), (nn.BCELoss(), "BCEWithLogitsLoss"),
    (nn.NLLLoss(), "CrossEntropyLoss"), (nn.L1Loss(), "loss must be"), ("hinge", "loss must be"),
    (lambda o, y: (o - y).abs().mean(), "loss must be"),
])
def test_unsupported_losses_are_refused(loss, match):
    with pytest.raises(ValueError, match=match):
        EGN(mlp(), loss=loss)


def test_revgn_refuses_label_smoothing_and_bce():
    model = RevMLP(6, 3, num_blocks=2, hidden=16, seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="label_smoothing"):
        RevGN(model, loss=nn.CrossEntropyLoss(label_smoothing=0.1))
    with pytest.raises(ValueError, match="supports the losses"):
        RevGN(model, loss=nn.BCEWithLogitsLoss())


def test_no_silent_default_loss():
    model = mlp()
    x, y = batch()
    opt = EGN(model)                     # integer labels: cross-entropy, recorded in the group
    opt.step(x, y)
    assert opt.param_groups[0]["loss"] == "cross_entropy"
    with pytest.raises(ValueError, match="pass loss="):
        EGN(mlp()).step(x, F.one_hot(y, 3).double())        # one-hot floats: labels or MSE targets?
    with pytest.raises(ValueError, match="pass loss="):
        EGN(mlp(1)).step(x, (y > 0).double())               # 0/1 floats: BCE or MSE?
    reg = EGN(mlp())
    reg.step(*batch(kind="regression"))
    assert reg.param_groups[0]["loss"] == "mse"


def test_closure_loss_is_inferred_and_then_held():
    model = mlp()
    x, y = batch()
    opt = EGN(model.parameters(), model=model)
    opt.step(lambda: nn.CrossEntropyLoss(label_smoothing=0.1)(model(x), y))
    g = opt.param_groups[0]
    assert (g["loss"], g["reduction"], g["label_smoothing"]) == ("cross_entropy", "mean", 0.1)
    with pytest.raises(ValueError, match="closure computed"):
        opt.step(lambda: F.mse_loss(model(x), F.one_hot(y, 3).double()))


def test_constructor_and_closure_loss_must_agree():
    model = mlp()
    x, y = batch()
    opt = EGN(model, loss=nn.MSELoss())
    with pytest.raises(ValueError, match="built with loss=nn.MSELoss"):
        opt.step(lambda: F.cross_entropy(model(x), y))


def test_closure_errors_say_what_to_do():
    model = mlp()
    x, y = batch()
    opt = EGN(model, loss="cross_entropy")
    with pytest.raises(ValueError, match="never called the model"):
        opt.step(lambda: torch.tensor(1.0))
    with pytest.raises(ValueError, match="not computed on the model's output"):
        opt.step(lambda: F.cross_entropy(2 * model(x), y))
    with pytest.raises(ValueError, match="no loss the optimizer knows"):
        opt.step(lambda: (model(x) - 1).square().mean())
    with pytest.raises(ValueError, match="F.nll_loss"):
        opt.step(lambda: F.nll_loss(model(x), y))
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match=r"step\(x, y\)"):
        opt.step(x)


# --------------------------------------------------------------------------------------------------
# Constructor forms, parameter groups, compiled models
# --------------------------------------------------------------------------------------------------

def test_constructor_forms():
    model = mlp()
    x, y = batch()
    a = EGN(model, loss="cross_entropy").direction(x, y)
    b = EGN(model.parameters(), model=model, loss="cross_entropy").direction(x, y)
    c = EGN(params=list(model.parameters()), model=model, loss="cross_entropy").direction(x, y)
    for u, v, w in zip(a, b, c):
        torch.testing.assert_close(u, v)
        torch.testing.assert_close(u, w)
    with pytest.raises(ValueError, match="needs the model"):
        EGN(model.parameters())
    with pytest.raises(ValueError, match="not a parameter of model"):
        EGN([nn.Parameter(torch.zeros(2))], model=model)
    with pytest.raises(ValueError, match="two models"):
        EGN(model, model=mlp())


def test_egn_trains_a_subset_of_parameters():
    model = mlp()
    x, y = batch()
    head = list(model[2].parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt = EGN(head, model=model, loss="cross_entropy", lr=0.5)
    assert len(opt.direction(x, y)) == 2
    opt.step(x, y)
    after = list(model.parameters())
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not torch.equal(after[2], before[2])


def test_add_param_group_raises_and_egn_keeps_one_group():
    model = mlp()
    opt = EGN(model, loss="cross_entropy")
    with pytest.raises(ValueError, match="add_param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    with pytest.raises(ValueError, match="one parameter group"):
        EGN([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}], model=model)
    rev = RevMLP(6, 3, num_blocks=2, hidden=16, seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="add_param_group"):
        RevGN(rev).add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def test_revgn_per_group_learning_rates():
    torch.manual_seed(0)
    model = RevMLP(6, 3, num_blocks=2, hidden=16, seed=0, dtype=torch.float64)
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    blocks = list(model.blocks)
    opt = RevGN([{"params": blocks[0].parameters(), "lr": 0.0}, {"params": blocks[1].parameters()}],
                model=model, lr=0.2)
    ref = RevGN(twin, lr=0.2)
    delta = ref.direction(x, y)
    opt.step(x, y)
    for p, q, d in zip(model.parameters(), twin.parameters(), delta):
        frozen = any(p is r for r in blocks[0].parameters())
        torch.testing.assert_close(p, q if frozen else q - 0.2 * d)
    opt.param_groups[1]["damping"] = 0.5
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['damping'\]"):
        opt.step(x, y)
    with pytest.raises(ValueError, match="leaves out"):
        RevGN(blocks[0].parameters(), model=model)


@pytest.mark.parametrize("which", ["egn", "revgn"])
def test_compiled_models_are_accepted(which):
    x = torch.randn(8, 6)
    y = torch.randint(0, 3, (8,))
    if which == "egn":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        make = lambda m: EGN(m.parameters(), model=m, loss=nn.CrossEntropyLoss())  # noqa: E731
    else:
        model = RevMLP(6, 3, num_blocks=2, hidden=16, seed=0, dtype=torch.float64)
        make = lambda m: RevGN(m.parameters(), model=m, loss=nn.CrossEntropyLoss())  # noqa: E731
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager")
    opt = make(compiled)
    loss = opt.step(lambda: F.cross_entropy(compiled(x), y))
    ref = make(twin).step(x, y)
    assert float(loss) == pytest.approx(ref["loss"])
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_lr_zero_accepted_by_both():
    model = mlp()
    x, y = batch()
    before = [p.detach().clone() for p in model.parameters()]
    stats = EGN(model, lr=0.0, loss="cross_entropy").step(x, y)
    assert stats["loss"] > 0 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    RevGN(RevMLP(6, 3, num_blocks=2, hidden=16, seed=0), lr=0.0)


def test_state_dict_round_trip_and_old_state_dicts():
    model = mlp()
    x, y = batch()
    opt = EGN(model, loss=nn.CrossEntropyLoss(label_smoothing=0.1), adaptive_damping=True)
    opt.step(x, y)
    saved = copy.deepcopy(opt.state_dict())
    other = EGN(copy.deepcopy(model))
    other.load_state_dict(saved)
    assert other.param_groups[0]["label_smoothing"] == 0.1
    old = copy.deepcopy(saved)
    for key in ("reduction", "label_smoothing"):
        del old["param_groups"][0][key]
    old["param_groups"][0]["loss"] = "cross_entropy"
    other.load_state_dict(old)
    assert other.param_groups[0]["reduction"] == "batch_mean"
    other.step(x, y)


# --------------------------------------------------------------------------------------------------
# Inputs (EGN's y checks), precision
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("y, match", [
    (lambda y: y.half(), "float16"), (lambda y: y.to(torch.complex128), "complex"),
    (lambda y: y > 0, "bool"), (lambda y: y.long(), "int64"),
])
def test_egn_mse_targets_of_the_wrong_dtype_are_refused(y, match):
    x, target = batch(kind="regression")
    with pytest.raises(ValueError, match=match):
        EGN(mlp(), loss="mse").step(x, y(target))


def test_egn_wrong_feature_width_names_x():
    x, y = batch(kind="regression")
    with pytest.raises(ValueError, match=r"x of shape \(8, 5\)"):
        EGN(mlp(), loss="mse").step(torch.randn(8, 5), y)


def test_cross_entropy_probability_targets_are_checked():
    x, y = batch(kind="probs")
    with pytest.raises(ValueError, match="sum to 1"):
        EGN(mlp(), loss=nn.CrossEntropyLoss()).step(x, 2 * y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_refused_with_a_message_about_the_model(dtype):
    with pytest.raises(ValueError, match="your model's parameters are"):
        EGN(mlp().to(dtype), loss="mse")
    with pytest.raises(ValueError, match="your model's parameters are"):
        RevGN(RevMLP(6, 3, num_blocks=2, hidden=16, seed=0).to(dtype))


def test_steps_under_autocast_run_in_the_parameters_dtype():
    torch.set_default_dtype(torch.float32)
    x = torch.randn(8, 6)
    y = torch.randint(0, 3, (8,))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    opt = EGN(model, loss=nn.CrossEntropyLoss(), lr=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = opt.step(lambda: F.cross_entropy(model(x), y))
    assert loss.dtype == torch.float32
    EGN(twin, loss=nn.CrossEntropyLoss(), lr=0.5).step(x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
    rev = RevMLP(6, 3, num_blocks=2, hidden=16, seed=0)
    rev_twin = copy.deepcopy(rev)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        RevGN(rev, lr=0.1).step(lambda: F.cross_entropy(rev(x), y))
    RevGN(rev_twin, lr=0.1).step(x, y)
    for p, q in zip(rev.parameters(), rev_twin.parameters()):
        torch.testing.assert_close(p, q)


def _coupling_args(n=5, half=4, M=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(n, half), r(n, half), r(half, M), r(half, M), r(half), r(half, M), r(half, M), r(half)


def test_ops_under_autocast_run_in_float32_on_either_backend():
    """The same dtypes and values as the float32 call, for the compiled ops and the references alike
    (CI runs this file with REVGN_BACKEND=reference too)."""
    from revgn_ext import ops

    args = _coupling_args()
    plain = ops.coupling_forward(*args, activation="tanh", return_features=True)
    low = [a.bfloat16() if i < 2 else a for i, a in enumerate(args)]    # inputs from a bf16 region
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ops.coupling_forward(*[a.bfloat16().float() if i < 2 else a for i, a in enumerate(args)],
                                    activation="tanh", return_features=True)
        mixed = ops.coupling_forward(*low, activation="tanh")
        inv = ops.coupling_inverse(*plain[:2], *args[2:], activation="tanh")
        A = torch.randn(2, 3, 5)
        x = ops.gram_cholesky_solve(A.bfloat16(), torch.randn(2, 3, 1).bfloat16(), 0.1)
    assert all(t.dtype == torch.float32 for t in (*auto, *mixed[:2], *inv, x))
    torch.testing.assert_close(auto[0], mixed[0])
    torch.testing.assert_close(inv[0], args[0], rtol=1e-5, atol=1e-5)
    if hasattr(torch.ops, "revgn") and hasattr(torch.ops.revgn, "coupling_forward"):
        with torch.autocast("cpu", dtype=torch.bfloat16):        # the registered autocast rule
            direct = torch.ops.revgn.coupling_forward(*low, "tanh", False)
        assert direct[0].dtype == torch.float32
        torch.testing.assert_close(direct[0], mixed[0])


def test_revmlp_training_under_autocast_matches_float32():
    torch.set_default_dtype(torch.float32)
    model = RevMLP(6, 3, num_blocks=2, hidden=16, seed=0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        auto_loss = F.cross_entropy(out, y)
    auto_grads = torch.autograd.grad(auto_loss, list(model.parameters()))
    # The blocks run in float32 under autocast; only the final readout Q is an autocast matmul.
    torch.testing.assert_close(auto_loss, loss, rtol=2e-2, atol=2e-2)
    for a, b in zip(auto_grads, grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)


# --------------------------------------------------------------------------------------------------
# The experiments CLI: defaults in --help, --lr 0 refused, one line per run in a log, Ctrl-C
# --------------------------------------------------------------------------------------------------

CLI_TINY = ["--dataset", "synthetic", "--max-train", "64", "--max-test", "32", "--hidden", "32", "--batch-size", "32",
            "--full-batch-size", "32", "--diag-samples", "32", "--ntk-samples", "8", "--ntk-probes", "2",
            "--epochs", "2"]


def test_cli_help_shows_defaults_and_refuses_lr_zero(capsys):
    from revgn_ext.experiments import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "(default: digits)" in out and "(default: float32)" in out
    for lr in ("0", "gn=0", "-1", "nan"):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--lr", lr])
        assert e.value.code == 2
        assert "positive" in capsys.readouterr().err


def test_cli_log_gets_one_line_per_run(tmp_path, capsys):
    from revgn_ext.experiments import cli

    with _quiet():
        assert cli.main(["train", *CLI_TINY, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err                      # pytest's capture is not a terminal
    lines = [line for line in err.splitlines() if line.strip()]
    assert len([line for line in lines if "epochs in" in line]) == 1
    assert "\r" not in err and "\x1b[" not in err


def test_cli_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from revgn_ext.experiments import cli
    from revgn_ext.experiments.revgn_paper import runner

    calls = {"n": 0}
    real = runner.train_step

    def interrupted(cfg, model, opt, x, y):
        calls["n"] += 1
        if calls["n"] > 2:                              # during the second epoch (2 batches an epoch)
            raise KeyboardInterrupt
        return real(cfg, model, opt, x, y)

    monkeypatch.setattr(runner, "train_step", interrupted)
    with _quiet():
        code = cli.main(["train", *CLI_TINY, "--out", str(tmp_path)])
    assert code == 130
    err = capsys.readouterr().err
    assert "stopped after epoch 1" in err and "rerun with --resume" in err
    monkeypatch.setattr(runner, "train_step", real)
    with _quiet():
        assert cli.main(["train", *CLI_TINY, "--out", str(tmp_path), "--resume"]) == 0


def _quiet():
    import warnings

    ctx = warnings.catch_warnings()

    class _Ctx:
        def __enter__(self):
            ctx.__enter__()
            warnings.simplefilter("ignore")

        def __exit__(self, *exc):
            return ctx.__exit__(*exc)
    return _Ctx()


# --------------------------------------------------------------------------------------------------
# Build choices (revgn_ext/ops/_build.py, shared by setup.py and the JIT path)
# --------------------------------------------------------------------------------------------------

def test_cuda_kernels_only_when_a_gpu_is_visible_or_asked_for(monkeypatch):
    from revgn_ext.ops import _build

    for var in ("REVGN_NO_CUDA", "REVGN_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_build, "cuda_home", lambda: "/usr/local/cuda")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not _build.want_cuda()                                   # CUDA torch and nvcc, no GPU
    assert "CPU kernels" in _build.describe(False) and "TORCH_CUDA_ARCH_LIST" in _build.describe(False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _build.want_cuda()                                       # asked for: CI
    assert ".cu" in _build.describe(True)
    monkeypatch.setenv("REVGN_NO_CUDA", "1")
    assert not _build.want_cuda()
    monkeypatch.delenv("REVGN_NO_CUDA")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _build.want_cuda()                                       # a GPU
    monkeypatch.setattr(torch.version, "cuda", None)
    assert not _build.want_cuda()                                   # a CPU build of torch
    monkeypatch.setenv("REVGN_FORCE_CUDA", "1")
    assert _build.want_cuda()
