"""What every Gram assembler assumes of a model, checked: samples do not interact, the forward is
deterministic, and the Gram with its stored factors fits in ``memory_limit``."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["UnsupportedModelError", "check_samplewise", "check_recurrent", "outputs_of", "RandomForward",
           "check_memory", "gram_bytes", "DEFAULT_MEMORY_LIMIT"]

DEFAULT_MEMORY_LIMIT = 4 * 2**30

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_SAMPLE_MIXING = (nn.modules.batchnorm._BatchNorm,) + _DROPOUT   # the types check_samplewise looks at


class UnsupportedModelError(ValueError):
    """The model (or a module inside it) cannot be handled by the requested Gram assembler."""


def check_samplewise(model: nn.Module) -> None:
    """Refuse modules that mix the samples of a batch or make the forward random."""
    for name, module in model.named_modules():
        if not isinstance(module, _SAMPLE_MIXING):
            continue
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


def check_recurrent(model: nn.Module, params, whole_model: bool) -> None:
    """Refuse nn.RNN/GRU/LSTM where a per-sample Jacobian through them is needed: their parameters
    (no layer rule; torch.func's vmap cannot batch the fused recurrence), or any of them on the
    whole-model torch.func route."""
    trainable = {id(p) for p in params}
    for name, module in model.named_modules():
        if not isinstance(module, nn.RNNBase):
            continue
        if whole_model or any(id(p) in trainable for p in module.parameters()):
            raise UnsupportedModelError(
                f"module '{name or type(model).__name__}' ({type(module).__name__}) is recurrent: EGN has no layer "
                "rule for it and torch.func cannot form its per-sample Jacobians (vmap does not batch the "
                "fused recurrence); freeze its parameters (with gram='auto') or write the recurrence with "
                "nn.Linear layers")


def outputs_of(model: nn.Module, out, b: int) -> torch.Tensor:
    """The model's output as (b, c); a non-tensor output (a tuple, a dict) is refused by name."""
    if not isinstance(out, torch.Tensor):
        raise UnsupportedModelError(
            f"{type(model).__name__} returned a {type(out).__name__}, but EGN needs model(x) to return one tensor "
            "of outputs (batch first): wrap the model so that its forward returns the logits only")
    return out.reshape(b, -1)


class RandomForward:
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


def gram_bytes(n: int, dtype) -> int:
    return n * n * torch.finfo(dtype).bits // 8


def check_memory(n: int, extra: int, dtype: torch.dtype, memory_limit: int, model: nn.Module, what: str) -> None:
    """The (n x n) Gram plus ``extra`` bytes within ``memory_limit``, or UnsupportedModelError."""
    need = gram_bytes(n, dtype) + extra
    if need > memory_limit:
        raise UnsupportedModelError(
            f"the ({n} x {n}) Gram of {type(model).__name__}{what} needs {need / 2**30:.2f} GiB > memory_limit "
            f"{memory_limit / 2**30:.2f} GiB; use a smaller batch, curvature='sampled'/'true-class' for many "
            "classes, or raise memory_limit")
