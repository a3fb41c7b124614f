"""The generic whole-model route: per-sample Jacobians from ``torch.func`` (vmap over samples of
jacrev), for any module whose output for sample i depends only on x_i."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ..._inputs import ModelInputs
from .assembly import Assembly
from .columns import column_rows
from .checks import DEFAULT_MEMORY_LIMIT, RandomForward, UnsupportedModelError, check_memory, check_recurrent, \
    outputs_of

__all__ = ["FunctionalGram", "per_sample_jacobian_rows"]


def per_sample_jacobian_rows(model: nn.Module, x, names: list[str],
                             columns: torch.Tensor) -> dict[str, torch.Tensor]:
    """V_p (b, m, d_p) = S_i^T J_i,p for the named parameters only, by vmap of jacrev (torch.func).
    ``x``: the inputs (a tensor or :class:`ModelInputs`); vmap maps over the per-sample ones, each
    sample called as a batch of one, and passes the constants unchanged."""
    m, b, c = columns.shape
    check_recurrent(model, [], whole_model=True)   # vmap runs the whole forward
    current = dict(model.named_parameters())
    chosen = {n: current[n].detach() for n in names}
    inputs = ModelInputs.of(x)
    keys = inputs.per_sample

    def f_single(weights, *xi):
        one = inputs.replace({k: t.unsqueeze(0) for k, t in zip(keys, xi)})
        return functional_call(model, weights, one.args, one.kwargs, strict=False).reshape(-1)

    try:
        with torch.no_grad():   # torch.func differentiates inside; no graph back to the other parameters
            jac = vmap(jacrev(f_single), in_dims=(None,) + (0,) * len(keys))(chosen, *inputs.tensors())
    except Exception as err:  # torch.func raises many error types for unsupported modules
        raise UnsupportedModelError(
            f"torch.func could not form per-sample Jacobians of {type(model).__name__} for {names}: {err}") from err
    return {n: column_rows(columns, jac[n].reshape(b, c, -1)) for n in names}


class FunctionalGram:
    """K = S^T J J^T S from per-sample Jacobians J_i = d f(x_i) / dw (torch.func: vmap of jacrev).

    Needs about 2 b c d numbers of memory, which is checked against ``memory_limit`` (bytes) first.
    Nothing to verify: torch.func differentiates every use.
    """
    method = "functional"
    fallback_names: list = []

    def __init__(self, model: nn.Module, params, memory_limit: int = DEFAULT_MEMORY_LIMIT):
        self.model = model
        self.memory_limit = memory_limit
        ids = {id(p) for p in params}
        self.names = [n for n, p in model.named_parameters() if id(p) in ids]
        self.params = [p for n, p in model.named_parameters() if id(p) in ids]

    def route_to_functional(self, pids) -> None:
        """Every parameter is on the torch.func route already."""

    def assemble(self, x, system, ranks) -> Assembly:
        """One solve's K (see :mod:`.assembly`) at the inputs x (a tensor or :class:`ModelInputs`); the
        rows of S^T J ((P-1)/P b m d numbers) are all_gathered across ``ranks``."""
        outputs = []
        x = ModelInputs.of(x)

        def forward(inputs):
            inputs = ModelInputs.of(inputs)
            with RandomForward(self.model, inputs.first):
                outputs.append(outputs_of(self.model, inputs.call(self.model), inputs.batch_size))
            return outputs[-1]

        columns, payload = system(forward)
        f = outputs[-1]
        if columns is None:
            return Assembly(f, payload)
        m, b, c = columns.shape
        total = ranks.total  # every rank must reach the same verdict
        d = sum(p.numel() for p in self.params)
        check_memory(total * m, 2 * total * c * d * torch.finfo(f.dtype).bits // 8, f.dtype, self.memory_limit,
                     self.model, f" with its per-sample Jacobians (b={total}, c={c}, d={d}) on the generic path")
        rows = [ranks.gather_rows(Jt) for Jt in per_sample_jacobian_rows(self.model, x, self.names, columns).values()]
        K = f.new_zeros(total * m, total * m)
        for Jt in rows:
            Jt = Jt.reshape(total * m, -1)
            K.addmm_(Jt, Jt.T)
        return Assembly(f, payload, K, self.params)
