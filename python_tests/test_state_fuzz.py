"""Property test of the loaded-state checker: random corruptions of ``load_state_dict`` and random writes
into ``param_groups`` / ``state`` of RevGN and EGN either raise a one-line error naming the entry,
leaving parameters and optimizer untouched, or give exactly the step of an optimizer freshly
constructed with the same values (for EGN's momentum state: the documented update with that state).
Never a silent change. Seeded draws, several hundred cases."""
import copy
import math
import random
import warnings

import pytest
import torch
from torch import nn

import revgn_ext as rg

f64 = torch.float64
NAN, INF = float("nan"), float("inf")
GENERIC = [NAN, INF, -INF, -1.0, 0.0, 1e-3, 0.5, 1.0, 2.0, 1e300, -0.5, "bogus", "", None, True, False, 3, 0,
           -2, (0.5, 0.5), [1.0], (), torch.tensor(0.1), 10 ** 40]
VALID = {  # other values the constructors accept, so that some draws must step and match a fresh optimizer
    "lr": [0.0, 0.05, 0.3], "damping": [0.0, 1e-2, 2.0], "target": ["newton", "damped", "identity"],
    "loss": ["mse", "cross_entropy", None], "reduction": ["mean", "sum", "batch_mean"],
    "label_smoothing": [0.0, 0.1], "shares": [(0.3, 0.7), [1.0, 0.0], (0.5, 0.5)],
    "damping_mode": ["absolute", "relative"], "solver": ["svd", "cholesky"], "rtol": [1e-3, 0.0],
    "atol": [0.0, 1e-8], "target_damping": [1e-2, 1.0], "gram_route": ["gather_rows", "reduce_gram", "auto"],
    "memory_limit": [2 ** 20, 10], "line_search": [True, False], "momentum": [0.0, 0.9],
    "adaptive_damping": [True], "damping_increase": [1.5], "damping_decrease": [0.5], "min_damping": [1e-3],
    "max_damping": [1e3, 1e-9], "armijo": [0.3], "backtrack": [0.5], "max_tries": [1, 4], "gram": ["functional"],
    "curvature": ["true-class", "sampled"], "samples": [1, 2], "gram_block_rows": [None, 2],
    "step": [0, 1, 7], "alpha": [0.05, 0.0], "ignore_index": [-100, 2, 1],
}
STATE_EXTRA = {"momentum_buffer": "buffer"}


def _revgn_base():
    torch.manual_seed(0)
    model = rg.RevMLP(10, 3, 2, 16, ("tanh", "relu"), weight_std=0.3, seed=0, dtype=f64)
    x, y = torch.randn(6, 10, dtype=f64), torch.randint(0, 3, (6,))
    return model, x, y, dict(lr=0.2, damping=1e-3, loss="cross_entropy")


def _egn_base():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(f64)
    x, y = torch.randn(6, 4, dtype=f64), torch.randint(0, 3, (6,))
    return model, x, y, dict(lr=0.2, damping=0.1, loss="cross_entropy", momentum=0.5)


KINDS = {"revgn": (rg.RevGN, _revgn_base), "egn": (rg.EGN, _egn_base)}


def _ctor_kwargs(group: dict) -> dict:
    """Constructor arguments reproducing a group's values (the loss entries back to an nn loss)."""
    kwargs = {k: v for k, v in group.items()
              if k not in ("params", "reduction", "label_smoothing", "ignore_index", "initial_lr")}
    if group["reduction"] != "batch_mean":
        cls = nn.MSELoss if group["loss"] == "mse" else nn.CrossEntropyLoss
        extra = dict(label_smoothing=group["label_smoothing"], ignore_index=group["ignore_index"]) \
            if cls is nn.CrossEntropyLoss else {}
        kwargs["loss"] = cls(reduction=group["reduction"], **extra)
    return kwargs


def _genuine(kind):
    """A model and optimizer after two steps (EGN: with a momentum buffer), and its state dict."""
    Opt, base = KINDS[kind]
    model, x, y, kwargs = base()
    opt = Opt(model, **kwargs)
    for _ in range(2):
        opt.step(x, y)
    return model, x, y, kwargs, opt.state_dict()


def _copy(kind, genuine):
    model, x, y, kwargs, saved = genuine
    model = copy.deepcopy(model)
    opt = KINDS[kind][0](model, **kwargs)
    opt.load_state_dict(copy.deepcopy(saved))
    return model, opt


def _draw(rng, kind, opt):
    spec = type(opt).HYPERPARAMETERS
    keys = [("group", k) for k in spec.group] + [("state", k) for k in spec.state]
    where, key = rng.choice(keys)
    pool = GENERIC + VALID.get(key, []) * 3
    value = rng.choice(pool)
    if key == "momentum_buffer":
        p = opt.param_groups[0]["params"][0]
        value = rng.choice([torch.zeros(p.shape[0] + 1, *p.shape[1:], dtype=f64), torch.full_like(p, NAN),
                            torch.randn_like(p), torch.zeros(p.numel(), dtype=f64), 1.0, None])
    return where, key, copy.deepcopy(value), rng.random() < 0.5


