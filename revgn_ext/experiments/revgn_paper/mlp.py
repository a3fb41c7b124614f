"""A plain (non-reversible) ReLU MLP, the baseline model of the open-question studies."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """``logits = W_{L+1} relu(... relu(W_1 x + b_1) ...) + b_{L+1}`` with L hidden layers of width M.

    PyTorch's default (Kaiming-uniform) initialisation, drawn from ``seed``. :meth:`features` returns
    the hidden representations (after each ReLU), the analogue of RevMLP's block outputs for CKA.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int, num_layers: int = 2, seed: int = 0,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes), ("hidden", hidden),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            widths = [in_features] + [hidden] * num_layers
            self.hidden_layers = nn.ModuleList(nn.Linear(a, b, dtype=dtype, device=device)
                                               for a, b in zip(widths[:-1], widths[1:]))
            self.head = nn.Linear(hidden, num_classes, dtype=dtype, device=device)

    def features(self, x: torch.Tensor) -> list:
        out = []
        for layer in self.hidden_layers:
            x = torch.relu(layer(x))
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[-1])
