"""``EGN(compile=True)``: the solve of a verified call pattern as one ``torch.compile`` graph.

At small batches an eager EGN step is mostly Python and small-tensor overhead (about 220 aten
operations, benchmarks/results/egn.md). For models whose trainable parameters all belong to
``nn.Linear`` modules called once per forward on (b, in) inputs, this module writes the solve of
:meth:`revgn_ext.egn.EGN._solve_once` out as plain tensor code, compiled once per input signature:

    forward with recording hooks -> loss factor S, target t -> m backward passes into the layers'
    output gradients G -> K = sum_l (X_l X_l^T + 1) * (G_l G_l^T) (Kronecker form) -> plain Cholesky
    of K + b lambda I -> u -> the back-projection J^T S u by autograd -> the direction check of
    every parameter (the layers' sum_ia u_ia V_p[(i, a)] against autograd's, the tolerance of
    :func:`revgn_ext.egn.gram.verification.mismatches`) -> ||dir||, the loss.

What only the eager step does stays there: the first step of every input signature runs eagerly
(its random-weight check, per-sample check, memory estimate and the factor op's policy), and so does
every step whose compiled verdict is not clean: a factor the op would retry (:func:`.cholesky.clean`),
a non-finite loss or direction, a parameter whose direction check disagrees, a call pattern the
eager step has not verified, a forward that drew random numbers. Such a step's compiled results are
dropped before anything is written and the eager step decides on the same batch, so a compiled step
gives the eager step's update (to rounding) or none of its own. Line search, adaptive damping,
curvature other than ``"exact"``, per-position losses and data-parallel runs always take the eager
step (momentum does not need it: it acts on the direction).
"""
from __future__ import annotations

import contextlib
import math
import time
import types
import warnings
import weakref

import torch
from torch import nn

from .._inputs import ModelInputs
from .._warn import user_stacklevel
from .cholesky import PLAIN_MAX_ROWS, clean, plain_cholesky
from .gram import LayerwiseGram, UnsupportedModelError, check_samplewise
from .gram.checks import RandomForward
from .gram.verification import aligned_mismatches
from .inputs import check_inputs, targets
from .loss_factors import apply_factor, curvature_factor, factor_matrix
from .solution import Solution

__all__ = ["CompiledSolve", "compile_options"]


