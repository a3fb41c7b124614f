"""One training run: an optimizer on RevMLP (or a plain MLP) in full-batch or mini-batch mode.

Optimizers: GN (RevGN), Adam, SGD, EGN (exact GN / Levenberg-Marquardt on any module), L-BFGS
(torch.optim, strong-Wolfe line search, one iteration per batch) and Shampoo / SOAP (pytorch-optimizer).
Every one of them gets the same decoupled weight decay ``theta <- (1 - lr_t wd) theta`` and the same
learning-rate schedule ``lr_t = lr * factor(t / T)`` over the run's T steps (:func:`schedule_factor`).

With ``cfg.validation`` the run trains on the fit part of a seeded split of the training set and
evaluates on the held-out part (metrics ``val_loss``, ``val_acc``): the test set is not loaded into
the run at all, so tuning on these runs cannot see it.

Per epoch it records (one JSON line and one CSV row):

* ``train_loss``: running mean of the pre-update batch losses (epoch 0: loss of the untrained model
  on the full-batch subset);
* ``test_loss``, ``test_acc`` (``val_loss``, ``val_acc`` with ``cfg.validation``);
* ``train_eval_loss``, ``train_eval_acc``: the model at the end of the epoch evaluated on the data it
  trains on (the full-batch subset or the whole training set), for train/test gaps;
* ``loss_change_pct``: mean over the epoch's steps of ``100 (L_after - L_before) / L_before`` on the
  same batch;
* ``ntk_similarity``: mean over probes of ``cos(K_0 v, K_t v)``, ``K = J J^T`` on a fixed subset;
* ``cka_block{l}``: linear CKA of block l's output ``[Y1, Y2]`` versus its output at init;
* ``weight_norm_ratio``, ``weight_relative_change``, ``weight_cosine``: all trainable parameters
  versus init.

A checkpoint (model, optimizer state, RNG state, the init references and the history) is written
atomically after every epoch; resuming from it continues the run exactly as if it had not stopped.

With ``distributed=True`` (GN only, inside an initialised process group) every rank runs the same loop
on its share of each batch (``idx.tensor_split(world)[rank]``); the optimizer makes the step and the
recorded losses those of the whole batch. Evaluation and diagnostics are repeated on every rank (they
are identical) and only rank 0 writes files and shows progress.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from ...revgn.model import RevMLP
from ..common import checkpoint
from ..common import diagnostics as dg
from ..common.data import load_dataset
from ..common.protocol import split_train
from ..common.records import CHECKPOINT, CONFIG_JSON, RunInterrupted, load_history, resolve_device, write_metrics
from .resume import validate as validate_checkpoint
from .config import RunConfig
from .mlp import MLP

__all__ = ["run", "load_history", "dataset_tensors", "prepare_data", "build_model", "build_optimizer", "RunInterrupted", "CHECKPOINT",
           "CONFIG_JSON"]


def dataset_tensors(cfg: RunConfig, cache: dict | None = None):
    """The dataset's (x_train, y_train, x_test, y_test) as loaded, kept in ``cache`` between runs."""
    key = (cfg.dataset, cfg.data_dir, cfg.standardize)
    if cache is not None and key in cache:
        return cache[key]
    tensors = load_dataset(cfg.dataset, cfg.data_dir, cfg.standardize)
    if cache is not None:
        cache[key] = tensors
    return tensors


