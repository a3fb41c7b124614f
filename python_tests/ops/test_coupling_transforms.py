"""torch.func transforms and forward-mode AD through the coupling ops and RevMLP (float64), checked
against the pure-PyTorch references: jvp, vjp, jacrev, jacfwd, vmap (over samples and over weights),
nested transforms and torch.autograd.forward_ad. Before the ops had forward-mode and vmap rules,
torch.func.jvp through the compiled op returned an all-zero tangent, forward_ad raised or returned
None, and jacrev / vjp raised "must override the setup_context staticmethod"."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, jacfwd, jacrev, jvp, vjp, vmap

from revgn_ext import RevMLP, ops
from revgn_ext.ops.coupling import coupling_forward_reference, coupling_inverse_reference, coupling_inverse_tangent_reference
from revgn_ext.ops.activations import ACTIVATIONS
from conftest import rel_err, requires_kernels

ACTS = ACTIVATIONS
D = torch.float64


def block(n=5, half=3, M=7, seed=0):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=D) * std

    return (draw(n, half), draw(n, half), draw(half, M, std=M ** -0.5), draw(half, M, std=0.5), draw(half, std=0.1),
            draw(half, M, std=M ** -0.5), draw(half, M, std=0.5), draw(half, std=0.1))


def tangents(args, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=g, dtype=D) for t in args)


def forward_op(activation, features=True):
    """The wrapper's outputs: (y1, y2, hF, hG) with features, else (y1, y2)."""
    return lambda *a: ops.coupling_forward(*a, activation=activation, return_features=features)[:4 if features else 2]


def forward_ref(activation, features=True):
    return lambda *a: coupling_forward_reference(*a, activation, features)[:4 if features else 2]


def close(got, want, tol=1e-11):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.numel()
            continue
        assert g.shape == w.shape
        assert rel_err(g, w) < tol, rel_err(g, w)
        # the bug: an all-zero tangent where the reference's is not
        assert w.abs().max() == 0 or g.abs().max() > 0


@pytest.mark.parametrize("activation", ACTS)
def test_jvp_matches_reference(activation):
    args = block()
    t = tangents(args)
    _, got = jvp(forward_op(activation), args, t)
    _, want = jvp(forward_ref(activation), args, t)
    close(got, want)
    # tangent on a subset of the arguments (the others held fixed), and without the features
    _, got = jvp(lambda WF, x2: forward_op(activation, False)(args[0], x2, args[2], WF, *args[4:]),
                 (args[3], args[1]), (t[3], t[1]))
    _, want = jvp(lambda WF, x2: forward_ref(activation, False)(args[0], x2, args[2], WF, *args[4:]),
                  (args[3], args[1]), (t[3], t[1]))
    close(got, want)


@pytest.mark.parametrize("activation", ACTS)
def test_vjp_and_jacrev_match_reference(activation):
    args = block(seed=2)
    cot = tangents(block(seed=2)[:2] + (torch.zeros(5, 7, dtype=D),) * 2, seed=3)
    _, fn = vjp(forward_op(activation), *args)
    _, ref_fn = vjp(forward_ref(activation), *args)
    close(fn(cot), ref_fn(cot))
    argnums = tuple(range(8))
    close(jacrev(forward_op(activation, False), argnums=argnums)(*args)[0],
          jacrev(forward_ref(activation, False), argnums=argnums)(*args)[0])
    close(jacfwd(forward_op(activation, False), argnums=argnums)(*args)[1],
          jacrev(forward_ref(activation, False), argnums=argnums)(*args)[1])


@pytest.mark.parametrize("activation", ACTS)
def test_vmap_over_samples_and_over_weights(activation):
    args = block(n=4, seed=4)
    xs = torch.randn(6, 4, 3, dtype=D), torch.randn(4, 6, 3, dtype=D)  # batch dims 0 and 1
    for features in (False, True):
        got = vmap(forward_op(activation, features), in_dims=(0, 1) + (None,) * 6)(*xs, *args[2:])
        want = vmap(forward_ref(activation, features), in_dims=(0, 1) + (None,) * 6)(*xs, *args[2:])
        close(got, want)
    WFs = torch.randn(3, *args[3].shape, dtype=D)
    got = vmap(forward_op(activation), in_dims=(None, None, None, 0) + (None,) * 4)(*args[:3], WFs, *args[4:])
    want = vmap(forward_ref(activation), in_dims=(None, None, None, 0) + (None,) * 4)(*args[:3], WFs, *args[4:])
    close(got, want)


@pytest.mark.parametrize("activation", ACTS)
def test_inverse_and_tangent_under_transforms(activation):
    y1, y2, VF, WF, bF, VG, WG, bG = block(seed=5)
    args = (y1, y2, VF, WF, bF, VG, WG, bG)
    t = tangents(args, seed=6)
    inv = lambda *a: ops.coupling_inverse(*a, activation=activation)  # noqa: E731
    inv_ref = lambda *a: coupling_inverse_reference(*a, activation)  # noqa: E731
    close(jvp(inv, args, t)[1], jvp(inv_ref, args, t)[1])
    close(jacrev(inv, argnums=(0, 3))(*args)[1], jacrev(inv_ref, argnums=(0, 3))(*args)[1])
    pair = (torch.randn(2, 5, 3, dtype=D), torch.randn(2, 5, 3, dtype=D))
    close(vmap(inv, in_dims=(0, 0) + (None,) * 6)(*pair, *args[2:]),
          vmap(inv_ref, in_dims=(0, 0) + (None,) * 6)(*pair, *args[2:]))
    tan = lambda y1, x2, dy1, dy2, WF: ops.coupling_inverse_tangent(y1, x2, dy1, dy2, VF, WF, VG, WG, activation)  # noqa
    tan_ref = lambda y1, x2, dy1, dy2, WF: coupling_inverse_tangent_reference(y1, x2, dy1, dy2, VF, WF, VG, WG,  # noqa
                                                                              activation)
    targs = (y1, y2, bG.expand(5, 3).clone(), y2.flip(0), WF)
    tt = tangents(targs, seed=7)
    close(jvp(tan, targs, tt)[1], jvp(tan_ref, targs, tt)[1])
    close(jacrev(tan, argnums=(0, 1, 4))(*targs)[0], jacrev(tan_ref, argnums=(0, 1, 4))(*targs)[0])


