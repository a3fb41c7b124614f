"""What the small step keeps from one step to the next is never served stale: the memo of checked
hyper-parameters, the fused input checks, and the per-call-pattern plans of the layer-wise Gram, each
against a changed value, shape, dtype or call pattern, with the step compared to the dense float64 solve."""
import math
import warnings

import pytest
import torch
from torch import nn

import revgn_ext as rg

from _dense import dense_direction, flat


def mlp(out=2):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, out)).double()


def batch(b=9, c=2, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 5, generator=g, dtype=dtype), torch.randn(b, c, generator=g, dtype=dtype)


def close(ours, ref, tol=1e-10):
    return float((ours - ref).abs().max()) <= tol * float(ref.abs().max())


# -- the memo of checked hyper-parameters -------------------------------------------------------------

@pytest.mark.parametrize("key,bad", [("lr", math.nan), ("damping", -1.0), ("momentum", 1.0), ("max_tries", 0),
                                     ("curvature", "diagonal"), ("gram", "functional"), ("lr", 1),
                                     ("line_search", 1)])
def test_a_value_written_into_param_groups_after_steps_is_checked(key, bad):
    model = mlp()
    opt = rg.EGN(model, lr=0.1, damping=0.5, loss="mse")
    x, y = batch()
    opt.step(x, y)
    opt.step(x, y)   # the options passed twice: memoised
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0][key] = bad
    if key == "lr" and bad == 1:   # an int step size is valid: the step runs, with lr 1
        ref = dense_direction(model, x, y, "mse", 0.5)
        opt.step(x, y)
        assert close(flat([p.detach() - w for p, w in zip(model.parameters(), before)]), ref)
        return
    with pytest.raises(ValueError, match=rf"param_groups\[0\]\['{key}'\]"):
        opt.step(x, y)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))


def test_a_value_loaded_by_load_state_dict_is_used_and_later_writes_are_checked():
    model = mlp()
    opt = rg.EGN(model, lr=1.0, damping=0.5, loss="mse")
    x, y = batch()
    opt.step(x, y)
    state = opt.state_dict()
    state["param_groups"][0]["damping"] = 2.0
    opt.load_state_dict(state)
    ref = dense_direction(model, x, y, "mse", 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert close(flat(opt.direction(x, y)), ref)
    opt.step(x, y)
    state = opt.state_dict()
    state["param_groups"][0]["damping"] = 0.25
    opt.load_state_dict(state)
    opt.step(x, y)
    opt.param_groups[0]["damping"] = math.inf   # written after a load whose values passed
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['damping'\]"):
        opt.step(x, y)


def test_the_memo_reads_the_parameters_dtype():
    """lr = 1e39 is a valid step size for float64 parameters, not for float32 ones (it overflows):
    after the parameters change dtype in place, the memoised options are checked again."""
    model = mlp()
    opt = rg.EGN(model, lr=1e39, damping=0.5, loss="mse")
    x, y = batch()
    opt.direction(x, y)
    opt.direction(x, y)
    for p in model.parameters():
        p.data = p.data.float()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] = 1e\+39 overflows the float32"):
        opt.direction(x.float(), y.float())


def test_a_mutable_option_is_checked_every_time():
    model = mlp()
    opt = rg.EGN(model, lr=0.1, damping=0.5, loss="mse")
    x, y = batch()
    opt.param_groups[0]["schedule"] = [1.0]   # a key the spec does not know: left alone, never memoised
    opt.step(x, y)
    opt.step(x, y)
    opt.param_groups[0]["lr"] = -0.1
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        opt.step(x, y)


# -- the fused input checks ---------------------------------------------------------------------------

def test_input_errors_keep_their_order_and_names():
    model = mlp()
    opt = rg.EGN(model, lr=0.1, damping=0.5, loss="mse")
    x, y = batch()
    opt.step(x, y)
    bad_x = x.clone()
    bad_x[3, 1] = math.nan
    bad_y = y.clone()
    bad_y[0, 0] = math.inf
    with pytest.raises(ValueError, match="^x contains NaN or Inf$"):
        opt.step(bad_x, y)
    with pytest.raises(ValueError, match="^y contains NaN or Inf$"):
        opt.step(x, bad_y)
    with pytest.raises(ValueError, match="^x contains NaN or Inf$"):   # x is checked before y
        opt.step(bad_x, bad_y)
    with pytest.raises(ValueError, match="^x contains NaN or Inf$"):   # ... and before y's batch size
        opt.step(bad_x, y[:4])
    with pytest.raises(ValueError, match="y must have the batch size"):
        opt.step(x, y[:4])
    ref = dense_direction(model, x, y, "mse", 0.5)
    assert close(flat(opt.direction(x, y)), ref)


