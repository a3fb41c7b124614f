"""The output-space Gram K = S^T J J^T S of a model, without materialising J where possible.

J = df/dw is the (b c) x d Jacobian of the outputs f (b, c) with respect to the trainable parameters,
and S = blockdiag(S_i) a per-sample c x m factor (see :mod:`revgn_ext.egn.loss_factors`; m = c for the
exact curvature, m = k samples or 1 for the approximations); it is passed as ``columns`` (m, b, c) with
``columns[a, i] = S_i[:, a]`` (the identity for K = J J^T). K is (b m) x (b m), rows ordered (i, a):
sample-major.

Two assemblers share one interface, ``f = forward(x)`` then ``K = gram(f, columns)``:

* :class:`LayerwiseGram`: K = sum over parameters of V_p V_p^T, where V_p[(i, a)] is the per-sample
  gradient of output column a of sample i with respect to parameter p. Each parameter's V_p comes from
  the layer rule of the modules that use it (:mod:`revgn_ext.egn.rules`: Linear on inputs of any rank,
  Conv1d/Conv2d, Embedding, LayerNorm/GroupNorm/RMSNorm/BatchNorm-eval affines) and is never formed
  where the rule gives a Kronecker form: then V_p V_p^T = sum_{t,s} (x_it . x_js)(g_iat . g_jbs) over
  positions, which for one position is the Hadamard product of an input kernel (b x b) and an
  output-gradient kernel (b m x b m). The output gradients g_ia come from m backward passes with
  grad_outputs = columns[a] (sample i's output depends on sample i only). Per parameter the cheaper
  of the two forms is used (counted in multiply-adds). A parameter used several times (tied weights,
  a module called twice) gets the *sum* of its uses' per-sample gradients, so the cross terms between
  uses are in K: uses of the same Kronecker kind are concatenated along positions, others are summed
  in dense form.

  Parameters no rule covers (a custom module's, an unsupported configuration's) fall back *per
  parameter* to per-sample Jacobians from ``torch.func`` (vmap of jacrev with respect to those
  parameters only); ``method="layerwise"`` refuses them instead, naming the module.

  **Verification.** A use that no module hook sees (``F.linear(h, enc.weight.t())``, a weight read by
  another module's forward, a layer that treats dim 0 as something other than the sample) would make
  V_p silently wrong. Two checks compare autograd's gradient of every parameter for some grad_outputs
  sum_a w_a columns[a] with sum_{i,a} w_ia V_p[(i, a)] from the rules' factors:

  * the first Gram of every new call pattern (recorded modules and shapes) runs one more backward
    pass with random per-sample weights w (b, m);
  * every step compares the back-projection J^T S u, which the step computes anyway, with w = u
    (:meth:`LayerwiseGram.check_direction`: free; a failure redoes the step's solve).

  A parameter that disagrees (relative error above sqrt(eps) of the dtype) falls back to torch.func
  from then on, with a RuntimeWarning naming it (``method="layerwise"``: UnsupportedModelError).
  Because the weights differ per sample, a wrong grouping of rows into samples is caught as well as
  a missing use.

  **Row blocks.** K is formed in blocks of ``block_rows`` rows (lower block triangle, then mirrored),
  so the temporaries of a block are bounded (default: 1/16 of ``memory_limit``, at most 256 MiB),
  and the stored factors (inputs X, output gradients G, dense V) never include a whole J.

  Why our own rules rather than a library: BackPACK's ``SqrtGGNExact`` gives the same V_p and was
  measured against these rules on the CNN (``benchmarks/bench_egn_step.py``, ``--suite cnn``,
  results in ``benchmarks/RESULTS.md``). It materialises S^T J for *every* parameter (b m x d_p floats,
  also for Linear layers, where the Kronecker form needs only the b x in inputs and b m x out output
  gradients), so its memory grows like the whole J; it needs ``extend()`` on every module and has no
  answer for uses its module extensions do not see. curvlinops' GGN is a d x d linear operator
  (matrix-vector products in parameter space), the wrong side of the push-through identity when
  d >> b m; it was not adopted (nor installed). Opacus' grad samplers give per-sample gradients of a
  summed loss (one output column), not per output column. The rules here are a few lines each, and
  the verification makes a missed use a fallback instead of a wrong answer.
* :class:`FunctionalGram`, the generic whole-model route: per-sample Jacobians with ``torch.func``
  (vmap over samples of jacrev), guarded by a memory estimate.

Both assume that samples do not interact and that the forward is deterministic: modules that mix
samples (BatchNorm in training mode) and forwards that draw random numbers (dropout in training mode)
are refused with :class:`UnsupportedModelError` naming them (:func:`check_samplewise`).

Data-parallel (``shards``, a :class:`revgn_ext.distributed.ShardGroup`): every factor has one row block
per sample (X, G, V), so each rank's rows are all_gathered and every rank assembles the same global K,
rows ordered by rank, then sample, then output.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .._warn import user_stacklevel
from .rules import KronInput, kron_per_sample, rule_for

__all__ = ["UnsupportedModelError", "LayerwiseGram", "FunctionalGram", "gram_assembler", "gram_matrix",
           "layerwise_obstacle", "check_samplewise", "DEFAULT_MEMORY_LIMIT", "per_sample_jacobian_rows"]

DEFAULT_MEMORY_LIMIT = 4 * 2**30
DEFAULT_BLOCK_BYTES = 256 * 2**20

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class UnsupportedModelError(ValueError):
    """The model (or a module inside it) cannot be handled by the requested Gram assembler."""


def check_samplewise(model: nn.Module) -> None:
    """Refuse modules that mix the samples of a batch or make the forward random."""
    for name, module in model.named_modules():
        label = f"module '{name or type(model).__name__}' ({type(module).__name__})"
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
            raise UnsupportedModelError(
                f"{label} mixes the samples of a batch (training mode or track_running_stats=False), so EGN's "
                "per-sample Jacobian does not apply; call model.eval() or use a per-sample normalisation "
                "(LayerNorm, GroupNorm)")
        if isinstance(module, _DROPOUT) and module.training and module.p > 0:
            raise UnsupportedModelError(
                f"{label} draws a random mask in training mode; EGN evaluates the model several times per "
                "step (forward, Gram, line search) and the Gauss-Newton direction needs one deterministic "
                "function, so call model.eval() (or set p=0) for the EGN steps")


class _RandomForward:
    """Raises if the forward consumed random numbers (functional dropout, noise layers)."""

    def __init__(self, model, x):
        self.model, self.cuda = model, x.is_cuda

    def __enter__(self):
        self.state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state() if self.cuda else None
        return self

    def __exit__(self, kind, *_):
        if kind is not None:
            return False
        changed = not torch.equal(self.state, torch.get_rng_state()) or (
            self.cuda and not torch.equal(self.cuda_state, torch.cuda.get_rng_state()))
        if changed:
            raise UnsupportedModelError(
                f"the forward of {type(self.model).__name__} drew random numbers (e.g. F.dropout with "
                "training=True); EGN needs a deterministic model: disable the randomness for the EGN steps")
        return False


def _owner_label(model: nn.Module, name: str) -> str:
    owner = name.rpartition(".")[0]
    kind = type(model.get_submodule(owner)).__name__ if owner else type(model).__name__
    return f"parameter '{name}' of module '{owner or type(model).__name__}' ({kind})"


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


def _gram_bytes(n: int, dtype) -> int:
    return n * n * torch.finfo(dtype).bits // 8


def _check_memory(n: int, extra: int, dtype: torch.dtype, memory_limit: int, model: nn.Module, what: str) -> None:
    need = _gram_bytes(n, dtype) + extra
    if need > memory_limit:
        raise UnsupportedModelError(
            f"the ({n} x {n}) Gram of {type(model).__name__}{what} needs {need / 2**30:.2f} GiB > memory_limit "
            f"{memory_limit / 2**30:.2f} GiB; use a smaller batch, curvature='sampled'/'true-class' for many "
            "classes, or raise memory_limit")


def per_sample_jacobian_rows(model: nn.Module, x: torch.Tensor, names: list[str],
                             columns: torch.Tensor) -> dict[str, torch.Tensor]:
    """V_p (b, m, d_p) = S_i^T J_i,p for the named parameters only, by vmap of jacrev (torch.func)."""
    m, b, c = columns.shape
    current = dict(model.named_parameters())
    chosen = {n: current[n].detach() for n in names}

    def f_single(weights, xi):
        return functional_call(model, weights, (xi.unsqueeze(0),), strict=False).reshape(-1)

    try:
        with torch.no_grad():   # torch.func differentiates inside; no graph back to the other parameters
            jac = vmap(jacrev(f_single), in_dims=(None, 0))(chosen, x)
    except Exception as err:  # torch.func raises many error types for unsupported modules
        raise UnsupportedModelError(
            f"torch.func could not form per-sample Jacobians of {type(model).__name__} for {names}: {err}") from err
    return {n: torch.einsum("aik,ikd->iad", columns, jac[n].reshape(b, c, -1)) for n in names}


# --------------------------------------------------------------------------------------------------
# Factors: the per-sample gradients of a group of parameters, in Kronecker or dense form
# --------------------------------------------------------------------------------------------------

class _KronFactor:
    """Per-sample gradients sum_t G[i, a, t] (x) X[i, t] of parameters sharing one Kronecker form.

    X: (b, T, p) features or (b, T) ids; G: (b, m, T, q). ``parts``: (param, first column, last column
    of X) for features (one use's weight and bias share G: X = [x, 1]); for ids one part.
    """

    def __init__(self, kron: KronInput, parts, G: torch.Tensor):
        self.kron, self.parts, self.G = kron, parts, G

    @property
    def T(self):
        return self.G.shape[2]

    def nbytes(self):
        return self.kron.X.numel() * self.kron.X.element_size() + self.G.numel() * self.G.element_size()

    def row_bytes(self, b):
        """Temporary bytes per sample row of a block."""
        m, T = self.G.shape[1], self.T
        return (m * T * b * m * T + T * b * T) * self.G.element_size()

    def gather(self, shards):
        self.kron = KronInput(shards.gather_rows(self.kron.X), self.kron.vocab)
        self.G = shards.gather_rows(self.G)

    def _input_kernel(self, i0, i1, j1):
        X = self.kron.X
        if self.kron.kind == "ids":   # (x_it . x_js) = [id_it = id_js], ids -1 match nothing
            A, B = X[i0:i1], X[:j1]
            return ((A[:, :, None, None] == B[None, None]) & (A[:, :, None, None] >= 0)).to(self.G.dtype)
        T = self.T
        return (X[i0:i1].reshape(-1, X.shape[2]) @ X[:j1].reshape(-1, X.shape[2]).T).view(i1 - i0, T, j1, T)

    def add_block(self, K, i0, i1, j1):
        """K[(i0..i1, :), (0..j1, :)] += this factor's Gram block."""
        m, T, q = self.G.shape[1], self.T, self.G.shape[3]
        Kx = self._input_kernel(i0, i1, j1)
        rows = K[i0 * m:i1 * m, :j1 * m].view(i1 - i0, m, j1, m)
        if T == 1:
            Kg = (self.G[i0:i1].reshape(-1, q) @ self.G[:j1].reshape(-1, q).T).view(i1 - i0, m, j1, m)
            rows.addcmul_(Kx[:, 0, :, 0][:, None, :, None], Kg)
        else:
            Kg = (self.G[i0:i1].reshape(-1, q) @ self.G[:j1].reshape(-1, q).T).view(i1 - i0, m, T, j1, m, T)
            rows.add_((Kg * Kx[:, None, :, :, None, :]).sum((2, 5)))   # sum_{t,s}; einsum would copy Kg

    def weighted_gradients(self, w):
        """{param: sum_{i,a} w_ia grad_ia} from the factor (for the verification)."""
        Gw = torch.einsum("ia,iatq->itq", w, self.G)
        if self.kron.kind == "ids":
            (p, _, _), = self.parts
            return {p: kron_per_sample(self.kron, Gw, p.shape).sum(0)}
        full = torch.einsum("itq,itp->qp", Gw, self.kron.X)
        return {p: full[:, lo:hi].reshape(p.shape) for p, lo, hi in self.parts}


class _DenseFactor:
    """Materialised per-sample gradients V (b, m, d_p) of one parameter."""

    def __init__(self, param, V):
        self.param, self.V = param, V

    def nbytes(self):
        return self.V.numel() * self.V.element_size()

    def row_bytes(self, b):
        return 0

    def gather(self, shards):
        self.V = shards.gather_rows(self.V)

    def add_block(self, K, i0, i1, j1):
        m = self.V.shape[1]
        K[i0 * m:i1 * m, :j1 * m].addmm_(self.V[i0:i1].reshape((i1 - i0) * m, -1), self.V[:j1].reshape(j1 * m, -1).T)

    def weighted_gradients(self, w):
        return {self.param: torch.einsum("ia,iad->d", w, self.V).reshape(self.param.shape)}


class _Use:
    __slots__ = ("name", "module", "rule", "inp", "out", "kron", "slots", "dense")

    def __init__(self, name, module, rule, inp, out):
        self.name, self.module, self.rule, self.inp, self.out = name, module, rule, inp, out
        self.kron = {}    # attr -> KronInput
        self.slots = []   # (factor, first position) where this use's G goes
        self.dense = []   # (attr, dense factor)


def _kron_cost(b, m, T, p, q, ids):
    return b * b * T * T * (1 if ids else p) + (b * m * T) ** 2 * q + ((b * m) ** 2 * T * T if T > 1 else 0)


def _dense_cost(b, m, T, p, q):
    return b * m * T * p * q + (b * m) ** 2 * p * q


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
        if uncovered and not fallback:
            why = next(iter(uncovered.values()))
            raise UnsupportedModelError(
                f"layerwise Gram unavailable for {type(model).__name__}: {why}; gram='auto' computes the "
                "per-sample Jacobian of such parameters with torch.func (vmap of jacrev), per layer")
        self.fallback = {pid for pid in uncovered}   # ids of parameters on the torch.func route
        self.covered = covered
        self._warned = set()
        self._generator = None
        self._verified: set = set()   # call patterns whose random-weight verification passed
        self._checked: list = []      # the rules' factors of the last Gram, for check_direction
        self.records: list[_Use] = []
        self.x = None

    @property
    def method(self) -> str:
        return "layerwise" if not self.fallback else "layerwise+functional"

    @property
    def fallback_names(self) -> list[str]:
        return [self.names.get(id(p), "?") for p in self.params if id(p) in self.fallback]

    def _hooked_modules(self):
        seen, out = set(), []
        for pid, owners in self.covered.items():
            if pid in self.fallback:
                continue
            for mname, module, _ in owners:
                if id(module) not in seen:
                    seen.add(id(module))
                    out.append((mname, module))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """f = model(x) reshaped to (b, c), recording every call of a covered module."""
        self.records = []
        self.x = x

        def hook(name, module, rule):
            def record(mod, inputs, output):
                if not (inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor)):
                    raise UnsupportedModelError(f"module '{name}' ({type(mod).__name__}) was called without a "
                                                "tensor input or output")
                # Hand on a copy so that an in-place operation after the layer cannot overwrite its output.
                self.records.append(_Use(name, mod, rule, inputs[0].detach(), output))
                return output.clone()
            return record

        handles = [m.register_forward_hook(hook(name, m, rule_for(m))) for name, m in self._hooked_modules()]
        try:
            with _RandomForward(self.model, x):
                f = self.model(x)
        finally:
            for h in handles:
                h.remove()
        return f.reshape(x.shape[0], -1)

    # ----------------------------------------------------------------------------------------------

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

    def _plan(self, b: int, m: int, like: torch.Tensor):
        """Factors for the recorded uses: one Kronecker or dense factor per parameter group."""
        trainable = {id(p): p for p in self.params}
        uses_of: dict[int, list] = {}
        bad = {}
        for use in self.records:
            attrs = [a for a in use.rule.attrs(use.module)
                     if id(getattr(use.module, a)) in trainable and id(getattr(use.module, a)) not in self.fallback]
            if not use.out.requires_grad:   # called under no_grad or on frozen inputs only: no Jacobian
                continue
            if use.out.dim() == 0 or use.out.shape[0] != b or use.inp.dim() == 0 or use.inp.shape[0] != b:
                for a in attrs:
                    bad[id(getattr(use.module, a))] = (f"module '{use.name}' got input {tuple(use.inp.shape)} / "
                                                       f"output {tuple(use.out.shape)} without the batch ({b}) first")
                continue
            use.kron = use.rule.kron_inputs(use.module, use.inp)
            for a in attrs:
                uses_of.setdefault(id(getattr(use.module, a)), []).append((use, a))
        for pid, why in bad.items():
            self._demote([pid], why)
        factors = []
        merged: dict[int, list] = {}   # id(use) -> [(param, KronInput)] of single-use Kronecker parameters
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
            if same and _kron_cost(b, m, T, p_width, q, krons[0].kind == "ids") <= _dense_cost(b, m, T, p.numel() // q, q):
                if len(uses) == 1 and krons[0].kind == "features":
                    merged.setdefault(id(uses[0][0]), []).append((p, krons[0]))
                    continue
                X = torch.cat([k.X for k in krons], 1)
                factor = _KronFactor(KronInput(X, krons[0].vocab), [(p, 0, p_width)], like.new_zeros(b, m, T, q))
                t0 = 0
                for (u, _), (t, _) in zip(uses, dims):
                    u.slots.append((factor, t0))
                    t0 += t
                factors.append(factor)
            else:
                factor = _DenseFactor(p, like.new_zeros(b, m, p.numel()))
                for u, a in uses:
                    u.dense.append((a, factor))
                factors.append(factor)
        for use in self.records:
            group = merged.get(id(use))
            if not group:
                continue
            X = torch.cat([k.X for _, k in group], 2) if len(group) > 1 else group[0][1].X
            parts, lo = [], 0
            for p, k in group:
                parts.append((p, lo, lo + k.width))
                lo += k.width
            T, q = use.rule.positions(use.module, use.out.detach()).shape[1:]
            factor = _KronFactor(KronInput(X), parts, like.new_zeros(b, m, T, q))
            use.slots.append((factor, 0))
            factors.append(factor)
        return factors

    def _check_memory(self, factors, total, m, f, shards):
        """Before the backward passes: K, the factors and the torch.func rows within memory_limit."""
        extra = sum(fa.nbytes() for fa in factors)
        extra += sum(k.X.numel() * k.X.element_size() for u in self.records for k in u.kron.values()
                     if k.X.untyped_storage().data_ptr() != u.inp.untyped_storage().data_ptr())   # conv patches
        c = f.shape[1]
        extra += sum(2 * f.shape[0] * c * p.numel() * f.element_size() for p in self.params if id(p) in self.fallback)
        if shards is not None:
            extra = extra * shards.world
        _check_memory(total * m, extra, f.dtype, self.memory_limit, self.model,
                      f" for batch {total} with {m} column(s) per sample, with its stored factors")

    def _fill(self, use: _Use, g: torch.Tensor, a: int):
        if use.slots:
            Gp = use.rule.positions(use.module, g)
            for factor, t0 in use.slots:
                factor.G[:, a, t0:t0 + Gp.shape[1]] = Gp
        if use.dense:
            attrs = [attr for attr, _ in use.dense]
            with_kron = [attr for attr in attrs if attr in use.kron]
            grads = {}
            if with_kron:
                Gp = use.rule.positions(use.module, g)
                grads.update({attr: kron_per_sample(use.kron[attr], Gp, getattr(use.module, attr).shape)
                              for attr in with_kron})
            rest = [attr for attr in attrs if attr not in use.kron]
            if rest:
                grads.update(use.rule.per_sample(use.module, use.inp, g, rest))
            for attr, factor in use.dense:
                factor.V[:, a] += grads[attr].reshape(g.shape[0], -1)

    @staticmethod
    def _weighted(factors, w):
        """{id(param): (param, sum_{i,a} w_ia V_p[(i, a)])} over the rules' factors."""
        ours: dict[int, tuple] = {}
        for factor in factors:
            for p, grad in factor.weighted_gradients(w).items():
                ours[id(p)] = (p, grad if id(p) not in ours else ours[id(p)][1] + grad)
        return ours

    def _verify(self, f, columns, factors) -> list[int]:
        """ids of covered parameters whose factors disagree with autograd's gradient (random sample weights)."""
        m, b, _ = columns.shape
        if self._generator is None:
            self._generator = torch.Generator(device="cpu").manual_seed(0x5EED)
        w = torch.rand(b, m, generator=self._generator, dtype=f.dtype).to(f.device) + 0.5
        ours = self._weighted(factors, w)
        if not ours:
            return []
        checked = [p for p, _ in ours.values()]
        grad_outputs = torch.einsum("ia,aic->ic", w, columns)
        truth = torch.autograd.grad(f, checked, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
        return _disagreeing(ours, truth, f.dtype)

    def check_direction(self, u: torch.Tensor, products) -> bool:
        """The free check of every step: ``products`` = autograd's J^T S u (one tensor per parameter in
        ``params`` order, summed over ranks) against sum_{i,a} u_ia V_p[(i, a)] from the last Gram's
        factors. False (after moving the disagreeing parameters to torch.func, or raising without
        fallback) means the Gram was wrong and the solve must be redone."""
        factors, self._checked = self._checked, []
        ours = self._weighted(factors, u)
        if not ours:
            return True
        index = {id(p): k for k, p in enumerate(self.params)}
        truth = [products[index[pid]] for pid in ours]
        bad = _disagreeing(ours, truth, u.dtype)
        if bad:
            self._demote(bad, _MISMATCH)
            self._verified.clear()
        return not bad

    def gram(self, f: torch.Tensor, columns: torch.Tensor, shards=None) -> torch.Tensor:
        """K (b m, b m) from the last :meth:`forward`; keeps the autograd graph of f for a later VJP.

        The random-weight verification runs when the pattern of recorded layer calls (modules and
        shapes) is new; every step is checked for free afterwards by :meth:`check_direction`.
        """
        m, b = columns.shape[:2]
        total = b if shards is None else shards.total
        factors = self._plan(b, m, f)
        self._check_memory(factors, total, m, f, shards)
        self._fill_all(f, columns, factors)
        signature = tuple((id(u.module), tuple(u.inp.shape), tuple(u.out.shape)) for u in self.records)
        bad = [] if signature in self._verified else self._verify(f, columns, factors)
        if shards is not None:   # one verdict on every rank
            flags = torch.zeros(len(self.params), dtype=f.dtype, device=f.device)
            index = {id(p): k for k, p in enumerate(self.params)}
            for pid in bad:
                flags[index[pid]] = 1
            (flags,) = shards.sum_tensors([flags])
            bad = [id(self.params[k]) for k in range(len(self.params)) if flags[k] > 0]
        if bad:
            self._demote(bad, _MISMATCH)
            # Rebuild every factor without the demoted parameters (a merged factor may hold both kinds).
            for u in self.records:
                u.slots, u.dense = [], []
            factors = self._plan(b, m, f)
            self._fill_all(f, columns, factors)
        else:
            self._verified.add(signature)
        covered = list(factors)
        fallback = [p for p in self.params if id(p) in self.fallback]
        if fallback:
            names = [self.names[id(p)] for p in fallback]
            for name, V in per_sample_jacobian_rows(self.model, self.x, names, columns).items():
                factors.append(_DenseFactor(None, V))
        if shards is not None:
            for fa in factors:
                fa.gather(shards)
        self._checked = covered
        self.records = []   # the layers' inputs, patches and outputs are in the factors now; free the rest
        return _assemble(factors, total, m, f, self.block_rows, self.memory_limit)

    def _fill_all(self, f, columns, factors):
        """The m backward passes: output gradients of every recorded use into the factors."""
        uses = [u for u in self.records if u.slots or u.dense]
        outs = [u.out for u in uses]
        for a in range(columns.shape[0] if outs else 0):
            grads = torch.autograd.grad(f, outs, grad_outputs=columns[a], retain_graph=True, allow_unused=True)
            for use, g in zip(uses, grads):
                if g is not None:
                    self._fill(use, g, a)


_MISMATCH = ("its hooked per-layer gradient differs from autograd's (a use no layer rule sees, such as "
             "F.linear(h, layer.weight.t()), or a layer whose dim 0 is not the sample)")


def _disagreeing(ours: dict, truth, dtype) -> list[int]:
    """ids of the parameters whose factor sums differ from autograd's ``truth`` (aligned with ``ours``)."""
    checked = [p for p, _ in ours.values()]
    mine = [g for _, g in ours.values()]
    eps = torch.finfo(dtype).eps
    truth = [torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g) for p, g in zip(checked, truth)]
    errors = torch.stack([torch.linalg.vector_norm(a - g) for a, g in zip(mine, truth)])
    scales = torch.stack([torch.linalg.vector_norm(a) + torch.linalg.vector_norm(g) for a, g in zip(mine, truth)])
    # Relative to the parameter's own gradient, with a floor at rounding level of the whole gradient
    # (a gradient that vanishes identically, e.g. a bias under softmax's shift invariance).
    limit = math.sqrt(eps) * scales + 100 * eps * scales.norm() + torch.finfo(dtype).tiny
    flags = (~(errors <= limit)).tolist()
    return [id(p) for p, flag in zip(checked, flags) if flag]


def _assemble(factors, b: int, m: int, like: torch.Tensor, block_rows, memory_limit: int) -> torch.Tensor:
    """K = sum of the factors' Grams, in blocks of rows: lower block triangle, then mirrored."""
    n = b * m
    K = like.new_zeros(n, n)
    if block_rows is None:
        budget = min(memory_limit // 16, DEFAULT_BLOCK_BYTES)
        per_sample = max([fa.row_bytes(b) for fa in factors] + [m * b * like.element_size()])
        block = max(1, budget // max(per_sample, 1))
    else:
        block = max(1, block_rows // m)
    starts = list(range(0, b, block))
    for i0 in starts:
        i1 = min(b, i0 + block)
        for fa in factors:
            fa.add_block(K, i0, i1, i1)
    for i0 in starts:   # upper block triangle from the lower one
        i1 = min(b, i0 + block)
        K[i0 * m:i1 * m, i1 * m:] = K[i1 * m:, i0 * m:i1 * m].T
    return K


class FunctionalGram:
    """K = S^T J J^T S from per-sample Jacobians J_i = d f(x_i) / dw (torch.func: vmap of jacrev).

    Works for any module whose output for sample i depends only on x_i; needs about 2 b c d numbers of
    memory, which is checked against ``memory_limit`` (bytes) first.
    """
    method = "functional"

    def __init__(self, model: nn.Module, params, memory_limit: int = DEFAULT_MEMORY_LIMIT):
        self.model = model
        self.memory_limit = memory_limit
        ids = {id(p) for p in params}
        self.names = [n for n, p in model.named_parameters() if id(p) in ids]
        self.params = [p for n, p in model.named_parameters() if id(p) in ids]
        self.x = None

    def check_direction(self, u, products) -> bool:
        """Nothing to check: torch.func differentiates every use."""
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x = x
        with _RandomForward(self.model, x):
            return self.model(x).reshape(x.shape[0], -1)

    def gram(self, f: torch.Tensor, columns: torch.Tensor, shards=None) -> torch.Tensor:
        """K (b m, b m); with ``shards`` the rows of S^T J ((P-1)/P b m d numbers) are all_gathered."""
        m, b, c = columns.shape
        total = b if shards is None else shards.total  # every rank must reach the same verdict
        d = sum(p.numel() for p in self.params)
        _check_memory(total * m, 2 * total * c * d * torch.finfo(f.dtype).bits // 8, f.dtype, self.memory_limit,
                      self.model, f" with its per-sample Jacobians (b={total}, c={c}, d={d}) on the generic path")
        rows = per_sample_jacobian_rows(self.model, self.x, self.names, columns).values()
        if shards is not None:
            rows = [shards.gather_rows(Jt) for Jt in rows]
            b = shards.total
        K = f.new_zeros(b * m, b * m)
        for Jt in rows:
            Jt = Jt.reshape(b * m, -1)
            K.addmm_(Jt, Jt.T)
        return K


def gram_assembler(model: nn.Module, params, method: str = "auto", memory_limit: int = DEFAULT_MEMORY_LIMIT,
                   block_rows: int | None = None):
    """LayerwiseGram with per-parameter torch.func fallback ("auto"), without it ("layerwise"), or the
    whole-model FunctionalGram ("functional")."""
    if method not in ("auto", "layerwise", "functional"):
        raise ValueError(f"gram must be 'auto', 'layerwise' or 'functional', got {method!r}")
    if method == "functional":
        return FunctionalGram(model, params, memory_limit)
    return LayerwiseGram(model, params, memory_limit, fallback=(method == "auto"), block_rows=block_rows)


def gram_matrix(model: nn.Module, x: torch.Tensor, columns: torch.Tensor | None = None, method: str = "auto",
                memory_limit: int = DEFAULT_MEMORY_LIMIT, block_rows: int | None = None) -> torch.Tensor:
    """K = S^T J J^T S for the model's trainable parameters at x (columns None: K = J J^T)."""
    check_samplewise(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assembler = gram_assembler(model, params, method, memory_limit, block_rows)
    with torch.enable_grad():
        f = assembler.forward(x)
        if columns is None:
            b, c = f.shape
            columns = torch.eye(c, dtype=f.dtype, device=f.device)[:, None, :].expand(c, b, c)
        return assembler.gram(f, columns)
