"""The output-space Gram K = S^T J J^T S of a model, without materialising J where possible.

J = df/dw is the (b c) x d Jacobian of the outputs f (b, c) with respect to the trainable parameters,
and S = blockdiag(S_i) a per-sample c x c factor (see :mod:`revgn_ext.egn.loss_factors`); it is
passed as ``columns`` (c, b, c) with ``columns[a, i] = S_i[:, a]`` (the identity for K = J J^T).
Rows are ordered (i, a): sample-major.

Two assemblers share one interface, ``f = forward(x)`` then ``K = gram(f, columns)``:

* :class:`LayerwiseGram` for models whose trainable parameters all sit in ``nn.Linear`` layers with
  per-sample modules (elementwise activations, dropout, flatten) in between. For layer l with input
  x_i (captured by a hook) and g~_ia = d(S^T f)_ia / dz_i, the gradient of output a of sample i with
  respect to the layer output z_i,

      K[(i,a), (j,b)] = sum_l (x_i . x_j + [bias]) (g~_ia . g~_jb).

  The g~ come from c backward passes with grad_outputs = columns[a]; this works because sample i's
  output depends only on sample i, so the gradient of sum_i (S^T f)_ia with respect to z_j is g~_ja.
* :class:`FunctionalGram`, the generic fallback: per-sample Jacobians with ``torch.func``
  (vmap over samples of jacrev), guarded by a memory estimate.

Both assume that samples do not interact (no BatchNorm in training mode); modules that break this are
refused with :class:`UnsupportedModelError` naming them.

Data-parallel (``shards``, a :class:`revgn_ext.distributed.ShardGroup`): K's factors have one row block
per sample (X_l, G~_l, or the rows of S^T J), so each rank's rows are all_gathered and every rank
assembles the same global K, rows ordered by rank, then sample, then output.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

__all__ = ["UnsupportedModelError", "LayerwiseGram", "FunctionalGram", "gram_assembler", "gram_matrix",
           "layerwise_obstacle", "check_samplewise", "DEFAULT_MEMORY_LIMIT"]

DEFAULT_MEMORY_LIMIT = 4 * 2**30

# Leaf modules that act on each sample separately and hold no trainable parameters.
SAMPLEWISE_MODULES = (
    nn.Identity, nn.Flatten, nn.Dropout, nn.AlphaDropout,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Tanhshrink, nn.LogSigmoid, nn.Softmax, nn.LogSoftmax,
)


class UnsupportedModelError(ValueError):
    """The model (or a module inside it) cannot be handled by the requested Gram assembler."""


def check_samplewise(model: nn.Module) -> None:
    """Refuse modules that mix samples of a batch, which would make J block-coupled across samples."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise UnsupportedModelError(
                f"module '{name or type(model).__name__}' ({type(module).__name__}) mixes the samples of a "
                "batch in training mode, so EGN's per-sample Jacobian does not apply; call model.eval() "
                "or use a per-sample normalisation (LayerNorm, GroupNorm)")


def layerwise_obstacle(model: nn.Module, params) -> str | None:
    """Why :class:`LayerwiseGram` cannot handle ``model`` (naming the module), or None if it can."""
    linear_params = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            linear_params.update(id(p) for p in module.parameters(recurse=False))
    names = {id(p): n for n, p in model.named_parameters()}
    for p in params:
        if id(p) not in linear_params:
            name = names.get(id(p), "?")
            owner = name.rpartition(".")[0]
            kind = type(model.get_submodule(owner)).__name__ if name != "?" else "?"
            return (f"parameter '{name}' of module '{owner or type(model).__name__}' ({kind}) does not belong "
                    "to an nn.Linear layer")
    for name, module in model.named_modules():
        leaf = next(module.children(), None) is None
        if leaf and not isinstance(module, (nn.Linear,) + SAMPLEWISE_MODULES):
            return (f"module '{name or type(model).__name__}' ({type(module).__name__}) is neither nn.Linear "
                    "nor an elementwise activation")
    return None


def _check_gram_size(b: int, c: int, dtype: torch.dtype, memory_limit: int, model: nn.Module) -> None:
    need = (b * c) ** 2 * torch.finfo(dtype).bits // 8
    if need > memory_limit:
        raise UnsupportedModelError(
            f"the ({b * c} x {b * c}) Gram of {type(model).__name__} for batch {b} with {c} outputs needs "
            f"{need / 2**30:.2f} GiB > memory_limit {memory_limit / 2**30:.2f} GiB; use a smaller batch or "
            "raise memory_limit")