# -- the layers' outputs handed on without copies -----------------------------------------------------

class InPlaceAfter(nn.Module):
    """A layer whose output the forward changes in place (as ReLU(inplace=True) does), from a step on."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 2)
        self.inplace = inplace

    def forward(self, x):
        h = self.a(x)
        if self.inplace:
            h.tanh_()
        else:
            h = torch.tanh(h)
        return self.b(h)


@pytest.mark.parametrize("first", [True, False])
def test_an_output_changed_in_place_is_seen_and_the_step_stays_exact(first):
    torch.manual_seed(0)
    model = InPlaceAfter(inplace=first).double()
    opt = rg.EGN(model, lr=0.5, damping=0.3, loss="mse")
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a wrong output gradient would fail the checks and be demoted, warning
        for step in range(4):
            model.inplace = first or step >= 2
            ref = dense_direction(model, x, y, "mse", 0.3)
            assert close(flat(opt.direction(x, y)), ref)
            opt.step(x, y)
    assert opt._assembler._copy_outputs
    assert opt.last_stats["gram"] == "layerwise"


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_all_finite_owned_sees_every_non_finite_entry_and_changes_no_value(default):
    from revgn_ext.egn.params import all_finite_owned
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)   # the check's own flag stays float32
    try:
        _check_all_finite_owned(all_finite_owned)
    finally:
        torch.set_default_dtype(previous)


def _check_all_finite_owned(all_finite_owned):
    for dtype in (torch.float32, torch.float64):
        tensors = [torch.randn(3, dtype=dtype), torch.full((2, 2), 3e38 if dtype == torch.float32 else 1e308,
                                                           dtype=dtype), torch.zeros(0, dtype=dtype),
                   torch.tensor([1e-40, -0.0], dtype=dtype)]
        before = [t.clone() for t in tensors]
        assert all_finite_owned(tensors)
        assert all(torch.equal(t, s) and torch.equal(t.signbit(), s.signbit()) for t, s in zip(tensors, before))
        for where in (0, 1, 3):
            for bad in (math.nan, math.inf, -math.inf):
                trial = [t.clone() for t in tensors]
                trial[where].view(-1)[-1] = bad
                assert not all_finite_owned(trial)


# -- what the recorded forward keeps per torch.func route ----------------------------------------------

def test_the_recorded_modules_follow_the_torch_func_route():
    """Parameters moved to torch.func after steps: their module is no longer recorded, and the step stays
    the dense one (a list of recorded modules kept across the route's change would still hook it)."""
    model = mlp()
    opt = rg.EGN(model, lr=0.2, damping=0.4, loss="mse")
    x, y = batch()
    opt.step(x, y)
    assembler = opt._assembler
    assert [name for name, _, _ in assembler._hooked_modules()] == ["0", "2", "4"]
    with pytest.warns(RuntimeWarning, match="torch.func"):
        assembler.route_to_functional([id(model[2].weight), id(model[2].bias)])
    assert [name for name, _, _ in assembler._hooked_modules()] == ["0", "4"]
    ref = dense_direction(model, x, y, "mse", 0.4)
    assert close(flat(opt.direction(x, y)), ref)
    assert assembler.method == "layerwise+functional"


def test_the_attention_backend_flags_are_restored_after_a_step():
    from revgn_ext.egn.capture import differentiable_attention
    flags = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.mem_efficient_sdp_enabled,
             torch.backends.cuda.math_sdp_enabled, torch.backends.cuda.cudnn_sdp_enabled)
    torch.backends.cuda.enable_flash_sdp(False)   # a user's own choice, kept across the step
    try:
        before = [f() for f in flags]
        with differentiable_attention("cpu"):
            assert [f() for f in flags] == [False, False, True, False]
        assert [f() for f in flags] == before
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double().eval()
        model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 3, 2).double())
        opt = rg.EGN(model, lr=0.1, damping=1.0, loss="mse")
        x = torch.randn(4, 3, 8, dtype=torch.float64)
        y = torch.randn(4, 2, dtype=torch.float64)
        opt.step(x, y)
        assert [f() for f in flags] == before
    finally:
        torch.backends.cuda.enable_flash_sdp(True)
