"""Data-parallel communication for the exact GN steps (RevGN, EGN) on ``torch.distributed``.

The global batch is the concatenation, in rank order, of the shards the P ranks of a process group pass
to ``step``. Samples interact only through the n x n (RevGN) or (b c) x (b c) (EGN) Gram, so one step is:

1. every rank checks its own shard; the verdicts are exchanged (:meth:`ShardGroup.agree`) so that bad
   input on one rank raises the same ``ValueError`` on all of them. The same exchange carries each
   rank's step and exchange counters and a fingerprint of its optimizer's hyper-parameters: ranks that
   are out of step (one rank raised outside the exchange and its caller retried, so its batch i+1
   would meet the others' batch i) raise ``RuntimeError`` together, and ranks whose hyper-parameters
   differ raise ``ValueError`` together, naming the first difference;
2. the rows of the Gram's factor (RevGN: features A_r, EGN: layer inputs X_r and output gradients G_r)
   and of the right-hand side are gathered (:meth:`ShardGroup.gather_rows`), so every rank forms and
   factors the same global Gram and solves the same system: no broadcast of the solution is needed;
3. each rank contracts its own rows, A_r^T U_r (RevGN) or J_r^T S_r u_r (EGN), and one all_reduce sums
   the parameter update (:meth:`ShardGroup.sum_tensors`), which every rank then applies identically.

At construction (:meth:`ShardGroup.synchronise`) the ranks first compare a fixed-size fingerprint of
the model's structure (parameter and buffer names, shapes, dtypes) and of the optimizer's
hyper-parameters, so that a rank built with another hidden width or learning rate gets a clear
``ValueError`` on every rank before any collective whose sizes depend on them (a broadcast of
mismatched shapes aborts the process inside gloo).

A rank that stays alive but stops calling ``step`` blocks the others in their next collective until the
process group's timeout (``init_process_group(timeout=...)``; 30 minutes by default for gloo). The
experiments CLI sets it with ``--dist-timeout`` (docs/distributed.md).

Only ``torch.distributed`` collectives are used (gloo on CPU, NCCL on GPU). Byte counts below are per
rank, for P ranks, shards of n/P rows and s bytes per element (ring algorithms):

* all_gather of n/P rows of width w:  (P-1)/P * n * w * s   sent (and the same received);
* all_reduce of N numbers:            2 (P-1)/P * N * s     sent (reduce-scatter + all-gather).

For RevGN's Gram A A^T (A: n x M) the alternative to gathering the feature rows is to re-shard A by
columns (all_to_all, (P-1)/P^2 * n M s) and all_reduce the partial Grams (2 (P-1)/P * n^2 s)
(:meth:`ShardGroup.reduce_gram`). It moves fewer bytes when n < M (P-1)/(2P), and it splits the n^2 M
Gram product across the ranks instead of repeating it on each. :func:`gram_route_bytes` gives both
counts and :func:`choose_gram_route` picks the smaller.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ShardGroup", "resolve", "all_gather_bytes", "all_reduce_bytes", "gram_route_bytes",
           "choose_gram_route", "GRAM_ROUTES"]

GRAM_ROUTES = ("auto", "gather_rows", "reduce_gram")


def all_gather_bytes(rows: int, width: int, world: int, itemsize: int) -> int:
    """Bytes one rank sends in an all_gather of ``rows`` global rows of ``width``: (P-1)/P n w s."""
    return (world - 1) * -(-rows // world) * width * itemsize


def all_reduce_bytes(numel: int, world: int, itemsize: int) -> int:
    """Bytes one rank sends in a ring all_reduce of ``numel`` numbers: 2 (P-1)/P N s."""
    return 2 * (world - 1) * numel * itemsize // world


def gram_route_bytes(n: int, M: int, world: int, itemsize: int) -> dict:
    """Bytes per rank to put the n x n Gram of a row-sharded A (n x M) on every rank, two ways:

    * "gather_rows": all_gather of the feature rows, (P-1)/P n M s;
    * "reduce_gram": all_to_all to column shards, (P-1)/P^2 n M s, then all_reduce of the partial
      Grams, 2 (P-1)/P n^2 s.
    """
    return {"gather_rows": all_gather_bytes(n, M, world, itemsize),
            "reduce_gram": (world - 1) * n * M * itemsize // world ** 2 + all_reduce_bytes(n * n, world, itemsize)}


def choose_gram_route(route: str, n: int, M: int, world: int, itemsize: int) -> str:
    """``route`` unless it is "auto"; then the route of :func:`gram_route_bytes` that sends fewer bytes."""
    if route != "auto":
        return route
    counts = gram_route_bytes(n, M, world, itemsize)
    return "reduce_gram" if counts["reduce_gram"] < counts["gather_rows"] else "gather_rows"


def describe_model(module: nn.Module) -> list:
    """One line per parameter and buffer: name, shape, dtype (what must match across ranks)."""
    lines = [f"model {type(module).__name__}"]
    for kind, items in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        lines += [f"{kind} {name}: shape {tuple(t.shape)}, {t.dtype}" for name, t in items]
    return lines


def describe_optimizer(optimizer) -> list:
    """One line per hyper-parameter of every param group (``param_groups[0]['lr'] = 0.1``), plus the
    optimizer's type and the shapes of its parameters."""
    lines = [f"optimizer {type(optimizer).__name__}"]
    for i, group in enumerate(optimizer.param_groups):
        lines.append(f"param_groups[{i}] parameter shapes {[tuple(p.shape) for p in group['params']]}")
        lines += [f"param_groups[{i}][{key!r}] = {group[key]!r}" for key in sorted(group) if key != "params"]
    return lines