class LayerwiseGram:
    """K = S^T J J^T S = sum_l (X_l X_l^T + [bias] 1 1^T) (x) (G~_l G~_l^T), never forming J.

    X_l (b, in_l) are the inputs of linear layer l and G~_l (b c, out_l) the output gradients of
    S^T f, one backward pass per output column. Cost: sum_l b^2 in_l + (b c)^2 out_l multiply-adds.
    """
    method = "layerwise"

    def __init__(self, model: nn.Module, params, memory_limit: int = DEFAULT_MEMORY_LIMIT):
        reason = layerwise_obstacle(model, params)
        if reason is not None:
            raise UnsupportedModelError(f"layerwise Gram unavailable for {type(model).__name__}: {reason}")
        self.model = model
        self.memory_limit = memory_limit
        trainable = {id(p) for p in params}
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
                       and any(id(p) in trainable for p in m.parameters(recurse=False))]
        self.trainable = trainable
        self.records: dict[str, list] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """f = model(x) reshaped to (b, c), recording each linear layer's input and output."""
        self.records = {name: [] for name, _ in self.layers}

        def hook(name):
            def record(module, inputs, output):
                # Hand on a copy so that an in-place activation after the layer cannot overwrite z.
                self.records[name].append((inputs[0].detach(), output))
                return output.clone()
            return record

        handles = [m.register_forward_hook(hook(name)) for name, m in self.layers]
        try:
            f = self.model(x)
        finally:
            for h in handles:
                h.remove()
        b = x.shape[0]
        for name, m in self.layers:
            calls = self.records[name]
            if len(calls) != 1:
                raise UnsupportedModelError(
                    f"layerwise Gram needs each nn.Linear called once per forward, but '{name}' was "
                    f"called {len(calls)} times")
            if calls[0][0].dim() != 2 or calls[0][0].shape[0] != b:
                raise UnsupportedModelError(
                    f"layerwise Gram needs (batch, features) inputs to every nn.Linear, but '{name}' got "
                    f"shape {tuple(calls[0][0].shape)}")
        return f.reshape(b, -1)

    def gram(self, f: torch.Tensor, columns: torch.Tensor, shards=None) -> torch.Tensor:
        """K (b c, b c) from the last :meth:`forward`; keeps the autograd graph of f for a later VJP.

        With ``shards`` the per-layer rows X_l (b_r, in_l) and G~_l (b_r, c, out_l) of every rank are
        all_gathered first: (P-1)/P b (in_l + c out_l) numbers per layer, and K is the global one.
        """
        c, b = columns.shape[:2]
        _check_gram_size(b if shards is None else shards.total, c, f.dtype, self.memory_limit, self.model)
        outputs = [self.records[name][0][1] for name, _ in self.layers]
        grads = [f.new_zeros((b, c, z.shape[1])) for z in outputs]
        for a in range(c):
            ga = torch.autograd.grad(f, outputs, grad_outputs=columns[a], retain_graph=True, allow_unused=True)
            for G, g in zip(grads, ga):
                if g is not None:
                    G[:, a] = g
        inputs = [self.records[name][0][0] for name, _ in self.layers]
        if shards is not None:
            inputs = [shards.gather_rows(X) for X in inputs]
            grads = [shards.gather_rows(G) for G in grads]
            b = shards.total
        K = f.new_zeros(b * c, b * c)
        for (name, layer), X, G in zip(self.layers, inputs, grads):
            kernel = X @ X.T if id(layer.weight) in self.trainable else X.new_zeros(b, b)
            if layer.bias is not None and id(layer.bias) in self.trainable:
                kernel += 1.0
            G = G.reshape(b * c, -1)
            # One fused pass per layer: K += kernel (x) (G G^T), the kernel broadcast over output pairs.
            K.view(b, c, b, c).addcmul_(kernel[:, None, :, None], (G @ G.T).view(b, c, b, c))
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x = x
        return self.model(x).reshape(x.shape[0], -1)

    def gram(self, f: torch.Tensor, columns: torch.Tensor, shards=None) -> torch.Tensor:
        """K (b c, b c); with ``shards`` the rows of S^T J ((P-1)/P b c d numbers) are all_gathered."""
        c, b = columns.shape[:2]
        total = b if shards is None else shards.total  # every rank must reach the same verdict
        _check_gram_size(total, c, f.dtype, self.memory_limit, self.model)
        d = sum(p.numel() for p in self.params)
        need = 2 * total * c * d * torch.finfo(f.dtype).bits // 8
        if need > self.memory_limit:
            raise UnsupportedModelError(
                f"the generic Jacobian path for {type(self.model).__name__} needs {need / 2**30:.2f} GiB for "
                f"b={total}, c={c}, d={d} > memory_limit {self.memory_limit / 2**30:.2f} GiB; use a smaller batch, "
                "raise memory_limit, or build the model from nn.Linear layers for the layerwise Gram")

        def f_single(weights, xi):
            return functional_call(self.model, weights, (xi.unsqueeze(0),)).reshape(-1)

        weights = {n: p.detach() for n, p in zip(self.names, self.params)}
        try:
            jac = vmap(jacrev(f_single), in_dims=(None, 0))(weights, self.x)
        except Exception as err:  # torch.func raises many error types for unsupported modules
            raise UnsupportedModelError(
                f"torch.func could not form per-sample Jacobians of {type(self.model).__name__}: {err}") from err
        rows = (torch.einsum("aib,ibk->iak", columns, jac[n].reshape(b, c, -1)) for n in self.names)
        if shards is not None:
            rows = [shards.gather_rows(Jt) for Jt in rows]
            b = shards.total
        K = f.new_zeros(b * c, b * c)
        for Jt in rows:
            Jt = Jt.reshape(b * c, -1)
            K.addmm_(Jt, Jt.T)
        return K


def gram_assembler(model: nn.Module, params, method: str = "auto", memory_limit: int = DEFAULT_MEMORY_LIMIT):
    """LayerwiseGram where the model allows it (method "auto" or "layerwise"), else FunctionalGram."""
    if method not in ("auto", "layerwise", "functional"):
        raise ValueError(f"gram must be 'auto', 'layerwise' or 'functional', got {method!r}")
    if method == "functional" or (method == "auto" and layerwise_obstacle(model, params) is not None):
        return FunctionalGram(model, params, memory_limit)
    return LayerwiseGram(model, params, memory_limit)


def gram_matrix(model: nn.Module, x: torch.Tensor, columns: torch.Tensor | None = None, method: str = "auto",
                memory_limit: int = DEFAULT_MEMORY_LIMIT) -> torch.Tensor:
    """K = S^T J J^T S for the model's trainable parameters at x (columns None: K = J J^T)."""
    check_samplewise(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assembler = gram_assembler(model, params, method, memory_limit)
    f = assembler.forward(x)
    if columns is None:
        b, c = f.shape
        columns = torch.eye(c, dtype=f.dtype, device=f.device)[:, None, :].expand(c, b, c)
    return assembler.gram(f, columns)
