"""EGN: exact Gauss-Newton / Levenberg-Marquardt for any ``nn.Module`` (Korbit et al., arXiv 2405.14402).

For a batch of b samples with c outputs, mean loss L(w) = (1/b) sum_i l(f_i, y_i), residual e = dL/df * b,
Q = blockdiag(d^2 l / df_i^2) = S S^T and J = df/dw ((b c) x d), the LM direction solves

    (J^T Q J / b + lambda I) dir = -J^T e / b.

With the push-through identity it becomes a (b c) x (b c) symmetric positive definite solve:

    dir = -J^T S u,    (S^T J J^T S + b lambda I) u = t,    S t = e,

factored by Cholesky. K = S^T J J^T S comes from :mod:`revgn_ext.egn.gram` (layerwise for linear
models, without forming J) and J^T (S u) is one vector-Jacobian product.

Data-parallel (``distributed=True``): rank r holds b_r samples. The rows of K's factors and of t are
all_gathered, every rank factors the same global K + b lambda I and solves for the same u, then
J^T S u = sum_r J_r^T S_r u_r is one local VJP per rank and one all_reduce (docs/distributed.md).
"""
from __future__ import annotations

import math
import re
import time
import warnings

import torch
from torch import nn

from .._checks import check_tensor
from .._hyper import egn_spec
from .._optim import LOSS_NAMES, GaussNewtonOptimizer, LossSpec, refuse, resolve_loss, unwrap_compiled
from ..distributed import SingleProcess, resolve
from ..ops.gram import gram_factor_from_gram_unchecked
from .gram import DEFAULT_MEMORY_LIMIT, check_samplewise, gram_assembler
from .loss_factors import (CURVATURES, LOSS_FACTORS, apply_factor, apply_factor_transpose, curvature_factor,
                           factor_matrix)

__all__ = ["EGN"]

_SHAPE_ERROR = re.compile(r"shape|size|dimension|channel", re.IGNORECASE)


def _all_finite(tensors) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


