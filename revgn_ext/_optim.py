"""What RevGN and EGN share as ``torch.optim.Optimizer`` subclasses, so that the two agree.

* **Hyper-parameters and state are checked where they are read.** Each optimizer declares, in
  ``HYPERPARAMETERS`` (a :class:`revgn_ext._hyper.Spec`), a rule for every key its parameter groups and
  its per-parameter state may hold; the spec is checked at construction, at ``load_state_dict`` (a bad
  state dict raises and leaves the optimizer as it was) and again at every ``step``/``direction``,
  because a scheduler or user code may have written into ``param_groups`` since. A NaN ``lr`` therefore
  raises instead of reaching the parameters.
* **Conventions.** ``lr >= 0`` (0 computes the step's statistics and moves nothing, as schedulers
  that decay to zero expect); ``damping >= 0``; a step whose update is not finite is refused: the
  parameters and the optimizer state stay as they were, ``stats["refused"]`` is True and
  ``stats["reason"]`` says why, with a ``RuntimeWarning``.
* **The torch.optim calling conventions** (:class:`GaussNewtonOptimizer`): ``Opt(params, model=...)``
  or ``Opt(model)``; ``step(closure)`` as in ``torch.optim.LBFGS`` or ``step(x, y)``; losses given as
  ``torch.nn`` loss modules or names (:func:`resolve_loss`); one place for parameter-group rules.
* **The stats record.** Every step returns a dict with at least :data:`COMMON_STATS`: "loss" (the
  pre-step batch loss), "refused", "reason" (None unless refused), "lr" (of the first group),
  "direction_norm" (of the unscaled direction) and "batch_size".
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._checks import check_number
from ._warn import user_stacklevel
from ._hyper import Context, Fixed, Spec
from ._inputs import ModelInputs, single_input

__all__ = ["GaussNewtonOptimizer", "COMMON_STATS", "refuse", "LossSpec", "resolve_loss", "infer_loss",
           "unwrap_compiled", "Batch"]

COMMON_STATS = ("loss", "refused", "reason", "lr", "direction_norm", "batch_size")



# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------

LOSS_NAMES = ("mse", "cross_entropy", "binary_cross_entropy")
NN_LOSSES = {nn.MSELoss: "mse", nn.CrossEntropyLoss: "cross_entropy", nn.BCEWithLogitsLoss: "binary_cross_entropy"}
_FUNCTIONAL = {F.mse_loss: "mse", F.cross_entropy: "cross_entropy",
               F.binary_cross_entropy_with_logits: "binary_cross_entropy"}
# Losses a closure may compute that have no Gauss-Newton factor here: named in the error.
_UNSUPPORTED = (F.nll_loss, F.binary_cross_entropy, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.kl_div,
                F.soft_margin_loss, F.multi_margin_loss, F.multilabel_soft_margin_loss, F.poisson_nll_loss,
                F.gaussian_nll_loss)
_HINTS = {nn.BCELoss: "use nn.BCEWithLogitsLoss on the logits (the model without its final sigmoid)",
          nn.NLLLoss: "use nn.CrossEntropyLoss on the logits (the model without its final log_softmax)"}


@dataclass(frozen=True)
class LossSpec:
    """A loss whose Gauss-Newton matrix the optimizers form.

    ``name`` is the per-sample loss l(f_i, y_i) of :mod:`revgn_ext.egn.loss_factors`: "mse"
    0.5 ||f_i - y_i||^2, "cross_entropy" -sum_a q_ia log softmax(f_i)_a (q: one-hot labels, smoothed
    by ``label_smoothing``, or class probabilities), "binary_cross_entropy" on one logit. The
    optimizers' own batch loss is L = (1/b) sum_i l(f_i, y_i); ``reduction`` says how the user's loss
    relates to it: "batch_mean" (a name such as "mse": the user's loss is L), or a torch.nn
    ``reduction``, "mean" or "sum" (the user's loss is ``scale(b, c) * L``). ``ignore_index``: for
    cross-entropy with class labels, the label whose samples contribute nothing (torch's default -100),
    the mean running over the kept samples, as torch's loss does.
    """
    name: str
    reduction: str = "batch_mean"
    label_smoothing: float = 0.0
    ignore_index: int = -100   # cross-entropy labels equal to it have no loss term (torch's padding)

    def scale(self, b: int, c: int) -> float:
        """s with (user's loss) = s * L for b samples of c outputs: nn.MSELoss has no 1/2 and its
        mean runs over b*c elements, so "mean" gives 2/c; "sum" gives 2b (MSE) or b."""
        if self.reduction == "batch_mean":
            return 1.0
        per_sample = 2.0 if self.name == "mse" else 1.0
        if self.reduction == "sum":
            return per_sample * b
        return per_sample / c if self.name in ("mse", "binary_cross_entropy") else per_sample

    def describe(self) -> str:
        if self.reduction == "batch_mean":
            return repr(self.name)
        cls = {v: k for k, v in NN_LOSSES.items()}[self.name].__name__
        smoothing = f", label_smoothing={self.label_smoothing}" if self.label_smoothing else ""
        if self.ignore_index != -100:
            smoothing += f", ignore_index={self.ignore_index}"
        return f"nn.{cls}(reduction={self.reduction!r}{smoothing})"


def _check_reduction(reduction: str, where: str, who: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{where} has reduction={reduction!r}; {who} needs a scalar loss to form its "
                         "Gauss-Newton step: use reduction='mean' or 'sum'")


def _spec(name: str, reduction: str, smoothing, weights: dict, where: str, who: str, allowed,
          ignore_index: int = -100) -> LossSpec:
    if name not in allowed:
        raise ValueError(f"{where}: {who} supports the losses {list(allowed)}, not {name}")
    _check_reduction(reduction, where, who)
    for arg, value in weights.items():
        if value is not None:
            raise ValueError(f"{where} has {arg} set; {who} supports unweighted losses only")
    smoothing = float(smoothing or 0.0)
    if smoothing:
        check_number(f"{where} label_smoothing", smoothing, low=0.0, high=1.0)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{where} has ignore_index={ignore_index!r}; it must be an int")
    return LossSpec(name, reduction, smoothing, ignore_index if name == "cross_entropy" else -100)


def resolve_loss(loss, who: str, allowed=LOSS_NAMES) -> LossSpec | None:
    """The :class:`LossSpec` of a constructor's ``loss``: None (inferred later, see :func:`infer_loss`),
    a name in ``allowed``, or an ``nn.MSELoss`` / ``nn.CrossEntropyLoss`` / ``nn.BCEWithLogitsLoss``
    instance with reduction "mean" or "sum" (its ``label_smoothing`` is kept; class weights are refused).
    """
    if loss is None or isinstance(loss, LossSpec):
        return loss
    names = [NN_LOSSES_NAMES[n] for n in allowed]
    if isinstance(loss, str):
        if loss not in allowed:
            raise ValueError(f"loss must be one of {list(allowed)} or one of {names}, got {loss!r}")
        return LossSpec(loss)
    kind = next((name for cls, name in NN_LOSSES.items() if isinstance(loss, cls)), None)
    if kind is None:
        hint = next((h for cls, h in _HINTS.items() if isinstance(loss, cls)), None)
        raise ValueError(f"loss must be one of {list(allowed)} or one of {names}, got "
                         f"{type(loss).__name__}" + (f": {hint}" if hint else ""))
    weights = {"weight": getattr(loss, "weight", None), "pos_weight": getattr(loss, "pos_weight", None)}
    return _spec(kind, loss.reduction, getattr(loss, "label_smoothing", 0.0), weights, "loss", who, allowed,
                 getattr(loss, "ignore_index", -100))


NN_LOSSES_NAMES = {"mse": "nn.MSELoss()", "cross_entropy": "nn.CrossEntropyLoss()",
                   "binary_cross_entropy": "nn.BCEWithLogitsLoss()"}


def infer_loss(y, who: str, allowed=LOSS_NAMES) -> LossSpec:
    """The loss for targets ``y`` when the constructor got none, only where there is no doubt among
    ``allowed``: integer labels mean cross-entropy; floating targets mean MSE unless every value is 0 or
    1, which looks like labels (one-hot for cross-entropy, 0/1 for binary cross-entropy) and is refused."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"y must be a torch.Tensor, got {type(y).__name__}")
    ask = (f"pass loss= to {who} (one of {list(allowed)}, or "
           f"{', '.join(NN_LOSSES_NAMES[n] for n in allowed)})")
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"y has dtype {y.dtype}, which names no loss; {ask}")
    if not y.is_floating_point():
        if "cross_entropy" not in allowed:
            raise ValueError(f"y holds integers; {ask}")
        return LossSpec("cross_entropy")
    if y.numel() and bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"y holds only 0s and 1s, which may be class labels (for cross-entropy or binary "
                         f"cross-entropy) or regression targets (mse); {ask}")
    return LossSpec("mse")


def _spec_from_call(func, args: dict, who: str, allowed) -> LossSpec:
    where = f"the closure's F.{func.__name__}"
    if func not in _FUNCTIONAL:
        raise ValueError(f"{where} has no Gauss-Newton factor in {who}; compute the loss with one of "
                         f"{[NN_LOSSES_NAMES[n] for n in allowed]}, or return (output, target) from the closure")
    reduction = args.get("reduction", "mean")
    if args.get("size_average") is not None or args.get("reduce") is not None:
        reduction = torch.nn._reduction.legacy_get_string(args.get("size_average"), args.get("reduce"))
    weights = {k: args.get(k) for k in ("weight", "pos_weight")}
    return _spec(_FUNCTIONAL[func], reduction, args.get("label_smoothing", 0.0), weights, where, who, allowed,
                 args.get("ignore_index", -100))


# ------------------------------------------------------------------------------------------------
# Closures: what the model saw and what the loss compared
# ------------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One batch for a step: inputs ``x`` (a tensor, or a ModelInputs read off a closure's model call
    for an optimizer with ``SEVERAL_INPUTS``), targets ``y``, the loss the closure computed (or None), and
    what ``step`` returns (``returned``: the closure's value; None for ``step(x, y)``)."""
    x: Any
    y: Any
    spec: LossSpec | None = None
    returned: Any = None
    from_closure: bool = False
    output: Any = None       # the model's output the loss read (closures), and the tensor the loss got:
    loss_input: Any = None   # that output or a view of it (reshape, transpose; with LOSS_VIEWS only)


class _LossRecorder(TorchFunctionMode):
    """Records every loss function the closure calls (``nn`` loss modules call them too).

    It steps aside while the model's forward runs (:meth:`pause` and :meth:`resume`, called by hooks
    on the model): a mode's ``__torch_function__`` is the innermost Python frame of every op it sees,
    so torch's warnings from the user's layers would be attributed to this file instead of the user's
    code. The loss is computed on the model's output, so nothing is missed while it is paused.
    """

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[Callable, dict]] = []
        self._paused: list[bool] = []   # per model call in progress: whether it popped this mode

    def pause(self, module, args) -> None:
        popped = torch.overrides._get_current_function_mode() is self   # another mode on top: stay
        if popped:
            torch.overrides._pop_mode()
        self._paused.append(popped)

    def resume(self) -> None:
        if self._paused and self._paused.pop():
            torch.overrides._push_mode(self)

    def __exit__(self, exc_type, exc_val, exc_tb):
        while self._paused:             # the model's forward raised, so its hook did not resume
            self.resume()
        return super().__exit__(exc_type, exc_val, exc_tb)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FUNCTIONAL or func in _UNSUPPORTED:
            bound = inspect.signature(func).bind(*args, **kwargs)
            self.calls.append((func, dict(bound.arguments)))
        return func(*args, **kwargs)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """b is a (reshaped) view of all of a, as ``output.squeeze(1)`` or ``output.view(-1)`` are."""
    if a is b:
        return True
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.numel() == b.numel()
            and a.data_ptr() == b.data_ptr() and a.is_contiguous() and b.is_contiguous())