def compile_options(compile) -> dict | None:
    """``EGN(compile=...)`` as torch.compile's keyword arguments: False -> None, True -> {}, a dict
    (e.g. ``{"backend": "aot_eager"}``, ``{"mode": "max-autotune-no-cudagraphs"}``) as given."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, dict) and all(isinstance(k, str) for k in compile):
        if "fullgraph" in compile or "dynamic" in compile:
            raise ValueError("compile: 'fullgraph' and 'dynamic' are chosen by EGN (one graph per input "
                             "signature); pass backend / mode / options only")
        return dict(compile)
    raise ValueError(f"compile must be True, False or a dict of torch.compile arguments, got {compile!r}")


class _Recorder:
    """Forward hooks registered once on the linear layers (per-call hooks would change the compiled
    graph's guards), recording only while ``on``."""

    def __init__(self, modules):
        self.on = False
        self.tape: list | None = None   # set by the traced solve
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, inputs, output):
        if self.on:
            self.tape.append((module, inputs[0].detach(), output))
            return output.clone()   # a later in-place change (ReLU(inplace=True)) must not touch it
        return None

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class CompiledSolve:
    """The compiled solve of one EGN optimizer (see the module docstring)."""

    def __init__(self, owner, options: dict):
        self.options = options
        self.reason = _structure_obstacle(owner)   # why no step compiles, or None
        why = self.obstacle(owner, None)
        if why is not None:   # said once, at construction; options changed later are not announced
            warnings.warn(f"EGN(compile=...): {why}; the steps run eagerly", RuntimeWarning,
                          stacklevel=user_stacklevel())
        self.verified: dict = {}   # input signature -> output width c, after an eager step on it passed
        self.recorder = None
        self._fn = None
        self._warned = False
        if self.reason is None:
            owned = {id(p) for p in owner.param_groups[0]["params"]}
            self.linears = [m for m in owner.model.modules() if isinstance(m, nn.Linear)
                            and any(id(p) in owned for p in m.parameters(recurse=False))]
            self.recorder = _Recorder(self.linears)
            weakref.finalize(owner, self.recorder.remove)   # no hooks left behind by a dropped optimizer

    def obstacle(self, owner, y) -> str | None:
        """Why this step takes the eager path (None: it may compile)."""
        if self.reason is not None:
            return self.reason
        group = owner.param_groups[0]
        if group["line_search"] or group["adaptive_damping"]:
            return "line_search and adaptive_damping are not compiled"
        if group.get("curvature", "exact") != "exact":
            return "curvature other than 'exact' is not compiled"
        if y is not None and not isinstance(y, torch.Tensor):
            return "per-position losses are not compiled"
        if owner._assembler.fallback or owner._assembler.capturable:
            return "parameters outside nn.Linear's rule are not compiled"
        if group["params"][0].device.type != "cpu":
            return "the compiled solve is tested on the CPU only"
        return None

    def note_eager(self, owner, x, sol) -> None:
        """After an eager solve that gave a direction: its input signature may compile from now on."""
        if self.reason is None and sol.direction is not None and sol.layout is None:
            self.verified[(x.signature(), x.batch_size)] = sol.f.shape[1]

    def solve(self, owner, x: ModelInputs, y, lam: float) -> Solution | None:
        """The solve by the compiled graph, or None: the caller runs the eager solve."""
        key = (x.signature(), x.batch_size)
        c = self.verified.get(key)
        if c is None or self.obstacle(owner, y) is not None:
            return None
        group = owner.param_groups[0]
        params = group["params"]
        b = x.batch_size
        # the eager step's checks, naming the argument; finiteness is read with the verdict, stricter
        check_inputs(x, y, owner.model, params[0], read_finite=False)
        check_samplewise(owner.model)
        like = params[0].new_empty(b, c)
        y = targets(y, like, group)
        start = time.perf_counter()
        rec = self.recorder
        try:
            with RandomForward(owner.model, x.first):
                try:   # the option on every call: a guard that fails (a changed module flag) retraces here
                    rec.on = True
                    with _tracing_autograd():
                        out = self._compiled()(owner.model, params, self.linears, rec, x.args, x.kwargs, y,
                                               like.new_tensor(b * lam), group["loss"])
                except Exception as err:   # noqa: BLE001 - the eager step decides, and raises what it must
                    self._warn(f"the compiled solve raised {type(err).__name__}: {err}")
                    return None
                finally:
                    rec.on, rec.tape = False, None
        except UnsupportedModelError:   # the forward drew random numbers: the eager step refuses it
            return None
        if out is None:   # the traced call pattern is not one the compiled solve covers
            return None
        verdict, direction, f, yt, loss = out
        values = verdict.tolist()   # the one host sync
        summary, norm, loss_value, flags = values[:4], values[4], values[5], values[6:]   # flags[0]: inputs
        if not (clean(summary, f.dtype) and math.isfinite(norm) and math.isfinite(loss_value)) or any(flags):
            return None
        return Solution(f, yt, None, b, loss, {"solve": time.perf_counter() - start}, direction=direction,
                        norm=norm, loss_value=loss_value)

    def _compiled(self):
        if self._fn is None:   # a code object of its own: dynamo keeps its graphs (and its limit) per code
            own = types.FunctionType(_solve.__code__.replace(co_name="_solve"), _solve.__globals__, "_solve")
            self._fn = torch.compile(own, dynamic=False, **self.options)
        return self._fn

    def _warn(self, what: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"EGN(compile=...): {what}; the eager step runs instead (said once)",
                          RuntimeWarning, stacklevel=user_stacklevel())


@contextlib.contextmanager
def _tracing_autograd():
    """``torch.autograd.grad`` traced into the graph: without it a trace breaks at each call, and the
    layers' outputs leave the graph as outputs that no gradient reaches."""
    config = torch._dynamo.config
    before = config.trace_autograd_ops
    config.trace_autograd_ops = True
    try:
        yield
    finally:
        config.trace_autograd_ops = before