def test_forward_ad_matches_reference():
    args = block(seed=10)
    t = tangents(args, seed=11)
    for activation in ACTS:
        with fwAD.dual_level():
            duals = [fwAD.make_dual(a, dt) for a, dt in zip(args, t)]
            got = [fwAD.unpack_dual(o).tangent for o in ops.coupling_forward(*duals, activation=activation,
                                                                              return_features=True)]
        _, want = jvp(forward_ref(activation), args, t)
        assert all(g is not None for g in got)
        close(tuple(got), want)


@requires_kernels
def test_direct_op_calls_are_not_zero_under_transforms():
    """torch.ops.revgn.* called directly (not through the wrappers) under a torch.func transform runs the
    reference, and under forward_ad / autograd the op's rules."""
    args = block(seed=12)
    t = tangents(args, seed=13)
    op = lambda *a: tuple(torch.ops.revgn.coupling_forward(*a, "tanh", True))  # noqa: E731
    close(jvp(op, args, t)[1], jvp(forward_ref("tanh"), args, t)[1])
    close(jacrev(op, argnums=3)(*args)[0], jacrev(forward_ref("tanh"), argnums=3)(*args)[0])
    with fwAD.dual_level():
        out = op(fwAD.make_dual(args[0], t[0]), *args[1:])
        got = fwAD.unpack_dual(out[1]).tangent
    want = jvp(lambda x1: forward_ref("tanh")(x1, *args[1:]), (args[0],), (t[0],))[1][1]
    close(got, want)


def revmlp_reference(model, params, x):
    """RevMLP's logits from the reference block formulas."""
    x1, x2 = model.split(x)
    for l, blk in enumerate(model.blocks):
        x1, x2, _, _ = coupling_forward_reference(x1, x2, blk.VF, params[f"blocks.{l}.WF"], params[f"blocks.{l}.bF"],
                                                  blk.VG, params[f"blocks.{l}.WG"], params[f"blocks.{l}.bG"],
                                                  blk.activation)
    return torch.cat([x1, x2], 1) @ model.Q


@pytest.mark.parametrize("reversible", [False, True])
@pytest.mark.parametrize("hidden", [6, None])
def test_revmlp_under_transforms_matches_reference(reversible, hidden):
    model = RevMLP(7, 3, num_blocks=2, hidden=hidden, activations=("identity", "gelu"), weight_std=0.4, seed=1,
                   reversible_backprop=reversible, dtype=D)
    x = torch.randn(4, 7, dtype=D, generator=torch.Generator().manual_seed(14))
    params = {k: v.detach() for k, v in model.named_parameters()}
    tp = {k: torch.randn_like(v) for k, v in params.items()}
    f = lambda p: functional_call(model, p, (x,))  # noqa: E731
    g = lambda p: revmlp_reference(model, p, x)  # noqa: E731
    close(jvp(f, (params,), (tp,))[1], jvp(g, (params,), (tp,))[1])
    got, want = jacrev(f)(params), jacrev(g)(params)
    close(tuple(got.values()), tuple(want.values()))
    cot = torch.randn(4, 3, dtype=D)
    close(tuple(vjp(f, params)[1](cot)[0].values()), tuple(vjp(g, params)[1](cot)[0].values()))
    # per-sample outputs and per-sample Jacobians (vmap over the batch, over jacrev)
    close(vmap(lambda xi: model(xi[None])[0])(x), revmlp_reference(model, params, x))
    per = vmap(lambda xi: jacrev(lambda p: functional_call(model, p, (xi[None],))[0])(params)["blocks.1.WG"])(x)
    per_ref = vmap(lambda xi: jacrev(lambda p: revmlp_reference(model, p, xi[None])[0])(params)["blocks.1.WG"])(x)
    close(per, per_ref)
    # forward-mode AD through the module with dual parameters
    with fwAD.dual_level():
        dual = {k: fwAD.make_dual(v, tp[k]) for k, v in params.items()}
        tangent = fwAD.unpack_dual(functional_call(model, dual, (x,))).tangent
    assert tangent is not None
    close(tangent, jvp(g, (params,), (tp,))[1])
    # second order: the Hessian of a scalar loss (jacfwd over jacrev)
    loss = lambda w: f({**params, "blocks.0.bF": w}).pow(2).sum()  # noqa: E731
    loss_ref = lambda w: g({**params, "blocks.0.bF": w}).pow(2).sum()  # noqa: E731
    close(jacfwd(jacrev(loss))(params["blocks.0.bF"]), jacfwd(jacrev(loss_ref))(params["blocks.0.bF"]), 1e-9)
