"""Property test: EGN's direction on random small models equals the dense brute-force LM solve.

Each case draws (from its own seed) an input kind (features, sequence, image, token ids), a random mix
of layers (Linear on any rank, Conv1d/Conv2d with random stride/padding/dilation/groups, Embedding,
LayerNorm/GroupNorm/BatchNorm-eval, pooling, attention on sequences: nn.MultiheadAttention,
TransformerEncoderLayer pre- or post-norm, hand-written attention through F.linear / x @ W.T /
torch.matmul(x, W) / F.scaled_dot_product_attention; custom parameters no rule covers), tied weights (two
modules sharing a weight, and a weight reused outside any module through F.linear(h, W.t())), frozen
parameters, activations, a loss, saturated outputs (the last layer's weight times 30, 300 or 3000 for
cross-entropy and BCE, about a third of those), a curvature (exact or true-class), a dtype (float32 or float64) and the
Gram route (``gram="auto"``, or ``"layerwise"``, which must refuse exactly the models with a use no rule
covers).
About a third of the cases call the model with several inputs (:class:`MultiInput`: a second per-sample
input, a per-sample float gate and bool mask, a constant without a batch dimension and a non-tensor
option), passed as a tuple or a dict.
Sequence inputs sometimes keep their positions to the end (coupled by a running sum): outputs
(b, T, c) with a loss per position, cross-entropy labels (b, T) padded with -100 at random, or
per-element MSE / BCE targets of the output's shape.
The reference is the parameter-space solve -(J^T S S^T J / b + lambda I)^{-1} g with J from
torch.func.jacrev in float64. A silent wrong answer on any of these shows up as a mismatch.

``REVGN_PROPERTY_CASES`` sets the number of cases (default 150: about 30 s on one core of the loaded 2-core box, well inside a minute).
"""
import copy
import math
import os
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import revgn_ext  # noqa: F401
from revgn_ext.egn import EGN
from revgn_ext.egn import loss_factors as lf
from revgn_ext.egn.gram import UnsupportedModelError

from _dense import call_model, dense_direction

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

CASES = int(os.environ.get("REVGN_PROPERTY_CASES", "150"))
ACTS = [torch.tanh, torch.relu, F.gelu, torch.sigmoid, F.silu, lambda h: h]


class Gain(nn.Module):
    """A parameter no layer rule covers."""

    def __init__(self, shape):
        super().__init__()
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(shape))

    def forward(self, h):
        return h * self.gain


class SelfAttention(nn.Module):
    """nn.MultiheadAttention on (b, T, d), batch first."""

    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, h):
        return self.attn(h, h, h, need_weights=False)[0]


class HandAttention(nn.Module):
    """Single-head attention from parameters: F.linear, x @ W.T, torch.matmul(x, W) (W stored (in, out)),
    written out or through F.scaled_dot_product_attention."""

    def __init__(self, d, sdpa):
        super().__init__()
        self.wq = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.bq = nn.Parameter(0.1 * torch.randn(d))
        self.wk = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.wv = nn.Parameter(torch.randn(d, d) / math.sqrt(d))
        self.sdpa = sdpa

    def forward(self, h):
        q, k, v = F.linear(h, self.wq, self.bq), h @ self.wk.T, torch.matmul(h, self.wv)
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


def attention(rng, d):
    kind = rng.choice(["mha", "encoder", "hand", "hand-sdpa"])
    heads = rng.choice([1, 2]) if d % 2 == 0 else 1
    if kind == "mha":
        return SelfAttention(d, heads)
    if kind == "encoder":
        return nn.TransformerEncoderLayer(d, heads, rng.choice([3, 4]), dropout=0.0, batch_first=True,
                                          norm_first=rng.random() < 0.5).eval()
    return HandAttention(d, kind == "hand-sdpa")


