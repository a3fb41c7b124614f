"""Seeing linear maps of parameters wherever they are called: ``F.linear`` and ``torch.matmul`` / ``@``.

Module hooks see a layer only when its module is called. Attention calls its projections as functions:
``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``) passes ``in_proj_weight`` and
``out_proj.weight`` to ``F.linear`` inside ``F.multi_head_attention_forward``, and hand-written attention
writes ``x @ W.T`` or ``F.linear(x, W)``. :class:`LinearCapture` records each such call, during one forward,
as a :class:`LinearCall`: the parameter (and the part of it used), the input and the output.

How calls are seen:

* a :class:`torch.overrides.TorchFunctionMode` sees the calls the model's own code makes
  (``F.linear``, ``torch.matmul``, ``Tensor.__matmul__``, ``Tensor.matmul``);
* a function of ``torch.nn.functional`` that the mode sees as a whole (``multi_head_attention_forward``)
  runs its body without the mode, so while it runs, the module attribute ``torch.nn.functional.linear``
  (which that module's functions look up at call time) is a recording wrapper; it is restored on exit.

Attention: in the recorded forward, ``F.scaled_dot_product_attention`` runs its math backend on CPU
(:func:`differentiable_attention`: the same function, differentiable twice; the fused CPU kernel's
backward has no derivative, and ``curvature="sampled"`` takes J g by double backward; on few positions
its backward, which the Gram takes once per output column, is also faster).

Which parameter a weight is: by storage. A weight argument that shares its storage with a tracked
parameter is that parameter, a block of its rows (``w.split``, ``w.chunk``, ``w[a:b]``), or the
transpose of either (``W.T`` in ``x @ W.T``; ``x @ W`` is the transpose of ``F.linear(x, W)``), read
off its strides and offset. Anything else (a weight computed from a parameter) is not recorded, and
the assembler's verification then finds that parameter's gradient incomplete.

The sample axis of a call is not known during the forward (attention runs its projections on (T, b, E)
inputs and its output projection on (T b, E) rows, position-major); :func:`resolve_layouts` finds it
after the forward from two backward passes (see there), once per call pattern.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

__all__ = ["LinearCall", "LinearCapture", "resolve_layouts", "to_samples", "parameter_ops",
           "differentiable_attention", "math_attention"]

_LINEAR = torch._C._nn.linear
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
_RMATMUL = {torch.Tensor.__rmatmul__}


def differentiable_attention(device):
    """A context in which attention runs its math backend on CPU (see the module docstring); elsewhere
    nothing."""
    return math_attention() if torch.device(device).type == "cpu" else contextlib.nullcontext()


def math_attention():
    """``sdpa_kernel(SDPBackend.MATH)``: attention on its math backend (differentiable twice), with the
    backend flags looked up once (:class:`_MathAttention`) where this torch names them as expected."""
    return _MathAttention() if _SDP_FLAGS else sdpa_kernel(SDPBackend.MATH)


def _sdp_flags() -> list:
    """(getter, setter, is math) of every attention backend flag, as ``sdpa_kernel`` reads and sets them;
    empty where this torch names them differently (then ``sdpa_kernel`` itself is used)."""
    try:
        from torch.nn.attention import _backend_names
        return [(getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"),
                 value == "MATH") for name, value in _backend_names.items()]
    except (ImportError, AttributeError):
        return []


_SDP_FLAGS = _sdp_flags()


class _MathAttention:
    """``sdpa_kernel(SDPBackend.MATH)`` with the flags' functions looked up once (the recorded forward
    enters it at every step): only the math backend on entry, every flag as it was on exit."""

    def __enter__(self):
        self.previous = [get() for get, _, _ in _SDP_FLAGS]
        for _, set_, math_only in _SDP_FLAGS:
            set_(math_only)
        return self

    def __exit__(self, *_):
        for (_, set_, _), enabled in zip(_SDP_FLAGS, self.previous):
            set_(enabled)
        return False


class LinearCall:
    """One call y = x W_u^T + b_u, with W_u a block of rows of ``weight`` (or its transpose) and b_u a
    block of ``bias``. Attributes ``weight`` / ``bias`` are the parameters themselves (or None: not a
    tracked parameter, e.g. frozen), so that the call reads like a module to the assembler.

    ``rows``: (first, last) rows of ``weight`` used; ``transposed``: the parameter is stored (in, out)
    (``x @ W``); ``bias_rows``: likewise for the bias. ``layout``: where the samples are in the call's
    leading dimensions, set by :func:`resolve_layouts` (None until then).
    """

    def __init__(self, name, weight, rows, transposed, bias, bias_rows, inp, out):
        self.name, self.weight, self.rows, self.transposed = name, weight, rows, transposed
        self.bias, self.bias_rows = bias, bias_rows
        self.inp, self.out = inp, out
        self.layout = None
        self.batch = None   # the batch size, set with the layout

    @property
    def full(self) -> bool:
        """The whole weight, stored (out, in): the Kronecker form applies as for ``nn.Linear``."""
        return self.weight is not None and not self.transposed and self.rows == (0, self.weight.shape[0])

    def signature(self):
        return (id(self.weight), self.rows, self.transposed, id(self.bias), self.bias_rows,
                tuple(self.inp.shape), tuple(self.out.shape))


def _same_storage(t: torch.Tensor, p: torch.Tensor) -> bool:
    try:
        return t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return False


def _as_part(t, params):
    """(param, (first, last) rows, transposed) if ``t`` is a block of rows of a tracked parameter or
    its transpose, else None."""
    if not isinstance(t, torch.Tensor) or not t.requires_grad:
        return None
    for p in params:
        if not _same_storage(t, p) or t.dim() != p.dim() or p.dim() not in (1, 2):
            continue
        offset = t.storage_offset() - p.storage_offset()
        if p.dim() == 1:
            if t.stride() == p.stride() and offset >= 0 and offset + t.shape[0] <= p.shape[0]:
                return p, (offset, offset + t.shape[0]), False
            continue
        rs, cs = p.stride()
        if offset < 0 or offset % rs:
            continue
        r0 = offset // rs
        if t.stride() == (rs, cs) and t.shape[1] == p.shape[1] and r0 + t.shape[0] <= p.shape[0]:
            return p, (r0, r0 + t.shape[0]), False
        if t.stride() == (cs, rs) and t.shape[0] == p.shape[1] and r0 + t.shape[1] <= p.shape[0]:
            return p, (r0, r0 + t.shape[1]), True
    return None


class LinearCapture(TorchFunctionMode):
    """Records the linear calls of ``params`` (see the module docstring) while active.

    ``calls``: the :class:`LinearCall` list, in call order. Each call's output is handed on as a copy,
    so that an in-place operation after the call cannot overwrite the recorded output, and so that the
    recorded output is where its gradient can be asked for.
    """

    def __init__(self, params, name_of=None):
        super().__init__()
        self.params = list(params)
        self.name_of = name_of or {}
        self.calls: list[LinearCall] = []
        self._patched = False

    def _record(self, x, weight, bias, compute):
        """compute() -> y; records the call when ``weight`` or ``bias`` is a tracked parameter (part)."""
        part = _as_part(weight, self.params)
        b_part = _as_part(bias, self.params) if bias is not None else None
        y = compute()
        if (part is None and b_part is None) or not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) \
                or not y.requires_grad:
            return y
        p, rows, transposed = part if part is not None else (None, None, False)
        bias_p, bias_rows = (b_part[0], b_part[1]) if b_part is not None and not b_part[2] else (None, None)
        if p is None and bias_p is None:
            return y
        name = self.name_of.get(id(p if p is not None else bias_p), "?")
        self.calls.append(LinearCall(name, p, rows, transposed, bias_p, bias_rows, x.detach(), y))
        return y.clone()

    def _linear(self, x, weight, bias=None):
        # F.linear(x, W_u, b_u): W_u (out, in); as a part of a parameter stored (out, in) or transposed.
        return self._record(x, weight, bias, lambda: _LINEAR(x, weight, bias))

    @contextlib.contextmanager
    def _linear_patched(self):
        if self._patched:
            yield
            return
        original = F.linear
        F.linear = self._linear
        self._patched = True
        try:
            yield
        finally:
            F.linear = original
            self._patched = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LINEAR:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return self._linear(x, weight, bias)
        if func in _MATMUL or func in _RMATMUL:
            a, w = (args[0], args[1]) if func in _MATMUL else (args[1], args[0])
            if isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(a, torch.Tensor) and a.dim() >= 1:
                # a @ w = F.linear(a, w.T): the "weight" of that linear call is w.T
                return self._record(a, w.T, None, lambda: func(*args, **kwargs))
            return func(*args, **kwargs)
        if getattr(func, "__module__", None) == "torch.nn.functional" and hasattr(func, "__code__"):
            with self._linear_patched():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _op_name(func) -> str:
    name = getattr(func, "__name__", repr(func))
    module = getattr(func, "__module__", None) or ""
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        return f"F.{name}"
    if module == "torch":
        return f"torch.{name}"
    return f"Tensor.{name}" if "TensorBase" in getattr(func, "__qualname__", "") else name


class _ParameterUses(TorchFunctionMode):
    """Records which torch functions the forward passes each watched parameter (or a view of it) to; a
    function of ``torch.nn.functional`` is seen as a whole (``F.multi_head_attention_forward``)."""

    def __init__(self, params):
        super().__init__()
        self.params = list(params)
        self.ops: dict[int, list[str]] = {id(p): [] for p in self.params}

    def _scan(self, func, value):
        if isinstance(value, (list, tuple)):
            for v in value:
                self._scan(func, v)
        elif isinstance(value, torch.Tensor):
            for p in self.params:
                if _same_storage(value, p) and _op_name(func) not in self.ops[id(p)]:
                    self.ops[id(p)].append(_op_name(func))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._scan(func, list(args) + list(kwargs.values()))
        return func(*args, **kwargs)


def parameter_ops(forward, params) -> dict:
    """{id(param): names of the torch functions that ``forward()`` (the model's forward) passes it to}, for
    the message that refuses a parameter no rule covers."""
    uses = _ParameterUses(params)
    with torch.enable_grad(), uses:
        forward()
    return uses.ops


# --------------------------------------------------------------------------------------------------
# Where the samples are
# --------------------------------------------------------------------------------------------------

def _candidates(lead, b):
    """Layouts of the sample axis in leading dims ``lead``: ("dim", k) a dim of size b; ("major", k) /
    ("minor", k) a dim of size b T flattened sample-major (i T + t) / position-major (t b + i)."""
    out = [("dim", k) for k, n in enumerate(lead) if n == b]
    out += [(kind, k) for k, n in enumerate(lead) if n != b and n % b == 0 for kind in ("major", "minor")]
    return out


def to_samples(t: torch.Tensor, layout, b: int) -> torch.Tensor:
    """``t`` (*lead, w) as (b, T, w), rows grouped by sample in ``layout``."""
    kind, k = layout
    lead, w = list(t.shape[:-1]), t.shape[-1]
    if kind == "major":
        t = t.reshape(*lead[:k], b, lead[k] // b, *lead[k + 1:], w)
    elif kind == "minor":
        t = t.reshape(*lead[:k], lead[k] // b, b, *lead[k + 1:], w)
        k += 1
    return t.movedim(k, 0).reshape(b, -1, w)


def _sample_scale(layout, lead, delta):
    """delta (b,) broadcast to the leading dims ``lead`` by ``layout``."""
    kind, k = layout
    b = delta.shape[0]
    if kind == "dim":
        shape = [1] * len(lead)
        shape[k] = b
        return delta.reshape(shape)
    n = lead[k] // b
    d = delta.repeat_interleave(n) if kind == "major" else delta.repeat(n)
    shape = [1] * len(lead)
    shape[k] = lead[k]
    return d.reshape(shape)


def resolve_layouts(f: torch.Tensor, calls, generator=None) -> list:
    """Set each call's ``layout`` (where its rows' samples are); returns the calls with no consistent
    layout (their parameters need another route).

    With f (b, c) and random R (b, c), g = df/dy^T R and g' = df/dy^T (delta R) for per-sample scales
    delta_i in [1, 2): a row of y that belongs to sample i has g'_row = delta_i g_row (samples do not
    interact), so the layout whose delta matches g' / g is the one. Rows with no gradient here (g = 0)
    do not decide; a call whose rows all have none takes its first candidate, and the assembler's
    verification of the step checks it like any other.
    """
    b = f.shape[0]
    outs = [c.out for c in calls]
    if not outs:
        return []
    R = torch.randn(f.shape, generator=generator, dtype=f.dtype).to(f.device)
    delta = (1 + torch.rand(b, generator=generator, dtype=f.dtype)).to(f.device)
    g1 = torch.autograd.grad(f, outs, grad_outputs=R, retain_graph=True, allow_unused=True)
    g2 = torch.autograd.grad(f, outs, grad_outputs=delta[:, None] * R, retain_graph=True, allow_unused=True)
    tol = math.sqrt(torch.finfo(f.dtype).eps)
    failed = []
    for call, a, a2 in zip(calls, g1, g2):
        lead = list(call.out.shape[:-1])
        cands = [c for c in _candidates(lead, b) if list(call.inp.shape[:-1]) == lead]
        call.layout, call.batch = None, b
        if a is None or not bool(a.any()):
            call.layout = cands[0] if cands else None
        else:
            for cand in cands:
                err = torch.linalg.vector_norm(a2 - _sample_scale(cand, lead, delta)[..., None] * a)
                if bool(err <= tol * torch.linalg.vector_norm(a2)):
                    call.layout = cand
                    break
        if call.layout is None:
            failed.append(call)
    return failed