def prepare_data(cfg: RunConfig, device: torch.device, cache: dict | None = None):
    """(x_train, y_train, x_eval, y_eval) on ``device`` in the run's dtype.

    The training set is cut to max_train. Without ``cfg.validation`` the evaluation set is the test
    set (cut to max_test); with it, the training set is split by :func:`.protocol.split_train` (seed
    ``RunConfig.SPLIT_SEED``) into the part trained on and the validation part evaluated on, and the
    test tensors are dropped here.
    """
    x_tr, y_tr, x_te, y_te = dataset_tensors(cfg, cache)
    if cfg.max_train is not None:
        x_tr, y_tr = x_tr[:cfg.max_train], y_tr[:cfg.max_train]
    if cfg.validation:
        x_tr, y_tr, x_te, y_te = split_train(x_tr, y_tr, cfg.val_fraction, RunConfig.SPLIT_SEED)
    elif cfg.max_test is not None:
        x_te, y_te = x_te[:cfg.max_test], y_te[:cfg.max_test]
    dtype = getattr(torch, cfg.dtype)
    return (x_tr.to(device, dtype), y_tr.to(device), x_te.to(device, dtype), y_te.to(device))


def build_model(cfg: RunConfig, in_features: int, num_classes: int, device: torch.device):
    if cfg.model == "mlp":
        return MLP(in_features, num_classes, cfg.hidden, cfg.blocks, seed=cfg.seed, dtype=getattr(torch, cfg.dtype),
                   device=device)
    return RevMLP(in_features, num_classes, num_blocks=cfg.blocks, hidden=cfg.hidden,
                  activations=cfg.activations, weight_std=cfg.weight_std, seed=cfg.seed,
                  dtype=getattr(torch, cfg.dtype), device=device)


CHECKPOINT_SECONDS = 300.0  # between evaluations, a checkpoint at least this often (wall seconds)
EGN_DAMPING = 1e-3  # EGN's lambda when cfg.damping is unset (its own default, 1.0, is meant for MSE)


