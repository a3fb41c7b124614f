"""RevGN and EGN share their conventions (revgn_ext/_optim.py): hyper-parameters are re-checked at
every step, lr = 0 moves nothing, refused steps leave the parameters as they were, and the stats record
has the same common keys."""
import math

import pytest
import torch
from torch import nn

import revgn_ext as rg
from revgn_ext._optim import COMMON_STATS


def _revgn():
    model = rg.RevMLP(8, 3, num_blocks=2, hidden=16, seed=0).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    return model, rg.RevGN(model, lr=0.5, damping=1e-3), x, y


def _egn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    return model, rg.EGN(model, lr=0.5, damping=1e-2, loss="cross_entropy"), x, y


MAKERS = {"revgn": _revgn, "egn": _egn}


@pytest.mark.parametrize("which", MAKERS)
@pytest.mark.parametrize("key, value", [("lr", float("nan")), ("lr", float("inf")), ("lr", -1.0),
                                        ("damping", float("nan")), ("damping", -1.0)])
def test_hyperparameters_written_after_construction_are_checked(which, key, value):
    model, opt, x, y = MAKERS[which]()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{key}'\]"):
        opt.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("which", MAKERS)
def test_nan_lr_through_load_state_dict_is_refused(which):
    model, opt, x, y = MAKERS[which]()
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        opt.load_state_dict(state)   # refused at load; the optimizer keeps its own values
    assert opt.param_groups[0]["lr"] == 0.5
    opt.step(x, y)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("which", MAKERS)
def test_lr_zero_moves_nothing_and_reports(which):
    model, opt, x, y = MAKERS[which]()
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    stats = opt.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert set(COMMON_STATS) <= set(stats)
    assert stats["refused"] is False and stats["reason"] is None and stats["lr"] == 0.0
    assert math.isfinite(stats["loss"]) and stats["batch_size"] == 6 and stats["direction_norm"] > 0


@pytest.mark.parametrize("which", MAKERS)
@pytest.mark.parametrize("key", ["lr", "damping"])
def test_direction_rechecks_hyperparameters_too(which, key):
    """direction() reads damping (a NaN damping was used as 0 before the per-step check)."""
    model, opt, x, y = MAKERS[which]()
    opt.param_groups[0][key] = float("nan")
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{key}'\]"):
        opt.direction(x, y)


@pytest.mark.parametrize("which", MAKERS)
def test_scheduler_that_makes_lr_infinite_is_refused(which):
    model, opt, x, y = MAKERS[which]()
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: math.inf if epoch else 1.0)
    opt.step(x, y)
    scheduler.step()
    assert opt.param_groups[0]["lr"] == math.inf
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        opt.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("which", MAKERS)
def test_nan_damping_through_load_state_dict_is_refused(which):
    model, opt, x, y = MAKERS[which]()
    state = opt.state_dict()
    state["param_groups"][0]["damping"] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['damping'\]"):
        opt.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert math.isfinite(opt.param_groups[0]["damping"])