class RandomNet(nn.Module):
    """A forward interpreted from ``ops``: ("mod", i), ("act", i), ("transposed", i), ("mean",), ("flatten",)."""

    def __init__(self):
        super().__init__()
        self.mods = nn.ModuleList()
        self.ops = []

    def forward(self, x):
        h = x
        for op in self.ops:
            if op[0] == "mod":
                h = self.mods[op[1]](h)
            elif op[0] == "act":
                h = ACTS[op[1]](h)
            elif op[0] == "transposed":
                h = F.linear(h, self.mods[op[1]].weight.t())
            elif op[0] == "mean":
                h = h.mean(1)
            elif op[0] == "flatten":
                h = h.flatten(1)
            elif op[0] == "cumsum":   # couples the positions of a sample (a causal running sum)
                h = h.cumsum(1)
            elif op[0] == "pool":
                h = F.avg_pool2d(h, 2) if h.dim() == 4 else F.max_pool1d(h, 2)
        return h


class MultiInput(nn.Module):
    """The drawn net on x plus a branch on a second per-sample input, gated per sample by a float and a
    bool mask, with a constant (1, c) offset and a non-tensor scale: model(x, side, gate, offset, scale, keep)."""

    def __init__(self, net, width, c):
        super().__init__()
        self.net, self.side = net, nn.Linear(width, c)

    def forward(self, x, side, gate, offset=None, scale=1.0, keep=None):
        h = self.net(x)   # (b, c), or (b, T, c) for a loss per position
        per = (-1,) + (1,) * (h.dim() - 1)
        branch = self.side(torch.tanh(side)).view(h.shape[0], *(1,) * (h.dim() - 2), -1)
        out = (h + scale * branch) * gate.view(per) + offset
        return torch.where(keep.view(per), out, -out)


def several_inputs(rng, net, x, c):
    """net wrapped in :class:`MultiInput` and its inputs, as a tuple or a dict."""
    b, width = x.shape[0], rng.choice([1, 2, 3])
    model = MultiInput(net, width, c).double()
    inputs = dict(x=x, side=torch.randn(b, width, dtype=torch.float64),
                  gate=torch.rand(b, dtype=torch.float64) + 0.5, offset=torch.randn(1, c, dtype=torch.float64),
                  scale=rng.choice([0.5, 2.0]), keep=torch.rand(b) < 0.7)
    return model, (tuple(inputs.values()) if rng.random() < 0.5 else inputs)


