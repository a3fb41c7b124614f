"""RevMLP: the reversible MLP that RevGN trains (arXiv 2411.07979, SPEC section 2).

Rows are samples. The input x (n, in_features) is zero-padded to an even width d and split into halves
X1 = x[:, :d/2], X2 = x[:, d/2:]. Block l = 1..L is an additive coupling layer

    F(U) = act(U V_F) W_F^T + b_F,      Y1 = X1 + F(X2)
    G(U) = act(U V_G) W_G^T + b_G,      Y2 = X2 + G(Y1)
    inverse:  X2 = Y2 - G(Y1),  X1 = Y1 - F(X2)

with fixed random V_F, V_G (d/2, M) ~ N(0, 1/M) (buffers, never trained), trainable W_F, W_G (d/2, M)
~ N(0, weight_std^2) and biases b_F, b_G (d/2,) = 0. Without a bottleneck (``hidden=None``) V is the
identity and W is (d/2, d/2). The output Z = [Y1_L, Y2_L] (n, d) is read out as logits = Z Q with a fixed
Q (d, c) with orthonormal columns (QR of a Gaussian).

The block math runs through :func:`revgn_ext.ops.coupling_forward` / ``coupling_inverse``, so the fused
kernels are used when they are loaded.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from .. import ops
from .._checks import check_tensor
from ..ops.activations import ACTIVATIONS
from ..ops.coupling import coupling_vjp

__all__ = ["RevMLP", "CouplingBlock", "BlockTrace", "RevMLPTrace"]


class BlockTrace(NamedTuple):
    """What one block's forward leaves behind for RevGN: input halves, output halves and the features
    hF = act(X2 V_F), hG = act(Y1 V_G) (the rows of the per-half design matrices)."""
    x1: torch.Tensor
    x2: torch.Tensor
    y1: torch.Tensor
    y2: torch.Tensor
    hF: torch.Tensor
    hG: torch.Tensor


class RevMLPTrace(NamedTuple):
    """Result of :meth:`RevMLP.forward_with_trace`: logits (n, c), output Z (n, d), one trace per block."""
    logits: torch.Tensor
    z: torch.Tensor
    blocks: list


class CouplingBlock(nn.Module):
    """One coupling block. Buffers VF, VG (None without a bottleneck); parameters WF, bF, WG, bG."""

    def __init__(self, half: int, hidden: int | None, activation: str, weight_std: float,
                 generator: torch.Generator, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.activation = activation
        width = half if hidden is None else hidden

        def gaussian(std: float) -> torch.Tensor:
            # Drawn in float64 on the CPU so a seed gives the same model on every device and dtype.
            t = torch.randn(half, width, generator=generator, dtype=torch.float64) * std
            return t.to(dtype=dtype, device=device)

        if hidden is None:
            self.register_buffer("VF", None)
            self.register_buffer("VG", None)
        else:
            self.register_buffer("VF", gaussian(hidden ** -0.5))
            self.register_buffer("VG", gaussian(hidden ** -0.5))
        self.WF = nn.Parameter(gaussian(weight_std))
        self.bF = nn.Parameter(torch.zeros(half, dtype=dtype, device=device))
        self.WG = nn.Parameter(gaussian(weight_std))
        self.bG = nn.Parameter(torch.zeros(half, dtype=dtype, device=device))

    @property
    def width(self) -> int:
        """Feature width M of F and G (d/2 without a bottleneck)."""
        return self.WF.shape[1]

    def forward(self, x1, x2, return_features: bool = False):
        """(y1, y2, hF, hG); the features are None unless ``return_features``."""
        return ops.coupling_forward(x1, x2, self.VF, self.WF, self.bF, self.VG, self.WG, self.bG,
                                    self.activation, return_features=return_features, check_finite=False)

    def inverse(self, y1, y2):
        return ops.coupling_inverse(y1, y2, self.VF, self.WF, self.bF, self.VG, self.WG, self.bG,
                                    self.activation, check_finite=False)

    def backward_from_inputs(self, x2, y1, gy1, gy2, need_input_grad: bool):
        """Vector-Jacobian product of the block at input half x2 and output half y1
        (:func:`revgn_ext.ops.coupling.coupling_vjp`). Returns (gX1, gX2, gW_F, gb_F, gW_G, gb_G)."""
        gx1, gx2, _, gWF, gbF, _, gWG, gbG = coupling_vjp(
            x2, y1, self.VF, self.WF, self.VG, self.WG, self.activation, gy1, gy2,
            need=(True, need_input_grad, False, True, True, False, True, True))
        return gx1, gx2, gWF, gbF, gWG, gbG


def _transforms_active() -> bool:
    """True under a torch.func transform or a forward-mode AD dual level. There the blocks run one by one
    (each op has rules for them) instead of through :class:`_ReversibleStack`, whose memory saving is
    for ordinary reverse-mode backprop."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


