"""The inputs of a model call, ``model(*args, **kwargs)``, split into per-sample inputs and constants.

EGN's ``step(x, y)`` takes x as a tensor (``model(x)``), a tuple or list (``model(*x)``) or a dict
(``model(**x)``); ``step(closure)`` records every argument of the model's call. :class:`ModelInputs`
holds them and classifies each entry by one rule:

* the batch size b is the first dimension of the first tensor with at least one dimension (positional
  arguments first, then keyword arguments, in call order);
* a tensor whose first dimension is b is a per-sample input: the optimizer slices it with the batch
  (half batches for the sample-mixing check, kept samples, data-parallel shards are the user's own);
* everything else passes unchanged as a constant: tensors without a batch dimension (a (T, T) causal
  mask, a positional table, a scalar tensor) and non-tensors (None, bools, ints, ``need_weights=False``).

No input is differentiated: EGN needs derivatives with respect to the parameters only, so float
inputs are inputs, not parameters, and bool / integer tensors (padding masks, token ids) are never
differentiated. A constant whose first dimension equals b by coincidence is sliced as if per-sample;
the sample-mixing check then sees the half batches disagree and refuses naming the inputs it
classified; such constants belong in a module buffer.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["ModelInputs", "single_input"]


def _is_batched(value, b: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == b


class ModelInputs:
    """``args`` and ``kwargs`` of one model call, with the per-sample tensors found (module docstring).

    ``names``: how each entry is named in errors, by position (int) or keyword (str);
    ``batch_size``: b; ``per_sample``: the keys of the per-sample tensors, in call order.
    """

    def __init__(self, args=(), kwargs=None, names: dict | None = None, batch_size: int | None = None):
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        if names is None:
            names = {0: "x"} if self.single else {k: _call_name(k) for k, _ in self.items()}
        self.names = names
        if batch_size is None:
            first = next((v for _, v in self.items() if isinstance(v, torch.Tensor) and v.dim() >= 1), None)
            if first is None and self.single:
                raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(self.args[0].shape)}")
            if first is None:
                raise ValueError(f"the model's inputs ({self.describe()}) hold no tensor with a batch "
                                 "dimension; the first tensor input's first dimension is the batch size")
            batch_size = int(first.shape[0])
        self.batch_size = batch_size
        self.per_sample = [k for k, v in self.items() if _is_batched(v, batch_size)]

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def of(cls, x) -> "ModelInputs":
        """From ``step(x, y)``'s x: a tensor, a tuple / list of positional inputs or a dict of keyword
        inputs (or a ModelInputs, returned as it is)."""
        if isinstance(x, ModelInputs):
            return x
        if isinstance(x, torch.Tensor):
            return cls((x,), names={0: "x"})
        if isinstance(x, (tuple, list)):
            if not x:
                raise ValueError("x is an empty tuple; pass the model's inputs, model(*x)")
            return cls(x, names={i: f"x[{i}]" for i in range(len(x))})
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise ValueError(f"x is a dict with keys {list(x)}; its keys must be the names of the "
                                 "model's keyword arguments, model(**x)")
            return cls(kwargs=x, names={k: f"x[{k!r}]" for k in x})
        raise ValueError(f"x must be a torch.Tensor, a tuple or list of the model's inputs (model(*x)) or a "
                         f"dict of them (model(**x)), got {type(x).__name__}")

    def items(self):
        """(key, value) of every entry: positions, then keywords."""
        return [*enumerate(self.args), *self.kwargs.items()]

    def get(self, key):
        return self.args[key] if isinstance(key, int) else self.kwargs[key]

    def replace(self, values: dict) -> "ModelInputs":
        """A copy with the entries ``values`` ({key: new value}) replaced; per-sample keys stay."""
        args = [values.get(i, v) for i, v in enumerate(self.args)]
        kwargs = {k: values.get(k, v) for k, v in self.kwargs.items()}
        out = ModelInputs.__new__(ModelInputs)
        out.args, out.kwargs, out.names = tuple(args), kwargs, self.names
        out.per_sample = list(self.per_sample)
        first = values.get(self.per_sample[0], self.get(self.per_sample[0]))
        out.batch_size = int(first.shape[0])
        return out

    # -- what the optimizer does with them ------------------------------------------------------------

    @property
    def single(self) -> bool:
        """One positional tensor and nothing else: ``model(x)``."""
        return len(self.args) == 1 and not self.kwargs and isinstance(self.args[0], torch.Tensor)

    @property
    def first(self) -> torch.Tensor:
        """The first per-sample tensor (the one that set the batch size): device, dtype, CUDA-ness."""
        return self.get(self.per_sample[0])

    def tensors(self) -> list[torch.Tensor]:
        """The per-sample tensors, in call order."""
        return [self.get(k) for k in self.per_sample]

    def slice(self, index) -> "ModelInputs":
        """The inputs of the samples ``index`` (a slice, index tensor or bool mask): every per-sample
        tensor indexed along its first dimension, the constants unchanged."""
        return self.replace({k: self.get(k)[index] for k in self.per_sample})

    def call(self, model: Callable):
        return model(*self.args, **self.kwargs)

    def signature(self) -> tuple:
        """The call pattern: the tensors' shapes and dtypes (per-sample or constant), the plain values
        of the non-tensor entries (``is_causal=True``) and the types of the others."""
        out = []
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                out.append((k, tuple(v.shape), v.dtype, k in self.per_sample))
            elif v is None or isinstance(v, (bool, int, float, str)):
                out.append((k, type(v).__name__, v))
            else:
                out.append((k, type(v).__name__))
        return tuple(out)

    def describe(self) -> str:
        parts = []
        for k, v in self.items():
            what = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else repr(v)
            parts.append(f"{self.names[k]} {what}")
        return ", ".join(parts)

    def classification(self) -> str:
        """How the entries were classified, for errors that a misclassification may cause."""
        const = [f"{self.names[k]} {tuple(v.shape)}" for k, v in self.items()
                 if isinstance(v, torch.Tensor) and k not in self.per_sample]
        batched = [f"{self.names[k]} {tuple(self.get(k).shape)}" for k in self.per_sample]
        text = f"per-sample (first dimension = batch size {self.batch_size}): {', '.join(batched)}"
        if const:
            text += f"; passed unchanged as constants: {', '.join(const)}"
        return text

    def ambiguous(self) -> bool:
        """Whether a misclassified entry could explain a failure: a tensor beside the first one."""
        return sum(isinstance(v, torch.Tensor) for _, v in self.items()) > 1


def _call_name(key) -> str:
    return f"model input {key}" if isinstance(key, int) else f"model input {key!r}"


def single_input(args: tuple, kwargs: dict, who: str) -> torch.Tensor:
    """The input x of a call ``model(x)``, for an optimizer that takes one input tensor."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        raise ValueError(f"{who} needs a model called with one input tensor, model(x); it was called with "
                         f"{len(args)} positional and {len(kwargs)} keyword arguments")
    return args[0]

