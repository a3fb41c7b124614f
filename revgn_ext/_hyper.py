"""One checker for every value an optimizer keeps: its parameter groups and its per-parameter state.

Each optimizer declares a :class:`Spec`: for every key a group may hold and every key the state of a
parameter may hold, a rule (:class:`Number`, :class:`Integer`, :class:`Choice`, :class:`Flag`,
:class:`Shares`, :class:`Fixed`, :class:`LikeParam`), plus relations between keys. The same spec is
checked at construction (on the constructor's arguments), at ``load_state_dict`` (before the loaded
values replace the current ones) and at every ``step``/``direction`` (a scheduler or user code may
have written into ``param_groups`` or ``state`` since). A bad value raises a one-line ``ValueError``
that names the entry, ``param_groups[0]['lr']`` or ``state[3]['momentum_buffer']`` (the index of
``state_dict()``), and nothing is written.

Keys a group holds that the spec does not know are left alone (learning-rate schedulers add
``initial_lr`` and the like); a per-parameter state key the spec does not know is refused, since only
the optimizer writes state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ._checks import check_number

__all__ = ["Rule", "Number", "Integer", "Choice", "Flag", "Shares", "Fixed", "LikeParam", "Spec", "Context",
           "revgn_spec", "egn_spec"]


@dataclass
class Context:
    """What a rule may compare against: the values the optimizer was built with (for :class:`Fixed`),
    the number of blocks (for :class:`Shares`), the parameters' dtype (bounds a step size so that
    ``lr * direction`` stays representable), and whether to read tensor values (a host sync)."""
    built: dict = field(default_factory=dict)
    num_blocks: int | None = None
    dtype: torch.dtype | None = None
    deep: bool = True


class Rule:
    def check(self, label: str, value, ctx: Context, param: torch.Tensor | None = None, values: dict | None = None,
              key: str | None = None) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Number(Rule):
    """A finite real (not a bool, not a tensor) in [low, high]; ``low_key`` names another entry that is
    the lower bound; ``dtype_bound`` caps it at the largest finite value of the parameters' dtype."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    low_key: str | None = None
    dtype_bound: bool = False

    def check(self, label, value, ctx, param=None, values=None, key=None):
        check_number(label, value, low=self.low, high=self.high, low_open=self.low_open, high_open=self.high_open)
        if self.low_key is not None and values is not None and self.low_key in values:
            other = label.replace(f"'{key}'", f"'{self.low_key}'") if key and f"'{key}'" in label else self.low_key
            low = values[self.low_key]
            if isinstance(low, (int, float)) and not isinstance(low, bool) and value < low:
                raise ValueError(f"{label} must be >= {other} = {low}, got {value}")
        if self.dtype_bound and ctx.dtype is not None and abs(value) > torch.finfo(ctx.dtype).max:
            raise ValueError(f"{label} = {value:g} overflows the {str(ctx.dtype).replace('torch.', '')} "
                             f"parameters (largest finite value {torch.finfo(ctx.dtype).max:.3g})")


@dataclass(frozen=True)
class Integer(Rule):
    """An int (not a bool) >= low, or None where ``none_ok``."""
    low: int = 0
    none_ok: bool = False

    def check(self, label, value, ctx, param=None, values=None, key=None):
        if value is None and self.none_ok:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < self.low:
            what = f"an int >= {self.low}" + (" or None" if self.none_ok else "")
            raise ValueError(f"{label} must be {what}, got {value!r}")


@dataclass(frozen=True)
class Choice(Rule):
    values: tuple

    def check(self, label, value, ctx, param=None, values=None, key=None):
        # Compared by type as well: True == 1 must not pass for a choice of ints, nor 1 for True.
        if not any(type(value) is type(v) and value == v for v in self.values):
            raise ValueError(f"{label} must be one of {list(self.values)}, got {value!r}")


@dataclass(frozen=True)
class Flag(Rule):
    def check(self, label, value, ctx, param=None, values=None, key=None):
        if not isinstance(value, bool):
            raise ValueError(f"{label} must be True or False, got {value!r}")


@dataclass(frozen=True)
class Shares(Rule):
    """``ctx.num_blocks`` finite non-negative numbers summing to 1 (a tuple or list)."""

    def check(self, label, value, ctx, param=None, values=None, key=None):
        L = ctx.num_blocks
        ok = isinstance(value, (tuple, list)) and len(value) == L and all(
            not isinstance(s, bool) and isinstance(s, (int, float)) and math.isfinite(s) and s >= 0 for s in value)
        if not ok or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"{label} must be {L} non-negative numbers summing to 1 (one per block), got {value!r}")


