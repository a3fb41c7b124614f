"""EGN(compile=True): the compiled solve of a verified call pattern against the dense float64 solve and
the eager step; every case it does not cover, and every verdict it does not pass, takes the eager step.

Most cases compile with the ``aot_eager`` backend (dynamo and AOT autograd trace the same code, seconds
to compile); one case per loss runs inductor, the default backend."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revgn_ext as rg

from _dense import assert_directions_close, dense_direction, dense_lm_direction, flat, stepped

FAST = {"backend": "aot_eager"}


def mlp(d=5, out=3, bias=True, act=nn.Tanh):
    return nn.Sequential(nn.Linear(d, 7, bias=bias), act(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, out)).double()


def batch(loss, b=9, d=5, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    if loss == "cross_entropy":
        return x, torch.randint(0, c, (b,), generator=g)
    y = torch.randn(b, c, generator=g, dtype=torch.float64)
    return x, (torch.sigmoid(y) if loss == "binary_cross_entropy" else y)


def compiled_taken(opt) -> bool:
    return "solve" in opt.last_stats["time"]


def pair(make, compile=FAST, **kw):
    """Two optimizers on equal copies of one model: eager and compiled."""
    torch.manual_seed(0)
    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    return rg.EGN(a, **kw), rg.EGN(b, compile=compile, **kw)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "binary_cross_entropy"])
def test_compiled_steps_give_the_dense_direction_and_the_eager_update(loss):
    eager, comp = pair(mlp, lr=0.4, damping=0.3, loss=loss)
    for k in range(4):
        x, y = batch(loss, seed=k)
        want = dense_direction(comp.model, x, y, loss, 0.3)
        got = flat(comp.direction(x, y))
        assert (got - want).abs().max() <= 1e-10 * want.abs().max()
        comp.step(x, y)
        eager.step(x, y)
        assert compiled_taken(comp)   # direction() at k = 0 ran eagerly and verified the signature
        for p, q in zip(eager.model.parameters(), comp.model.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
        assert comp.last_stats["loss"] == pytest.approx(eager.last_stats["loss"], rel=1e-12)
        assert comp.last_stats["direction_norm"] == pytest.approx(eager.last_stats["direction_norm"], rel=1e-10)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_inductor_matches_the_dense_direction_in_float64_and_float32(loss):
    """The default backend (inductor), float64 to 1e-10 against the dense solve, float32 against float64."""
    torch.manual_seed(0)
    model = mlp()
    model32 = mlp().float()
    model32.load_state_dict(model.state_dict())
    opt = rg.EGN(model, lr=1.0, damping=0.5, loss=loss, compile=True)
    opt32 = rg.EGN(model32, lr=1.0, damping=0.5, loss=loss, compile=True)
    x, y = batch(loss, b=16)
    x32, y32 = x.float(), (y.float() if y.is_floating_point() else y)
    opt.step(x, y)   # eager: verifies the call pattern
    opt32.step(x32, y32)
    want = dense_direction(model, x, y, loss, 0.5)
    got, _ = stepped(model, lambda: opt.step(x, y))
    assert compiled_taken(opt)
    assert (flat(got) - want).abs().max() <= 1e-10 * want.abs().max()
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    model.load_state_dict({k: v.double() for k, v in model32.state_dict().items()})
    want = dense_direction(model, x, y, loss, 0.5)
    got32, _ = stepped(model32, lambda: opt32.step(x32, y32))
    assert compiled_taken(opt32)
    assert (flat(got32).double() - want).abs().max() <= 2e-3 * want.abs().max()


def test_closure_with_the_users_loss_and_momentum():
    """step(closure) with nn.CrossEntropyLoss, momentum: compiled steps equal the user's dense LM solve."""
    eager, comp = pair(lambda: mlp(out=4), lr=1.0, damping=0.2, momentum=0.0)
    crit = nn.CrossEntropyLoss()
    x, y = batch("cross_entropy", c=4)
    for opt in (eager, comp):
        opt.step(lambda: crit(opt.model(x), y))
    want = dense_lm_direction(comp.model, crit, x, y, 0.2)
    got, _ = stepped(comp.model, lambda: comp.step(lambda: crit(comp.model(x), y)))
    assert compiled_taken(comp)
    assert_directions_close(got, want)
    eager_m, comp_m = pair(mlp, lr=0.3, damping=0.5, loss="mse", momentum=0.7)
    for k in range(3):
        x, y = batch("mse", seed=k)
        eager_m.step(x, y)
        comp_m.step(x, y)
    assert compiled_taken(comp_m)
    for p, q in zip(eager_m.model.parameters(), comp_m.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
    assert comp_m.state_dict()["state"].keys() == eager_m.state_dict()["state"].keys()
    summed = nn.MSELoss(reduction="sum")   # the damping is relative to the user's loss: lambda / b here
    eager_s, comp_s = pair(mlp, lr=1.0, damping=0.5)
    x, y = batch("mse")
    for opt in (eager_s, comp_s):
        opt.step(lambda: summed(opt.model(x), y))
    want = dense_lm_direction(comp_s.model, summed, x, y, 0.5)
    got, loss = stepped(comp_s.model, lambda: comp_s.step(lambda: summed(comp_s.model(x), y)))
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(summed(eager_s.model(x), y)), rel=1e-12)
    assert compiled_taken(comp_s)
    assert_directions_close(got, want)


