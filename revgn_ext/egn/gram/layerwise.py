"""The layer-wise Gram: K = sum over parameters of V_p V_p^T, from the layer rules.

V_p[(i, a)] is the per-sample gradient of output column a of sample i with respect to parameter p.
It comes from the rule of the modules that use p (:mod:`revgn_ext.egn.rules`), recorded by forward
hooks, and from m backward passes with grad_outputs = columns[a] (sample i's output depends on sample
i only); it is never formed where the rule gives a Kronecker form (:mod:`.factors`). A parameter used
several times (tied weights, a module called twice) gets the *sum* of its uses' per-sample gradients,
so the cross terms between uses are in K: uses of the same Kronecker kind are concatenated along
positions, others are summed in dense form.

Parameters that no module rule covers but that the model passes to ``F.linear`` or ``@`` (attention
projections, hand-written layers) are recorded by :class:`revgn_ext.egn.capture.LinearCapture` and take
the rule of :mod:`revgn_ext.egn.rules.functional_linear`; the sample axis of such a call is found once
per call pattern (:func:`revgn_ext.egn.capture.resolve_layouts`). Parameters no rule covers otherwise
fall back *per parameter* to torch.func (:mod:`.functional`);
``fallback=False`` (``gram="layerwise"``) refuses them instead, naming the parameter, its module and
the ops the forward passes it to. The factors are
verified against autograd (:mod:`.verification`); a parameter that disagrees moves to torch.func from
then on, with a RuntimeWarning naming it.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ..._inputs import ModelInputs
from ..._warn import user_stacklevel
from ..capture import LinearCall, LinearCapture, differentiable_attention, parameter_ops, resolve_layouts
from ..rules import KronInput, rule_for
from ..rules.linear import LinearRule
from ..rules.functional_linear import FunctionalLinearRule
from . import factors as factor_forms
from .assembly import Assembly
from .checks import DEFAULT_MEMORY_LIMIT, RandomForward, UnsupportedModelError, check_memory, outputs_of
from .factors import DenseFactor, KronFactor
from .functional import per_sample_jacobian_rows
from .verification import MISMATCH, random_weight_check

__all__ = ["LayerwiseGram", "layerwise_obstacle"]

_CALL_RULE = FunctionalLinearRule()
_MERGE_SLACK = 1.1   # a shared Kronecker factor is kept up to this factor above the dense ones' cost


def _coverage(model: nn.Module, params):
    """(covered, uncovered): id(param) -> [(module name, module, attr)] for the rules' modules, and
    {id(param): why} for trainable parameters some registering module has no rule for."""
    trainable = {id(p) for p in params}
    covered: dict[int, list] = {}
    uncovered: dict[int, str] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        rule = rule_for(module)
        obstacle = rule.obstacle(module) if rule is not None else None
        attrs = set(rule.attrs(module)) if rule is not None else set()
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in trainable:
                continue
            full = f"{mname}.{pname}" if mname else pname
            label = f"parameter '{full}' of module '{mname or type(model).__name__}' ({type(module).__name__})"
            if rule is None:
                uncovered[id(p)] = f"{label}: no layer rule for {type(module).__name__}"
            elif obstacle is not None:
                uncovered[id(p)] = f"{label}: {obstacle}"
            elif pname not in attrs:
                uncovered[id(p)] = f"{label}: not covered by the {type(module).__name__} rule"
            else:
                covered.setdefault(id(p), []).append((mname, module, pname))
    return covered, uncovered


def layerwise_obstacle(model: nn.Module, params) -> str | None:
    """Why the layer rules do not cover every trainable parameter (naming the first), or None."""
    _, uncovered = _coverage(model, params)
    return next(iter(uncovered.values()), None)


class _Use:
    """One recorded call of a covered module: its input, output, and where its gradients go."""
    __slots__ = ("name", "module", "rule", "inp", "out", "kron", "slots", "dense", "former", "version")

    def __init__(self, name, module, rule, inp, out, version=None):
        self.name, self.module, self.rule, self.inp, self.out = name, module, rule, inp, out
        self.version = version   # out._version when recorded, where out was handed on itself (not a copy)
        self.kron = {}    # attr -> KronInput
        self.slots = []   # (factor, first position) where this use's G goes
        self.dense = []   # (attr, dense factor, first column, rows, copy): see _dense_factor
        self.former = None   # g -> per-sample gradients of the dense attrs (the rule's dense_former)


class LayerwiseGram:
    """K = S^T J J^T S as a sum over parameters, from the layer rules (see the module docstring).

    ``fallback``: parameters the rules do not cover get per-sample Jacobians from torch.func (True,
    ``gram="auto"``) or raise :class:`UnsupportedModelError` (False, ``gram="layerwise"``).
    ``block_rows``: rows of K per block (None: from the block byte budget).
    """

    def __init__(self, model: nn.Module, params, memory_limit: int = DEFAULT_MEMORY_LIMIT, fallback: bool = True,
                 block_rows: int | None = None):
        self.model = model
        self.memory_limit = memory_limit
        self.fallback_enabled = fallback
        self.block_rows = block_rows
        self.params = list(params)
        self.names = {id(p): n for n, p in model.named_parameters()}
        covered, uncovered = _coverage(model, self.params)
        # A parameter of 1 or 2 dims may be the weight or bias of a linear call (F.linear, @), which
        # LinearCapture records during the forward; ``gram="layerwise"`` refuses the others now, and those
        # that no call covers after the forward (see _refuse_uncaptured).
        # (A parameter of a module whose rule does not cover it is used by that module's own op.)
        dims = {id(p): p.dim() for p in self.params}
        ruled = {id(p) for m in model.modules() if rule_for(m) is not None for p in m.parameters(recurse=False)}
        self.capturable = {pid for pid in uncovered if dims[pid] in (1, 2) and pid not in ruled}
        hard = [why if pid in ruled else f"{why} (nor is a parameter of {dims[pid]} dims a linear call's weight or bias)"
                for pid, why in uncovered.items() if pid not in self.capturable]
        if hard and not fallback:
            raise UnsupportedModelError(
                f"layerwise Gram unavailable for {type(model).__name__}: {hard[0]}; gram='auto' computes the "
                "per-sample Jacobian of such parameters with torch.func (vmap of jacrev), per layer")
        self.uncovered = uncovered
        self.functional = set(uncovered)   # ids of parameters on the torch.func route unless captured
        self.fallback = set(uncovered)     # this solve's torch.func route: functional less what was captured
        self.covered = covered
        self._layouts: dict = {}           # call pattern -> the calls' sample layouts (None: no layout)
        self._plans: dict = {}             # verified call pattern -> its factor plan (see _describe)
        self._warned = set()
        self._generator = None
        self._verified: set = set()   # call patterns whose random-weight check passed
        self._copy_outputs = False    # hand on copies of the layers' outputs (the forward changed one in place)
        self._hooked = None           # (torch.func route, the modules to record on it)

    @property
    def method(self) -> str:
        return "layerwise" if not self.fallback else "layerwise+functional"

    @property
    def fallback_names(self) -> list[str]:
        return [self.names.get(id(p), "?") for p in self.params if id(p) in self.fallback]

    # -- the one call ------------------------------------------------------------------------------

    def assemble(self, x, system, ranks) -> Assembly:
        """One solve's K (see :mod:`.assembly`) at the inputs x (a tensor or :class:`ModelInputs`): the
        recorded forward, the caller's columns, the m backward passes into the factors, their
        verification, then K in row blocks."""
        tape: list[_Use] = []
        outputs = []
        x = ModelInputs.of(x)

        def forward(inputs):
            outputs.append(self._recorded_forward(ModelInputs.of(inputs), tape))
            return outputs[-1]

        columns, payload = system(forward)
        f = outputs[-1]
        if columns is None:
            return Assembly(f, payload)
        m, b = columns.shape[:2]
        signature = tuple(u.module.signature() if isinstance(u.module, LinearCall) else
                          (id(u.module), tuple(u.inp.shape), tuple(u.out.shape)) for u in tape)
        # A verified call pattern replays its factor plan: no cost model, no memory estimate again.
        key = (signature, b, m, ranks.total, frozenset(self.fallback), tuple(u.out.requires_grad for u in tape))
        plan = self._plans.get(key)
        if plan is not None:
            factors = _replay(plan, tape, b, m, f)
        else:
            factors = self._plan(tape, b, m, f)
            self._check_memory(tape, factors, ranks.total, m, f, ranks)
        self._fill(tape, f, columns, factors)
        bad = self._random_check(signature, f, columns, factors, ranks)
        if not bad and plan is None and key[4] == frozenset(self.fallback):
            self._plans[key] = _describe(tape, factors)
        if bad:
            self._demote(bad, MISMATCH)
            # Rebuild every factor without the demoted parameters (a merged factor may hold both kinds).
            for u in tape:
                u.slots, u.dense, u.former = [], [], None
            factors = self._plan(tape, b, m, f)
            self._fill(tape, f, columns, factors)
        checked = list(factors)
        fallback = [self.names[id(p)] for p in self.params if id(p) in self.fallback]
        if fallback:
            by_name = {self.names[id(p)]: p for p in self.params}
            factors += [DenseFactor(by_name[n], V) for n, V in per_sample_jacobian_rows(self.model, x, fallback,
                                                                                         columns).items()]
        for factor in factors:
            factor.gather(ranks)
        tape.clear()   # the layers' inputs, patches and outputs are in the factors now; free the rest
        K = factor_forms.assemble(factors, ranks.total, m, f, self.block_rows, self.memory_limit)
        return Assembly(f, payload, K, self.params, checked, factors)

    def route_to_functional(self, pids) -> None:
        """After a failed direction check: these parameters take the torch.func route from now on (or
        UnsupportedModelError without fallback), and every call pattern is verified anew."""
        self._demote(pids, MISMATCH)
        self._verified.clear()

    # -- the pieces --------------------------------------------------------------------------------

    def _hooked_modules(self):
        """(name, module, rule) of the modules to record, for this solve's torch.func route (kept per route)."""
        key = frozenset(self.fallback)
        if self._hooked is not None and self._hooked[0] == key:
            return self._hooked[1]
        seen, out = set(), []
        for pid, owners in self.covered.items():
            if pid in self.fallback:
                continue
            for mname, module, _ in owners:
                if id(module) not in seen:
                    seen.add(id(module))
                    out.append((mname, module, rule_for(module)))
        self._hooked = (key, out)
        return out

    def _recorded_forward(self, x: ModelInputs, tape: list) -> torch.Tensor:
        """f = model(*x.args, **x.kwargs) reshaped to (b, c), recording every call of a covered module
        on ``tape``. A layer's output is handed on itself, with its version counter noted; a forward
        that changed one in place (``relu_``, ``h += ...``) is run again handing on copies, as every
        later forward of this model is (an in-place change must not overwrite a recorded output)."""
        start = len(tape)
        f = self._recording(x, tape, self._copy_outputs)
        changed = any(u.version is not None and u.out._version != u.version for u in tape[start:])
        if changed and not self._copy_outputs:
            self._copy_outputs = True
            del tape[start:]
            f = self._recording(x, tape, True)
        return f

    def _recording(self, x: ModelInputs, tape: list, copy: bool) -> torch.Tensor:
        def hook(name, module, rule):
            def record(mod, inputs, output):
                if not (inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor)):
                    raise UnsupportedModelError(f"module '{name}' ({type(mod).__name__}) was called without a "
                                                "tensor input or output")
                if copy:
                    tape.append(_Use(name, mod, rule, inputs[0].detach(), output))
                    return output.clone()
                tape.append(_Use(name, mod, rule, inputs[0].detach(), output, output._version))
                return None
            return record

        handles = [m.register_forward_hook(hook(name, m, rule)) for name, m, rule in self._hooked_modules()]
        capturable = [p for p in self.params if id(p) in self.capturable]
        capture = LinearCapture(capturable, self.names) if capturable else None
        try:
            with RandomForward(self.model, x.first), (capture if capture is not None else contextlib.nullcontext()), \
                    differentiable_attention(self.params[0].device if self.params else "cpu"):
                f = x.call(self.model)
        finally:
            for h in handles:
                h.remove()
        f = outputs_of(self.model, f, x.batch_size)
        captured = self._captured_calls(f, capture.calls) if capture is not None else []
        tape.extend(_Use(call.name, call, _CALL_RULE, call.inp, call.out) for call in captured)
        # This solve's torch.func route: the uncovered parameters that no laid-out call covered.
        self.fallback = self.functional - {id(getattr(c, a)) for c in captured for a in _CALL_RULE.attrs(c)}
        if self.fallback and not self.fallback_enabled:
            self._refuse_uncaptured(x, capture.calls if capture is not None else [])
        return f

    def _refuse_uncaptured(self, x, calls):
        """``gram="layerwise"``: refuse the first parameter that neither a module rule nor a laid-out
        linear call covers, naming it and the ops the forward passes it to (one more forward)."""
        param = next(p for p in self.params if id(p) in self.fallback)
        pid = id(param)
        unlaid = [c for c in calls if c.layout is None and pid in (id(c.weight), id(c.bias))]
        if unlaid:
            how = (f"its linear call (input {tuple(unlaid[0].inp.shape)}, output {tuple(unlaid[0].out.shape)}) "
                   "has no sample axis in its rows")
        else:
            ops = parameter_ops(lambda: x.call(self.model), [param])[pid]
            how = (f"the forward passes it to {', '.join(ops) or 'no torch function'}, which no layer rule covers "
                   "(rules cover it as the weight or bias of F.linear / @ / torch.matmul)")
        raise UnsupportedModelError(
            f"layerwise Gram unavailable for {type(self.model).__name__}: {self.uncovered[pid]}, and {how}; "
            "gram='auto' computes the per-sample Jacobian of such parameters with torch.func (vmap of jacrev)")

    def _captured_calls(self, f: torch.Tensor, calls) -> list:
        """The recorded linear calls with their sample layout (found once per call pattern by two
        backward passes, then reused); calls with none are left out (their parameters stay on
        torch.func)."""
        b = f.shape[0]
        key = (b,) + tuple(c.signature() for c in calls)
        if key not in self._layouts:
            if self._generator is None:
                self._generator = torch.Generator(device="cpu").manual_seed(0x5EED)
            resolve_layouts(f, calls, self._generator)
            self._layouts[key] = [c.layout for c in calls]
        out = []
        for call, layout in zip(calls, self._layouts[key]):
            call.layout, call.batch = layout, b
            if layout is not None:
                out.append(call)
        return out

    def _demote(self, pids, why: str):
        """Move parameters to the torch.func route (or refuse, without fallback)."""
        names = [self.names.get(pid, "?") for pid in pids]
        if not self.fallback_enabled:
            raise UnsupportedModelError(
                f"layerwise Gram cannot cover parameter(s) {names} of {type(self.model).__name__}: {why}; "
                "gram='auto' computes their per-sample Jacobian with torch.func (vmap of jacrev), per layer")
        new = [n for n in names if n not in self._warned]
        if new:
            self._warned.update(new)
            warnings.warn(f"EGN: parameter(s) {new} of {type(self.model).__name__}: {why}; their per-sample "
                          "Jacobian now comes from torch.func (vmap of jacrev)", RuntimeWarning,
                          stacklevel=user_stacklevel())
        self.fallback.update(pids)
        self.functional.update(pids)
        self._plans.clear()
        self.capturable.difference_update(pids)

    def _plan(self, tape, b: int, m: int, like: torch.Tensor):
        """Factors for the recorded uses: one Kronecker or dense factor per parameter group."""
        trainable = {id(p): p for p in self.params}
        uses_of: dict[int, list] = {}
        bad = {}
        for use in tape:
            attrs = [a for a in use.rule.attrs(use.module)
                     if id(getattr(use.module, a)) in trainable and id(getattr(use.module, a)) not in self.fallback]
            if not use.out.requires_grad:   # called under no_grad or on frozen inputs only: no Jacobian
                continue
            if not isinstance(use.module, LinearCall) and (   # a linear call's rows are laid out by sample
                    use.out.dim() == 0 or use.out.shape[0] != b or use.inp.dim() == 0 or use.inp.shape[0] != b):
                for a in attrs:
                    bad[id(getattr(use.module, a))] = (f"module '{use.name}' got input {tuple(use.inp.shape)} / "
                                                       f"output {tuple(use.out.shape)} without the batch ({b}) first")
                continue
            use.kron = use.rule.kron_inputs(use.module, use.inp)
            for a in attrs:
                uses_of.setdefault(id(getattr(use.module, a)), []).append((use, a))
        for pid, why in bad.items():
            self._demote([pid], why)
        factors, dense = [], []
        merged: dict[int, list] = {}   # id(use) -> [(param, KronInput)] of single-use Kronecker parameters
        candidates: dict[int, list] = {}   # id(use) -> [(param, KronInput, T, q)] that may share one factor
        for pid, uses in uses_of.items():
            if pid in self.fallback:
                continue
            p = trainable[pid]
            krons = [u.kron.get(a) for u, a in uses]
            same = all(k is not None for k in krons) and len({(k.kind, k.width) for k in krons}) == 1
            if same:
                dims = [(u.rule.positions(u.module, u.out.detach()).shape[1:]) for u, _ in uses]   # (T, q)
                same = len({q for _, q in dims}) == 1
            if same:
                T, q, p_width = sum(t for t, _ in dims), dims[0][1], krons[0].width
            if same and len(uses) == 1 and krons[0].kind == "features":   # decided per use, below
                candidates.setdefault(id(uses[0][0]), []).append((p, krons[0], T, q))
                continue
            if same and factor_forms.kron_cost(b, m, T, p_width, q, krons[0].kind == "ids") \
                    <= factor_forms.dense_cost(b, m, T, p.numel() // q, q):
                X = torch.cat([k.X for k in krons], 1)
                factor = KronFactor(KronInput(X, krons[0].vocab), [(p, 0, p_width)], like.new_zeros(b, m, T, q))
                t0 = 0
                for (u, _), (t, _) in zip(uses, dims):
                    u.slots.append((factor, t0))
                    t0 += t
                factors.append(factor)
            else:
                dense.append((p, uses))
        # One use's parameters (a weight and its bias) share one Kronecker factor (X side by side) or are
        # all dense: the shared factor's cost against the sum of the dense ones, with a slack for the
        # fixed cost of each factor beyond one (its fill, Gram block and check: ~10 small operations).
        for use in tape:
            group = candidates.get(id(use), [])
            T, q = (group[0][2], group[0][3]) if group else (0, 0)
            cost = sum(factor_forms.dense_cost(b, m, T, p.numel() // q, q) for p, _, _, _ in group)
            if group and factor_forms.kron_cost(b, m, T, sum(k.width for _, k, _, _ in group), q, False) \
                    <= cost * (_MERGE_SLACK if len(group) > 1 else 1.0):
                merged[id(use)] = [(p, k) for p, k, _, _ in group]
                continue
            for p, _, _, _ in group:
                dense.append((p, [(use, next(a for a in use.kron if getattr(use.module, a) is p))]))
        if dense:
            factors.append(_dense_factor(dense, b, m, like))
        for use in tape:
            group = merged.get(id(use))
            if not group:
                continue
            X = torch.cat([k.X for _, k in group], 2) if len(group) > 1 else group[0][1].X
            parts, lo = [], 0
            for p, k in group:
                parts.append((p, lo, lo + k.width))
                lo += k.width
            T, q = use.rule.positions(use.module, use.out.detach()).shape[1:]
            factor = KronFactor(KronInput(X), parts, like.new_zeros(b, m, T, q))
            use.slots.append((factor, 0))
            factors.append(factor)
        return factors

    def _check_memory(self, tape, factors, total, m, f, ranks):
        """Before the backward passes: K, the factors and the torch.func rows within memory_limit."""
        extra = sum(fa.nbytes() for fa in factors)
        extra += sum(k.X.numel() * k.X.element_size() for u in tape for k in u.kron.values()
                     if k.X.untyped_storage().data_ptr() != u.inp.untyped_storage().data_ptr())   # conv patches
        c = f.shape[1]
        extra += sum(2 * f.shape[0] * c * p.numel() * f.element_size() for p in self.params if id(p) in self.fallback)
        check_memory(total * m, extra * ranks.world, f.dtype, self.memory_limit, self.model,
                     f" for batch {total} with {m} column(s) per sample, with its stored factors")

    def _fill(self, tape, f, columns, factors):
        """The m backward passes: output gradients of every recorded use into the factors."""
        uses = [u for u in tape if u.slots or u.dense]
        outs = [u.out for u in uses]
        for a in range(columns.shape[0] if outs else 0):
            grads = torch.autograd.grad(f, outs, grad_outputs=columns[a], retain_graph=True, allow_unused=True)
            for use, g in zip(uses, grads):
                if g is not None:
                    self._fill_use(use, g, a)
                else:   # no path to f: zero where this use would have written first
                    for attr, factor, c0, c1, rows, copy in use.dense:
                        if copy:
                            _region(factor, a, c0, c1, rows, getattr(use.module, attr)).zero_()

    @staticmethod
    def _fill_use(use: _Use, g: torch.Tensor, a: int):
        if use.slots:
            Gp = use.rule.positions(use.module, g)
            for factor, t0 in use.slots:
                if factor.G.shape[1] == 1 and t0 == 0 and Gp.shape[1] == factor.G.shape[2]:
                    factor.G = Gp[:, None]   # one column, one use holding all positions: G is Gp itself
                    factor.G_rows = g if g.dim() == 2 and type(use.rule) is LinearRule else None   # g is Gp's rows
                else:
                    factor.G[:, a, t0:t0 + Gp.shape[1]] = Gp
        if not use.dense:
            return
        if use.former is None:   # once per solve (a linear call's former gives its rows only)
            use.former = use.rule.dense_former(use.module, use.inp, [e[0] for e in use.dense], use.kron)
        grads = use.former(g)
        for attr, factor, c0, c1, rows, copy in use.dense:
            region = _region(factor, a, c0, c1, rows, getattr(use.module, attr))
            src = grads[attr].reshape(region.shape)
            if copy:
                region.copy_(src)
            else:
                region.add_(src)

    def _random_check(self, signature, f, columns, factors, ranks) -> list[int]:
        """The random-weight verification for a new call pattern; one verdict on every rank."""
        if signature in self._verified:
            bad = []
        else:
            if self._generator is None:
                self._generator = torch.Generator(device="cpu").manual_seed(0x5EED)
            bad = random_weight_check(f, columns, factors, self._generator)
        if ranks.world > 1:
            flags = torch.zeros(len(self.params), dtype=f.dtype, device=f.device)
            index = {id(p): k for k, p in enumerate(self.params)}
            for pid in bad:
                flags[index[pid]] = 1
            (flags,) = ranks.sum_tensors([flags])
            bad = [id(self.params[k]) for k in range(len(self.params)) if flags[k] > 0]
        if not bad:
            self._verified.add(signature)
        return bad


def _rows_of(p) -> int:
    return p.shape[0] if p.dim() else 1


def _region(factor: DenseFactor, a: int, c0: int, c1: int, rows, p) -> torch.Tensor:
    """Column a's rows r0..r1 of parameter p in the dense factor's buffer: (b, r1 - r0, ...)."""
    return factor.V[:, a, c0:c1].view(factor.V.shape[0], _rows_of(p), -1)[:, rows[0]:rows[1]]


def _use_rows(use: _Use, attr: str, p) -> tuple:
    """The rows of ``p`` that one use's gradient fills (a linear call may use a block of rows)."""
    if isinstance(use.module, LinearCall):
        return use.module.rows if attr == "weight" else use.module.bias_rows
    return (0, _rows_of(p))


def _dense_factor(groups, b: int, m: int, like: torch.Tensor) -> DenseFactor:
    """One DenseFactor for the parameters given densely, [(param, [(use, attr)])], side by side in one
    buffer (b, m, sum of their sizes), so that K takes one matrix product for all of them. Sets each
    use's ``dense`` entries (attr, factor, first column, rows, copy): where the uses' row ranges tile a
    parameter, the first use of each range writes by copy and repeated ranges add, with no zeroing;
    otherwise its columns are zeroed and every use adds."""
    parts, lo = [], 0
    for p, _ in groups:
        parts.append((p, lo, lo + p.numel()))
        lo += p.numel()
    factor = DenseFactor(None, like.new_empty(b, m, lo), parts)
    for (p, uses), (_, c0, c1) in zip(groups, parts):
        ranges = [_use_rows(u, a, p) for u, a in uses]
        edges = sorted(set(ranges))
        tiles = edges[0][0] == 0 and edges[-1][1] == _rows_of(p) and all(
            r[1] == s[0] for r, s in zip(edges, edges[1:]))
        if not tiles:
            factor.V[:, :, c0:c1].zero_()
        seen = set()
        for (u, a), r in zip(uses, ranges):
            u.dense.append((a, factor, c0, c1, r, tiles and r not in seen))
            seen.add(r)
    return factor


# -- plans of verified call patterns -----------------------------------------------------------------

def _describe(tape, factors) -> list:
    """How the factors were built from the tape, by tape index: for a Kronecker factor the uses whose
    inputs make X (one use: its parameters' inputs side by side; several: their inputs along positions),
    its parts, vocabulary and G's shape; for the dense factor its parameters and their uses."""
    index = {id(fa): k for k, fa in enumerate(factors)}
    specs = [["kron", [], None] if isinstance(fa, KronFactor) else ["dense", [], None] for fa in factors]
    for i, u in enumerate(tape):
        for fa, t0 in u.slots:
            specs[index[id(fa)]][1].append((i, t0))
        for attr, fa, *_ in u.dense:
            specs[index[id(fa)]][1].append((i, attr))
    out = []
    for fa, (kind, uses, _) in zip(factors, specs):
        if kind == "dense":
            of = {id(p): [] for p, _, _ in fa.parts}
            for i, attr in uses:
                of[id(getattr(tape[i].module, attr))].append((i, attr))
            out.append(("dense", [(p, of[id(p)]) for p, _, _ in fa.parts]))
            continue
        def attr_of(u, p):
            return next(a for a in u.kron if getattr(u.module, a) is p)
        if len(uses) == 1:
            i, _ = uses[0]
            inputs = [(i, attr_of(tape[i], p)) for p, _, _ in fa.parts]
        else:
            (p, _, _), = fa.parts
            inputs = [(i, attr_of(tape[i], p)) for i, _ in uses]
        out.append(("kron", inputs, uses, fa.parts, fa.kron.vocab, tuple(fa.G.shape[2:])))
    return out


def _replay(plan, tape, b: int, m: int, like: torch.Tensor) -> list:
    """The factors of a tape whose call pattern has ``plan`` (from :func:`_describe`)."""
    needed = {i for spec in plan for i, _ in (spec[2] if spec[0] == "kron" else
                                              [iu for _, uses in spec[1] for iu in uses])}
    for i in needed:
        u = tape[i]
        u.kron = u.rule.kron_inputs(u.module, u.inp)
    factors = []
    for spec in plan:
        if spec[0] == "dense":
            factor = _dense_factor([(p, [(tape[i], a) for i, a in uses]) for p, uses in spec[1]], b, m, like)
        else:
            _, inputs, uses, parts, vocab, (T, q) = spec
            Xs = [tape[i].kron[a].X for i, a in inputs]
            if len(Xs) == 1:
                X = Xs[0]
            else:
                X = torch.cat(Xs, 2 if len(uses) == 1 else 1)
            factor = KronFactor(KronInput(X, vocab), parts, like.new_zeros(b, m, T, q))
            for i, t0 in uses:
                tape[i].slots.append((factor, t0))
        factors.append(factor)
    return factors
