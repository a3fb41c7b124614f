"""EGN's checks of a batch (x, y) and of its construction options, each error naming the argument."""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from .._checks import all_finite, check_tensor
from .._inputs import ModelInputs
from .gram import UnsupportedModelError, outputs_of
from .loss_factors import CURVATURES
from .sequence import all_ignored

__all__ = ["check_inputs", "targets", "forward_naming_x", "check_curvature_options",
           "drop_ignored", "check_per_sample", "ModelInputs"]

_SHAPE_ERROR = re.compile(r"shape|size|dimension|channel", re.IGNORECASE)
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_x_dtype(x, model: nn.Module, finite: list | None = None) -> None:
    """x is float32/float64 and finite, or integer token ids for a model that has an nn.Embedding.
    ``finite``: where given, (name, x) is appended to it for the caller's fused finiteness check
    instead of being checked here."""
    if isinstance(x, torch.Tensor) and x.dtype in _INTEGER_DTYPES:
        if not any(isinstance(m, nn.Embedding) for m in model.modules()):
            raise ValueError(f"x holds integers ({x.dtype}) but {type(model).__name__} has no nn.Embedding to "
                             "take token ids; pass float32 or float64 features")
        return
    check_tensor("x", x, finite=finite is None)
    if finite is not None:
        finite.append(("x", x))


def check_inputs(x: ModelInputs, y, model: nn.Module, p0: torch.Tensor, batch_y: bool = True,
                 read_finite: bool = True) -> None:
    """x and y against each other and against the model's parameters (dtype, device, batch; the batch
    only with ``batch_y``: a loss on a view of the output, such as output.reshape(-1, C), has its own).
    The tensors that must be finite are read in one host sync (``read_finite=False``: not read, for a
    caller that reads a stricter verdict with its own values and runs these checks again when it
    fails); the errors come in the order of the checks, each naming its argument."""
    finite: list = []   # (name, tensor) whose finiteness is checked last, all at once
    try:
        for key, value in x.items():
            if isinstance(value, torch.Tensor):
                _check_input(x, key, value, model, p0, finite)
        first, b = x.first, x.batch_size
        if b == 0:
            raise ValueError(f"{x.names[x.per_sample[0]]} must have a non-empty batch dimension, got shape "
                             f"{tuple(first.shape)}")
        check_tensor("y", y, float_only=False, finite=False)
        if y.device != first.device:
            raise ValueError(f"y is on {y.device} but {x.names[x.per_sample[0]]} is on {first.device}")
        if batch_y and (y.dim() == 0 or y.shape[0] != b):
            raise ValueError(f"y must have the batch size of {_batch_of(x)}, got shape {tuple(y.shape)}")
    except ValueError:
        _check_finite(finite)   # a non-finite tensor checked before the failing check is reported first
        raise
    if y.is_floating_point():
        finite.append(("y", y))
    if read_finite and finite and not all_finite([t for _, t in finite]):
        _check_finite(finite)


def _check_finite(named: list) -> None:
    for name, t in named:
        check_tensor(name, t, float_only=False)


def _batch_of(x: ModelInputs) -> str:
    return f"x ({x.batch_size})" if x.single else \
        f"the inputs ({x.batch_size}, the first dimension of {x.names[x.per_sample[0]]})"


def _check_input(x: ModelInputs, key, t: torch.Tensor, model: nn.Module, p0: torch.Tensor, finite: list) -> None:
    """One tensor input: on the parameters' device; a per-sample float input in their dtype; no NaN
    in a float input, and the first input finite (the others may hold -inf, as additive attention
    masks do; the first is appended to ``finite``). A lone input ``model(x)`` is float features or token
    ids for an nn.Embedding."""
    name, batched = x.names[key], key in x.per_sample
    if x.single:
        check_x_dtype(t, model, finite)
    elif t.is_complex():
        raise ValueError(f"{name} is complex ({t.dtype}); the model's inputs must be real")
    elif t.is_floating_point():
        if batched and t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name} must be float32 or float64, got {t.dtype}")
        if key == x.per_sample[0]:
            check_tensor(name, t, float_only=False, finite=False)
            finite.append((name, t))
        elif bool(torch.isnan(t).any()):
            raise ValueError(f"{name} contains NaN")
    if batched and t.is_floating_point() and t.dtype != p0.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but the model's parameters have {p0.dtype}")
    if t.device != p0.device:
        raise ValueError(f"{name} is on {t.device} but the model's parameters are on {p0.device}")


