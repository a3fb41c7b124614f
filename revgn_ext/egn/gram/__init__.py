"""The output-space Gram K = S^T J J^T S of a model, without materialising J where possible.

J = df/dw is the (b c) x d Jacobian of the outputs f (b, c) with respect to the trainable parameters,
and S = blockdiag(S_i) a per-sample c x m factor (:mod:`revgn_ext.egn.loss_factors`; m = c for the
exact curvature (c - 1 for cross-entropy), m = k samples or 1 for the approximations), passed as ``columns`` (m, b, c) with
``columns[a, i] = S_i[:, a]``. K is (b m) x (b m), rows ordered (i, a): sample-major.

* :mod:`.assembly`: the one call of an assembler per solve and the :class:`Assembly` it returns;
* :mod:`.layerwise`: :class:`LayerwiseGram`, K from the layer rules (:mod:`revgn_ext.egn.rules`)
  with a per-parameter torch.func fallback;
* :mod:`.factors`: the rules' per-sample gradients in Kronecker or dense form, and K in row blocks;
* :mod:`.verification`: the checks of the rules' factors against autograd;
* :mod:`.functional`: :class:`FunctionalGram`, per-sample Jacobians of the whole model (torch.func);
* :mod:`.checks`: what every assembler refuses (sample-mixing modules, random forwards, memory).

Design notes (why these rules rather than BackPACK or curvlinops): docs/egn_design.md.
"""
from __future__ import annotations

import torch
from torch import nn

from ..._inputs import ModelInputs
from ...distributed import SingleProcess
from .assembly import Assembly
from .checks import DEFAULT_MEMORY_LIMIT, UnsupportedModelError, check_memory, check_recurrent, check_samplewise, \
    outputs_of
from .functional import FunctionalGram, per_sample_jacobian_rows
from .layerwise import LayerwiseGram, layerwise_obstacle

__all__ = ["UnsupportedModelError", "LayerwiseGram", "FunctionalGram", "Assembly", "gram_assembler",
           "gram_matrix", "layerwise_obstacle", "check_samplewise", "DEFAULT_MEMORY_LIMIT",
           "per_sample_jacobian_rows", "GRAM_METHODS", "check_memory", "outputs_of"]

GRAM_METHODS = ("auto", "layerwise", "functional")


def gram_assembler(model: nn.Module, params, method: str = "auto", memory_limit: int = DEFAULT_MEMORY_LIMIT,
                   block_rows: int | None = None):
    """LayerwiseGram with per-parameter torch.func fallback ("auto"), without it ("layerwise"), or the
    whole-model FunctionalGram ("functional")."""
    if method not in GRAM_METHODS:
        raise ValueError(f"gram must be 'auto', 'layerwise' or 'functional', got {method!r}")
    params = list(params)
    check_recurrent(model, params, whole_model=(method == "functional"))
    if method == "functional":
        return FunctionalGram(model, params, memory_limit)
    return LayerwiseGram(model, params, memory_limit, fallback=(method == "auto"), block_rows=block_rows)


def gram_matrix(model: nn.Module, x, columns: torch.Tensor | None = None, method: str = "auto",
                memory_limit: int = DEFAULT_MEMORY_LIMIT, block_rows: int | None = None) -> torch.Tensor:
    """K = S^T J J^T S for the model's trainable parameters at x (columns None: K = J J^T); x a tensor,
    a tuple / dict of the model's inputs or a :class:`ModelInputs`."""
    check_samplewise(model)
    x = ModelInputs.of(x)
    params = [p for p in model.parameters() if p.requires_grad]
    assembler = gram_assembler(model, params, method, memory_limit, block_rows)
    ranks = SingleProcess()

    def system(forward):
        f = ranks.agree(lambda: forward(x), lambda: x.batch_size)
        if columns is not None:
            return columns, None
        b, c = f.shape
        return torch.eye(c, dtype=f.dtype, device=f.device)[:, None, :].expand(c, b, c), None

    with torch.enable_grad():
        return assembler.assemble(x, system, ranks).gram
