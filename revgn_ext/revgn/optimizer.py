"""RevGN: exact, tractable Gauss-Newton for RevMLP (Buffelli et al., arXiv 2411.07979).

One step on a batch (x, y), with Z = X_L the network output, logits = Z Q and J = dZ/dtheta:

    E     = function-space target in logit space (n x c)      (revgn_ext.revgn.targets)
    dZ    = E Q^T                                              (lift to the output, n x d)
    Delta = right inverse of J applied to dZ, J Delta = dZ     (revgn_ext.revgn.right_inverse)
    theta <- theta - lr * Delta

so to first order the logits move by -lr * E. With target="identity" and cross-entropy this is the
paper's update E = softmax(z) - onehot(y).

Learning rates from the paper: the official code gives every block the full target dZ, so its
total step is L times ours for the same number; its learning rate equals ours divided by L. To
reproduce a paper setting use ``lr = L * lr_paper`` with the default shares 1/L (MNIST full batch:
GN 0.5 with L = 2 -> lr = 1.0 here).

Data-parallel: with ``distributed=True`` each rank passes its shard of the batch and the step equals
the single-process step on the concatenated batch (docs/distributed.md, :mod:`revgn_ext.distributed`).
"""
from __future__ import annotations

import math
import warnings

import torch

from .._checks import all_finite, check_tensor
from .._hyper import Context, revgn_spec
from .._optim import GaussNewtonOptimizer, refuse, resolve_loss, unwrap_compiled
from .._warn import user_stacklevel
from ..egn.gram import DEFAULT_MEMORY_LIMIT, UnsupportedModelError
from ..distributed import GRAM_ROUTES, resolve
from . import right_inverse, targets
from .model import RevMLP

# Integer label dtypes RevGN accepts (converted to int64); the wider unsigned ones lack the comparisons.
_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

__all__ = ["RevGN"]

def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 / 100 else f"{nbytes:,} bytes"


DAMPING_MODES = ("relative", "absolute")