def unwrap_compiled(model):
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) compiles, else ``model``. The
    optimizers run their own forward passes and VJPs on it; the user's forwards stay compiled."""
    while isinstance(model, nn.Module) and type(model).__name__ == "OptimizedModule" \
            and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def _check_elementwise_shapes(spec: "LossSpec", args: dict, who: str) -> None:
    """An element-wise loss (MSE, BCE with logits) whose input and target shapes differ is computed by
    torch on their broadcast, a different loss from the per-sample one the step solves: refuse it."""
    if spec.name not in ("mse", "binary_cross_entropy"):
        return
    inp, target = args.get("input"), args.get("target")
    if isinstance(inp, torch.Tensor) and isinstance(target, torch.Tensor) and inp.shape != target.shape:
        raise ValueError(f"{who}.step(closure): the closure's {spec.name} loss got an input of shape "
                         f"{tuple(inp.shape)} and a target of shape {tuple(target.shape)}; torch broadcasts "
                         f"them to another loss than the per-sample one, so the step would solve a different "
                         f"problem: give both the same shape (e.g. target.view_as(output))")


class GaussNewtonOptimizer(torch.optim.Optimizer):
    """Base class of :class:`~revgn_ext.RevGN` and :class:`~revgn_ext.EGN` (see the module docstring).

    ``HYPERPARAMETERS`` is the :class:`revgn_ext._hyper.Spec` of every group option and state entry
    (rules and relations, :mod:`revgn_ext._hyper`). ``PER_GROUP`` lists the options that may differ
    between parameter groups; every other option must agree, because one Gauss-Newton system couples
    all the parameters.
    """

    HYPERPARAMETERS: Spec = Spec(group={})
    PER_GROUP: tuple[str, ...] = ()
    LOSSES: tuple[str, ...] = LOSS_NAMES
    ADD_GROUP_MESSAGE = "parameter groups are fixed at construction"
    IGNORE_INDEX = False   # whether cross-entropy samples labelled ignore_index are dropped from the step
    SEVERAL_INPUTS = False  # whether the model may take several inputs (revgn_ext._inputs.ModelInputs)
    LOSS_VIEWS = None      # a function (output, loss input) -> index or None: losses on views of the output

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def split_model(cls, params, model):
        """(params or None, model) from ``Opt(model, ...)`` or ``Opt(params, model=model, ...)``."""
        who = cls.__name__
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError(f"{who} got two models: pass {who}(model.parameters(), model=model) "
                                 f"or {who}(model)")
            return None, params
        if model is None:
            raise ValueError(f"{who} needs the model it trains, because it runs the model's forward to "
                             f"form the Gauss-Newton curvature: {who}(model.parameters(), model=model, ...) "
                             f"or {who}(model, ...)")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(params, torch.Tensor):
            raise ValueError("params must be an iterable of tensors or of dicts (parameter groups), "
                             "as for torch.optim, got a single Tensor")
        return params, model

    @classmethod
    def model_params(cls, params, model: nn.Module, trainable: list) -> list:
        """``params`` (tensors or groups) checked against the model's ``trainable`` parameters; all of
        ``trainable`` when ``params`` is None."""
        who = cls.__name__
        if params is None:
            return list(trainable)
        params = list(params)
        if not params:
            raise ValueError(f"{who} got an empty parameter list")
        known = {id(p) for p in model.parameters()}
        allowed = {id(p) for p in trainable}
        is_groups = isinstance(params[0], dict)
        groups = params if is_groups else [{"params": params}]
        out = []
        for g in groups:
            if not isinstance(g, dict):
                raise ValueError("params must be all tensors or all dicts (parameter groups)")
            ps = g.get("params")
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps or [])
            out.append({**g, "params": ps})
            for p in ps:
                if not isinstance(p, torch.Tensor):
                    raise ValueError(f"params must hold tensors, got {type(p).__name__}")
                if id(p) not in known:
                    raise ValueError(f"params holds a tensor of shape {tuple(p.shape)} that is not a "
                                     f"parameter of model; {who} differentiates through model's forward, "
                                     f"so it can only train model's parameters")
                if id(p) not in allowed:
                    raise ValueError(f"params holds a parameter of shape {tuple(p.shape)} that {who} "
                                     f"does not train (requires_grad=False or a fixed tensor)")
        return out if is_groups else out[0]["params"]

    @classmethod
    def check_model_dtype(cls, params: list) -> None:
        """A half-precision model is refused: the Gram and its Cholesky factor need float32/64."""
        for p in params:
            if p.dtype not in (torch.float32, torch.float64):
                raise ValueError(
                    f"{cls.__name__}: your model's parameters are {p.dtype}, but the Gauss-Newton step "
                    f"needs float32 or float64 parameters (its Gram matrix and Cholesky factor lose too "
                    f"much in half precision). Keep the model in float32 (model.float()) and use "
                    f"torch.autocast for mixed precision: the optimizer runs its own forward, Gram and "
                    f"solve with autocast off, in the parameters' dtype")

    def finish_construction(self, hook_module: nn.Module) -> None:
        """After ``torch.optim.Optimizer.__init__``: the group rules, and the module whose calls a
        closure's batch is read from (the module the user calls, possibly compiled)."""
        self._hook_module = hook_module
        self._groups_fixed = True
        self.last_stats: dict | None = None
        # The values the spec requires to stay as built (e.g. EGN's Gram assembler options).
        self._built = {k: self.param_groups[0][k] for k, rule in self.HYPERPARAMETERS.group.items()
                       if isinstance(rule, Fixed) and k in self.param_groups[0]}
        self.check_all()

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, then every loaded group option and state entry
        is checked (:mod:`revgn_ext._hyper`); a bad one raises and the optimizer keeps its own."""
        groups, state = self.param_groups, self.state
        super().load_state_dict(state_dict)
        try:
            self.check_all()
        except Exception:
            self.param_groups, self.state = groups, state
            raise

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_groups_fixed", False):
            raise ValueError(f"{type(self).__name__}.add_param_group: {self.ADD_GROUP_MESSAGE}")
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # State dicts saved before the loss options existed.
        for group in self.param_groups:
            group.setdefault("reduction", "batch_mean")
            group.setdefault("label_smoothing", 0.0)
            group.setdefault("ignore_index", -100)

    # -- hyper-parameters -----------------------------------------------------------------------

    def hyper_context(self, deep: bool = False) -> Context:
        """What the spec's rules compare against; ``deep`` also reads tensor state (a host sync)."""
        params = self.param_groups[0]["params"]
        return Context(built=getattr(self, "_built", {}), num_blocks=getattr(getattr(self, "model", None),
                       "num_blocks", None), dtype=params[0].dtype if params else None, deep=deep)

    def checked_group(self, index: int = 0, deep: bool = False) -> dict:
        """``param_groups[index]`` after re-checking its options and its parameters' state; raises
        ValueError naming the entry (``param_groups[0]['lr']``, ``state[2]['step']``) and leaves
        everything untouched."""
        group = self.param_groups[index]
        ctx = self.hyper_context(deep)
        self.HYPERPARAMETERS.check_group(group, index, ctx, self.__dict__.setdefault("_passed_options", {}))
        self.HYPERPARAMETERS.check_state(self.state, self.param_groups, ctx, only=index)
        return group

    def checked_groups(self, deep: bool = False) -> list[dict]:
        groups = [self.checked_group(i, deep) for i in range(len(self.param_groups))]
        self.check_group_agreement()
        return groups

    def check_all(self) -> None:
        """Every group and every state entry, tensor values included (construction and loading)."""
        self.checked_groups(deep=True)

    def check_group_agreement(self) -> None:
        first = self.param_groups[0]
        for i, group in enumerate(self.param_groups[1:], 1):
            for key, value in first.items():
                if key == "params" or key in self.PER_GROUP:
                    continue
                if group.get(key) != value:
                    allowed = f"only {list(self.PER_GROUP)} may" if self.PER_GROUP else "no option may"
                    raise ValueError(
                        f"param_groups[{i}][{key!r}] = {group.get(key)!r} differs from param_groups[0]"
                        f"[{key!r}] = {value!r}: {type(self).__name__} solves one Gauss-Newton system "
                        f"for all its parameters, so {allowed} differ between groups")

    @classmethod
    def check_hyperparameters(cls, values: dict, ctx: Context | None = None) -> None:
        """Construction-time check of the arguments given, naming the constructor argument."""
        cls.HYPERPARAMETERS.check_values(values, lambda name: name, ctx or Context(), partial=True)

    # -- losses ---------------------------------------------------------------------------------

    @staticmethod
    def loss_options(spec: LossSpec | None) -> dict:
        """The group entries that store a loss (plain values, so ``state_dict`` stays plain)."""
        if spec is None:
            return dict(loss=None, reduction="batch_mean", label_smoothing=0.0, ignore_index=-100)
        return dict(loss=spec.name, reduction=spec.reduction, label_smoothing=spec.label_smoothing,
                    ignore_index=spec.ignore_index)

    def loss_spec(self) -> LossSpec | None:
        group = self.param_groups[0]
        if group["loss"] is None:
            return None
        return LossSpec(group["loss"], group.get("reduction", "batch_mean"), group.get("label_smoothing", 0.0),
                        group.get("ignore_index", -100))

    def adopt_loss(self, batch: Batch) -> LossSpec:
        """The loss of this step: the constructor's; else the closure's; else inferred from y (and kept
        for later steps). A closure whose loss differs from the constructor's in any attribute (kind,
        label smoothing, ignore_index, a sum where the constructor's loss is a mean or the reverse) is refused."""
        who = type(self).__name__
        if getattr(self, "shards", None) is None:
            # The loss entries are read here first: checked before they are used. (Data-parallel steps
            # check inside the ranks' joint exchange, so that a bad value raises on every rank.)
            self.checked_groups()
        current = self.loss_spec()
        seen = batch.spec
        if current is not None:
            if seen is not None and (seen.name != current.name or seen.label_smoothing != current.label_smoothing
                                     or seen.ignore_index != current.ignore_index
                                     or (seen.reduction == "sum") != (current.reduction == "sum")):
                raise ValueError(f"{who} was built with loss={current.describe()}, but the closure computed "
                                 f"{seen.describe()}; the Gauss-Newton step must use the loss you train with")
            return self._check_ignored(current, batch)
        spec = seen if seen is not None else infer_loss(batch.y, who, self.LOSSES)
        if spec.reduction == "sum" and getattr(self, "shards", None) is not None:
            raise ValueError(f"{who}: reduction='sum' is not supported with distributed=True (the "
                             "global batch size would scale the damping); use reduction='mean'")
        for group in self.param_groups:
            group.update(self.loss_options(spec))
        return self._check_ignored(spec, batch)

    def _check_ignored(self, spec: LossSpec, batch: Batch) -> LossSpec:
        """Cross-entropy labels equal to ``ignore_index`` (torch's padding, -100 by default) are
        dropped by an optimizer with ``IGNORE_INDEX``; any other refuses them, naming the padding."""
        y = batch.y
        if (not self.IGNORE_INDEX and spec.name == "cross_entropy" and isinstance(y, torch.Tensor)
                and not y.is_floating_point() and y.dtype != torch.bool and bool((y == spec.ignore_index).any())):
            who = type(self).__name__
            raise ValueError(f"{who}: y holds labels equal to ignore_index={spec.ignore_index} (padding), "
                             f"which {who} does not support: drop those samples from the batch")
        return spec

    # -- step(closure) / step(x, y) -------------------------------------------------------------

    def batch(self, closure, y) -> Batch:
        """The batch of ``step(closure)`` or ``step(x, y)``."""
        who = type(self).__name__
        if y is not None:
            return Batch(closure, y)
        if closure is None:
            raise ValueError(f"{who}.step needs a closure that runs the model and computes the loss (as "
                             f"for torch.optim.LBFGS), or a batch: step(x, y)")
        if isinstance(closure, (torch.Tensor, tuple, list, dict)):
            raise ValueError(f"{who}.step(x) needs the targets as well: step(x, y)")
        if not callable(closure):
            raise ValueError(f"closure must be callable, got {type(closure).__name__}")
        return self.capture(closure)

    def capture(self, closure: Callable) -> Batch:
        """Run ``closure`` (with grad enabled, as torch.optim does) and read off the batch: the model's
        inputs from its call (every argument, with ``SEVERAL_INPUTS``), and the target from the loss
        the closure computed, or from the ``(output, target)`` pair it returned."""
        who = type(self).__name__
        calls: list = []

        recorder = _LossRecorder()

        def record(module, args, kwargs, output):
            calls.append((args, kwargs, output))
            recorder.resume()

        handles = (self._hook_module.register_forward_pre_hook(recorder.pause),
                   self._hook_module.register_forward_hook(record, with_kwargs=True))
        try:
            with torch.enable_grad(), recorder:
                returned = closure()
        finally:
            for handle in handles:
                handle.remove()
        if not calls:
            raise ValueError(f"{who}.step(closure): the closure never called the model ({type(self._hook_module).__name__}) "
                             f"given to {who}; call it in the closure, e.g. loss = loss_fn(model(x), y)")

        def model_call(output):   # (args, kwargs, output) of the call whose output ``output`` is (a view of)
            for args, kwargs, out in reversed(calls):
                if _same_tensor(out, output) or (self.LOSS_VIEWS and isinstance(output, torch.Tensor)
                                                 and self.LOSS_VIEWS(out, output) is not None):
                    return args, kwargs, out
            return None

        def model_input(call):   # every argument of the call (EGN), or its one input tensor
            return ModelInputs(call[0], call[1]) if self.SEVERAL_INPUTS else single_input(call[0], call[1], who)

        if isinstance(returned, (tuple, list)) and len(returned) == 2 \
                and all(isinstance(t, torch.Tensor) for t in returned):
            output, target = returned
            call = model_call(output)
            if call is None:
                raise ValueError(f"{who}.step(closure): the loss was not computed on the model's output "
                                 f"(or a reshape of it, such as output.squeeze(1)); the Gauss-Newton step "
                                 f"needs loss(model(x), target)")
            return Batch(model_input(call), target.detach(), None, None, True, call[2], output)
        if not recorder.calls:
            raise ValueError(f"{who}.step(closure): no loss the optimizer knows was computed in the "
                             f"closure; compute it with {[NN_LOSSES_NAMES[n] for n in self.LOSSES]} (or "
                             f"their torch.nn.functional forms), or return (output, target)")
        on_output = []
        for func, args in recorder.calls:
            call = model_call(args.get("input"))
            if call is not None:
                on_output.append((func, args, call))
        if not on_output:
            seen = sorted({f"F.{func.__name__}" for func, _ in recorder.calls})
            raise ValueError(f"{who}.step(closure): the loss ({', '.join(seen)}) was not computed on the "
                             f"model's output (or a reshape of it, such as output.squeeze(1)); the "
                             f"Gauss-Newton step needs loss(model(x), target) with one of "
                             f"{[NN_LOSSES_NAMES[n] for n in self.LOSSES]} on the logits")
        if len(on_output) != 1:
            raise ValueError(f"{who}.step(closure): the closure computed {len(on_output)} losses on the "
                             f"model's output; with more than one, return (output, target) to say which")
        func, args, call = on_output[0]
        spec = _spec_from_call(func, args, who, self.LOSSES)
        _check_elementwise_shapes(spec, args, who)
        target = args["target"].detach()
        return Batch(model_input(call), target, spec, returned, True, call[2], args["input"])

    @staticmethod
    def step_result(batch: Batch, stats: dict):
        """What ``step`` returns: the closure's loss for ``step(closure)`` (as torch.optim), the stats
        dict for ``step(x, y)``."""
        if not batch.from_closure:
            return stats
        if batch.returned is not None:
            return batch.returned
        return torch.tensor(stats["loss"])

    def no_autocast(self):
        """The optimizers' own forward, Gram and solve run in the parameters' dtype."""
        device = self.param_groups[0]["params"][0].device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            return torch.autocast(device, enabled=False)
        return contextlib.nullcontext()


def refuse(stats: dict, reason: str, who: str) -> dict:
    """Mark a step refused (parameters untouched) and warn once per call."""
    stats["refused"] = True
    stats["reason"] = reason
    warnings.warn(f"{who}: step refused, {reason}; parameters unchanged", RuntimeWarning,
                  stacklevel=user_stacklevel())
    return stats
