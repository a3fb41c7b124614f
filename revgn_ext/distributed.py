"""Data-parallel communication for the exact GN steps (RevGN, EGN) on ``torch.distributed``.

The global batch is the concatenation, in rank order, of the shards the P ranks of a process group pass
to ``step``. Samples interact only through the n x n (RevGN) or (b c) x (b c) (EGN) Gram, so one step is:

1. every rank checks its own shard; the verdicts are exchanged (:meth:`ShardGroup.agree`) so that bad
   input on one rank raises the same ``ValueError`` on all of them;
2. the rows of the Gram's factor (RevGN: features A_r, EGN: layer inputs X_r and output gradients G_r)
   and of the right-hand side are gathered (:meth:`ShardGroup.gather_rows`), so every rank forms and
   factors the same global Gram and solves the same system: no broadcast of the solution is needed;
3. each rank contracts its own rows, A_r^T U_r (RevGN) or J_r^T S_r u_r (EGN), and one all_reduce sums
   the parameter update (:meth:`ShardGroup.sum_tensors`), which every rank then applies identically.

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
        """Run ``check()`` on every rank, then exchange the verdicts and shard sizes (one all_gather of
        two integers per rank). If any rank's check raised ValueError, every rank raises ValueError with
        the first failing rank's message prefixed by "rank r: ". Returns what ``check`` returned.
        """
        result, message = None, ""
        try:
            result = check()
        except ValueError as err:
            message = str(err) or type(err).__name__
        n = 0 if message else int(batch_size())
        mine = torch.tensor([int(bool(message)), n], dtype=torch.int64, device=self._device(like))
        verdicts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(verdicts, mine, group=self.group)
        failed = [r for r, v in enumerate(verdicts) if int(v[0])]
        if failed:
            messages = [None] * self.world
            dist.all_gather_object(messages, message, group=self.group)
            raise ValueError(f"rank {failed[0]}: {messages[failed[0]]}")
        self.counts = [int(v[1]) for v in verdicts]
        return result

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

    def synchronise(self, module: nn.Module) -> None:
        """Copy the parameters and buffers of the group's rank 0 to every rank (as DDP does at wrap time)."""
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=src, group=self.group)


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
