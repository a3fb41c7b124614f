"""Per-position (per-token) losses: outputs (b, ..., C) with labels (b, ...), as taggers and language
models have, and the loss computed on any rearrangement of the model's output that keeps each loss
row inside one sample.

A *position* is one row of the loss: the C logits that one softmax cross-entropy term reads (with its
label), or, for the element-wise losses (MSE, BCE with logits), the sample itself (their loss is a sum
over elements, so any one-to-one rearrangement of the output only permutes the targets). With torch's
semantics the cross-entropy is

    L = (1/N) sum over kept positions p of l(f_p, y_p)     (reduction "mean"; "sum": N L),

N the number of positions whose label is not ``ignore_index``. Every kept position is one "sample" of
the push-through solve: the system (S^T J J^T S + N lambda I) u = t has one row per kept position and
factor column (exact: C; sampled: k draws; true-class: 1), and an ignored position has none.

The Gram assemblers (:mod:`revgn_ext.egn.gram`) see samples: the outputs f (b, c) of sample i depend
on x_i only, and one backward pass gives one row per sample. So the columns handed to them are laid
out per sample, (width m_t, b, c) with width the most kept positions of any sample and m_t the factor
columns per position; the rows of samples with fewer kept positions are zero, and are removed from K
before the solve (:meth:`Layout.live`). Rows of different positions of the same sample are coupled in
K exactly (they share the sample's Jacobian); the sample-mixing check stays over the batch dimension.

Which element of the model's output a loss input element is: :func:`view_index`, from the storage
offsets of the two tensors (a reshape, ``view``, ``transpose``, ``permute``, ``squeeze`` of the whole
output); anything else (a copy, a slice) is not the model's output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._inputs import ModelInputs

__all__ = ["view_index", "SequenceTargets", "Layout", "PositionColumns", "loss_targets", "build_layout", "all_ignored"]


def all_ignored(ignore_index: int, unit: str) -> ValueError:
    """The error for a batch whose every label is ``ignore_index`` (``unit``: "sample" or "position")."""
    return ValueError(f"every label of the batch equals ignore_index={ignore_index}, so the loss has no {unit} "
                      "to average over (torch's loss is NaN); skip this batch")


def _offsets(t: torch.Tensor) -> torch.Tensor:
    """The storage offset of every element of t, shaped like t."""
    off = torch.tensor(t.storage_offset(), dtype=torch.long)
    for size, stride in zip(t.shape, t.stride()):
        off = off[..., None] + torch.arange(size, dtype=torch.long) * stride
    return off


def _dense(t: torch.Tensor) -> bool:
    """t covers a block of t.numel() storage elements, each once (strides a permutation of contiguous)."""
    expect = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expect:
            return False
        expect *= size
    return True


def view_index(out, inp) -> torch.Tensor | None:
    """For ``inp`` a one-to-one rearrangement of all of ``out`` (a view sharing its storage: reshape,
    transpose, permute, squeeze), the index of every inp element in out's row-major order, shaped like
    inp; None when inp is anything else."""
    if not (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor)) or out.numel() != inp.numel() \
            or out.numel() == 0 or out.dtype != inp.dtype or out.device != inp.device:
        return None
    try:
        if out.untyped_storage().data_ptr() != inp.untyped_storage().data_ptr():
            return None
    except (RuntimeError, NotImplementedError):
        return None
    if out.is_contiguous() and _dense(inp) and inp.storage_offset() == out.storage_offset():
        return _offsets(inp) - out.storage_offset()   # both cover the same block of storage, once each
    o = _offsets(out).reshape(-1)
    so, order = torch.sort(o)
    if bool((so[1:] == so[:-1]).any()):   # an expanded output: elements share storage
        return None
    i = _offsets(inp).reshape(-1)
    pos = torch.searchsorted(so, i).clamp_(max=so.numel() - 1)
    if not bool((so[pos] == i).all()):
        return None
    index = order[pos]
    if torch.unique(index).numel() != index.numel():
        return None
    return index.view(inp.shape)


def _identity(index: torch.Tensor) -> bool:
    """The loss input is the model's output in its own order (``index`` from :func:`view_index`)."""
    return bool((index.reshape(-1) == torch.arange(index.numel())).all())


@dataclass
class SequenceTargets:
    """Cross-entropy targets whose positions are not the samples: ``y`` as the loss got it (labels, or
    class probabilities), ``index`` (shaped like the loss input) the element of the model's output of
    each loss input element, or None when the loss input is the model's output itself, and
    ``class_dim`` the loss input's class dimension (1 for torch's functional / nn losses, whose input
    is (N, C, d1, ...); -1 for ``step(x, y)`` and an ``(output, target)`` pair, whose output is
    (b, ..., C))."""
    y: torch.Tensor
    index: torch.Tensor | None
    class_dim: int
    ignore_index: int

    def kept(self) -> int:
        """N: the positions with a label other than ignore_index (probabilities: every position)."""
        if self.y.is_floating_point():
            c = self.y.shape[self.class_dim] if self.y.dim() > 1 else 1
            return self.y.numel() // max(c, 1)
        return int((self.y != self.ignore_index).sum())