def cast(x, dtype):
    """The float tensors of the inputs x in ``dtype``."""
    def one(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    if isinstance(x, dict):
        return {k: one(v) for k, v in x.items()}
    return tuple(one(t) for t in x) if isinstance(x, tuple) else one(x)


def build_case(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    net = RandomNet()
    b = rng.choice([3, 4, 5])
    kind = rng.choice(["features", "sequence", "image", "image1d", "tokens"])
    if kind == "features":
        x = torch.randn(b, rng.choice([2, 3, 4]), dtype=torch.float64)
    elif kind == "sequence":
        x = torch.randn(b, rng.choice([2, 3]), rng.choice([2, 3]), dtype=torch.float64)
    elif kind == "image":
        x = torch.randn(b, rng.choice([1, 2]), rng.choice([4, 5]), rng.choice([4, 5]), dtype=torch.float64)
    elif kind == "image1d":
        x = torch.randn(b, rng.choice([1, 2]), rng.choice([5, 7]), dtype=torch.float64)
    else:
        x = torch.randint(0, 6, (b, rng.choice([2, 3])))
    probe = x

    def add(module, op=None):
        nonlocal probe
        net.mods.append(module.double())
        net.ops.append(op or ("mod", len(net.mods) - 1))
        probe = net.ops[-1] and RandomNet.forward(_single(net, net.ops[-1]), probe)

    def act():
        net.ops.append(("act", rng.randrange(len(ACTS))))
        nonlocal probe
        probe = ACTS[net.ops[-1][1]](probe)

    if kind == "tokens":
        add(nn.Embedding(6, rng.choice([2, 3]), padding_idx=rng.choice([None, 0])))
        kind = "sequence"
    per_token = kind == "sequence" and rng.random() < 0.4   # outputs (b, T, c): a loss per position
    if kind in ("image", "image1d"):
        conv = nn.Conv2d if kind == "image" else nn.Conv1d
        for _ in range(rng.choice([1, 2])):
            cin = probe.shape[1]
            groups = rng.choice([g for g in (1, 2) if cin % g == 0])
            cout = groups * rng.choice([1, 2])
            stride = rng.choice([1, 2])
            kw = dict(kernel_size=rng.choice([1, 2, 3]), stride=stride, dilation=rng.choice([1, 2]),
                      padding=rng.choice([0, 1] + (["same"] if stride == 1 else [])), groups=groups,
                      bias=rng.random() < 0.7)
            try:
                module = conv(cin, cout, **kw).double()
                if module(probe).shape[-1] < 1:
                    continue
            except RuntimeError:
                continue
            add(module)
            if rng.random() < 0.4 and cout % 2 == 0 and probe[0, :cout // 2].numel() > 1:
                add(nn.GroupNorm(2, cout))
            elif rng.random() < 0.3:
                bn = (nn.BatchNorm2d if kind == "image" else nn.BatchNorm1d)(cout)
                with torch.no_grad():
                    bn.running_mean.uniform_(-1, 1)
                    bn.running_var.uniform_(0.5, 2)
                    bn.weight.uniform_(0.5, 1.5)
                add(bn.eval())
            act()
            if rng.random() < 0.3 and min(probe.shape[2:]) >= 2:
                net.ops.append(("pool",))
                probe = RandomNet.forward(_single(net, ("pool",)), probe)
        net.ops.append(("flatten",))
        probe = probe.flatten(1)
    if kind == "sequence":
        for _ in range(rng.choice([1, 2])):
            add(nn.Linear(probe.shape[-1], rng.choice([2, 3, 4])))
            if rng.random() < 0.4:
                add(nn.LayerNorm(probe.shape[-1]))
            act()
        # (not on 2 features: a LayerNorm over 2 features passes back a gradient that float32 leaves to
        # rounding, in which the layout probe of the linear calls before it finds no sample axis)
        if rng.random() < 0.5 and probe.shape[-1] > 2:
            add(attention(rng, probe.shape[-1]))
        if per_token:
            net.ops.append(("cumsum",))
            probe = probe.cumsum(1)
        else:
            net.ops.append(("mean",) if rng.random() < 0.5 else ("flatten",))
            probe = probe.mean(1) if net.ops[-1][0] == "mean" else probe.flatten(1)
    # Feature stage, with ties and custom parameters.
    linears = []
    for _ in range(rng.choice([2, 3, 4])):
        width = probe.shape[-1]
        choice = rng.random()
        square = [i for i in linears if net.mods[i].weight.shape == (width, width)]
        transposable = [i for i in linears if net.mods[i].weight.shape[0] == width]
        if choice < 0.3 and square:
            tied = nn.Linear(width, width)
            tied.weight = net.mods[rng.choice(square)].weight   # the same Parameter in two modules
            add(tied)
        elif choice < 0.45 and transposable:
            i = rng.choice(transposable)
            net.ops.append(("transposed", i))
            probe = F.linear(probe, net.mods[i].weight.t())
        elif choice < 0.55:
            add(Gain(width))
        else:   # often square, so that later layers can tie to it
            add(nn.Linear(width, width if rng.random() < 0.5 else rng.choice([2, 3, 4])))
            linears.append(len(net.mods) - 1)
        act()
    loss = rng.choice(["mse", "cross_entropy", "binary_cross_entropy"])
    c = rng.choice([1, 2]) if loss == "binary_cross_entropy" else rng.choice([2, 3])
    add(nn.Linear(probe.shape[-1], c))
    # Frozen parameters: each with probability 0.2, keeping at least one trainable.
    params = list(net.parameters())
    for p in params:
        if rng.random() < 0.2:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in net.parameters()):
        params[-1].requires_grad_(True)
    shape = (b, probe.shape[1]) if per_token else (b,)   # per token: labels (b, T), padding -100
    if loss == "mse":
        y = torch.randn(*shape, c, dtype=torch.float64)
    elif loss == "cross_entropy":
        y = torch.randint(0, c, shape)
        if per_token:
            y[torch.rand(shape) < 0.3] = -100
            y[0, 0] = 0
    else:
        y = torch.randint(0, 2, (*shape, c)).double()
    curvature = "exact" if rng.random() < 0.7 else "true-class"
    dtype = rng.choice([torch.float32, torch.float64])
    damping = rng.choice([0.3, 1.0])
    gram = rng.choice(["auto", "layerwise"])
    if rng.random() < 0.35:
        net, x = several_inputs(rng, net, x, c)
    if loss != "mse" and rng.random() < 0.3:   # saturated outputs: log p of some labels far below -20
        head = (net.net if isinstance(net, MultiInput) else net).mods[-1]
        with torch.no_grad():
            head.weight.mul_(rng.choice([30.0, 300.0, 3000.0]))   # 3000: float32 overflows t
    return net, x, y, loss, curvature, dtype, damping, gram


def _single(net, op):
    """A RandomNet that runs only ``op`` with net's modules (for shape probes while building)."""
    one = RandomNet()
    one.mods = net.mods
    one.ops = [op]
    return one


def true_class_S(model, x, y, loss, index=None):
    """The observed-label factor S_i = e_i (b, c, 1) at the model's outputs (per position with index)."""
    f = call_model(model, x).detach()
    f = f.reshape(f.shape[0], -1)
    if index is not None:
        f = f.reshape(-1)[index]
    return lf.factor_matrix(lf.true_class_factor(loss, f, y))


def positions(net, x, y, loss):
    """(targets, index) of the dense reference: per-token cross-entropy reads the kept positions'
    logits (index (P, C) into the flattened outputs); other losses sum over a sample's outputs."""
    if loss != "cross_entropy" or y.dim() == 1:
        return y.reshape(y.shape[0], -1) if y.is_floating_point() else y, None
    c = call_model(net, x).shape[-1]
    keep = (y != -100).reshape(-1)
    return y.reshape(-1)[keep], torch.arange(y.numel() * c).view(-1, c)[keep]


@pytest.mark.parametrize("seed", range(CASES))
def test_random_model_direction_equals_dense_solve(seed):
    net, x, y, loss, curvature, dtype, damping, gram = build_case(seed)
    yr, index = positions(net, x, y, loss)
    ref = dense_direction(net, x, yr, loss, damping, index=index,
                          S=None if curvature == "exact" else true_class_S(net, x, yr, loss, index))
    model = copy.deepcopy(net).to(dtype)
    xs = cast(x, dtype)
    ys = y.to(dtype) if y.is_floating_point() else y
    # layerwise refuses only models with a use of a parameter that no rule covers (and may accept one
    # whose such use contributes nothing here: the comparison below decides)
    base = net.net if isinstance(net, MultiInput) else net
    uncovered = any(isinstance(mod, Gain) and mod.gain.requires_grad for mod in base.mods) or any(
        op[0] == "transposed" and base.mods[op[1]].weight.requires_grad for op in base.ops)
    try:
        opt = EGN(model, lr=0.1, damping=damping, loss=loss, curvature=curvature, gram=gram)
        d = torch.cat([t.double().reshape(-1) for t in opt.direction(xs, ys)])
    except UnsupportedModelError as e:
        assert gram == "layerwise" and uncovered, f"case {seed}: refused ({e}); model {net.ops} {net.mods}"
        return
    err = float(torch.linalg.vector_norm(d - ref))
    scale = float(torch.linalg.vector_norm(ref)) + 1e-30
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    assert err <= tol * max(scale, 1e-3), (
        f"case {seed}: relative error {err / scale:.3g} ({dtype}, {loss}, {curvature}, gram route "
        f"{opt._assembler.method}, fallback {opt._assembler.fallback_names}); model {net}")
