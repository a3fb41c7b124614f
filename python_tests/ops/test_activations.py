"""The activation registry: Python (revgn_ext/ops/activations.py) and C++ (csrc/activations.h) agree,
and every entry's derivative and feature form match autograd."""
import re
from pathlib import Path

import pytest
import torch

from revgn_ext.ops import activations as act

HEADER = Path(__file__).resolve().parents[2] / "csrc" / "activations.h"


def _header_entries():
    text = HEADER.read_text()
    block = text[text.index("#define REVGN_ACTIVATIONS(X)"):text.index("enum class Activation")]
    return [(name, int(i)) for name, _, i in re.findall(r"X\((\w+),\s*(\w+),\s*(\d+)\)", block)]


@pytest.mark.skipif(not HEADER.exists(), reason="csrc not beside the tests")
def test_python_and_cpp_lists_agree():
    assert _header_entries() == [(a.name, a.id) for a in act.REGISTRY.values()]


@pytest.mark.parametrize("name", act.ACTIVATIONS)
def test_derivative_and_feature_form_match_autograd(name):
    z = torch.randn(64, dtype=torch.float64, requires_grad=True)
    t = torch.randn(64, dtype=torch.float64)
    h = act.activation(name, z)
    (grad,) = torch.autograd.grad(h, z, t)
    assert torch.allclose(act.activation_grad(name, z.detach()) * t, grad, atol=1e-12)
    from_h = act.activation_grad_times(name, t, lambda: z.detach(), h.detach())
    assert torch.allclose(from_h, grad, atol=1e-12)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="activation must be one of"):
        act.get("swish")
