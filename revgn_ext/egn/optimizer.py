"""EGN: exact Gauss-Newton / Levenberg-Marquardt for any ``nn.Module`` (Korbit et al., arXiv 2405.14402).

For a batch of b samples with c outputs, mean loss L(w) = (1/b) sum_i l(f_i, y_i), residual e = dL/df * b,
Q = blockdiag(d^2 l / df_i^2) = S S^T and J = df/dw ((b c) x d), the LM direction solves

    (J^T Q J / b + lambda I) dir = -J^T e / b.

With the push-through identity it becomes a (b m) x (b m) SPD solve (S_i c x m; m = c - 1 for CE):

    dir = -J^T S u,    (S^T J J^T S + b lambda I) u = t,    S t = e,

factored by Cholesky. The Gram K = S^T J J^T S comes from :mod:`revgn_ext.egn.gram` (layer-wise for
linear maps, without forming J) and J^T (S u) is one vector-Jacobian product.

One step is a one-way pipeline, each stage a short method below:

    step = solve -> momentum -> line search -> damping update

* solve (:meth:`EGN._solve`): the checked forward, the loss factor S (:mod:`.loss_factors`), K from
  one call of the assembler, the Cholesky solve, dir = -J^T S u (:mod:`.linearisation`); the back-
  projection is checked against the assembler's factors, and a failed check (a layer use no rule saw)
  solves again with those parameters on torch.func: a retry loop;
* momentum (:meth:`EGN._momentum`): the bias-corrected EMA of directions;
* line search (:meth:`EGN._move`): Armijo backtracking, or one step of size lr;
* damping update (:mod:`.damping`): the gain-ratio rule.

Data-parallel (``distributed=True``): rank r holds b_r samples. The rows of K's factors and of t are
all_gathered, every rank factors the same global K + b lambda I and solves for the same u, then
J^T S u = sum_r J_r^T S_r u_r is one local VJP per rank and one all_reduce (docs/distributed.md).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .._checks import all_finite as _all_finite
from .._hyper import egn_spec
from .._optim import LOSS_NAMES, GaussNewtonOptimizer, LossSpec, refuse, resolve_loss, unwrap_compiled
from .._warn import user_stacklevel
from ..distributed import SingleProcess, resolve
from ..ops.gram import cholesky_solve_lower
from .cholesky import factor_op, plain_cholesky, plain_factor, clean
from .compiled import CompiledSolve, compile_options
from .damping import gain_ratio, next_damping
from .gram import DEFAULT_MEMORY_LIMIT, check_memory, check_samplewise, gram_assembler, outputs_of
from .inputs import ModelInputs, check_curvature_options, check_inputs, check_per_sample, drop_ignored, \
    forward_naming_x, targets
from .linearisation import jvp, twice_differentiable, vjp
from .params import all_finite_owned, set_params as _set_params
from .loss_factors import CURVATURES, LOSS_FACTORS, apply_factor, apply_factor_transpose, curvature_factor, \
    factor_matrix
from .sequence import SequenceTargets, build_layout, loss_targets, view_index
from .solution import Solution, push_through_terms, woodbury_terms
from .telemetry import Clock, step_record

__all__ = ["EGN", "Solution"]


class EGN(GaussNewtonOptimizer):
    """Exact Gauss-Newton / Levenberg-Marquardt optimizer for any ``nn.Module`` (docs/api.md).

    ``EGN(params, model=model, loss=...)`` as for any ``torch.optim`` optimizer, or ``EGN(model, ...)``.

    Args:
        params: the parameters to train, all of them parameters of ``model`` (default: its trainable
            ones, in ``model.parameters()`` order). One group: the step solves one system for all.
        model: the network, called as ``model(x)`` or with several inputs (``step((a, mask), y)``,
            ``step(dict(...), y)`` or any call in a closure; :mod:`revgn_ext._inputs`); may be
            ``torch.compile``-d or DDP-wrapped. Samples must not interact (no BatchNorm in training mode).
        loss: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` (``label_smoothing``, probability targets) or
            ``nn.BCEWithLogitsLoss`` with reduction "mean" or "sum"; or "mse" (0.5 ||f - y||^2 per
            sample), "cross_entropy" (softmax, integer labels) or "binary_cross_entropy" (logits,
            targets in [0, 1], summed over a sample's outputs), averaged over the batch. None: the closure's loss, or inferred from the
            targets where unambiguous (:func:`revgn_ext._optim.infer_loss`). Damping applies to the
            loss as given: for a loss s L, lambda / s is used with L (docs/api.md).
        lr: step size alpha (the largest step when ``line_search`` is on). Default 0.1.
        damping: lambda in (J^T Q J / b + lambda I) dir = -g. Default 1.0.
        line_search: Armijo backtracking on the same batch: alpha0 = min(1.5 alpha_prev, lr), accept if
            L(w + alpha d) <= L(w) + armijo * alpha g^T d, else alpha *= backtrack, at most max_tries.
        momentum: beta of the bias-corrected EMA of directions, m = beta m + (1 - beta) dir,
            step along m / (1 - beta^t). Default 0.
        adaptive_damping: update lambda from the gain ratio rho = actual / predicted decrease, predicted
            from the quadratic model g^T s + 0.5 ||S^T J s||^2 / b: lambda *= damping_increase if
            rho < 0.25, lambda *= damping_decrease if rho > 0.75, clipped to [min_damping, max_damping].
            Defaults 1.01 and 0.99 as in the authors' code.
        gram: "auto" (the layer rules of :mod:`revgn_ext.egn.gram`, with a per-parameter torch.func
            fallback for what they do not cover), "layerwise" (the rules only: an uncovered parameter
            raises, naming its module) or "functional" (torch.func for the whole model).
        memory_limit: bytes allowed for the Gram and its stored factors (or, on the functional path,
            the per-sample Jacobian).
        curvature: the per-sample loss Hessian Q_i = S_i S_i^T used (see
            :mod:`revgn_ext.egn.loss_factors` for the formulas):

            * "exact": S_i the exact square root, c x c (cross-entropy: c x (c - 1), Q_i has rank c - 1);
              a (b c) x (b c) (CE: b (c - 1) square) system, c (CE: c - 1) backward passes. No bias.
            * "sampled": Monte-Carlo GGN (Gauss-Newton-Bartlett), S_i = [dl(f_i, y^_is)/df_i]_s / sqrt(k)
              with k = ``samples`` labels y^ drawn from the model's predictive distribution (torch's
              default generator, anew at every step or ``direction`` call): a (b k) x (b k) system, k backward passes. Unbiased for the
              curvature, E[J^T S S^T J] = J^T Q J, variance ~ 1/k. Since the gradient e is not in
              the range of S, the step uses Woodbury's identity, dir = -(g - J^T S u) / lambda with
              (S^T J J^T S + b lambda I) u = S^T J g and g = J^T e / b; it needs damping > 0 and
              costs one Jacobian-vector product (double backward) more.
            * "true-class": the curvature of the observed label only (empirical Fisher),
              S_i = e_i = dl(f_i, y_i)/df_i, t_i = 1: a b x b system, one backward pass. Biased towards
              the squared residuals (zero curvature on fitted samples).
        samples: k for curvature="sampled". Default 1.
        gram_block_rows: rows of the Gram formed per block (None: chosen so that a block's
            temporaries take at most 1/16 of ``memory_limit``, at most 256 MiB).
        distributed: data-parallel over ``process_group`` (default: the initialised default group).
            Every rank calls ``step(x_r, y_r)`` with its shard; the step, the line search and the
            damping updates are those of the concatenated batch (losses are global-batch means).
            Parameters and buffers are copied from the group's rank 0 at construction. Passing
            ``process_group`` implies ``distributed=True``.
        process_group: a ``torch.distributed`` process group, or None.

    ``model`` may be wrapped in DistributedDataParallel: its ``.module`` is trained, over the wrapper's
    process group. The optimizer needs the bare module because it runs its own forward and VJPs, which
    DDP's reducer (expecting one backward per forward) would try to average across ranks.

    ``step(closure)`` works as for ``torch.optim.LBFGS`` and returns the closure's loss; ``step(x, y)``
    returns a dict of statistics (``loss`` is the pre-step loss), kept in ``last_stats`` either way. A
    step whose update is not finite is refused, leaving parameters and state as they were.
    ``stats["time"]`` splits the step's solve into seconds of "forward" (the model with the layer
    hooks), "gram" (the backward passes and K; for curvature="sampled" also g and S^T J g), "factor"
    (Cholesky) and "backproject" (the solve, the VJP J^T S u and its check against the layer factors).

    ``x`` may hold integer token ids when the model starts with an ``nn.Embedding``. The model must
    be deterministic during the step: train-mode dropout (modules or ``F.dropout``) is refused, like
    train-mode BatchNorm; call ``model.eval()`` around EGN steps. Once per input shape the forward is
    run again on x and on each half of the batch (every per-sample input halved): a model whose
    outputs change (noise from its own generator, numpy) or depend on other samples
    (``h - h.mean(0)``) is refused, naming the cause.
    Cross-entropy's ``ignore_index`` (default -100) drops the samples with that label: they contribute
    no row, and the mean runs over the kept ones, as torch's loss does. Per-token losses: outputs
    (b, ..., C) with labels (b, ...) (``step(x, y)``), or a closure's loss on a view of the output
    (``out.reshape(-1, C)``, ``out.transpose(1, 2)``): one row per kept token and factor column, the
    mean over the kept tokens of the whole batch (:mod:`.sequence`).
    """

    # Every group option and state entry, checked at construction, load_state_dict and each step.
    HYPERPARAMETERS = egn_spec(LOSS_NAMES, CURVATURES, ("auto", "layerwise", "functional"))

    PER_GROUP = ()
    IGNORE_INDEX = True   # samples labelled ignore_index are dropped (inputs.drop_ignored)
    SEVERAL_INPUTS = True  # model(*args, **kwargs): the closure's call is recorded whole (ModelInputs)
    LOSS_VIEWS = staticmethod(view_index)   # losses on output.reshape(-1, C), output.transpose(1, 2), ...
    ADD_GROUP_MESSAGE = ("EGN solves one Gauss-Newton system over the parameters it was built with (its "
                         "Gram assembler hooks their layers); build a new EGN with every parameter to train")

    def __init__(self, params=None, lr: float = 0.1, damping: float = 1.0, loss=None,
                 line_search: bool = False, momentum: float = 0.0, adaptive_damping: bool = False, *,
                 damping_increase: float = 1.01, damping_decrease: float = 0.99, min_damping: float = 1e-8,
                 max_damping: float = 1e8, armijo: float = 0.1, backtrack: float = 0.8, max_tries: int = 15,
                 gram: str = "auto", memory_limit: int = DEFAULT_MEMORY_LIMIT, distributed: bool = False,
                 process_group=None, curvature: str = "exact", samples: int = 1,
                 gram_block_rows: int | None = None, model: nn.Module | None = None, compile=False):
        params, model = self.split_model(params, model)
        compile_opts = compile_options(compile)
        called = model                      # what the user calls (maybe compiled): closures are read off it
        model, shards = resolve(unwrap_compiled(model), distributed, process_group)
        model = unwrap_compiled(model)
        self.check_hyperparameters(dict(lr=lr, damping=damping, momentum=momentum,
                                        damping_increase=damping_increase, damping_decrease=damping_decrease,
                                        min_damping=min_damping, max_damping=max_damping, armijo=armijo,
                                        backtrack=backtrack))
        spec = resolve_loss(loss, "EGN")
        if spec is not None and spec.reduction == "sum" and shards is not None:
            raise ValueError("EGN: reduction='sum' is not supported with distributed=True (the global batch "
                             "size would scale the damping); use reduction='mean'")
        for name, flag in (("line_search", line_search), ("adaptive_damping", adaptive_damping)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        if not isinstance(max_tries, int) or max_tries < 1:
            raise ValueError(f"max_tries must be a positive int, got {max_tries!r}")
        if not isinstance(memory_limit, int) or memory_limit <= 0:
            raise ValueError(f"memory_limit must be a positive int (bytes), got {memory_limit!r}")
        check_curvature_options(curvature, samples, gram_block_rows, damping)
        if curvature != "exact" and (distributed or process_group is not None):
            raise ValueError(f"curvature={curvature!r} is not implemented for distributed EGN; use 'exact'")
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model has no trainable parameters (requires_grad=True)")
        params = self.model_params(params, model, trainable)
        defaults = dict(lr=lr, damping=damping, **self.loss_options(spec), line_search=line_search,
                        momentum=momentum, adaptive_damping=adaptive_damping, damping_increase=damping_increase,
                        damping_decrease=damping_decrease, min_damping=min_damping, max_damping=max_damping,
                        armijo=armijo, backtrack=backtrack, max_tries=max_tries, gram=gram,
                        memory_limit=memory_limit, curvature=curvature, samples=samples,
                        gram_block_rows=gram_block_rows)
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("EGN keeps one parameter group: its step solves one Gauss-Newton system for "
                             "all its parameters, so per-group options would not apply; pass the "
                             "parameters as one list (freeze others with requires_grad=False)")
        params = self.param_groups[0]["params"]
        self.check_model_dtype(params)
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if len(dtypes) > 1:
            raise ValueError(f"EGN: the model's parameters mix {sorted(map(str, dtypes))}; its forward, Gram and "
                             "solve need one dtype: convert the model with model.double() or model.float()")
        self.model = model
        self._per_sample_checked: dict = {}   # input shape -> output shape, for forwards that passed _check_per_sample
        self._assembler = gram_assembler(model, params, gram, memory_limit, gram_block_rows)
        self.shards = shards
        # The one data-parallel seam: every exchange of the step goes through self._ranks (the
        # assembler's too), which is the identity for a single process.
        self._ranks = SingleProcess() if shards is None else shards
        if shards is not None:
            shards.synchronise(model, self)  # same structure and hyper-parameters on every rank
        # compile=True: verified call patterns solve in one torch.compile graph (egn/compiled.py)
        self._compiled = None if compile_opts is None else CompiledSolve(self, compile_opts)
        self.finish_construction(called)

    # ----------------------------------------------------------------------------------------------
    # step = solve -> momentum -> line search -> damping update
    # ----------------------------------------------------------------------------------------------

    def step(self, closure=None, y=None):
        """One EGN step, as torch.optim steps, or on a batch given directly.

        * ``step(closure)``: ``closure()`` runs the model on a batch and computes the loss, as for
          ``torch.optim.LBFGS``; EGN reads the inputs from the model's call (every positional and
          keyword argument) and the targets from the loss call (an ``nn.MSELoss``/
          ``nn.CrossEntropyLoss``/``nn.BCEWithLogitsLoss`` or its ``torch.nn.functional`` form), or
          from an ``(output, target)`` pair the closure returns. EGN then runs its own forward on
          those inputs (the closure's backward is not needed, but harmless). Returns
          what the closure returned (for a pair, the pre-step loss), as torch.optim does.
        * ``step(x, y)``: the batch itself, x a tensor (``model(x)``), a tuple or list (``model(*x)``)
          or a dict (``model(**x)``); returns the statistics dict. Tensors whose first dimension is
          the batch size are per-sample inputs, everything else passes unchanged (docs/api.md).

        The statistics (``"loss"``: the pre-step loss, in the user's reduction) are also kept in
        ``last_stats``. The step runs with autocast off, in the parameters' dtype.
        """
        self._ranks.begin_step(self)
        batch, x, y, scale = self._prepare(closure, y)
        with self.no_autocast():
            stats = self._step(x, y, scale)
        self.last_stats = stats
        return self.step_result(batch, stats)

    def _step(self, x, y, scale: float) -> dict:
        group = self.param_groups[0]   # checked by _prepare
        params = group["params"]
        lam = float(group["damping"])
        state = self.state.get(params[0], {})  # read only: a refused step must leave no state behind
        with torch.enable_grad():
            sol = self._solve(x, y, lam / scale)
        stats = step_record(sol, group, lam, scale, self._assembler.method)
        if sol.retries > 0:
            warnings.warn(f"EGN: Cholesky of the damped Gram needed {sol.retries} jitter retries "
                          f"(jitter {sol.jitter:.3g})", RuntimeWarning, stacklevel=user_stacklevel())
        norm = None if sol.direction is None else sol.norm
        stats["direction_norm"] = norm
        if norm is None or not math.isfinite(norm):
            stats["damping"] = stats["next_damping"] = lam
            return refuse(stats, "non-finite loss, Gram or direction", "EGN")

        step_count, buffers, d_step = self._momentum(sol.direction, group, state)
        if group["line_search"] or group["adaptive_damping"]:
            gTd, quad = self._model_terms(sol, d_step, buffers is not None)
            backup = [p.detach().clone() for p in params]
            accepted, alpha, new_loss = self._move(x, sol, d_step, gTd if group["line_search"] else None,
                                                   backup, group, state, stats)
            if accepted and not _all_finite(params):
                accepted = False
                refuse(stats, "non-finite parameters after the update", "EGN")
            if not accepted:
                with torch.no_grad():
                    for p, w in zip(params, backup):
                        p.copy_(w)
        else:   # one step of size lr: the new values are checked before anything is written
            alpha, new_loss = float(group["lr"]), None
            with torch.no_grad():
                new = torch._foreach_add(params, d_step, alpha=alpha)
            accepted = all_finite_owned(new)
            if accepted:
                with torch.no_grad():
                    torch._foreach_copy_(params, new)
            else:
                refuse(stats, "non-finite parameters after the update", "EGN")
        if accepted:   # the state changes only with the parameters
            self.state[params[0]]["step"] = step_count
            for p, m in zip(params, buffers or ()):
                self.state[p]["momentum_buffer"] = m
        if group["line_search"]:
            self.state[params[0]]["alpha"] = alpha

        if group["adaptive_damping"]:
            stats["rho"] = gain_ratio(sol.loss, new_loss, alpha, gTd, quad)
            group["damping"] = next_damping(lam, stats["rho"], group)
        stats.update(accepted=accepted, alpha=alpha if accepted else 0.0, next_damping=group["damping"],
                     new_loss=None if new_loss is None else float(new_loss) * scale)
        return stats

    # -- solve -------------------------------------------------------------------------------------

    def _solve(self, x, y, lam: float) -> Solution:
        """The LM direction on (x, y) with damping lam of L (see :meth:`_solve_once`).

        A solve whose back-projection disagrees with the Gram's layer factors moved the disagreeing
        parameters to the torch.func route (or raised, for gram="layerwise") and is redone. Each retry
        moves at least one parameter for good, so the loop ends after at most one retry per parameter.
        """
        x = ModelInputs.of(x)
        compiled = self._compiled
        sol = None if compiled is None else compiled.solve(self, x, y, lam)
        while sol is None:
            sol = self._solve_once(x, y, lam)
            if sol is not None and compiled is not None:
                compiled.note_eager(self, x, sol)
        return sol

    def _solve_once(self, x, y, lam: float) -> Solution | None:
        """One solve; None when the direction check failed and the solve must be redone.

        exact / true-class (push-through): dir = -J^T S u, (K + b lambda I) u = t with S t = e.
        sampled (Woodbury; t does not exist, or overflowed): with g = J^T e / b and A = S^T J,
        (A^T A / b + lambda I)^{-1} g = (g - A^T (K + b lambda I)^{-1} A g) / lambda, so
        dir = -J^T (e / b - S u) / lambda with (K + b lambda I) u = S^T J g.
        In both, S^T J dir = -Ku and g^T dir = -tKu / b (the quadratic model's terms).
        """
        params = self.param_groups[0]["params"]
        clock = Clock(x.first)
        assembly = self._assembler.assemble(x, lambda forward: self._linearise(x, y, lam, forward, clock),
                                            self._ranks)
        sol = assembly.payload
        if assembly.gram is None:   # the loss or its factor is not finite: no step
            return sol
        factor, b, f = sol.factor, sol.b, sol.f
        sampled = factor.target is None
        if sampled:
            # S^T J g from K's factors in a single process; per-position rows (a layout) by double backward
            own = self._ranks.world == 1 and sol.layout is None
            rhs, g, gg, g_norms = self._sampled_rhs(f, factor, params, b, assembly if own else None)
        assembly.rows = None   # only S^T J g needs them: free the torch.func rows before the factorisation
        clock.lap("gram")
        damped = assembly.gram
        live = None if sol.layout is None else sol.layout.live(damped.shape[0] // (sol.layout.b * sol.layout.width))
        if live is not None:   # the rows of samples with fewer kept positions than the longest are zero
            damped = damped[live][:, live]
        damped.diagonal().add_(b * lam)   # in place: K is large and only needed damped
        # The Woodbury solve's inputs; its largest damped diagonal entry ~ ||K + mu I|| bounds its residual
        woodbury = (rhs, g, gg, damped.diagonal().amax()) if sampled else None
        plain = plain_factor(damped)
        L, summary, mu = plain_cholesky(damped) + (b * lam,) if plain else factor_op(damped, b * lam)
        clock.lap("factor")
        # One host sync for the factor's verdict, the direction check, ||dir|| and the loss. On the CPU a
        # plain factor, and the op with its jitter retries only when that one fails the op's policy;
        # elsewhere the op, which decides its retries on the device.
        while True:
            u, back_projection, direction = self._back_project(sol, L, mu, lam, woodbury)
            # ||J^T S u|| per parameter, for the check and (unless sampled) ||dir|| = ||-J^T S u||
            norms = torch._foreach_norm(back_projection)
            # sampled: J^T S u = g - J^T (e / b - S u) carries g's rounding, so the check allows for it
            ids, flags = assembly.disagreement(u if sol.layout is None else sol.layout.padded(u),
                                               back_projection, norms, g_norms if sampled else None)
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(direction) if sampled else norms))
            verdict = torch.cat([summary, norm.reshape(1), sol.loss.reshape(1).to(f.dtype),
                                 flags.to(f.dtype)]).tolist()
            head, verdict = verdict[:len(summary)], verdict[len(summary):]
            if not plain:
                sol.retries, sol.jitter = int(head[0]), head[1]
                if sol.retries < 0:   # only for a non-finite Gram: no step
                    return sol
                break
            if clean(head, f.dtype):
                break
            L, summary, mu = factor_op(damped, b * lam)
            plain = False
        sol.norm, sol.loss_value = verdict[0], verdict[1]
        # A non-finite direction is refused by the step; its check would compare inf with inf.
        bad = [pid for pid, flag in zip(ids, verdict[2:]) if flag] if math.isfinite(sol.norm) else []
        if bad:
            self._assembler.route_to_functional(bad)
            return None
        sol.direction = direction
        clock.lap("backproject")
        return sol

    def _back_project(self, sol: Solution, L, mu: float, lam: float, woodbury=None):
        """(u, J^T S u, dir) from the factor L of K + mu I (mu = b lambda + jitter); sets how Ku and tKu form.
        ``woodbury``: (S^T J g, g, g.g, K + mu I's largest diagonal entry) for the Woodbury solve, else None."""
        params = self.param_groups[0]["params"]
        factor, b, f = sol.factor, sol.b, sol.f
        m = L.shape[0] // b
        if woodbury is not None:
            rhs, g, gg, top = woodbury
            u = cholesky_solve_lower(rhs.reshape(-1, 1), L).reshape(b, m)
            grads = vjp(f, params, factor.residual / b - apply_factor(factor, u))
            back_projection = torch._foreach_sub(g, grads)   # J^T S u
            direction = torch._foreach_div(grads, -lam)
            # S^T J dir = -(A g - K u) / lambda = -mu u / lambda;  g^T dir = -(g.g - (A g).u) / lambda
            sol.set_terms(lambda: woodbury_terms(rhs.reshape(b, m), u, gg, mu, lam, b, top))
            return u, back_projection, direction
        t = self._ranks.gather_rows(factor.target).reshape(-1, 1)
        u = cholesky_solve_lower(t, L).reshape(b, m)
        # K u = (M + jitter I - mu I) u with (M + jitter I) u = t: no extra product.
        sol.set_terms(lambda: push_through_terms(t.reshape(b, m), u, mu))
        back_projection = self._ranks.sum_tensors(vjp(f, params, apply_factor(factor, u[self._ranks.rows])))
        return u, back_projection, torch._foreach_neg(back_projection)

    def _linearise(self, x, y, lam: float, forward, clock: Clock):
        """Inside the assembler's call: the checked forward (on every rank together), the loss factor,
        and the verdict on its finiteness. Returns (S's columns (m, b, c), or None when the loss is
        not finite; the Solution begun)."""
        group = self.param_groups[0]
        ranks = self._ranks
        seq = isinstance(y, SequenceTargets)

        def check():
            check_inputs(x, y.y if seq else y, self.model, group["params"][0], batch_y=not seq or y.index is None)
            check_samplewise(self.model)
            with twice_differentiable(group):
                f = forward_naming_x(forward, x)
            shape = self._check_per_sample(x, f)
            if not seq:
                return f, targets(y, f, group), None
            layout = build_layout(y, shape, f)   # the kept positions: their logits are the rows of the loss
            f = layout.gather(f)
            return f, targets(layout.y, f, group), layout

        f, y, layout = ranks.agree(check, lambda: x.batch_size, like=x.first)
        clock.lap("forward")
        if group.get("curvature", "exact") == "sampled":   # before the draws are made: (b k)^2 Gram entries
            rows = ranks.total if layout is None else f.shape[0]
            check_memory(rows * group["samples"], 0, f.dtype, group["memory_limit"], self.model,
                         f" for {rows} samples or positions with samples={group['samples']} drawn labels each "
                         "(curvature='sampled'; use fewer samples)")
        factor = curvature_factor(group["loss"], group.get("curvature", "exact"), f.detach(), y,
                                  group.get("samples", 1))
        sol = Solution(f, y, factor, f.shape[0], factor.loss.detach(), clock.times, layout=layout)
        finite = _all_finite([factor.loss, factor.residual if factor.target is None else factor.target])
        if not finite and factor.target is not None and ranks.world == 1 and lam > 0 and \
                _all_finite([factor.loss, factor.residual]):
            # A saturated softmax / sigmoid (log p below about -177 in float32) overflows t = V^T e / s
            # while e and Q are finite: the same LM system by Woodbury's identity, as for sampled curvature.
            factor = sol.factor = factor._replace(target=None)
            finite = True
        if ranks.world > 1:  # global loss and a global verdict, in one all_reduce
            loss_sum, nonfinite = ranks.sum_tensors([factor.loss.reshape(1) * sol.b,
                                                     f.new_tensor([float(not finite)])])
            sol.b = ranks.total
            sol.loss, finite = loss_sum[0] / sol.b, not bool(nonfinite[0])
        if not finite:
            return None, sol
        if factor.target is None and not lam > 0:
            raise ValueError("curvature='sampled' needs damping > 0 (the gradient is not in the range of "
                             "the sampled factor, so the step uses Woodbury's identity, which divides by it)")
        S = factor_matrix(factor)
        if layout is None:
            return S.permute(2, 0, 1), sol   # columns[a, i] = S_i[:, a]: (m, b, c)
        rows = layout.b * layout.width * S.shape[2]   # before the rows of missing positions are dropped
        check_memory(rows, 0, f.dtype, group["memory_limit"], self.model,
                     f" for {f.shape[0]} kept positions ({layout.width} in the longest sample, {rows} rows "
                     "before padding's are dropped; use shorter sequences or a smaller batch)")
        return layout.columns(S), sol   # formed one column at a time (sequence.PositionColumns)

    def _check_per_sample(self, x, f) -> tuple:
        """Once per input signature (shapes, dtypes, constants), :func:`.inputs.check_per_sample` (a
        repeatable forward, no sample mixing); returns the model's output shape."""
        key = x.signature()
        if key not in self._per_sample_checked:
            self._per_sample_checked[key] = check_per_sample(self.model, x, f)
        return self._per_sample_checked[key]

    @staticmethod
    def _sampled_rhs(f, factor, params, b, assembly=None):
        """S^T J g, g = J^T e / b (one VJP), g.g and ||g|| per parameter; S^T J g from K's factors (the
        rows of A = S^T J), else J g by double backward."""
        g = vjp(f, params, factor.residual / b)
        g_norms = torch._foreach_norm(g)
        gg = torch.stack(g_norms).square().sum()
        Ag = assembly.apply(g) if assembly is not None else None
        return (apply_factor_transpose(factor, jvp(f, params, g)) if Ag is None else Ag), g, gg, g_norms

    # -- momentum ----------------------------------------------------------------------------------

    def _momentum(self, direction, group: dict, state: dict):
        """(step count, new buffers or None, the step's direction): m = beta m + (1 - beta) dir, stepping
        along m / (1 - beta^t). Nothing is written here: the buffers are kept only if the step is taken."""
        beta = group["momentum"]
        step_count = state.get("step", 0) + 1
        if not beta > 0:
            return step_count, None, direction
        buffers = [self.state.get(p, {}).get("momentum_buffer", torch.zeros_like(p)) for p in group["params"]]
        buffers = [beta * m + (1 - beta) * d for m, d in zip(buffers, direction)]
        return step_count, buffers, [m / (1 - beta ** step_count) for m in buffers]

    # -- line search -------------------------------------------------------------------------------

    def _move(self, x, sol: Solution, d_step, gTd, backup, group: dict, state: dict, stats: dict):
        """w = w0 + alpha d: Armijo backtracking from alpha0 = min(1.5 alpha_prev, lr) when gTd is given
        (line search), else one step of size lr. Returns (accepted, alpha, new loss or None)."""
        params = group["params"]
        alpha = float(group["lr"])
        if gTd is None:
            _set_params(params, backup, d_step, alpha)
            return True, alpha, self._loss_at(x, sol) if group["adaptive_damping"] else None
        if state.get("alpha", 0.0) > 0:   # a step at lr = 0 stores alpha 0: the next search starts at lr
            alpha = min(1.5 * state["alpha"], alpha)
        for tries in range(1, group["max_tries"] + 1):
            _set_params(params, backup, d_step, alpha)
            new_loss = self._loss_at(x, sol)
            stats["line_search_tries"] = tries
            if bool(new_loss <= sol.loss + group["armijo"] * alpha * gTd):
                return True, alpha, new_loss
            if tries < group["max_tries"]:
                alpha *= group["backtrack"]
        return False, alpha, new_loss

    @torch.no_grad()
    def _loss_at(self, x, sol: Solution) -> torch.Tensor:
        f = outputs_of(self.model, x.call(self.model), x.batch_size)
        if sol.layout is not None:
            f = sol.layout.gather(f)
        loss = LOSS_FACTORS[self.param_groups[0]["loss"]](f, sol.y).loss
        return self._ranks.mean(loss)

    def _model_terms(self, sol: Solution, d_step: list[torch.Tensor], with_momentum: bool):
        """g^T d and ||S^T J d||^2 / b of the quadratic model along the step direction d.

        For d = dir = -J^T S u both come from the Gram: g^T d = -t^T K u / b and S^T J d = -K u. A
        momentum direction needs one VJP for g = J^T e / b and a JVP (double backward) for J d.
        """
        f, factor, b = sol.f, sol.factor, sol.b
        if not with_momentum:   # from the Gram, unless its push-through terms may have cancelled
            gTd, quad, doubtful = torch.stack([-sol.tKu / b, sol.Ku.square().sum() / b,
                                               sol.doubtful.to(sol.Ku.dtype)]).tolist()
            if not doubtful:
                return gTd, quad
        params = self.param_groups[0]["params"]
        with torch.enable_grad():
            g = vjp(f, params, factor.residual / b)
            Jd = jvp(f, params, d_step)
        quad = apply_factor_transpose(factor, Jd).square().sum().reshape(1)
        # g = sum_r J_r^T e_r / b and ||S^T J d||^2 = sum_r ||S_r^T J_r d||^2
        *g, quad = self._ranks.sum_tensors(g + [quad])
        gTd = sum(float((gi * d).sum()) for gi, d in zip(g, d_step))
        return gTd, float(quad[0] / b)

    # -- without a step ----------------------------------------------------------------------------

    def direction(self, closure=None, y=None) -> list[torch.Tensor]:
        """The LM direction dir = -J^T S u, one tensor per trainable parameter, on the batch of
        ``direction(closure)`` or ``direction(x, y)`` (see :meth:`step`).

        Nothing is stepped and no state changes. Raises RuntimeError when the loss at the current
        parameters is not finite.
        """
        _, x, y, scale = self._prepare(closure, y)
        with torch.enable_grad(), self.no_autocast():
            sol = self._solve(x, y, self.param_groups[0]["damping"] / scale)
        if sol.direction is None:
            raise RuntimeError(f"the loss or its curvature at the current parameters is not finite "
                               f"(loss {float(sol.loss)}); no direction exists")
        return [d.detach() for d in sol.direction]

    # -- before the solve ---------------------------------------------------------------------------

    def _prepare(self, closure, y):
        """(batch, x, y, s): the batch of ``step``/``direction``, its loss, the hyper-parameters, the
        samples ``ignore_index`` drops, and the user's loss scale s, on every rank together: a refusal
        on one rank (a NaN lr, a closure computing another loss, targets no loss can be inferred from)
        raises the same error on every rank."""
        def prepare():
            batch = self.batch(closure, y)
            spec = self.adopt_loss(batch)
            group = self.checked_group() if self.shards is not None else self.param_groups[0]
            x = ModelInputs.of(batch.x)
            # The closure's loss call has torch's layout (N, C, d1, ...); step(x, y) and a returned
            # (output, target) pair have classes last, (b, ..., C).
            y_ = loss_targets(spec, x, batch.y, batch.output, batch.loss_input,
                              1 if batch.spec is not None else -1)
            if isinstance(y_, SequenceTargets):
                if self._ranks.world > 1:
                    raise ValueError("EGN: per-position losses (outputs (b, ..., C) with labels (b, ...), or a "
                                     "loss on a view of the output) are not implemented with distributed=True")
                return batch, x, y_, float(y_.kept()) if spec.reduction == "sum" else 1.0
            x, kept = drop_ignored(group, x, y_)
            return batch, x, kept, self._loss_scale(spec, x, kept)
        if self._ranks.world == 1:
            return prepare()
        return self._ranks.agree(prepare, lambda: 0)

    @staticmethod
    def _loss_scale(spec: LossSpec, x, y) -> float:
        """s with (user's loss) = s * L: the damping of the user's loss is lambda, that of L lambda / s."""
        if spec.reduction == "batch_mean" or not isinstance(y, torch.Tensor) or y.dim() == 0:
            return 1.0
        return spec.scale(x.batch_size, y[0].numel() if y.dim() > 1 else 1)