class RevGN(GaussNewtonOptimizer):
    """Exact Gauss-Newton step for a :class:`~revgn_ext.RevMLP`: ``theta <- theta - lr * Delta`` with
    ``J Delta = E Q^T`` (see the module docstring for the math and the paper's learning rates).

    ``RevGN(params, model=model, ...)`` as for any ``torch.optim`` optimizer, or ``RevGN(model, ...)``.

    Args:
        params: the RevMLP's parameters, all of them, as tensors or groups; groups may have their
            own ``lr`` (0 holds a group still), every other option is shared.
        model: the RevMLP whose W and b are trained (all of them; V and Q are fixed buffers); may be
            ``torch.compile``-d or DDP-wrapped.
        lr: step size (ours = L * the official code's, see above).
        damping: lambda of ``A^+ R = A^T (A A^T + lambda I)^{-1} R``; relative to mean(diag(A A^T)) of
            each Gram by default. 0 gives the exact right inverse when every A has full row rank n
            (n <= M and non-linear blocks; a linear block has rank <= d/2 + 1).
        target: "identity" (E = g, the official runs), "newton" (E_i = H_i^+ g_i), "damped"
            (E_i = (H_i + target_damping I)^{-1} g_i) or "damped-batch" (the official code's damped form:
            E_i = [(1/n) sum_j (H_j + target_damping I)^{-1}] g_i, one inverse averaged over the batch).
        loss: "cross_entropy" / ``nn.CrossEntropyLoss`` (y: int labels) or "mse" / ``nn.MSELoss``
            (0.5 ||z - y||^2 per sample; y: (n, c) floats, or int labels one-hot encoded for "mse").
            The reduction scales only ``stats["loss"]``: the step is a per-sample function-space move.
            None: the closure's loss, or inferred from y where unambiguous.
        shares: s_l, the fraction of the target block l produces; non-negative, sum 1; default 1/L.
        damping_mode: "relative" or "absolute".
        solver: "cholesky" (one batched Gram factorisation) or "svd" (the official truncated pinv:
            singular values below max(rtol * s_max, atol) are dropped).
        target_damping: mu of the "damped" and "damped-batch" targets.
        distributed: data-parallel over ``process_group`` (default: the initialised default group).
            Every rank calls ``step(x_r, y_r)`` with its shard; the rows of the Grams and targets are
            all_gathered, every rank solves the same global system, and one all_reduce sums the update,
            so the step (and ``stats["loss"]``) is that of the concatenated batch. Parameters and
            buffers are copied from the group's rank 0 at construction. Passing ``process_group``
            implies ``distributed=True``.
        process_group: a ``torch.distributed`` process group, or None.
        gram_route: data-parallel Cholesky steps only: "gather_rows" all_gathers the feature rows,
            "reduce_gram" re-shards them by columns (all_to_all) and all_reduces partial Grams, which
            also splits the Gram product across ranks; "auto" (default) takes the one that sends fewer
            bytes for the shapes at hand (see docs/distributed.md).

    ``model`` may be a DistributedDataParallel-wrapped RevMLP: its ``.module`` is trained, over the
    wrapper's process group. DDP's own gradient all_reduce (an average of per-shard gradients) is not
    used, because the exact step couples all samples through the Gram; a bare module works as well.

    ``step(closure)`` works as for ``torch.optim.LBFGS`` and returns the closure's loss; ``step(x, y)``
    returns a stats dict (kept in ``last_stats`` either way): "loss" (pre-step batch loss), "refused"
    (True when the update was not finite and the parameters were left untouched), per-Gram lists in the order
    F_1, G_1, F_2, G_2, ...: "damping" (absolute lambda), "info" and "jitter" (Cholesky retries and the
    jitter they added; info -1 = all retries failed) or "rank" (SVD), and "exact" (damping 0, n <= M and
    every Gram factored cleanly at full rank).
    """

    # Every group option and state entry, checked at construction, load_state_dict and each step.
    HYPERPARAMETERS = revgn_spec(targets.TARGETS, ("mse", "cross_entropy"), right_inverse.SOLVERS, DAMPING_MODES, GRAM_ROUTES)

    PER_GROUP = ("lr",)
    IGNORE_INDEX = True
    LOSSES = ("mse", "cross_entropy")
    ADD_GROUP_MESSAGE = ("RevGN trains every W and b of its RevMLP from construction on, so there is "
                         "nothing to add; give per-group learning rates at construction")

    def __init__(self, params=None, lr: float = 0.1, damping: float = 1e-4, target: str = "identity",
                 loss=None, *, shares=None, damping_mode: str = "relative",
                 solver: str = "cholesky", rtol: float = 1e-2, atol: float = 1e-5,
                 target_damping: float = 1e-3, distributed: bool = False, process_group=None,
                 gram_route: str = "auto", memory_limit: int = DEFAULT_MEMORY_LIMIT,
                 model: RevMLP | None = None) -> None:
        params, model = self.split_model(params, model)
        called = model
        model, shards = resolve(unwrap_compiled(model), distributed, process_group)
        model = unwrap_compiled(model)
        if not isinstance(model, RevMLP):
            raise ValueError(f"model must be a revgn_ext.RevMLP, got {type(model).__name__}")
        L = model.num_blocks
        if shares is None:
            shares = (1.0 / L,) * L
        elif not isinstance(shares, (tuple, list)) and hasattr(shares, "__iter__"):
            shares = tuple(s.item() if hasattr(s, "item") else s for s in shares)  # an array or tensor
        first = next(model.parameters(), None)
        self.check_hyperparameters(
            dict(lr=lr, damping=damping, rtol=rtol, atol=atol, target_damping=target_damping, target=target,
                 damping_mode=damping_mode, solver=solver, gram_route=gram_route, shares=shares,
                 memory_limit=memory_limit),
            Context(num_blocks=L, dtype=first.dtype if first is not None and first.dtype in (torch.float32, torch.float64) else None))
        shares = tuple(float(s) for s in shares)
        spec = resolve_loss(loss, "RevGN", self.LOSSES)
        self.check_loss(spec, shards)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if frozen:
            raise ValueError(f"model has frozen parameters {frozen}; RevGN updates every W and b")
        params = self.model_params(params, model, list(model.parameters()))
        defaults = dict(lr=lr, damping=damping, target=target, **self.loss_options(spec), shares=shares,
                        damping_mode=damping_mode, solver=solver, rtol=rtol, atol=atol,
                        target_damping=target_damping, gram_route=gram_route, memory_limit=memory_limit)
        super().__init__(params, defaults)
        covered = {id(p) for g in self.param_groups for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if id(p) not in covered]
        if missing:
            raise ValueError(f"params leaves out {missing}; RevGN's step moves every W and b of the "
                             f"RevMLP together (give lr=0 to a group to hold its parameters still)")
        self.check_model_dtype(list(model.parameters()))
        self.check_one_dtype(model)
        self.model = model
        self.shards = shards
        if shards is not None:
            shards.synchronise(model, self)  # same structure and hyper-parameters on every rank, then rank 0's weights
        self.finish_construction(called)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:   # state dicts saved before the memory guard existed
            group.setdefault("memory_limit", DEFAULT_MEMORY_LIMIT)

    @staticmethod
    def check_one_dtype(model: RevMLP) -> None:
        """Every parameter and buffer in the readout Q's dtype and device (a block converted on its own
        would fail inside the step's products)."""
        ref = model.Q
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype != ref.dtype or t.device != ref.device:
                raise ValueError(f"model's {name} is {t.dtype} on {t.device} but its readout Q is {ref.dtype} on "
                                 f"{ref.device}; RevGN needs one dtype and device for the whole RevMLP: convert "
                                 f"the whole model, model.to({ref.dtype})")

    @staticmethod
    def check_loss(spec, shards=None) -> None:
        if spec is None:
            return
        if spec.label_smoothing:
            raise ValueError("RevGN's function-space targets need hard labels: label_smoothing is not "
                             "supported (EGN supports it)")
        if spec.reduction == "sum" and shards is not None:
            raise ValueError("RevGN: reduction='sum' is not supported with distributed=True; use 'mean'")

    # ------------------------------------------------------------------------------------------
    def _check_batch(self, x, y) -> None:
        # The hyper-parameters first: when distributed this runs inside the ranks' joint check, so a
        # NaN lr on one rank raises on every rank together.
        self.checked_groups()
        model, loss = self.model, self.param_groups[0]["loss"]
        self.check_one_dtype(model)
        model.check_input(x, "x", finite=True)
        n, c = x.shape[0], model.num_classes
        check_tensor("y", y, float_only=False, finite=False)
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
        if y.is_floating_point():
            if loss == "cross_entropy":
                raise ValueError(f"y must hold integer class labels for cross_entropy, got {y.dtype}")
            check_tensor("y", y, ndim=2)
            if tuple(y.shape) != (n, c):
                raise ValueError(f"y must have shape ({n}, {c}) (batch size of x, num_classes), "
                                 f"got {tuple(y.shape)}")
            return
        if y.dtype not in _LABEL_DTYPES or y.dim() != 1 or y.shape[0] != n:
            raise ValueError(f"y must be integer labels of shape ({n},) (batch size of x) with dtype int64, "
                             f"int32, int16, int8 or uint8, got {y.dtype} {tuple(y.shape)}")
        ignore = self.param_groups[0].get("ignore_index", -100) if loss == "cross_entropy" else None
        bad = ((y < 0) | (y >= c)) if ignore is None else ((y < 0) | (y >= c)) & (y != ignore)
        if bool(bad.any()):
            where = y[bad]
            pad = (f"; labels equal to ignore_index={ignore} (padding) are dropped from the step" if ignore is not None
                   else "; padding labels need loss=nn.CrossEntropyLoss(ignore_index=...) or 'cross_entropy' "
                        "(ignore_index -100)")
            raise ValueError(f"y has labels outside [0, {c}) (num_classes={c}): min {int(where.min())}, max "
                             f"{int(where.max())}{pad}")

    def _direction(self, x, y):
        """(loss, [BlockDelta per block], report); the direction is not yet scaled by -lr."""
        shards = self.shards
        kept = []

        def check():
            self._check_batch(x, y)
            kept.append(self._drop_ignored(x, y))
            return kept[0]

        if shards is None:
            x, y = check()
            n = x.shape[0]
        else:
            x, y = shards.agree(check, lambda: kept[0][0].shape[0], like=x)
            n = shards.total
        if not y.is_floating_point():
            y = y.long()  # class labels of any accepted integer dtype; cross_entropy and one_hot need int64
        group = self.checked_group()
        model = self.model
        M = model.width
        self._check_memory(x, n, group)
        if n > M:
            warnings.warn(f"RevGN: batch size n={n} exceeds the bottleneck width M={M}; the Grams are "
                          "rank-deficient, so the step is a damped least-squares fit, not exact "
                          "(J Delta != dZ). Use hidden >= batch size.", UserWarning, stacklevel=user_stacklevel())
        trace = model.forward_with_trace(x)
        loss = targets.loss_value(trace.logits, y, group["loss"])
        if shards is not None:
            loss = shards.mean(loss)
        E = targets.function_space_target(trace.logits, y, group["loss"], group["target"], group["target_damping"])
        dZ = right_inverse.LowRankTarget(E, model.Q)  # E Q^T, kept in factors (rank c, see right_inverse)
        deltas, report = right_inverse.right_inverse(model.blocks, trace.blocks, dZ, group["shares"], group["damping"],
                                          group["damping_mode"] == "relative", group["solver"],
                                          group["rtol"], group["atol"], shards, group["gram_route"],
                                          residual=group["damping"] == 0)
        return loss, n, deltas, report

    def _drop_ignored(self, x, y):
        """(x, y) without the samples whose cross-entropy label is ``ignore_index``: such a sample has no
        loss term, so it has no row in the system, and the mean runs over the kept samples, as in
        torch's loss. A batch (or a rank's shard) with no sample left is refused."""
        group = self.param_groups[0]
        if group["loss"] != "cross_entropy" or y.is_floating_point():
            return x, y
        keep = y != group["ignore_index"]
        if bool(keep.all()):
            return x, y
        if not bool(keep.any()):
            raise ValueError(f"every label of y is ignore_index={group['ignore_index']} (padding): no sample "
                             "has a loss term, so there is no step")
        return x[keep], y[keep]

    def _check_memory(self, x, n: int, group: dict) -> None:
        """Refuse, before the forward, a step whose features and Grams exceed ``memory_limit``: per
        half-layer the n x M features (and, for "svd", its n x (M + 1) right factor) and the n x n Gram
        and factor, plus one n x n temporary."""
        model, L = self.model, self.model.num_blocks
        M, item = model.width, x.element_size() if x.is_floating_point() else 8
        halves = 2 * L
        per_half = n * M * (2 if group["solver"] == "svd" else 1) + 2 * n * n
        need = (halves * per_half + n * n) * item
        limit = group["memory_limit"]
        if need > limit:
            raise UnsupportedModelError(
                f"RevGN: a step on a batch of {n} needs about {_size(need)} ({halves} half-layers, "
                f"each {n} x {M} features and {n} x {n} Grams) > memory_limit {_size(limit)}; use a "
                f"smaller batch (the step is exact only for a batch <= hidden = {M}) or raise memory_limit")

    def _agreed_batch_and_loss(self, closure, y):
        """The batch and its loss, on every rank together when distributed: a refusal on one rank (a NaN
        lr in the loss entries' check, a closure computing another loss) raises on every rank."""
        if self.shards is None:
            return self._batch_and_loss(closure, y)
        return self.shards.agree(lambda: self._batch_and_loss(closure, y), lambda: 0)

    def _batch_and_loss(self, closure, y):
        batch = self.batch(closure, y)
        spec = self.adopt_loss(batch)
        self.check_loss(spec, self.shards)
        return batch, spec

    def direction(self, closure=None, y=None) -> list:
        """Delta with J Delta = E Q^T, one tensor per parameter in ``model.parameters()`` order
        (the step would be ``theta - lr * Delta``), on the batch of ``direction(closure)`` or
        ``direction(x, y)`` (see :meth:`step`). Not finite when the forward pass overflows at x."""
        batch, _ = self._agreed_batch_and_loss(closure, y)
        with torch.no_grad(), self.no_autocast():
            _, _, deltas, _ = self._direction(batch.x, batch.y)
        return [t for d in deltas for t in d]

    def step(self, closure=None, y=None):
        """One RevGN step, as torch.optim steps, or on a batch given directly.

        * ``step(closure)``: ``closure()`` runs the RevMLP on a batch and computes the loss (an
          ``nn.CrossEntropyLoss``/``nn.MSELoss`` or its functional form), as for ``torch.optim.LBFGS``,
          or returns ``(output, target)``; RevGN reads x and the targets off those calls, runs its own
          forward, and returns what the closure returned (for a pair, the pre-step loss).
        * ``step(x, y)``: the batch itself; returns the stats dict described in the class doc.

        The stats are also kept in ``last_stats``; ``stats["loss"]`` is in the user's reduction. The
        step runs with autocast off, in the parameters' dtype.
        """
        if self.shards is not None:
            self.shards.begin_step(self)   # counted before anything can raise (docs/distributed.md)
        batch, spec = self._agreed_batch_and_loss(closure, y)
        with torch.no_grad(), self.no_autocast():
            stats = self._step(batch.x, batch.y)
        stats["loss"] *= spec.scale(stats["batch_size"], self.model.num_classes)
        self.last_stats = stats
        return self.step_result(batch, stats)

    def _step(self, x, y) -> dict:
        loss, n, deltas, report = self._direction(x, y)  # checks the hyper-parameters with the batch
        groups = self.checked_groups()
        flat = [t for d in deltas for t in d]
        params = list(self.model.parameters())
        # One read of each tensor: a norm is finite iff the tensor is (barring overflow of a huge one).
        # The parameters' norm bounds their largest entry, which decides how the update is written.
        norms = torch.stack(torch._foreach_norm(flat + params))
        norm, biggest = (torch.linalg.vector_norm(v) for v in (norms[:len(flat)], norms[len(flat):]))
        # A single host sync for the decision and every statistic.
        values = torch.cat([torch.stack([loss, norm, biggest]).double()]
                           + [v.double() for v in report.values()]).tolist()
        loss_value, norm_value, biggest_value = values[:3]
        finite = math.isfinite(norm_value)
        stats = {"loss": loss_value, "refused": False, "reason": None, "lr": groups[0]["lr"],
                 "direction_norm": norm_value, "batch_size": n}
        if finite and not self._update(groups, flat, norm_value, biggest_value):
            refuse(stats, "the updated parameters would not be finite", "RevGN")
        elif not finite:
            refuse(stats, "the update is not finite", "RevGN")
        per_gram = len(self.model.blocks) * 2
        for k, key in enumerate(report):
            chunk = values[3 + k * per_gram: 3 + (k + 1) * per_gram]
            stats[key] = [int(v) for v in chunk] if key in ("info", "rank") else chunk
        stats["exact"] = self._exact(stats, n, groups[0])
        return stats

    def _update(self, groups: list, flat: list, norm: float, biggest: float) -> bool:
        """theta <- theta - lr Delta for every parameter, or for none (False) when a new value would not
        be finite. When ||theta|| + lr ||Delta|| (a bound on every new entry) is far below the dtype's
        largest value no entry can overflow, and the update runs in place; otherwise the new values are
        formed and checked first."""
        by_param = dict(zip(self.model.parameters(), flat))
        pairs = [(p, by_param[p], float(group["lr"])) for group in groups for p in group["params"]]
        top = max(lr for _, _, lr in pairs)
        if not (math.isfinite(biggest) and biggest + top * norm < 0.5 * torch.finfo(flat[0].dtype).max):
            new = [torch.add(p, d, alpha=-lr) for p, d, lr in pairs]
            if not all_finite(new):
                return False
            torch._foreach_copy_([p for p, _, _ in pairs], new)
        else:
            for p, d, lr in pairs:
                p.add_(d, alpha=-lr)
        for p, _, _ in pairs:
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
        return True

    def _exact(self, stats: dict, n: int, group: dict) -> bool:
        """True when J Delta = dZ holds: damping 0, n <= M, every Gram factored cleanly at full rank, and
        every half-layer's solve fits its right-hand side (the sketched relative residual, see
        :func:`revgn_ext.revgn.right_inverse.right_inverse`, within sqrt(eps) of the dtype). A
        rank-deficient Gram whose Cholesky happens to succeed fails the residual test. When damping is
        0 and the step is not exact, a UserWarning says why."""
        if group["damping"] != 0:
            return False
        dtype = next(self.model.parameters()).dtype
        tol = math.sqrt(torch.finfo(dtype).eps)
        clean = all(i == 0 for i in stats.get("info", [0])) and all(r == n for r in stats.get("rank", [n]))
        worst = max(stats.get("residual", [math.inf]))
        exact = n <= self.model.width and clean and worst <= tol
        if not exact and n <= self.model.width:
            why = ("a Gram needed jitter or was truncated (rank-deficient)" if not clean else
                   f"a half-layer's solve misses its target by {worst:.2g} (relative; a rank-deficient Gram)")
            warnings.warn(f"RevGN: damping=0 but the step is not exact: {why}; J Delta != dZ", UserWarning,
                          stacklevel=user_stacklevel())
        return exact