def build_optimizer(cfg: RunConfig, model, distributed: bool = False):
    if distributed and cfg.optimizer != "gn":
        raise ValueError(f"distributed runs support the exact GN step only, got optimizer {cfg.optimizer!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    if cfg.optimizer == "lbfgs":
        return torch.optim.LBFGS(params, lr=cfg.lr, max_iter=1, history_size=10, line_search_fn="strong_wolfe")
    if cfg.optimizer in ("shampoo", "soap"):
        try:
            import pytorch_optimizer
        except ImportError:
            raise ValueError(f"optimizer {cfg.optimizer!r} needs the pytorch-optimizer package: "
                             "pip install pytorch-optimizer") from None
        if cfg.optimizer == "shampoo":
            return pytorch_optimizer.Shampoo(params, lr=cfg.lr)
        return pytorch_optimizer.SOAP(params, lr=cfg.lr, weight_decay=0.0)
    from ... import EGN, RevGN

    damping = {} if cfg.damping is None else {"damping": cfg.damping}
    if cfg.optimizer == "egn":
        if cfg.loss != "cross_entropy" and cfg.loss != "mse":
            raise ValueError(f"loss {cfg.loss!r} is not supported by EGN here")
        return EGN(model, lr=cfg.lr, loss=cfg.loss, **({"damping": EGN_DAMPING} | damping))
    return RevGN(model, lr=cfg.lr, target=cfg.target, loss=cfg.loss, damping_mode=cfg.damping_mode,
                    solver=cfg.solver, rtol=cfg.rtol, distributed=distributed, **damping)


def schedule_factor(schedule: str, progress: float) -> float:
    """Multiplier of the base learning rate at ``progress`` = step / total steps in [0, 1]:
    constant 1; cosine ``0.5 (1 + cos(pi progress))``; step 1, then 0.1 from 50%, 0.01 from 75%."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    if schedule == "step":
        return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01
    raise ValueError(f"schedule must be constant, cosine or step, got {schedule!r}")


def steps_per_epoch(cfg: RunConfig, n_train: int) -> int:
    return 1 if cfg.setting == "full" else math.ceil(n_train / cfg.batch_size)


def batch_loss(cfg: RunConfig, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if cfg.loss == "cross_entropy":
        return F.cross_entropy(logits, y)
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return 0.5 * ((logits - onehot) ** 2).sum(1).mean()


@torch.no_grad()
def evaluate(cfg: RunConfig, model, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048):
    """(mean loss, accuracy) over (x, y) in chunks."""
    total, correct = 0.0, 0
    for i in range(0, len(x), chunk):
        logits = model(x[i:i + chunk])
        total += float(batch_loss(cfg, logits, y[i:i + chunk])) * len(logits)
        correct += int((logits.argmax(1) == y[i:i + chunk]).sum())
    return total / len(x), correct / len(x)


def epoch_batches(cfg: RunConfig, n_train: int, epoch: int):
    """Index tensors of this epoch's batches. The shuffle depends only on (seed, epoch), so a resumed
    run sees the same batches."""
    if cfg.setting == "full":
        return [torch.arange(min(cfg.full_batch_size, n_train))]
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    order = torch.randperm(n_train, generator=g)
    return list(order.split(cfg.batch_size))


class Tracker:
    """Reference quantities at init and the per-epoch diagnostics computed against them.

    CKA compares each block's output ``[Y1, Y2]`` (RevMLP) or each hidden layer's output (MLP)."""

    def __init__(self, cfg: RunConfig, model, x_train: torch.Tensor, state: dict | None = None):
        self.model = model
        self.x = x_train[:cfg.diag_samples]
        x_ntk = self.x[:cfg.ntk_samples]
        if state is None:
            init = dg.trainable_params(model)
            self.init_params = [init[n] for n in init]
            self.features0 = self.block_features()
            self.ntk = dg.NTKSimilarity(model, x_ntk, cfg.ntk_probes, seed=cfg.seed)
        else:
            self.init_params = state["init_params"]
            self.features0 = state["features0"]
            self.ntk = dg.NTKSimilarity(model, x_ntk, state["probes"], K0v=state["K0v"])

    def state(self) -> dict:
        return {"init_params": self.init_params, "features0": self.features0, "probes": self.ntk.probes,
                "K0v": self.ntk.K0v}

    @torch.no_grad()
    def block_features(self) -> list:
        if isinstance(self.model, MLP):
            return self.model.features(self.x)
        return [torch.cat([b.y1, b.y2], dim=1) for b in self.model.forward_with_trace(self.x).blocks]

    def __call__(self) -> dict:
        out = {"ntk_similarity": self.ntk()}
        for l, (f0, f) in enumerate(zip(self.features0, self.block_features()), start=1):
            out[f"cka_block{l}"] = dg.linear_cka(f0, f) if torch.isfinite(f).all() else math.nan
        params = [p for p in self.model.parameters() if p.requires_grad]
        change = dg.weight_change(params, self.init_params)
        out.update({f"weight_{k}": v for k, v in change.items()})
        return out


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _scalar_stats(stats) -> dict:
    """Finite numeric scalars of an optimizer's stats dict (tensors of one element included). A
    non-finite one (the direction norm of a step refused for it) is left out, as None is: the refusal
    is counted in ``refused``, and a history row of a run that goes on holds finite numbers only."""
    out = {}
    for k, v in (stats or {}).items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float)) and math.isfinite(v):  # bools too, as 0.0 / 1.0
            out[k] = float(v)
    return out


def train_step(cfg: RunConfig, model, opt, x: torch.Tensor, y: torch.Tensor):
    """One optimizer step; returns (pre-step loss, post-step loss on the same batch, stats)."""
    if cfg.optimizer in ("gn", "egn"):
        stats = opt.step(x, y)
        before = float(stats["loss"])
    elif cfg.optimizer == "lbfgs":
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(cfg, model(x), y)
            loss.backward()
            return loss
        before, stats = float(opt.step(closure).detach()), {}
    else:
        opt.zero_grad(set_to_none=True)
        loss = batch_loss(cfg, model(x), y)
        loss.backward()
        opt.step()
        before, stats = float(loss.detach()), {}
    with torch.no_grad():
        after = batch_loss(cfg, model(x), y)
        shards = getattr(opt, "shards", None)
        after = float(after if shards is None else shards.mean(after))   # the whole batch's loss
    if cfg.weight_decay > 0:
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    p.mul_(1.0 - group["lr"] * cfg.weight_decay)
    return before, after, _scalar_stats(stats)


def run(cfg: RunConfig, out_dir: str, device: str | None = "cpu", resume: bool = False,
        progress: bool = True, data_cache: dict | None = None, label: str | None = None,
        distributed: bool = False, stop=None) -> list:
    """Train ``cfg`` writing metrics, config and checkpoints to ``out_dir``; returns the history rows.

    With ``resume`` the run continues from ``out_dir``'s checkpoint (which must exist and have a
    matching config) up to ``cfg.epochs``. ``distributed``: see the module docstring. ``stop``:
    optional ``stop(history) -> bool`` asked after every epoch; True ends the run there. A run whose
    train loss turns non-finite ends at that epoch too (``"diverged": True`` in its last row).
    """
    from tqdm.auto import tqdm

    dev = resolve_device(device)
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist
        rank, world = dist.get_rank(), dist.get_world_size()
    writer = rank == 0
    progress = progress and writer
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    ckpt = None
    if writer:
        checkpoint.remove_stale_tmp(ckpt_path)
    if resume:
        ckpt = checkpoint.load(ckpt_path, validate_checkpoint, map_location=dev)  # checksum verified, state validated
        cfg.check_resumable(RunConfig.from_dict(ckpt["config"]))
    if writer:
        with open(os.path.join(out_dir, CONFIG_JSON), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)

    x_tr, y_tr, x_te, y_te = prepare_data(cfg, dev, data_cache)
    ev = cfg.eval_split
    train_set = (x_tr[:cfg.full_batch_size], y_tr[:cfg.full_batch_size]) if cfg.setting == "full" else (x_tr, y_tr)
    num_classes = int(torch.cat([y_tr, y_te]).max()) + 1
    model = build_model(cfg, x_tr.shape[1], num_classes, dev)
    opt = build_optimizer(cfg, model, distributed)

    if ckpt is not None:
        per_epoch = steps_per_epoch(cfg, len(x_tr))
        if ckpt["history"][-1]["step"] != ckpt["epoch"] * per_epoch:
            raise checkpoint.unusable(ckpt_path, f"it counts {ckpt['history'][-1]['step']} steps after epoch "
                                                 f"{ckpt['epoch']}, this run takes {per_epoch} a epoch")
        checkpoint.restore(ckpt_path, ckpt, model, opt, lambda state: _set_rng_state(state, dev))
        tracker = Tracker(cfg, model, x_tr, ckpt["tracker"])
        history, start = ckpt["history"], ckpt["epoch"] + 1
    else:
        torch.manual_seed(cfg.seed)
        tracker = Tracker(cfg, model, x_tr)
        train_loss, train_acc = evaluate(cfg, model, *train_set)
        test_loss, test_acc = evaluate(cfg, model, x_te, y_te)
        history = [{"epoch": 0, "step": 0, "train_loss": train_loss, f"{ev}_loss": test_loss,
                    f"{ev}_acc": test_acc, "train_eval_loss": train_loss, "train_eval_acc": train_acc,
                    "loss_change_pct": math.nan, **tracker(), "time_s": 0.0}]
        start = 1
    history = history[:start]  # rows written after the checkpoint (a crash mid-epoch) are redone
    saved, saving = start - 1, None   # the epoch whose checkpoint is on disk; the one being written
    if writer:
        write_metrics(out_dir, history)

    label = label or cfg.name
    # Bars only on a terminal; a log (non-interactive stderr) gets one line per run at its end.
    interactive = progress and sys.stderr.isatty()
    epochs = tqdm(range(start, cfg.epochs + 1), desc=label, initial=start - 1, total=cfg.epochs,
                  disable=not interactive, leave=True, dynamic_ncols=True)
    step = history[-1]["step"]
    elapsed = history[-1]["time_s"]
    total_steps = max(1, cfg.epochs * steps_per_epoch(cfg, len(x_tr)))
    if history[-1].get("diverged") or (stop is not None and len(history) > 1 and stop(history)):
        epochs.close()
        return history
    last_save = time.perf_counter()
    try:
        for epoch in epochs:
            batches = epoch_batches(cfg, len(x_tr), epoch)
            bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not interactive or len(batches) == 1,
                       dynamic_ncols=True)
            t0 = time.perf_counter()
            loss_sum, count, changes, stat_sums = 0.0, 0, [], {}
            for idx in bar:
                idx = idx.to(dev)
                mine = idx if world == 1 else idx.tensor_split(world)[rank]
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * schedule_factor(cfg.schedule, step / total_steps)
                before, after, stats = train_step(cfg, model, opt, x_tr[mine], y_tr[mine])
                step += 1
                loss_sum += before * len(idx)
                count += len(idx)
                changes.append(100.0 * (after - before) / before if before > 0 else math.nan)
                for k, v in stats.items():
                    stat_sums[k] = stat_sums.get(k, 0.0) + v
                bar.set_postfix(loss=f"{before:.4f}")
            elapsed += time.perf_counter() - t0
            row = {"epoch": epoch, "step": step, "train_loss": loss_sum / count,
                   "loss_change_pct": sum(changes) / len(changes)}
            diverged = not math.isfinite(row["train_loss"])
            ending = diverged or epoch == cfg.epochs or (stop is not None and stop(history + [row]))
            # Held-out and train evaluations every eval_every epochs and at the end; rows in between
            # hold only the training loss (readers take the rows that hold a key: plots.series).
            evaluated = epoch % cfg.eval_every == 0 or ending
            if evaluated:
                test_loss, test_acc = evaluate(cfg, model, x_te, y_te)
                train_eval = evaluate(cfg, model, *train_set)
                row.update({f"{ev}_loss": test_loss, f"{ev}_acc": test_acc, "train_eval_loss": train_eval[0],
                            "train_eval_acc": train_eval[1]})
            if epoch % cfg.diag_every == 0 or ending:
                row.update(tracker())
            row["time_s"] = elapsed
            if diverged:
                row["diverged"] = True
            row.update({f"opt_{k}": v / len(batches) for k, v in stat_sums.items() if k != "loss"})
            history.append(row)
            if evaluated:
                epochs.set_postfix(train=f"{row['train_loss']:.4f}", **{ev: f"{test_loss:.4f}"}, acc=f"{test_acc:.3f}")
            else:
                epochs.set_postfix(train=f"{row['train_loss']:.4f}")
            # A checkpoint at every evaluation, at the end, and at least every CHECKPOINT_SECONDS between.
            if writer and (evaluated or time.perf_counter() - last_save >= CHECKPOINT_SECONDS):
                write_metrics(out_dir, history)
                saving = epoch
                checkpoint.save(ckpt_path, {"config": cfg.to_dict(), "epoch": epoch, "model": model.state_dict(),
                                            "optimizer": opt.state_dict(), "rng": _rng_state(dev),
                                            "tracker": tracker.state(), "history": history})
                saved, saving, last_save = epoch, None, time.perf_counter()
            elif writer:
                write_metrics(out_dir, history)
            if ending:
                break
    except KeyboardInterrupt:
        epochs.close()
        raise RunInterrupted(label, saved, ckpt_path, "epoch", lost=saving) from None
    epochs.close()
    if progress and not interactive and len(history) > 1:
        last = history[-1]
        print(f"{label}: {last['epoch']} epochs in {last['time_s']:.1f} s; train loss {last['train_loss']:.4f}, "
              f"{ev} loss {last[ev + '_loss']:.4f}, {ev} acc {last[ev + '_acc']:.3f}", file=sys.stderr, flush=True)
    return history

