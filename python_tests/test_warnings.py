"""Warnings point at the user's line, and a plain step raises none.

* The library's own warnings (a refused step, Cholesky jitter, the torch.func fallback, RevGN's batch
  larger than the bottleneck) are attributed to the caller of ``opt.step(...)``: this file.
* A torch warning raised in the user's model, called from a closure, keeps the user's frame (the
  closure's loss recorder steps aside while the model runs).
* The library's jvp calls do not show torch's "torch.jit.script is deprecated" about its internals.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revgn_ext as rg

HERE = __file__


def caught(fn):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fn()
    return record


def assert_from_here(record, category, match):
    hits = [w for w in record if issubclass(w.category, category) and match in str(w.message)]
    assert hits, f"no {category.__name__} matching {match!r} among {[str(w.message) for w in record]}"
    for w in hits:
        assert w.filename == HERE, f"{category.__name__} {str(w.message)[:60]!r} is attributed to " \
                                   f"{w.filename}:{w.lineno}, not to the caller's file"


# ------------------------------------------------------------------------------------------------
# The library's own warnings
# ------------------------------------------------------------------------------------------------

def test_refused_revgn_step_warns_at_the_step_call():
    m = rg.RevMLP(8, 3, 2, 16, "relu", weight_std=1.0, seed=0)
    x, y = torch.full((4, 8), 1e30), torch.tensor([0, 1, 2, 0])   # features overflow float32
    opt = rg.RevGN(m)
    assert_from_here(caught(lambda: opt.step(x, y)), RuntimeWarning, "step refused")
    assert_from_here(caught(lambda: opt.step(lambda: F.cross_entropy(m(x), y))), RuntimeWarning, "step refused")


def test_revgn_batch_above_bottleneck_warns_at_the_step_call():
    m = rg.RevMLP(6, 3, 2, hidden=4, seed=0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt = rg.RevGN(m)
    assert_from_here(caught(lambda: opt.step(x, y)), UserWarning, "bottleneck")


def test_egn_cholesky_jitter_warns_at_the_step_call():
    model = nn.Linear(2, 1).double()
    x = torch.ones(8, 2, dtype=torch.float64)       # identical samples: a rank-1 Gram
    y = torch.randn(8, 1, dtype=torch.float64)
    opt = rg.EGN(model, damping=0.0, lr=1.0)
    assert_from_here(caught(lambda: opt.step(x, y)), RuntimeWarning, "jitter")


class TransposedUse(nn.Module):
    """Reuses the encoder's weight outside any module, which no layer rule sees: gram="auto" falls
    back to torch.func for it, with a warning."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 5)
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        return self.out(torch.tanh(F.linear(h, self.enc.weight.t())))


@pytest.mark.parametrize("how", ["batch", "closure"])
def test_egn_fallback_warns_at_the_step_call(how):
    torch.manual_seed(8)
    model = TransposedUse().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    opt = rg.EGN(model, loss="mse", damping=0.4)
    step = (lambda: opt.step(x, y)) if how == "batch" else (lambda: opt.step(lambda: (model(x), y)))
    assert_from_here(caught(step), RuntimeWarning, "torch.func")


# ------------------------------------------------------------------------------------------------
# Warnings raised by the user's code inside a closure
# ------------------------------------------------------------------------------------------------