def loss_targets(spec, x, y, output=None, loss_input=None, class_dim: int = -1):
    """The targets of a step in the form the solve needs: ``y`` itself when the positions are the
    samples (labels (b,), outputs (b, c): the classic case), y rearranged into the model output's
    order for the element-wise losses, or :class:`SequenceTargets` for per-position cross-entropy.

    ``output``/``loss_input``: the model's output and the tensor the loss got (a view of it), from a
    closure; None for ``step(x, y)``.
    """
    if isinstance(x, ModelInputs):
        b = x.batch_size
    elif isinstance(x, torch.Tensor) and x.dim() > 0:
        b = x.shape[0]
    else:
        return y
    if not isinstance(y, torch.Tensor):
        return y
    index = view_index(output, loss_input) if output is not None else None
    if output is not None and index is None:
        raise ValueError("the loss input is not a rearrangement of the model's whole output (a copy or a slice "
                         "of it); compute the loss on model(x) or a view of it (reshape, transpose, permute)")
    if spec.name != "cross_entropy":
        if index is None or y.shape != index.shape:
            return y
        if _identity(index):
            return y if y.dim() and y.shape[0] == b else y.reshape(b, -1)
        out = torch.empty(index.numel(), dtype=y.dtype, device=y.device)
        out[index.reshape(-1).to(y.device)] = y.reshape(-1)
        return out.view(b, -1)
    shape = tuple(loss_input.shape) if index is not None else None
    plain = (y.dim() == 1 and not y.is_floating_point()) or (y.is_floating_point() and y.dim() == 2)
    if index is None and output is None and plain:
        return y   # step(x, y): labels (b,) or probabilities (b, C) of outputs (b, ...): the samples
    if plain and shape == (b, output[0].numel()) and y.shape[0] == b and _identity(index):
        return y
    seq = SequenceTargets(y, index, class_dim, spec.ignore_index)
    if not y.is_floating_point() and seq.kept() == 0:
        raise all_ignored(spec.ignore_index, "position")
    return seq


@dataclass
class Layout:
    """The kept positions of one batch: ``index`` (P, C) their logits in f.reshape(-1) (f: (b, c)),
    sorted by sample then order of appearance, ``sample`` / ``slot`` (P,) the sample of each and its
    rank among that sample's positions, ``y`` (P,) labels or (P, C) probabilities, ``width`` the most
    positions of one sample."""
    index: torch.Tensor
    sample: torch.Tensor
    slot: torch.Tensor
    y: torch.Tensor
    b: int
    c: int
    width: int

    def gather(self, f: torch.Tensor) -> torch.Tensor:
        """The positions' logits (P, C) of outputs f (b, c), differentiably."""
        return f.reshape(-1)[self.index]

    def columns(self, S: torch.Tensor) -> "PositionColumns":
        """Per-position factors S (P, C, m) as the assemblers' columns (width m, b, c)."""
        return PositionColumns(self, S)

    def live(self, m: int) -> torch.Tensor | None:
        """The rows of K (b width m, sample-major) that belong to a kept position; None if all do."""
        if self.index.shape[0] == self.b * self.width:
            return None
        mask = torch.zeros(self.b, self.width, dtype=torch.bool, device=self.index.device)
        mask[self.sample, self.slot] = True
        return mask[:, :, None].expand(self.b, self.width, m).reshape(-1)

    def padded(self, u: torch.Tensor) -> torch.Tensor:
        """u (P, m) per position as (b, width m) per sample, zero for the missing positions."""
        P, m = u.shape
        out = u.new_zeros(self.b, self.width, m)
        out[self.sample, self.slot] = u
        return out.reshape(self.b, self.width * m)


class PositionColumns:
    """The assemblers' columns (width m, b, c) of per-position factors S (P, C, m), formed on demand
    (:mod:`revgn_ext.egn.gram.columns`): column (s, a) of sample i is S_p[:, a] of its s-th kept
    position p, placed at p's logits, zero where sample i has fewer than s + 1 positions. Dense, they
    would hold b width m c numbers (b T^2 k V for a language model), almost all zero; one at a time
    they take b c."""

    def __init__(self, layout: Layout, S: torch.Tensor):
        self.layout, self.S = layout, S
        self.m = S.shape[2]
        self.shape = torch.Size((layout.width * self.m, layout.b, layout.c))
        self._slots: dict = {}

    def __getitem__(self, a: int) -> torch.Tensor:
        s, r = divmod(int(a), self.m)
        lay = self.layout
        if s not in self._slots:
            self._slots[s] = torch.nonzero(lay.slot == s).reshape(-1)
        p = self._slots[s]
        out = self.S.new_zeros(lay.b * lay.c)
        out[lay.index[p]] = self.S[p, :, r]
        return out.view(lay.b, lay.c)

    def weighted(self, w: torch.Tensor) -> torch.Tensor:
        """sum_a w[i, a] columns[a, i] (b, c) for w (b, width m)."""
        lay = self.layout
        wp = w.reshape(lay.b, lay.width, self.m)[lay.sample, lay.slot]                # (P, m)
        out = self.S.new_zeros(lay.b * lay.c)
        out.index_put_((lay.index.reshape(-1),), torch.einsum("pcr,pr->pc", self.S, wp).reshape(-1),
                       accumulate=True)
        return out.view(lay.b, lay.c)

    def rows(self, jac: torch.Tensor) -> torch.Tensor:
        """S_i^T J_i (b, width m, d) from per-sample Jacobians jac (b, c, d)."""
        lay = self.layout
        d = jac.shape[2]
        Vp = torch.einsum("pcr,pcd->prd", self.S, jac.reshape(lay.b * lay.c, d)[lay.index])   # (P, m, d)
        out = jac.new_zeros(lay.b, lay.width, self.m, d)
        out[lay.sample, lay.slot] = Vp
        return out.reshape(lay.b, lay.width * self.m, d)