@dataclass(frozen=True)
class Fixed(Rule):
    """A value set up at construction (e.g. EGN's Gram assembler): valid under ``rule`` and, once built,
    equal to the constructor's value."""
    rule: Rule
    why: str = "it is set up at construction"

    def check(self, label, value, ctx, param=None, values=None, key=None):
        self.rule.check(label, value, ctx, param, values, key)
        if key in ctx.built and (type(value) is not type(ctx.built[key]) or value != ctx.built[key]):
            raise ValueError(f"{label} = {value!r} differs from {key}={ctx.built[key]!r} this optimizer was "
                             f"built with ({self.why}); build it with {key}={value!r} to use that value")


@dataclass(frozen=True)
class LikeParam(Rule):
    """A tensor of its parameter's shape, dtype and device; finite (checked when ``ctx.deep``)."""

    def check(self, label, value, ctx, param=None, values=None, key=None):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{label} must be a tensor like its parameter, got {type(value).__name__}")
        if param is not None and (value.shape != param.shape or value.dtype != param.dtype
                                  or value.device != param.device):
            raise ValueError(f"{label} has shape {tuple(value.shape)}, {value.dtype} on {value.device}; its "
                             f"parameter has shape {tuple(param.shape)}, {param.dtype} on {param.device}")
        if ctx.deep and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{label} contains NaN or Inf")


@dataclass(frozen=True)
class Spec:
    """``group``: key -> rule for every option of a parameter group (all required in a group);
    ``state``: key -> rule for the per-parameter state (all optional, no others allowed);
    ``relations``: callables ``(values, label)`` that raise for combinations no constructor accepts."""
    group: dict
    state: dict = field(default_factory=dict)
    relations: tuple = ()

    def check_values(self, values: dict, label: Callable[[str], str], ctx: Context, partial: bool) -> None:
        """The rules of every key in ``values`` (all of the spec's keys unless ``partial``), then the
        relations."""
        for key, rule in self.group.items():
            if key not in values:
                if partial:
                    continue
                raise ValueError(f"{label(key)} is missing (a state dict of another optimizer or version?)")
            rule.check(label(key), values[key], ctx, None, values, key)
        for relation in self.relations:
            relation(values, label)

    def check_group(self, group: dict, index: int, ctx: Context, memo: dict | None = None) -> None:
        """``memo`` (index -> what the last check that passed read): the options are checked again only
        where one of them, or what the rules compare against, is another object than then. Options
        are immutable values, so the same objects pass again; a group holding anything else (a list)
        is checked every time."""
        key = _options_key(group, ctx) if memo is not None else None
        if key is not None and _same_key(memo.get(index), key):
            return
        if memo is not None:
            memo.pop(index, None)
        self.check_values(group, lambda key: f"param_groups[{index}]['{key}']", ctx, partial=False)
        if key is not None:
            memo[index] = key

    def check_state(self, state, groups: list, ctx: Context, only: int | None = None) -> None:
        """The state of every parameter (of group ``only`` if given); labels use the parameter's index
        in ``state_dict()``."""
        index = 0
        for g, group in enumerate(groups):
            for p in group["params"]:
                entry = state.get(p) if (only is None or g == only) else None
                if entry:
                    if not isinstance(entry, dict):
                        raise ValueError(f"state[{index}] must be a dict, got {type(entry).__name__}")
                    for key, value in entry.items():
                        rule = self.state.get(key)
                        if rule is None:
                            raise ValueError(f"state[{index}][{key!r}] is not state this optimizer keeps "
                                             f"(it keeps {sorted(self.state)}); a state dict of another "
                                             f"optimizer?")
                        rule.check(f"state[{index}]['{key}']", value, ctx, p, entry, key)
                index += 1


def loss_relation(smoothing: bool) -> Callable:
    """The loss entries agree with each other as a constructor would set them: no loss yet
    (reduction "batch_mean", no smoothing), a name ("batch_mean"), or an nn loss ("mean"/"sum");
    label smoothing only for cross-entropy with an nn loss, and only where the optimizer supports it."""
    def relation(values: dict, label) -> None:
        loss, reduction = values.get("loss"), values.get("reduction", "batch_mean")
        smooth = values.get("label_smoothing", 0.0)
        if loss is None and reduction != "batch_mean":
            raise ValueError(f"{label('reduction')} = {reduction!r} but {label('loss')} is None (no loss "
                             f"yet); a reduction comes with a loss")
        if smooth and (loss != "cross_entropy" or reduction == "batch_mean"):
            raise ValueError(f"{label('label_smoothing')} = {smooth} applies to nn.CrossEntropyLoss only, "
                             f"but the loss is {loss!r} with reduction {reduction!r}")
        ignore = values.get("ignore_index", -100)
        if ignore != -100 and (loss != "cross_entropy" or reduction == "batch_mean"):
            raise ValueError(f"{label('ignore_index')} = {ignore} applies to nn.CrossEntropyLoss / "
                             f"F.cross_entropy only, but the loss is {loss!r} with reduction {reduction!r}")
        if smooth and not smoothing:
            raise ValueError(f"{label('label_smoothing')} = {smooth}: this optimizer's function-space "
                             f"targets need hard labels, so label smoothing is not supported")
    return relation