def test_frozen_parameters_and_a_bias_free_layer():
    def make():
        m = mlp(bias=False)
        m[2].bias.requires_grad_(False)
        m[4].weight.requires_grad_(False)
        return m
    eager, comp = pair(make, lr=0.5, damping=0.4, loss="mse")
    for k in range(3):
        x, y = batch("mse", seed=k)
        want = dense_direction(comp.model, x, y, "mse", 0.4)
        assert (flat(comp.direction(x, y)) - want).abs().max() <= 1e-10 * want.abs().max()
        eager.step(x, y)
        comp.step(x, y)
    assert compiled_taken(comp)
    for p, q in zip(eager.model.parameters(), comp.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


class Tied(nn.Module):
    """After ``tie`` is set, the first layer's weight is also used outside its module (no hook sees it)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.tie = False

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.tie:
            h = h + F.linear(h, self.a.weight)
        return self.head(h)


def test_a_use_no_hook_sees_fails_the_check_and_the_eager_step_decides():
    eager, comp = pair(lambda: Tied().double(), lr=1.0, damping=0.3, loss="mse")
    x, y = batch("mse", d=4, c=2)
    for opt in (eager, comp):
        opt.step(x, y)
        opt.step(x, y)
    assert compiled_taken(comp)
    eager.model.tie = comp.model.tie = True
    want = dense_direction(comp.model, x, y, "mse", 0.3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, _ = stepped(comp.model, lambda: comp.step(x, y))
        eager.step(x, y)
    assert not compiled_taken(comp)   # the compiled check disagreed: the eager step ran and re-routed
    assert any("torch.func" in str(w.message) or "differs from autograd" in str(w.message) for w in caught)
    assert (flat(got) - want).abs().max() <= 1e-10 * want.abs().max()
    for p, q in zip(eager.model.parameters(), comp.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.a(torch.tanh(self.a(x))))


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3)
        self.head = nn.Linear(2 * 3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x[:, None, :])).flatten(1))


class Positions(nn.Module):
    """A Linear over positions: its input is (b, T, d), not per sample."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(1, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x[:, :, None])).mean(1))


@pytest.mark.parametrize("make,kw,said", [
    (lambda: CalledTwice().double(), {}, None),   # decided per traced call pattern: no warning
    (lambda: Positions().double(), {}, None),
    (lambda: Conv().double(), {}, "only nn.Linear"),
    (lambda: mlp(d=5, out=2), {"line_search": True}, "line_search"),
    (lambda: mlp(d=5, out=2), {"adaptive_damping": True}, "adaptive_damping"),
    (lambda: mlp(d=5, out=2), {"gram": "functional"}, "functional"),
])
def test_what_it_does_not_cover_runs_eagerly_and_exactly(make, kw, said):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager, comp = pair(make, lr=0.5, damping=0.3, loss="mse", **kw)
    told = [str(w.message) for w in caught if "compile" in str(w.message)]
    if said is None:
        assert not told
    else:
        assert len(told) == 1 and said in told[0] and "eagerly" in told[0]
    d = 3 if isinstance(eager.model, CalledTwice) else 5
    for k in range(3):
        x, y = batch("mse", d=d, c=2, seed=k)
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # no warning: these are not failures
            comp.step(x, y)
        eager.step(x, y)
        assert not compiled_taken(comp)
    for p, q in zip(eager.model.parameters(), comp.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


def test_bad_input_raises_the_eager_error_and_writes_nothing():
    _, comp = pair(mlp, lr=0.5, damping=0.3, loss="mse")
    x, y = batch("mse")
    comp.step(x, y)
    comp.step(x, y)
    assert compiled_taken(comp)
    before = [p.detach().clone() for p in comp.model.parameters()]
    for bad_x, bad_y, match in [(x.clone().fill_(float("nan")), y, "x"), (x, y.clone().fill_(float("inf")), "y")]:
        with pytest.raises(ValueError, match=match):
            comp.step(bad_x, bad_y)
    with pytest.raises(ValueError, match="y"):
        comp.step(x, y[:, :2])
    for p, q in zip(before, comp.model.parameters()):
        assert torch.equal(p, q)


def test_a_huge_step_is_refused_whole_and_a_new_batch_size_starts_eager():
    _, comp = pair(mlp, lr=1e308, damping=1e-3, loss="mse")
    x, y = batch("mse")
    comp.step(x, y)   # eager, refused (the update overflows)
    before = [p.detach().clone() for p in comp.model.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        stats = comp.step(x, y)
    assert stats["refused"] and compiled_taken(comp)
    assert all(torch.equal(p, q) for p, q in zip(before, comp.model.parameters()))
    comp.param_groups[0]["lr"] = 0.1
    x2, y2 = batch("mse", b=5, seed=3)
    comp.step(x2, y2)
    assert not compiled_taken(comp)   # a new input signature: eager first
    comp.step(x2, y2)
    assert compiled_taken(comp)


def test_a_random_forward_falls_back_and_is_refused():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 3)
            self.noise = False

        def forward(self, x):
            h = self.a(x)
            return h + torch.randn_like(h) if self.noise else h

    _, comp = pair(lambda: Noisy().double(), lr=0.5, damping=0.3, loss="mse")
    x, y = batch("mse")
    comp.step(x, y)
    comp.step(x, y)
    assert compiled_taken(comp)
    comp.model.noise = True
    with warnings.catch_warnings(), pytest.raises(rg.UnsupportedModelError, match="random"):
        warnings.simplefilter("error", RuntimeWarning)   # the eager step's refusal, no compile warning
        comp.step(x, y)


@pytest.mark.parametrize("bad", [1, "yes", {"fullgraph": True}, {"dynamic": True}, {3: 4}])
def test_the_compile_option_is_checked(bad):
    with pytest.raises(ValueError, match="compile"):
        rg.EGN(mlp(), loss="mse", compile=bad)


@pytest.mark.parametrize("seed", range(4))
def test_drawn_models_losses_and_hyperparameters(seed):
    """Drawn widths, depths, activations, losses, batch sizes, damping, lr, momentum and frozen layers;
    parameters written through load_state_dict between steps: compiled equals eager and the dense solve."""
    g = torch.Generator().manual_seed(100 + seed)

    def draw(n):
        return int(torch.randint(1, n + 1, (1,), generator=g))

    widths = [draw(6) for _ in range(draw(3) + 1)]
    loss = ["mse", "cross_entropy", "binary_cross_entropy"][seed % 3]
    c = draw(3) + 1
    act = [nn.Tanh, nn.ReLU, nn.Sigmoid, nn.GELU][draw(4) - 1]
    biases = [bool(draw(2) - 1) for _ in widths[1:]]

    def make():
        layers, d = [], widths[0]
        for w, bias in zip(widths[1:], biases):
            layers += [nn.Linear(d, w, bias=bias), act()]
            d = w
        return nn.Sequential(*layers, nn.Linear(d, c)).double()

    torch.manual_seed(seed)
    state = make().state_dict()
    models = [make(), make()]
    for m in models:
        m.load_state_dict(state)
        if seed % 2:
            m[-1].bias.requires_grad_(False)
    kw = dict(lr=float(torch.rand(1, generator=g)) + 0.1, damping=10 ** float(-2 * torch.rand(1, generator=g)),
              loss=loss, momentum=0.5 * (seed % 2))
    eager, comp = rg.EGN(models[0], **kw), rg.EGN(models[1], compile=FAST, **kw)
    b = draw(12) + 2
    for k in range(3):
        x, y = batch(loss, b=b, d=widths[0], c=c, seed=seed * 10 + k)
        if k == 2:   # new values through load_state_dict, then the dense check
            new = {n: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for n, v in state.items()}
            for m in models:
                m.load_state_dict(new)
            want = dense_direction(models[1], x, y, loss, kw["damping"])
            assert (flat(comp.direction(x, y)) - want).abs().max() <= 1e-10 * max(1.0, want.abs().max())
        eager.step(x, y)
        comp.step(x, y)
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-11)
    assert compiled_taken(comp)


def test_past_dynamos_recompile_limit_the_solve_stays_exact():
    """Each input shape compiles anew; past torch._dynamo's recompile limit the same solve runs uncompiled."""
    eager, comp = pair(mlp, lr=0.5, damping=0.3, loss="mse")
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # dynamo says once that the limit was hit
        for b in (3, 4, 5, 6):
            x, y = batch("mse", b=b, seed=b)
            for _ in range(2):
                eager.step(x, y)
                comp.step(x, y)
            assert compiled_taken(comp)
    for p, q in zip(eager.model.parameters(), comp.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


def test_a_dropped_optimizer_leaves_no_hooks():
    import gc
    model = mlp()
    opt = rg.EGN(model, loss="mse", compile=FAST)
    assert all(len(m._forward_hooks) == 1 for m in model if isinstance(m, nn.Linear))
    del opt
    gc.collect()
    assert all(len(m._forward_hooks) == 0 for m in model)


def test_label_smoothing_and_per_token_losses():
    """A smoothed cross-entropy compiles (class probabilities as targets); a per-token loss runs eagerly."""
    eager, comp = pair(lambda: mlp(out=4), lr=1.0, damping=0.2)
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    x, y = batch("cross_entropy", c=4)
    for _ in range(2):
        for opt in (eager, comp):
            opt.step(lambda: crit(opt.model(x), y))
    assert compiled_taken(comp)
    for p, q in zip(eager.model.parameters(), comp.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
    want = dense_lm_direction(comp.model, crit, x, y, 0.2)
    got, _ = stepped(comp.model, lambda: comp.step(lambda: crit(comp.model(x), y)))
    assert_directions_close(got, want)

    tagger = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    opt = rg.EGN(tagger, lr=1.0, damping=0.3, compile=FAST)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(6, 7, 3, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 4, (6, 7), generator=g)
    ys[0, 3:] = -100
    ce = nn.CrossEntropyLoss()
    want = dense_lm_direction(tagger, lambda o, t: ce(o.reshape(-1, 4), t.reshape(-1)), xs, ys, 0.3)
    for _ in range(2):
        got, _ = stepped(tagger, lambda: opt.step(lambda: ce(tagger(xs).reshape(-1, 4), ys.reshape(-1))))
        assert not compiled_taken(opt)
        assert_directions_close(got, want)
        want = dense_lm_direction(tagger, lambda o, t: ce(o.reshape(-1, 4), t.reshape(-1)), xs, ys, 0.3)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x, z, scale=1.0):
        return self.head(torch.tanh(self.a(x) + scale * self.b(z)))


@pytest.mark.parametrize("as_dict", [False, True])
def test_several_inputs_compile(as_dict):
    eager, comp = pair(lambda: TwoInputs().double(), lr=1.0, damping=0.4, loss="mse")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    z = torch.randn(8, 2, generator=g, dtype=torch.float64)
    y = torch.randn(8, 3, generator=g, dtype=torch.float64)
    inputs = {"x": x, "z": z, "scale": 0.5} if as_dict else (x, z, 0.5)
    for _ in range(2):
        eager.step(inputs, y)
        comp.step(inputs, y)
    assert compiled_taken(comp)
    want = dense_direction(comp.model, inputs, y, "mse", 0.4)
    got, _ = stepped(comp.model, lambda: comp.step(inputs, y))
    assert compiled_taken(comp)
    assert (flat(got) - want).abs().max() <= 1e-10 * want.abs().max()