class Noisy(nn.Module):
    """A layer whose forward makes torch warn (C++ and Python warnings), as user layers may."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        torch.tensor(x)                                  # C++: "To copy construct from a tensor ..."
        warnings.warn("user warning in forward", UserWarning)
        return self.lin(x)


@pytest.mark.parametrize("optimizer", ["EGN", "RevGN"])
def test_torch_warning_in_the_users_model_keeps_the_users_frame(optimizer):
    torch.manual_seed(0)
    if optimizer == "EGN":
        model = Noisy()
        opt = rg.EGN(model, loss="cross_entropy", damping=1.0)
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    else:
        model = rg.RevMLP(4, 3, 2, hidden=16, seed=0)
        opt = rg.RevGN(model)
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        real = model.forward

        def forward(inp):
            torch.tensor(inp)                            # a torch warning inside the model's call
            return real(inp)
        model.forward = forward

    def closure():
        opt.zero_grad()
        warnings.warn("user warning in closure", UserWarning)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    record = caught(lambda: opt.step(closure))
    assert_from_here(record, UserWarning, "copy construct")
    assert_from_here(record, UserWarning, "user warning in closure")
    if optimizer == "EGN":
        assert_from_here(record, UserWarning, "user warning in forward")


def test_recorder_is_restored_when_the_model_raises():
    """The closure's model call raises: the step raises it, and no torch-function mode is left behind."""
    model = nn.Sequential(nn.Linear(4, 3))
    opt = rg.EGN(model, loss="cross_entropy")

    def closure():
        return F.cross_entropy(model(torch.randn(8, 5)), torch.zeros(8, dtype=torch.long))

    before = torch.overrides._get_current_function_mode_stack()
    with pytest.raises(RuntimeError):
        opt.step(closure)
    assert torch.overrides._get_current_function_mode_stack() == before
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt.step(lambda: F.cross_entropy(model(x), y))       # and the next closure is read as usual
    assert opt.last_stats["batch_size"] == 8


def test_loss_recording_sees_through_a_users_mode_around_the_model():
    """A user's own torch-function mode around the model call: the recorder stays put under it."""
    model = nn.Sequential(nn.Linear(4, 3))
    opt = rg.EGN(model, loss="cross_entropy")
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def closure():
        with torch.overrides.BaseTorchFunctionMode():
            out = model(x)
        return F.cross_entropy(out, y)

    before = torch.overrides._get_current_function_mode_stack()
    opt.step(closure)
    assert torch.overrides._get_current_function_mode_stack() == before
    assert opt.last_stats["batch_size"] == 8


# ------------------------------------------------------------------------------------------------
# A plain step raises no warning at all
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(line_search=True, adaptive_damping=True, momentum=0.5),
                                dict(curvature="sampled"), dict(curvature="true-class")])
def test_plain_egn_steps_raise_no_warning(kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = rg.EGN(model.parameters(), model=model, loss=loss_fn, lr=1.0, damping=0.5, **kw)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)
        loss.item()
        opt.step(lambda: (model(x), y))
        opt.step(x, y)
        opt.direction(x, y)
        rg.EGN(conv, loss="cross_entropy", damping=1.0, **kw).step(torch.randn(8, 1, 6, 6),
                                                                   torch.randint(0, 3, (8,)))


@pytest.mark.parametrize("kw", [dict(), dict(target="newton"), dict(target="damped", solver="svd")])
def test_plain_revgn_steps_raise_no_warning(kw):
    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = rg.RevMLP(in_features=6, num_classes=3, num_blocks=2, hidden=16, seed=0)
        opt = rg.RevGN(model.parameters(), model=model, lr=0.1, **kw)
        opt.step(lambda: F.cross_entropy(model(x), y)).item()
        opt.step(x, y)
        opt.direction(x, y)


def test_library_jvp_hides_torchs_jit_script_deprecation(tmp_path):
    """In a fresh process (torch loads its jvp decompositions once), with every warning an error."""
    code = ("import torch, warnings; warnings.simplefilter('error')\n"
            "from revgn_ext._warn import load_jvp_decompositions\n"
            "load_jvp_decompositions()\n"
            "print(torch.func.jvp(torch.sin, (torch.zeros(3),), (torch.ones(3),))[1].tolist())\n")
    # The package under test, from a folder that holds no other revgn_ext (python -c puts its cwd first).
    env = {**os.environ, "PYTHONPATH": str(Path(rg.__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[1.0, 1.0, 1.0]"