class EGN(GaussNewtonOptimizer):
    """Exact Gauss-Newton / Levenberg-Marquardt optimizer for any ``nn.Module`` (docs/api.md).

    ``EGN(params, model=model, loss=...)`` as for any ``torch.optim`` optimizer, or ``EGN(model, ...)``.

    Args:
        params: the parameters to train, all of them parameters of ``model`` (default: its trainable
            ones, in ``model.parameters()`` order). One group: the step solves one system for all.
        model: the network, called as ``model(x)``; may be ``torch.compile``-d or DDP-wrapped. Samples
            must not interact (no BatchNorm in training mode).
        loss: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` (``label_smoothing``, probability targets) or
            ``nn.BCEWithLogitsLoss`` with reduction "mean" or "sum"; or "mse" (0.5 ||f - y||^2 per
            sample), "cross_entropy" (softmax, integer labels) or "binary_cross_entropy" (one logit,
            targets in [0, 1]), averaged over the batch. None: the closure's loss, or inferred from the
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

            * "exact": S_i the exact c x c square root; a (b c) x (b c) system, c backward passes for
              the Gram. No bias.
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
    train-mode BatchNorm; call ``model.eval()`` around EGN steps.
    """

    # Every group option and state entry, checked at construction, load_state_dict and each step.
    HYPERPARAMETERS = egn_spec(LOSS_NAMES, CURVATURES, ("auto", "layerwise", "functional"))

    PER_GROUP = ()
    ADD_GROUP_MESSAGE = ("EGN solves one Gauss-Newton system over the parameters it was built with (its "
                         "Gram assembler hooks their layers); build a new EGN with every parameter to train")

    def __init__(self, params=None, lr: float = 0.1, damping: float = 1.0, loss=None,
                 line_search: bool = False, momentum: float = 0.0, adaptive_damping: bool = False, *,
                 damping_increase: float = 1.01, damping_decrease: float = 0.99, min_damping: float = 1e-8,
                 max_damping: float = 1e8, armijo: float = 0.1, backtrack: float = 0.8, max_tries: int = 15,
                 gram: str = "auto", memory_limit: int = DEFAULT_MEMORY_LIMIT, distributed: bool = False,
                 process_group=None, curvature: str = "exact", samples: int = 1,
                 gram_block_rows: int | None = None, model: nn.Module | None = None):
        params, model = self.split_model(params, model)
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
        _check_curvature_options(curvature, samples, gram_block_rows, damping)
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
        self.model = model
        self._assembler = gram_assembler(model, params, gram, memory_limit, gram_block_rows)
        self.shards = shards
        # The one data-parallel seam: every exchange of the step goes through self._ranks, which is
        # the identity for a single process.
        self._ranks = SingleProcess() if shards is None else shards
        if shards is not None:
            shards.synchronise(model, self)  # same structure and hyper-parameters on every rank
        self.finish_construction(called)

    # ----------------------------------------------------------------------------------------------
    # The LM direction
    # ----------------------------------------------------------------------------------------------

    def _check_inputs(self, x, y) -> None:
        p0 = self.param_groups[0]["params"][0]
        _check_x_dtype(x, self.model)
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
        if x.is_floating_point() and x.dtype != p0.dtype:
            raise ValueError(f"x has dtype {x.dtype} but the model's parameters have {p0.dtype}")
        if x.device != p0.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {p0.device}")
        check_tensor("y", y, float_only=False, finite=False)
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
        if y.dim() == 0 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have the batch size of x ({x.shape[0]}), got shape {tuple(y.shape)}")
        check_tensor("y", y, float_only=False)

    def _targets(self, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """y in the form the loss factor expects, checked against the outputs f (b, c): for
        cross_entropy int64 labels (b,), or class probabilities (b, c) when y holds probabilities or
        the loss has label smoothing; (b, c) floats otherwise."""
        b, c = f.shape
        group = self.param_groups[0]
        loss = group["loss"]
        if loss == "cross_entropy":
            return self._class_targets(y, f, group.get("label_smoothing", 0.0))
        if y.is_complex() or y.dtype == torch.bool or not y.is_floating_point():
            hint = (" (for class labels use loss='cross_entropy')" if loss == "mse" else
                    f" in [0, 1]; convert labels with y.to({f.dtype})")
            raise ValueError(f"y has dtype {y.dtype}, but {loss} needs floating-point targets{hint}")
        if y.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"y has dtype {y.dtype}; the targets must be float32 or float64 (the model "
                             f"computes in {f.dtype}): convert them with y.to({f.dtype})")
        if y.numel() != b * c:
            raise ValueError(f"y must hold {c} value(s) per sample to match the model output {tuple(f.shape)}, "
                             f"got shape {tuple(y.shape)}")
        y = y.reshape(b, c).to(f.dtype)
        if loss == "binary_cross_entropy":
            if c != 1:
                raise ValueError(f"binary_cross_entropy needs one model output (logit), got {c}")
            if bool(((y < 0) | (y > 1)).any()):
                raise ValueError("y must lie in [0, 1] for binary_cross_entropy")
        return y

    @staticmethod
    def _class_targets(y: torch.Tensor, f: torch.Tensor, smoothing: float) -> torch.Tensor:
        """Labels (b,) as int64, or q (b, c) = (1 - eps) q + eps / c for probabilities or smoothing."""
        b, c = f.shape
        if c < 2:
            raise ValueError("cross_entropy needs at least 2 model outputs; use binary_cross_entropy")
        if y.is_floating_point():
            if y.dtype not in (torch.float32, torch.float64) or tuple(y.shape) != (b, c):
                raise ValueError(f"y must be integer class labels of shape ({b},) or float32/float64 class "
                                 f"probabilities of shape ({b}, {c}) for cross_entropy, got {y.dtype} of "
                                 f"shape {tuple(y.shape)}")
            q = y.to(f.dtype)
            tol = 1e-4 if q.dtype == torch.float32 else 1e-10
            if bool(((q < 0) | (q > 1)).any()) or bool(((q.sum(1) - 1).abs() > tol).any()):
                raise ValueError("y holds class probabilities for cross_entropy, so each row must lie in "
                                 "[0, 1] and sum to 1")
        else:
            if y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
                raise ValueError(f"y must be a 1-d tensor of integer class labels for cross_entropy, got "
                                 f"{y.dtype} of shape {tuple(y.shape)}")
            if bool(((y < 0) | (y >= c)).any()):
                raise ValueError(f"y holds labels outside [0, {c}) (the model has {c} outputs)")
            if not smoothing:
                return y.long()
            q = torch.nn.functional.one_hot(y.long(), c).to(f.dtype)
        return q * (1 - smoothing) + smoothing / c if smoothing else q

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # Parameters the layer rules miss at run time fall back per parameter inside the assembler.
        return self._assembler.forward(x)

    def _forward_naming_x(self, x: torch.Tensor) -> torch.Tensor:
        """The forward, with torch's shape errors ("mat1 and mat2 shapes cannot be multiplied") turned
        into one that names x."""
        try:
            return self._forward(x)
        except RuntimeError as err:
            if isinstance(err, torch.OutOfMemoryError) or not _SHAPE_ERROR.search(str(err)):
                raise
            raise ValueError(f"x of shape {tuple(x.shape)} does not fit the model (check the number of "
                             f"features per sample); its forward pass failed with: {err}") from err

    def _checked_forward(self, x, y):
        """(f, y in loss form) after every check on (x, y); on all ranks together when distributed."""
        def check():
            self._check_inputs(x, y)
            check_samplewise(self.model)
            f = self._forward_naming_x(x)
            return f, self._targets(y, f)
        return self._ranks.agree(check, lambda: x.shape[0], like=x)

    def _solve(self, x, y, lam: float) -> dict:
        """Everything one step needs: pre-step loss, dir, and the Gram products for predicted decrease.

        exact / true-class (push-through): dir = -J^T S u, (K + b lambda I) u = t with S t = e.
        sampled (Woodbury, t does not exist): with g = J^T e / b and A = S^T J,
        (A^T A / b + lambda I)^{-1} g = (g - A^T (K + b lambda I)^{-1} A g) / lambda, so
        dir = -J^T (e / b - S u) / lambda with (K + b lambda I) u = S^T J g.
        In both, S^T J dir = -out["Ku"] and g^T dir = -out["tKu"] / b (the quadratic model's terms).
        """
        group = self.param_groups[0]
        params = group["params"]
        ranks = self._ranks
        clock = _Clock(x)
        f, y = self._checked_forward(x, y)
        clock.lap("forward")
        curvature = group.get("curvature", "exact")
        factor = curvature_factor(group["loss"], curvature, f.detach(), y, group.get("samples", 1))
        b, c = f.shape
        out = {"f": f, "y": y, "b": b, "factor": factor, "loss": factor.loss.detach(), "direction": None,
               "retries": 0, "jitter": 0.0, "time": clock.times}
        parts = [factor.loss, factor.residual if factor.target is None else factor.target]
        finite = _all_finite(parts)
        if ranks.world > 1:  # global loss and a global verdict, in one all_reduce
            loss_sum, nonfinite = ranks.sum_tensors([factor.loss.reshape(1) * b, f.new_tensor([float(not finite)])])
            out["b"] = b = ranks.total
            out["loss"], finite = loss_sum[0] / b, not bool(nonfinite[0])
        if not finite:
            return out
        columns = factor_matrix(factor).permute(2, 0, 1)  # columns[a, i] = S_i[:, a]: (m, b, c)
        m = columns.shape[0]
        n = b * m
        sampled = factor.target is None
        if sampled:
            if not lam > 0:
                raise ValueError("curvature='sampled' needs damping > 0 (the gradient is not in the range of "
                                 "the sampled factor, so the step uses Woodbury's identity, which divides by it)")
            rhs, g, gg = self._sampled_rhs(f, factor, params, b)
        M = self._assembler.gram(f, columns, self.shards)
        clock.lap("gram")
        M.diagonal().add_(b * lam)   # in place: the Gram is large and only needed damped, K = M - b lambda I
        chol = gram_factor_from_gram_unchecked(M[None], M.new_zeros(1))
        out["retries"], out["jitter"] = chol.info.item(), chol.jitter.item()
        clock.lap("factor")
        if out["retries"] < 0:   # only for a non-finite Gram: no step
            return out
        mu = b * lam + out["jitter"]
        if sampled:
            u = torch.cholesky_solve(rhs.reshape(n, 1), chol.L[0]).reshape(b, m)
            v = factor.residual / b - apply_factor(factor, u)
            grads = torch.autograd.grad(f, params, grad_outputs=v, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads, params)]
            if not self._assembler.check_direction(u, [gi - gr for gi, gr in zip(g, grads)]):   # J^T S u
                return self._solve(x, y, lam)
            out["direction"] = [-gr / lam for gr in grads]
            # S^T J dir = -(A g - K u) / lambda = -mu u / lambda;  g^T dir = -(g.g - (A g).u) / lambda.
            out["Ku"] = mu / lam * u
            out["tKu"] = b / lam * (gg - (rhs * u).sum())
        else:
            t = ranks.gather_rows(factor.target).reshape(n, 1)
            u = torch.cholesky_solve(t, chol.L[0])
            # K u = (M + jitter I - mu I) u with (M + jitter I) u = t: no extra product.
            Ku = (t - mu * u).reshape(b, m)
            u = u.reshape(b, m)
            v = apply_factor(factor, u[ranks.rows])
            grads = torch.autograd.grad(f, params, grad_outputs=v, retain_graph=True, allow_unused=True)
            direction = [-g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
            direction = ranks.sum_tensors(direction)
            if not self._assembler.check_direction(u, [-d for d in direction]):   # J^T S u
                return self._solve(x, y, lam)   # the Gram missed a use: redone with the fallback
            out["direction"] = direction
            out["Ku"] = Ku
            out["tKu"] = (t.reshape(b, m) * Ku).sum()
        clock.lap("backproject")
        return out

    @staticmethod
    def _sampled_rhs(f, factor, params, b):
        """S^T J g, g = J^T e / b (one VJP) and g.g; J g by double backward (a JVP through the VJP)."""
        g = torch.autograd.grad(f, params, grad_outputs=factor.residual / b, retain_graph=True, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
        z = torch.zeros_like(f, requires_grad=True)
        vjp = torch.autograd.grad(f, params, grad_outputs=z, create_graph=True, allow_unused=True)
        pairs = [(v, gi) for v, gi in zip(vjp, g) if v is not None]
        Jg = torch.autograd.grad([v for v, _ in pairs], z, grad_outputs=[gi for _, gi in pairs])[0]
        gg = sum((gi * gi).sum() for gi in g)
        return apply_factor_transpose(factor, Jg.detach()), g, gg

    @torch.no_grad()
    def _loss_at(self, x, y) -> torch.Tensor:
        f = self.model(x).reshape(x.shape[0], -1)
        loss = LOSS_FACTORS[self.param_groups[0]["loss"]](f, y).loss
        return self._ranks.mean(loss)

    def direction(self, closure=None, y=None) -> list[torch.Tensor]:
        """The LM direction dir = -J^T S u, one tensor per trainable parameter, on the batch of
        ``direction(closure)`` or ``direction(x, y)`` (see :meth:`step`).

        Nothing is stepped and no state changes. Raises RuntimeError when the loss at the current
        parameters is not finite.
        """
        batch = self.batch(closure, y)
        spec = self.adopt_loss(batch)
        x, y = batch.x, batch.y
        with torch.enable_grad(), self.no_autocast():
            sol = self._solve(x, y, self.checked_group()["damping"] / self._loss_scale(spec, x, y))
        if sol["direction"] is None:
            raise RuntimeError(f"the loss or its curvature at the current parameters is not finite "
                               f"(loss {float(sol['loss'])}); no direction exists")
        return [d.detach() for d in sol["direction"]]

    @staticmethod
    def _loss_scale(spec: LossSpec, x, y) -> float:
        """s with (user's loss) = s * L: the damping of the user's loss is lambda, that of L lambda / s."""
        if spec.reduction == "batch_mean" or not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) \
                or x.dim() == 0 or y.dim() == 0:
            return 1.0
        return spec.scale(x.shape[0], y[0].numel() if y.dim() > 1 else 1)

    # ----------------------------------------------------------------------------------------------
    # The step
    # ----------------------------------------------------------------------------------------------

    def step(self, closure=None, y=None):
        """One EGN step, as torch.optim steps, or on a batch given directly.

        * ``step(closure)``: ``closure()`` runs the model on a batch and computes the loss, as for
          ``torch.optim.LBFGS``; EGN reads the input x from the model's call and the targets from the
          loss call (an ``nn.MSELoss``/``nn.CrossEntropyLoss``/``nn.BCEWithLogitsLoss`` or its
          ``torch.nn.functional`` form), or from an ``(output, target)`` pair the closure returns. EGN
          then runs its own forward on x (the closure's backward is not needed, but harmless). Returns
          what the closure returned (for a pair, the pre-step loss), as torch.optim does.
        * ``step(x, y)``: the batch itself; returns the statistics dict.

        The statistics (``"loss"``: the pre-step loss, in the user's reduction) are also kept in
        ``last_stats``. The step runs with autocast off, in the parameters' dtype.
        """
        batch = self.batch(closure, y)
        spec = self.adopt_loss(batch)
        with self.no_autocast():
            stats = self._step(batch.x, batch.y, self._loss_scale(spec, batch.x, batch.y))
        self.last_stats = stats
        return self.step_result(batch, stats)

    def _step(self, x, y, scale: float) -> dict:
        group = self.checked_group()
        params = group["params"]
        lam = float(group["damping"])
        state = self.state.get(params[0], {})  # read only: a refused step must leave no state behind
        with torch.enable_grad():
            sol = self._solve(x, y, lam / scale)
        stats = {"loss": float(sol["loss"]) * scale, "refused": False, "reason": None, "lr": float(group["lr"]),
                 "direction_norm": None, "batch_size": sol["b"], "new_loss": None, "damping": lam, "alpha": 0.0,
                 "line_search_tries": 0, "accepted": False, "cholesky_retries": sol["retries"],
                 "cholesky_jitter": sol["jitter"], "rho": None, "gram": self._assembler.method,
                 "time": sol["time"]}
        if sol["retries"] > 0:
            warnings.warn(f"EGN: Cholesky of the damped Gram needed {sol['retries']} jitter retries "
                          f"(jitter {sol['jitter']:.3g})", RuntimeWarning, stacklevel=2)
        direction = sol["direction"]
        norm = None if direction is None else float(torch.linalg.vector_norm(
            torch.stack(torch._foreach_norm(direction))))
        stats["direction_norm"] = norm
        if norm is None or not math.isfinite(norm):
            stats["damping"] = stats["next_damping"] = lam
            return refuse(stats, "non-finite loss, Gram or direction", "EGN")

        beta = group["momentum"]
        step_count = state.get("step", 0) + 1
        needs_model = group["line_search"] or group["adaptive_damping"]
        if beta > 0:
            buffers = [self.state[p].get("momentum_buffer", torch.zeros_like(p)) for p in params]
            buffers = [beta * m + (1 - beta) * d for m, d in zip(buffers, direction)]
            d_step = [m / (1 - beta ** step_count) for m in buffers]
        else:
            d_step = direction
        if needs_model:
            gTd, quad = self._model_terms(sol, d_step, beta > 0)

        alpha = float(group["lr"])
        loss0 = sol["loss"]
        backup = [p.detach().clone() for p in params]
        new_loss = None
        if group["line_search"]:
            if "alpha" in state:
                alpha = min(1.5 * state["alpha"], alpha)
            accepted = False
            for tries in range(1, group["max_tries"] + 1):
                _set_params(params, backup, d_step, alpha)
                new_loss = self._loss_at(x, sol["y"])
                if bool(new_loss <= loss0 + group["armijo"] * alpha * gTd):
                    accepted = True
                    break
                if tries < group["max_tries"]:
                    alpha *= group["backtrack"]
            stats["line_search_tries"] = tries
            self.state[params[0]]["alpha"] = alpha
        else:
            _set_params(params, backup, d_step, alpha)
            accepted = True
            if group["adaptive_damping"]:
                new_loss = self._loss_at(x, sol["y"])

        if accepted and not _all_finite(params):
            accepted = False
            refuse(stats, "non-finite parameters after the update", "EGN")
        if not accepted:
            with torch.no_grad():
                for p, w in zip(params, backup):
                    p.copy_(w)
        else:
            self.state[params[0]]["step"] = step_count
            if beta > 0:
                for p, m in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = m

        if group["adaptive_damping"]:
            predicted = -(alpha * gTd + 0.5 * alpha ** 2 * quad)
            actual = float(loss0 - new_loss) if new_loss is not None else -math.inf
            rho = actual / predicted if predicted > 0 and math.isfinite(actual) else -math.inf
            if rho < 0.25:
                lam *= group["damping_increase"]
            elif rho > 0.75:
                lam *= group["damping_decrease"]
            group["damping"] = min(max(lam, group["min_damping"]), group["max_damping"])
            stats["rho"] = rho
        stats.update(accepted=accepted, alpha=alpha if accepted else 0.0, next_damping=group["damping"],
                     new_loss=None if new_loss is None else float(new_loss) * scale)
        return stats

    def _model_terms(self, sol: dict, d_step: list[torch.Tensor], with_momentum: bool):
        """g^T d and ||S^T J d||^2 / b of the quadratic model along the step direction d.

        For d = dir = -J^T S u both come from the Gram: g^T d = -t^T K u / b and S^T J d = -K u. A
        momentum direction needs one VJP for g = J^T e / b and a JVP (double backward) for J d.
        """
        f, factor, b = sol["f"], sol["factor"], sol["b"]
        if not with_momentum:
            return float(-sol["tKu"] / b), float(sol["Ku"].square().sum() / b)
        params = self.param_groups[0]["params"]
        with torch.enable_grad():
            g = torch.autograd.grad(f, params, grad_outputs=factor.residual / b, retain_graph=True,
                                    allow_unused=True)
            z = torch.zeros_like(f, requires_grad=True)
            vjp = torch.autograd.grad(f, params, grad_outputs=z, create_graph=True, allow_unused=True)
            pairs = [(v, d) for v, d in zip(vjp, d_step) if v is not None]
            Jd = torch.autograd.grad([v for v, _ in pairs], z, grad_outputs=[d for _, d in pairs])[0]
        g = [torch.zeros_like(d) if gi is None else gi for gi, d in zip(g, d_step)]
        quad = apply_factor_transpose(factor, Jd.detach()).square().sum().reshape(1)
        # g = sum_r J_r^T e_r / b and ||S^T J d||^2 = sum_r ||S_r^T J_r d||^2
        *g, quad = self._ranks.sum_tensors(g + [quad])
        gTd = sum(float((gi * d).sum()) for gi, d in zip(g, d_step))
        return gTd, float(quad[0] / b)


def _set_params(params, base, direction, alpha: float) -> None:
    """w = base + alpha d, in place."""
    with torch.no_grad():
        for p, w, d in zip(params, base, direction):
            p.copy_(w).add_(d, alpha=alpha)


_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_x_dtype(x, model: nn.Module) -> None:
    """x is float32/float64 and finite, or integer token ids for a model that has an nn.Embedding."""
    if isinstance(x, torch.Tensor) and x.dtype in _INTEGER_DTYPES:
        if not any(isinstance(m, nn.Embedding) for m in model.modules()):
            raise ValueError(f"x holds integers ({x.dtype}) but {type(model).__name__} has no nn.Embedding to "
                             "take token ids; pass float32 or float64 features")
        return
    check_tensor("x", x)


def _check_curvature_options(curvature, samples, block_rows, damping) -> None:
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if samples != 1 and curvature != "sampled":
        raise ValueError(f"samples={samples} applies to curvature='sampled' only, got curvature={curvature!r}")
    if curvature == "sampled" and not damping > 0:
        raise ValueError("curvature='sampled' needs damping > 0 (its step uses Woodbury's identity)")
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
        raise ValueError(f"gram_block_rows must be a positive int or None, got {block_rows!r}")


class _Clock:
    """Wall seconds per phase of a step; on CUDA through events, read once at the end."""

    def __init__(self, like: torch.Tensor):
        self.cuda = isinstance(like, torch.Tensor) and like.is_cuda
        self.times: dict[str, float] = {}
        self._last = self._now()

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def lap(self, name: str) -> None:
        now = self._now()
        if self.cuda:
            now.synchronize()
            self.times[name] = self._last.elapsed_time(now) / 1e3
        else:
            self.times[name] = now - self._last
        self._last = now