def loss_rules(losses: tuple) -> dict:
    return {"loss": Choice((None,) + tuple(losses)),
            "reduction": Choice(("batch_mean", "mean", "sum")),
            "label_smoothing": Number(low=0.0, high=1.0), "ignore_index": Integer(low=-2 ** 63)}


def revgn_spec(targets: tuple, losses: tuple, solvers: tuple, damping_modes: tuple, gram_routes: tuple) -> Spec:
    """RevGN's groups and state (the names of the choices come from the modules that implement them)."""
    return Spec(
        group={"lr": Number(low=0.0, dtype_bound=True), "damping": Number(low=0.0), "target": Choice(targets),
               **loss_rules(losses), "shares": Shares(), "damping_mode": Choice(damping_modes),
               "solver": Choice(solvers), "rtol": Number(low=0.0), "atol": Number(low=0.0),
               "target_damping": Number(low=0.0, low_open=True), "gram_route": Choice(gram_routes),
               "memory_limit": Integer(low=1)},
        state={"step": Integer(low=0)},
        relations=(loss_relation(smoothing=False),))


def _curvature_relation(values: dict, label) -> None:
    curvature, samples = values.get("curvature", "exact"), values.get("samples", 1)
    if samples != 1 and curvature != "sampled":
        raise ValueError(f"{label('samples')} = {samples} applies to curvature='sampled' only, but "
                         f"{label('curvature')} = {curvature!r}")
    damping = values.get("damping")
    if curvature == "sampled" and isinstance(damping, (int, float)) and not damping > 0:
        raise ValueError(f"{label('damping')} = {damping}: curvature='sampled' needs damping > 0 (its step "
                         f"uses Woodbury's identity)")


def egn_spec(losses: tuple, curvatures: tuple, grams: tuple) -> Spec:
    """EGN's group and state. ``gram``, ``memory_limit`` and ``gram_block_rows`` configure the Gram
    assembler built at construction, so they must keep the constructor's values."""
    assembler = "EGN's Gram assembler is set up with it at construction"
    return Spec(
        group={"lr": Number(low=0.0, dtype_bound=True), "damping": Number(low=0.0), **loss_rules(losses),
               "line_search": Flag(), "momentum": Number(low=0.0, high=1.0, high_open=True),
               "adaptive_damping": Flag(), "damping_increase": Number(low=1.0),
               "damping_decrease": Number(low=0.0, high=1.0, low_open=True), "min_damping": Number(low=0.0),
               "max_damping": Number(low_key="min_damping"), "armijo": Number(low=0.0, high=1.0, high_open=True),
               "backtrack": Number(low=0.0, high=1.0, low_open=True, high_open=True),
               "max_tries": Integer(low=1), "gram": Fixed(Choice(grams), assembler),
               "memory_limit": Fixed(Integer(low=1), assembler),
               "gram_block_rows": Fixed(Integer(low=1, none_ok=True), assembler),
               "curvature": Choice(curvatures), "samples": Integer(low=1)},
        state={"step": Integer(low=0), "alpha": Number(low=0.0),   # 0 after a line search at lr 0
               "momentum_buffer": LikeParam()},
        relations=(loss_relation(smoothing=True), _curvature_relation))


_IMMUTABLE = (int, float, bool, str, type(None))


def _options_key(group: dict, ctx: Context):
    """What a group's check reads: its option names, and its values with the context's (compared by
    identity in :func:`_same_key`); None where a value is mutable, so never memoised."""
    names, values = [], [ctx.dtype, ctx.num_blocks, ctx.built]
    for name, value in group.items():
        if name == "params":
            continue
        if type(value) not in _IMMUTABLE and not (type(value) is tuple and all(type(v) in _IMMUTABLE for v in value)):
            return None
        names.append(name)
        values.append(value)
    return tuple(names), values


def _same_key(old, new) -> bool:
    return old is not None and old[0] == new[0] and len(old[1]) == len(new[1]) and all(
        a is b for a, b in zip(old[1], new[1]))
