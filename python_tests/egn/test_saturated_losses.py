"""Saturated softmax and sigmoid outputs: a confidently wrong sample has log p far below the dtype's
exp range, so the push-through target t = V^T e / s overflows although e and Q are finite. The step
then solves the same LM system by Woodbury's identity; it was refused before, at every later step too."""
import warnings

import pytest
import torch
from torch import nn

import revgn_ext as rg

from _dense import dense_direction, flat


def saturated(loss: str, dtype=torch.float64, gap=20000.0):
    """A small MLP whose logits differ by about ``gap`` on some samples, labelled against them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)
    with torch.no_grad():
        model[2].weight.mul_(gap / 4)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, generator=g, dtype=dtype)
    f = model(x).detach()
    if loss == "cross_entropy":
        y = f.argmin(1)   # the least likely class: log p about -gap
    else:
        y = (f < 0).to(dtype)   # every logit on the wrong side
    return model, x, y


@pytest.mark.parametrize("loss", ["cross_entropy", "binary_cross_entropy"])
def test_the_step_equals_the_dense_lm_solve_where_the_target_overflows(loss):
    model, x, y = saturated(loss)
    opt = rg.EGN(model, lr=1.0, damping=0.5, loss=loss)
    factor = rg.egn.loss_factors.LOSS_FACTORS[loss](model(x).detach(), y)
    assert not torch.isfinite(factor.target).all() and torch.isfinite(factor.residual).all()
    want = dense_direction(model, x, y, loss, 0.5)
    assert torch.isfinite(want).all()
    got = flat(opt.direction(x, y))
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()
    before = flat([p.detach().clone() for p in model.parameters()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = opt.step(x, y)
    assert not stats["refused"]
    assert (flat(model.parameters()) - before - want).abs().max() <= 1e-10 * want.abs().max()


def test_float32_saturation_with_line_search_and_adaptive_damping():
    """log p down to about -330 overflows float32's exp but not float64's: the float32 step against the float64
    dense solve at the same parameters; the line search and the gain ratio read the Woodbury terms."""
    model, x, y = saturated("cross_entropy", torch.float32, gap=3000.0)
    model64 = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    want = dense_direction(model64, x.double(), y, "cross_entropy", 0.5)
    opt = rg.EGN(model, lr=1.0, damping=0.5, loss="cross_entropy", line_search=True, adaptive_damping=True,
                 max_tries=40)   # g^T d = -3.7e5 here: Armijo holds below alpha = 1e-3
    got = flat(opt.direction(x, y)).double()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    stats = opt.step(x, y)
    assert not stats["refused"] and stats["accepted"] and stats["new_loss"] < stats["loss"]
    assert stats["rho"] is not None and stats["rho"] > 0


def test_without_damping_the_overflowing_step_is_refused_and_nothing_moves():
    model, x, y = saturated("cross_entropy")
    opt = rg.EGN(model, lr=1.0, damping=0.0, loss="cross_entropy")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="refused"):
        stats = opt.step(x, y)
    assert stats["refused"]
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 80.0), (torch.float64, 400.0), (torch.float32, 80.0),
                                         (torch.float32, 160.0)])
def test_the_quadratic_models_terms_where_the_push_through_cancels(dtype, scale):
    """g^T d and ||S^T J d||^2 / b, read by the line search and the gain ratio, against the dense
    problem, for one sample with log p of its label down to about -37 / -73 / -181: the push-through
    K u = t - mu u cancels there (float32 gave g^T d = +1.6e7 against -561), so the step forms them
    by a VJP and a JVP instead."""
    from revgn_ext._inputs import ModelInputs
    from _dense import dense_problem
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=g)
    with torch.no_grad():
        y[0] = model(x)[0].argmin()
        model[2].weight.mul_(scale)
    ours = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)
    ours.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    opt = rg.EGN(ours, lr=1.0, damping=0.5, loss="cross_entropy", line_search=True)
    with torch.enable_grad():
        sol = opt._solve(ModelInputs.of(x.to(dtype)), y, 0.5)
    gTd, quad = opt._model_terms(sol, sol.direction, False)
    J, Q, grad, _ = dense_problem(model, x, y, "cross_entropy")
    d = dense_direction(model, x, y, "cross_entropy", 0.5)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert gTd == pytest.approx(float(grad @ d), rel=tol)
    assert quad == pytest.approx(float(d @ J.T @ Q @ J @ d) / 16, rel=tol)