class _ReversibleStack(torch.autograd.Function):
    """Runs all blocks keeping only the final output; backward recomputes each block's input with
    the exact inverse (memory O(1) in depth instead of O(L))."""

    @staticmethod
    def forward(ctx, blocks, x1, x2, *params):
        with torch.no_grad():
            for block in blocks:
                x1, x2, _, _ = block(x1, x2)
        ctx.blocks = blocks
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy1, gy2):
        y1, y2 = ctx.saved_tensors
        gy1 = torch.zeros_like(y1) if gy1 is None else gy1
        gy2 = torch.zeros_like(y2) if gy2 is None else gy2
        need_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grads = []
        blocks = ctx.blocks
        for l in range(len(blocks) - 1, -1, -1):
            block = blocks[l]
            x1, x2 = block.inverse(y1, y2)
            gy1, gy2, gWF, gbF, gWG, gbG = block.backward_from_inputs(x2, y1, gy1, gy2,
                                                                      need_x or l > 0)
            grads = [gWF, gbF, gWG, gbG] + grads
            y1, y2 = x1, x2
        if not need_x:
            gy1 = gy2 = None
        return (None, gy1, gy2, *grads)


class RevMLP(nn.Module):
    """Reversible MLP: ``logits = [Y1_L, Y2_L] Q`` after L coupling blocks (formulas in the module doc).

    Args:
        in_features: input width; an odd width is padded with one zero feature to d = in_features + 1.
        num_classes: c, the number of logits (needs c <= d).
        num_blocks: L.
        hidden: bottleneck width M (the paper uses M >= batch size); ``None`` for the variant without
            a bottleneck (F(U) = act(U) W_F^T + b_F).
        activations: one of "identity", "relu", "tanh", "gelu", or a sequence of them, one per block;
            a shorter sequence repeats its last entry, so ("identity", "relu") is the paper's choice
            (identity in block 1, ReLU after it) for any L.
        weight_std: standard deviation of the initial W (paper 1e-3).
        seed: seeds V, W and Q (drawn in this order, block by block, then Q).
        reversible_backprop: when True, the autograd forward stores only the output and the backward
            recomputes block inputs with the exact inverse (ordinary backprop only: under torch.func
            transforms and forward-mode AD the blocks run one by one).
    Parameters are, block by block, (W_F, b_F, W_G, b_G); V_F, V_G and Q are buffers.
    """

    def __init__(self, in_features: int, num_classes: int, num_blocks: int = 2, hidden: int | None = 8000,
                 activations: str | Sequence[str] = ("identity", "relu"), weight_std: float = 1e-3,
                 seed: int = 0, reversible_backprop: bool = False, dtype: torch.dtype | None = None,
                 device=None) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes),
                            ("num_blocks", num_blocks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1):
            raise ValueError(f"hidden must be a positive int or None, got {hidden!r}")
        if not (isinstance(weight_std, (int, float)) and weight_std >= 0 and weight_std < float("inf")):
            raise ValueError(f"weight_std must be a finite number >= 0, got {weight_std!r}")
        dim = in_features + in_features % 2
        if num_classes > dim:
            raise ValueError(f"num_classes={num_classes} exceeds the padded width d={dim}: the readout Q "
                             "(d x c) cannot have orthonormal columns")
        acts = self._parse_activations(activations, num_blocks)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")

        self.in_features = in_features
        self.num_classes = num_classes
        self.dim = dim
        self.hidden = hidden
        self.activations = acts
        self.reversible_backprop = bool(reversible_backprop)
        generator = torch.Generator().manual_seed(int(seed))
        self.blocks = nn.ModuleList(
            CouplingBlock(dim // 2, hidden, act, float(weight_std), generator, dtype, device) for act in acts)
        gauss = torch.randn(dim, num_classes, generator=generator, dtype=torch.float64)
        self.register_buffer("Q", torch.linalg.qr(gauss).Q.to(dtype=dtype, device=device))

    @staticmethod
    def _parse_activations(activations, num_blocks: int) -> tuple:
        acts = (activations,) if isinstance(activations, str) else tuple(activations)
        if not acts or len(acts) > num_blocks:
            raise ValueError(f"activations must be a name or 1..num_blocks={num_blocks} names, got {activations!r}")
        for a in acts:
            if a not in ACTIVATIONS:
                raise ValueError(f"activations: each must be one of {ACTIVATIONS}, got {a!r}")
        return acts + (acts[-1],) * (num_blocks - len(acts))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        """Feature width M of every half-layer (d/2 without a bottleneck)."""
        return self.blocks[0].width

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, d={self.dim}, "
                f"num_blocks={self.num_blocks}, hidden={self.hidden}, activations={self.activations}, "
                f"reversible_backprop={self.reversible_backprop}")

    # ------------------------------------------------------------------------------------------
    def check_input(self, x, name: str = "x", finite: bool = False) -> torch.Tensor:
        """ValueError naming ``name`` unless x is (n, in_features) with the model's dtype and device."""
        check_tensor(name, x, ndim=2, finite=finite)
        if x.shape[1] != self.in_features:
            raise ValueError(f"{name} has {x.shape[1]} features, the model expects in_features="
                             f"{self.in_features}; got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")
        ref = self.Q
        if x.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but the model is {ref.dtype}")
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but the model is on {ref.device}")
        return x

    def split(self, x: torch.Tensor):
        """Pad x to width d and split it into halves (X1, X2)."""
        if self.dim != self.in_features:
            x = torch.nn.functional.pad(x, (0, 1))
        half = self.dim // 2
        return x[:, :half], x[:, half:]

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The network output Z = X_L (n, d) before the readout."""
        self.check_input(x)
        x1, x2 = self.split(x)
        if self.reversible_backprop and torch.is_grad_enabled() and not _transforms_active():
            x1, x2 = _ReversibleStack.apply(self.blocks, x1, x2, *self.parameters())
        else:
            for block in self.blocks:
                x1, x2, _, _ = block(x1, x2)
        return torch.cat([x1, x2], dim=1)

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        """logits = Z Q."""
        return z @ self.Q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """logits = RevMLP(x), (n, num_classes). An ordinary differentiable forward."""
        return self.readout(self.body(x))

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`body`: reconstructs x (n, in_features) from Z (n, d)."""
        check_tensor("z", z, ndim=2, finite=False)
        if z.shape[1] != self.dim:
            raise ValueError(f"z has {z.shape[1]} features, expected d={self.dim}; got shape {tuple(z.shape)}")
        half = self.dim // 2
        y1, y2 = z[:, :half], z[:, half:]
        for block in reversed(self.blocks):
            y1, y2 = block.inverse(y1, y2)
        return torch.cat([y1, y2], dim=1)[:, :self.in_features]

    @torch.no_grad()
    def forward_with_trace(self, x: torch.Tensor) -> RevMLPTrace:
        """Forward pass (no autograd) keeping every block's input/output halves and features
        hF = act(X2 V_F), hG = act(Y1 V_G), so RevGN does not recompute them."""
        self.check_input(x)
        x1, x2 = self.split(x)
        traces = []
        for block in self.blocks:
            y1, y2, hF, hG = block(x1, x2, return_features=True)
            traces.append(BlockTrace(x1, x2, y1, y2, hF, hG))
            x1, x2 = y1, y2
        z = torch.cat([x1, x2], dim=1)
        return RevMLPTrace(self.readout(z), z, traces)