def _structure_obstacle(owner) -> str | None:
    """Why the model's structure rules out the compiled solve, or None: every trainable parameter must
    be the weight or bias of an ``nn.Linear`` (not a subclass with its own forward) that owns it alone."""
    if owner._ranks.world > 1:
        return "data-parallel EGN is not compiled"
    if not isinstance(owner._assembler, LayerwiseGram):
        return "gram='functional' is not compiled"
    owners: dict[int, int] = {}
    for module in owner.model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for p in owner.param_groups[0]["params"]:
        mods = owner._assembler.covered.get(id(p), [])
        if len(mods) != 1 or owners.get(id(p)) != 1:
            return "a parameter shared by several modules, or outside any module, is not compiled"
        module = mods[0][1]
        if type(module).forward is not nn.Linear.forward:
            return f"only nn.Linear layers compile (the model has {type(module).__name__})"
    return None


def _solve(model, params, linears, rec, args, kwargs, y, damping, loss: str):
    """The traced solve: (verdict, direction, f, y, loss) or None for a call pattern it does not cover.
    verdict = [Cholesky summary (4), ||dir||, loss, inputs not all finite, one disagreement flag per
    parameter]."""
    inputs = [t for t in (*args, *kwargs.values(), y) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    bad_inputs = torch.stack([~torch.isfinite(t).all() for t in inputs]).any() if inputs else torch.tensor(False)
    tape = rec.tape = []   # made here: a list from outside would hand the outputs' graph back out
    f = model(*args, **kwargs)
    rec.tape = None
    if not isinstance(f, torch.Tensor) or f.dim() == 0:
        return None
    b = y.shape[0]
    f = f.reshape(b, -1)
    if len(tape) != len(linears) or len({id(m) for m, _, _ in tape}) != len(tape):
        return None   # a layer called twice, or not at all
    if any(inp.dim() != 2 or inp.shape[0] != b for _, inp, _ in tape):
        return None   # a layer applied to positions, not to samples
    factor = curvature_factor(loss, "exact", f.detach(), y)
    S = factor_matrix(factor)   # (b, c, m)
    m = S.shape[2]
    if b * m > PLAIN_MAX_ROWS:
        return None
    outs = [o for _, _, o in tape]
    by_column = [torch.autograd.grad(f, outs, S[:, :, a], retain_graph=True) for a in range(m)]
    K, parts = None, []
    for k, (module, inp, _) in enumerate(tape):
        G = torch.stack([g[k] for g in by_column], 1)   # (b, m, out)
        Gf = G.reshape(b * m, -1)
        w, bias = module.weight, module.bias
        XX = inp @ inp.T if w.requires_grad else inp.new_zeros(b, b)
        if bias is not None and bias.requires_grad:
            XX = XX + 1
        term = (Gf @ Gf.T).view(b, m, b, m) * XX[:, None, :, None]
        K = term if K is None else K + term
        parts.append((module, inp, G))
    n = b * m
    damped = K.reshape(n, n) + damping * torch.eye(n, dtype=f.dtype, device=f.device)
    L, summary = plain_cholesky(damped)
    u = torch.cholesky_solve(factor.target.reshape(n, 1), L).reshape(b, m)
    truth = torch.autograd.grad(f, params, apply_factor(factor, u))
    ours = {}
    for module, inp, G in parts:
        Gu = (G * u[:, :, None]).sum(1)   # (b, out)
        if module.weight.requires_grad:
            ours[id(module.weight)] = (module.weight, Gu.T @ inp)
        if module.bias is not None and module.bias.requires_grad:
            ours[id(module.bias)] = (module.bias, Gu.sum(0))
    norms = torch._foreach_norm(truth)
    _, flags = aligned_mismatches(ours, params, truth, f.dtype, norms)
    norm = torch.linalg.vector_norm(torch.stack(norms))
    loss_value = factor.loss.detach()
    verdict = torch.cat([summary, norm.reshape(1), loss_value.reshape(1).to(f.dtype),
                         bad_inputs.reshape(1).to(f.dtype), flags.to(f.dtype)])
    return verdict, torch._foreach_neg(truth), f.detach(), y, loss_value