def build_layout(targets: SequenceTargets, raw_shape: tuple, f: torch.Tensor) -> Layout:
    """The kept positions for outputs f (b, c) of raw shape ``raw_shape``; a one-line error when the
    labels do not fit the output or a loss row reads the logits of several samples."""
    b, c = f.shape
    y = targets.y.to(f.device)
    index = targets.index
    if index is None:
        if math.prod(raw_shape) != b * c:
            raise ValueError(f"the model's output for this x has {b * c} elements, not the {math.prod(raw_shape)} "
                             f"of the shape {raw_shape} it had for inputs of this shape; EGN needs one output shape per input shape")
        if len(raw_shape) < 2:
            raise ValueError(f"cross_entropy needs the class logits in the model's output, got shape {raw_shape}")
        index = torch.arange(b * c, device=f.device).view(raw_shape)
    else:
        index = index.to(f.device)
    where = (f"the output {tuple(index.shape)} (classes last: (b, ..., C))" if targets.class_dim == -1 else
             f"the loss input {tuple(index.shape)} (torch's layout: (N, C, d1, ...))")
    cdim = targets.class_dim % index.dim()
    if index.dim() < 2 and targets.class_dim == 1:
        raise ValueError(f"cross_entropy got the unbatched input {tuple(index.shape)}; give it a batch of rows")
    C = index.shape[cdim]
    positions = index.movedim(cdim, -1)
    if y.is_floating_point():
        if y.dtype not in (torch.float32, torch.float64) or y.shape != index.shape:
            raise ValueError(f"y holds class probabilities of shape {tuple(y.shape)} and dtype {y.dtype}, which "
                             f"must be float32/float64 of the shape of {where}")
        labels = y.movedim(cdim, -1).reshape(-1, C).to(f.dtype)
        tol = 1e-4 if labels.dtype == torch.float32 else 1e-10
        if bool(((labels < 0) | (labels > 1)).any()) or bool(((labels.sum(1) - 1).abs() > tol).any()):
            raise ValueError("y holds class probabilities for cross_entropy, so each row must lie in [0, 1] "
                             "and sum to 1")
        pos = positions.reshape(-1, C)
    else:
        want = positions.shape[:-1]
        if y.is_complex() or y.dtype == torch.bool or tuple(y.shape) != tuple(want):
            hint = ("; for torch's (N, C, d1, ...) layout compute the loss in a closure, e.g. "
                    "F.cross_entropy(model(x), y)") if targets.class_dim == -1 else ""
            raise ValueError(f"y of shape {tuple(y.shape)} ({y.dtype}) does not fit {where}: cross_entropy "
                             f"needs integer class labels of shape {tuple(want)}{hint}")
        labels = y.reshape(-1)
        keep = labels != targets.ignore_index
        labels = labels[keep].long()
        if bool(((labels < 0) | (labels >= C)).any()):
            raise ValueError(f"y holds labels outside [0, {C}) (the loss has {C} classes) other than "
                             f"ignore_index={targets.ignore_index} (padding)")
        pos = positions.reshape(-1, C)[keep]
    if C < 2:
        raise ValueError("cross_entropy needs at least 2 classes; use binary_cross_entropy")
    if pos.shape[0] == 0:
        raise all_ignored(targets.ignore_index, "position")
    sample = pos[:, 0] // c
    if not bool((pos // c == sample[:, None]).all()):
        raise ValueError(f"a row of the cross_entropy over {where} reads the logits of several samples (a "
                         "reshape across the batch dimension), so the loss has no per-sample Gauss-Newton "
                         "factor; keep the batch dimension first, e.g. output.reshape(-1, C) of (b, T, C)")
    order = torch.argsort(sample, stable=True)
    pos, sample, labels = pos[order], sample[order], labels[order]
    counts = torch.bincount(sample, minlength=b)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(pos.shape[0], device=pos.device) - starts[sample]
    return Layout(pos, sample, slot, labels, b, c, int(counts.max()))