def _step(opt, x, y):
    torch.manual_seed(1)  # curvature="sampled" draws labels from the default generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return opt.step(x, y)


def _expected(kind, genuine, opt, state, x, y):
    """Parameters after one step of an optimizer built from scratch with opt's (validated) values."""
    model, _, _, _, saved = genuine
    fresh_model = copy.deepcopy(model)
    group = opt.param_groups[0]
    fresh = KINDS[kind][0](fresh_model, **_ctor_kwargs(group))
    if kind == "egn" and group["momentum"] > 0:
        # The documented update with this state: m = beta m + (1 - beta) dir, step along m / (1 - beta^t).
        params = list(fresh_model.parameters())
        torch.manual_seed(1)
        direction = fresh.direction(x, y)
        if group["line_search"] or group["adaptive_damping"]:
            return None   # those read the quadratic model too: compared through a fresh optimizer below
        beta, t = group["momentum"], state[0].get("step", 0) + 1
        with torch.no_grad():
            for i, (p, d) in enumerate(zip(params, direction)):
                m = state[i].get("momentum_buffer", torch.zeros_like(p))
                p.add_((beta * m + (1 - beta) * d) / (1 - beta ** t), alpha=group["lr"])
        return [p.detach() for p in params]
    fresh_state = {"state": copy.deepcopy(saved["state"]), "param_groups": fresh.state_dict()["param_groups"]}
    fresh.load_state_dict(fresh_state)
    _step(fresh, x, y)
    return [p.detach() for p in fresh_model.parameters()]


def _group_only_expected(kind, genuine, opt, x, y):
    model, _, _, _, saved = genuine
    fresh_model = copy.deepcopy(model)
    fresh = KINDS[kind][0](fresh_model, **_ctor_kwargs(opt.param_groups[0]))
    fresh.load_state_dict({"state": copy.deepcopy(saved["state"]), "param_groups": fresh.state_dict()["param_groups"]})
    _step(fresh, x, y)
    return [p.detach() for p in fresh_model.parameters()]


CASES = 320


@pytest.mark.parametrize("kind", ["revgn", "egn"])
def test_state_fuzz_loaded_state_one_checker(kind):
    rng = random.Random(2026 if kind == "revgn" else 7)
    genuine = _genuine(kind)
    x, y = genuine[1], genuine[2]
    outcomes = {"error": 0, "same step": 0}
    for case in range(CASES // 2):
        model, opt = _copy(kind, genuine)
        where, key, value, through_load = _draw(rng, kind, opt)
        before = [p.detach().clone() for p in model.parameters()]
        saved_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        what = f"case {case}: {where} {key} = {value!r} ({'load_state_dict' if through_load else 'write'})"
        loaded = False
        try:
            if through_load:
                sd = opt.state_dict()
                if where == "group":
                    sd["param_groups"][0][key] = value
                else:
                    sd["state"].setdefault(0, {})[key] = value
                opt.load_state_dict(sd)
                loaded = True
            elif where == "group":
                opt.param_groups[0][key] = value
            else:
                opt.state[opt.param_groups[0]["params"][0]][key] = value
            pre_state = {i: copy.deepcopy(dict(opt.state[p])) for i, p in enumerate(opt.param_groups[0]["params"])}
            _step(opt, x, y)
        except (ValueError, TypeError) as err:
            message = str(err)
            assert "\n" not in message, what
            if not (f"'{key}'" in message or f"{key}=" in message or message.startswith(key)):
                # An error about the batch under these values: a fresh optimizer with them says the same.
                with pytest.raises((ValueError, TypeError)) as fresh_err:
                    _group_only_expected(kind, genuine, opt, x, y)
                assert str(fresh_err.value) == message, (what, message)
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), what
            if through_load and not loaded:   # a refused load leaves the optimizer's own values
                assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == saved_groups, what
            outcomes["error"] += 1
            continue
        got = [p.detach() for p in model.parameters()]
        want = _expected(kind, genuine, opt, pre_state, x, y) if where == "state" else \
            _group_only_expected(kind, genuine, opt, x, y)
        if want is None:
            want = _group_only_expected(kind, genuine, opt, x, y)
        for a, b in zip(got, want):
            if not torch.allclose(a, b, rtol=1e-12, atol=1e-14, equal_nan=False):
                pytest.fail(f"silent change: {what}: the step differs from a fresh optimizer's by "
                            f"{float((a - b).abs().max()):.3g}")
        outcomes["same step"] += 1
    # Both outcomes occur: the draws are not all refused, nor all accepted.
    print(kind, outcomes)
    assert outcomes["error"] > 20 and outcomes["same step"] > 20, outcomes