def _fingerprint(lines: list) -> int:
    """A signed 64-bit digest of the description lines."""
    return int.from_bytes(hashlib.sha256("\n".join(lines).encode()).digest()[:8], "little", signed=True)


class ShardGroup:
    """The ranks of ``group`` holding consecutive shards of one global batch.

    After :meth:`agree`, ``counts[r]`` is rank r's shard size, ``total`` the global batch size and
    ``rows`` the slice of the global batch this rank holds. ``traffic`` accumulates the bytes this rank
    sent per collective kind (from the formulas in the module docstring), for benchmarks.
    """

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("distributed=True needs an initialised default process group: call "
                             "torch.distributed.init_process_group first (torchrun sets up its environment)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.counts = [0] * self.world
        self.traffic = {"all_gather": 0, "all_reduce": 0, "all_to_all": 0}
        self.steps = 0       # optimizer.step() calls begun on this rank (counted by begin_step)
        self.exchanges = 0   # agree() calls on this rank
        self.optimizer = None  # whose hyper-parameters every exchange compares across ranks

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def rows(self) -> slice:
        start = sum(self.counts[:self.rank])
        return slice(start, start + self.counts[self.rank])

    def _device(self, like: torch.Tensor | None) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return like.device if like is not None and like.is_cuda else torch.device("cuda",
                                                                                     torch.cuda.current_device())
        return torch.device("cpu")

    def agree(self, check: Callable, batch_size: Callable[[], int], like: torch.Tensor | None = None):
        """Run ``check()`` on every rank, then exchange the verdicts, shard sizes, step and exchange
        counters and hyper-parameter fingerprints (one all_gather of six integers per rank).

        * Counters that differ (a rank raised outside this exchange and was retried, or skipped a step):
          RuntimeError on every rank, before anything of the mismatched batches is combined.
        * A rank whose check raised (any Exception): ValueError on every rank with the first failing
          rank's message prefixed by "rank r: ".
        * Hyper-parameters that differ (one rank's ``param_groups`` were changed): ValueError on every
          rank naming the first difference.

        Returns what ``check`` returned.
        """
        self.exchanges += 1
        result, message = None, ""
        try:
            result = check()
        except Exception as err:  # any failure of one rank's check must reach every rank
            message = (str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}") \
                or type(err).__name__
        n = 0 if message else int(batch_size())
        settings = 0 if self.optimizer is None else _fingerprint(describe_optimizer(self.optimizer))
        mine = torch.tensor([int(bool(message)), n, self.steps, self.exchanges, settings, 0], dtype=torch.int64,
                            device=self._device(like))
        verdicts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(verdicts, mine, group=self.group)
        verdicts = [v.tolist() for v in verdicts]
        counters = [tuple(v[2:4]) for v in verdicts]
        if len(set(counters)) > 1:
            where = ", ".join(f"rank {r} at step {c[0]} (exchange {c[1]})" for r, c in enumerate(counters))
            raise RuntimeError(f"the ranks are out of step: {where}. A step raised on some ranks only and was "
                               "retried, or a rank skipped a step, so the ranks would combine different batches; "
                               "rebuild the optimizer on every rank (from a checkpoint) to resume")
        failed = [r for r, v in enumerate(verdicts) if v[0]]
        if failed:
            messages = [None] * self.world
            dist.all_gather_object(messages, message, group=self.group)
            raise ValueError(f"rank {failed[0]}: {messages[failed[0]]}")
        if len({v[4] for v in verdicts}) > 1:
            self._raise_difference(describe_optimizer(self.optimizer), "hyper-parameters")
        self.counts = [v[1] for v in verdicts]
        return result

    def _raise_difference(self, lines: list, what: str) -> None:
        """Gather every rank's description lines and raise ValueError naming the first line in which a
        rank differs from rank 0 (the same message on every rank)."""
        described = [None] * self.world
        dist.all_gather_object(described, lines, group=self.group)
        base = described[0]
        for r, other in enumerate(described[1:], start=1):
            for i in range(max(len(base), len(other))):
                a = base[i] if i < len(base) else "(nothing)"
                b = other[i] if i < len(other) else "(nothing)"
                if a != b:
                    raise ValueError(f"the ranks' {what} differ: rank 0 has {a!r}, rank {r} has {b!r}; every rank "
                                     "must build the same model and optimizer")
        raise ValueError(f"the ranks' {what} differ")

    def check_consistent(self, module: nn.Module, optimizer=None) -> None:
        """ValueError on every rank unless all ranks have the same model structure (and, given the
        optimizer, the same hyper-parameters). One all_gather of two integers per rank comes first, so a
        mismatch is found before any collective whose sizes depend on the model."""
        model_lines = describe_model(module)
        settings = [] if optimizer is None else describe_optimizer(optimizer)
        mine = torch.tensor([_fingerprint(model_lines), _fingerprint(settings)], dtype=torch.int64,
                            device=self._device(next(iter(module.parameters()), None)))
        prints = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(prints, mine, group=self.group)
        prints = [tuple(p.tolist()) for p in prints]
        if len({p[0] for p in prints}) > 1:
            self._raise_difference(model_lines, "models")
        if len({p[1] for p in prints}) > 1:
            self._raise_difference(settings, "hyper-parameters")

    def begin_step(self, optimizer) -> None:
        """The first call of ``optimizer.step`` (each optimizer calls its rank group before anything
        else, so a step that raises before its exchange still counts): counts the step, and compares
        the hyper-parameters across ranks once if the optimizer did not pass itself to
        :meth:`synchronise`."""
        self.steps += 1
        if self.optimizer is not optimizer:
            model = getattr(optimizer, "model", None)
            self.check_consistent(model if isinstance(model, nn.Module) else nn.Module(), optimizer)
            self.optimizer = optimizer

    def gather_rows(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The global tensor whose ``dim`` concatenates every rank's shard (sizes from :meth:`agree`).

        all_gather needs equal shapes, so shards are padded to the largest; cost (P-1) max_r n_r w s.
        """
        if self.world == 1:
            return t
        t = t.movedim(dim, 0)
        most = max(self.counts)
        if t.shape[0] < most:
            t = torch.cat([t, t.new_zeros((most - t.shape[0],) + t.shape[1:])])
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        self.traffic["all_gather"] += (self.world - 1) * t.numel() * t.element_size()
        return torch.cat([p[:c] for p, c in zip(parts, self.counts)]).movedim(0, dim)

    def reduce_gram(self, A: torch.Tensor) -> torch.Tensor:
        """G = A A^T over the global rows of A (shards: (B, n_r, M) -> (B, n, n) on every rank).

        One all_to_all re-shards A by columns (rank r receives every rank's rows of its M/P columns),
        each rank forms the partial Gram of its columns, and one all_reduce sums them:
        (P-1)/P^2 n M s + 2 (P-1)/P n^2 s bytes sent, and 1/P of the Gram product per rank.
        """
        if self.world == 1:
            return A @ A.mT
        B, _, M = A.shape
        cols = [len(c) for c in torch.arange(M).tensor_split(self.world)]
        send = torch.cat([piece.reshape(-1) for piece in A.split(cols, dim=2)])
        recv = A.new_empty(B * self.total * cols[self.rank])
        dist.all_to_all_single(recv, send, output_split_sizes=[B * c * cols[self.rank] for c in self.counts],
                               input_split_sizes=[B * self.counts[self.rank] * c for c in cols],
                               group=self.group)
        self.traffic["all_to_all"] += (send.numel() - B * self.counts[self.rank] * cols[self.rank]) * A.element_size()
        mine = torch.cat([piece.view(B, c, cols[self.rank])
                          for piece, c in zip(recv.split([B * c * cols[self.rank] for c in self.counts]),
                                              self.counts)], dim=1)
        return self.sum_tensors([mine @ mine.mT])[0]

    def sum_tensors(self, tensors: list) -> list:
        """sum_r tensors_r, elementwise over ranks, in one all_reduce of the flattened list."""
        if self.world == 1:
            return list(tensors)
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        self.traffic["all_reduce"] += all_reduce_bytes(flat.numel(), self.world, flat.element_size())
        return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def mean(self, local_mean: torch.Tensor) -> torch.Tensor:
        """The global-batch mean from this shard's mean: sum_r n_r mean_r / n."""
        return self.sum_tensors([local_mean.reshape(1) * self.counts[self.rank]])[0][0] / self.total

    def synchronise(self, module: nn.Module, optimizer=None) -> None:
        """Check that every rank has the same model structure and (given ``optimizer``) hyper-parameters
        (:meth:`check_consistent`), then copy the parameters and buffers of the group's rank 0 to every
        rank (as DDP does at wrap time)."""
        self.check_consistent(module, optimizer)
        if optimizer is not None:
            self.optimizer = optimizer
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=src, group=self.group)


class SingleProcess:
    """The :class:`ShardGroup` interface for one process holding the whole batch: every exchange is
    the identity. An optimizer written against this interface reads the same with and without
    data parallelism, and its single-process step makes no collective call."""

    rank, world = 0, 1

    def __init__(self):
        self.counts = [0]

    @property
    def total(self) -> int:
        return self.counts[0]

    @property
    def rows(self) -> slice:
        return slice(None)

    def begin_step(self, optimizer) -> None:
        """Nothing to count or compare."""

    def agree(self, check: Callable, batch_size: Callable[[], int], like: torch.Tensor | None = None):
        result = check()
        self.counts = [int(batch_size())]
        return result

    def gather_rows(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return t

    def sum_tensors(self, tensors: list) -> list:
        return list(tensors)

    def mean(self, local_mean: torch.Tensor) -> torch.Tensor:
        return local_mean


def resolve(model: nn.Module, distributed: bool, process_group) -> tuple[nn.Module, ShardGroup | None]:
    """(bare module, ShardGroup or None) for an optimizer's ``model``/``distributed``/``process_group``.

    A DistributedDataParallel wrapper is unwrapped (its ``.module`` is trained) and implies
    ``distributed=True`` over its process group: the exact step does its own communication, and DDP's
    gradient all_reduce (an average of per-shard gradients) is not used by it.
    """
    if not isinstance(distributed, bool):
        raise ValueError(f"distributed must be True or False, got {distributed!r}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if process_group is None:
            process_group = model.process_group
        model, distributed = model.module, True
    if process_group is not None:
        distributed = True
    if not distributed:
        return model, None
    return model, ShardGroup(process_group)