def forward_naming_x(forward, x: ModelInputs) -> torch.Tensor:
    """``forward(x)``, with torch's shape errors ("mat1 and mat2 shapes cannot be multiplied") turned
    into one that names x (for several inputs: how each was classified)."""
    try:
        return forward(x)
    except RuntimeError as err:
        if isinstance(err, torch.OutOfMemoryError) or not _SHAPE_ERROR.search(str(err)):
            raise
        if x.single:
            raise ValueError(f"x of shape {tuple(x.first.shape)} does not fit the model (check the number of "
                             f"features per sample); its forward pass failed with: {err}") from err
        raise ValueError(f"the inputs ({x.describe()}) do not fit the model; they were classified as "
                         f"{x.classification()} (a tensor whose first dimension differs from the batch size "
                         f"passes unchanged: if it is a per-sample input, the inputs' batch sizes disagree); "
                         f"the forward pass failed with: {err}") from err


def targets(y: torch.Tensor, f: torch.Tensor, group: dict) -> torch.Tensor:
    """y in the form the loss factor expects, checked against the outputs f (b, c): for
    cross_entropy int64 labels (b,), or class probabilities (b, c) when y holds probabilities or
    the loss has label smoothing; (b, c) floats otherwise."""
    b, c = f.shape
    loss = group["loss"]
    if loss == "cross_entropy":
        return _class_targets(y, f, group.get("label_smoothing", 0.0))
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
    if loss == "binary_cross_entropy":   # one logit per output element
        if bool(((y < 0) | (y > 1)).any()):
            raise ValueError("y must lie in [0, 1] for binary_cross_entropy")
    return y


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


def check_curvature_options(curvature, samples, block_rows, damping) -> None:
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


def drop_ignored(group: dict, x: ModelInputs, y):
    """For cross-entropy with class labels, the samples whose label is ``ignore_index`` removed: they
    contribute no row to the system, and the mean runs over the kept samples, as torch's loss does."""
    if group["loss"] != "cross_entropy" or not isinstance(y, torch.Tensor) \
            or y.is_floating_point() or y.dim() != 1 or x.batch_size != y.shape[0]:
        return x, y
    keep = y != group.get("ignore_index", -100)
    if bool(keep.all()):
        return x, y
    if not bool(keep.any()):
        raise all_ignored(group.get("ignore_index", -100), "sample")
    return x.slice(keep), y[keep]


def check_per_sample(model: nn.Module, x: ModelInputs, f) -> tuple:
    """The model's output shape (before flattening to (b, c)), after checking that the forward is
    repeatable (the same outputs again) and sample i's output
    depends on x_i only (the two halves of the batch alone give the same outputs); else the model is
    refused naming the cause, since no per-sample Jacobian describes it. With several inputs, each half
    slices every per-sample input and keeps the constants (:class:`ModelInputs`); a refusal then names
    how they were classified, since a misclassified constant makes the halves disagree too."""
    b = x.batch_size
    tol = math.sqrt(torch.finfo(f.dtype).eps)
    scale = float(f.detach().abs().max()) if f.numel() else 0.0
    inputs = "" if not x.ambiguous() else (
        f"; the inputs were classified as {x.classification()}: a tensor whose first dimension equals the "
        "batch size is sliced with the batch and any other passes unchanged, so pass a constant whose first "
        "dimension equals the batch size as a module buffer, and give every per-sample input the batch first")

    def differs(a):
        return not bool(((a - f.detach()).abs() <= tol * (1.0 + scale)).all())

    with torch.no_grad():
        out = x.call(model)
        if differs(outputs_of(model, out, b)):
            raise UnsupportedModelError(
                f"the forward of {type(model).__name__} gave different outputs for the same x: it draws random "
                "numbers (from a generator of its own, numpy or Python's random), so no Gauss-Newton direction "
                "describes it; make the forward deterministic for the EGN steps")
        if b < 2:
            return
        try:
            halves = torch.cat([outputs_of(model, x.slice(slice(0, b // 2)).call(model), b // 2),
                                outputs_of(model, x.slice(slice(b // 2, b)).call(model), b - b // 2)])
        except RuntimeError as err:
            if isinstance(err, torch.OutOfMemoryError) or not inputs:
                raise
            raise UnsupportedModelError(f"the forward of {type(model).__name__} on half of the batch failed "
                                        f"({err}){inputs}") from err
        if differs(halves):
            raise UnsupportedModelError(
                f"{type(model).__name__} mixes the samples of a batch (sample i's output depends on other "
                "samples, e.g. h - h.mean(0) or attention across the batch dimension), so EGN's per-sample "
                f"Jacobian does not apply; normalise per sample instead{inputs}")
    return tuple(out.shape)
