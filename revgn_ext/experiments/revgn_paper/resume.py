"""What a ``train`` / ``reproduce`` run's checkpoint must hold before it is resumed (the checksum and
the file format are checked first by :func:`..common.checkpoint.load`)."""
from __future__ import annotations

import math

import torch

from ..common import checkpoint as ck
from .config import RunConfig

PAYLOAD_KEYS = {"config": dict, "epoch": int, "model": dict, "optimizer": dict, "rng": dict, "tracker": dict,
                "history": list}


def validate(path: str, payload) -> dict:
    """The payload's structure and values as a resume needs them; CheckpointError naming ``path`` otherwise."""
    if not isinstance(payload, dict):
        raise ck.unusable(path, f"the payload is a {type(payload).__name__}, not a dict")
    for key, kind in PAYLOAD_KEYS.items():
        if key not in payload:
            raise ck.unusable(path, f"it has no {key!r} entry")
        if not isinstance(payload[key], kind) or isinstance(payload[key], bool):
            raise ck.unusable(path, f"{key!r} is a {type(payload[key]).__name__}, expected {kind.__name__}")
    try:
        cfg = RunConfig.from_dict(payload["config"])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ck.unusable(path, f"its config is invalid ({type(e).__name__}: {ck.one_line(e)})") from None
    epoch, history = payload["epoch"], payload["history"]
    epochs = payload["config"].get("epochs")
    if epoch < 1 or (isinstance(epochs, int) and epoch > epochs) or len(history) != epoch + 1:
        raise ck.unusable(path, f"epoch {epoch} does not fit its history of {len(history)} rows"
                    + (f" and the run's {epochs} epochs" if isinstance(epochs, int) else ""))
    for i, row in enumerate(history):
        if not isinstance(row, dict) or row.get("epoch") != i:
            raise ck.unusable(path, f"history row {i} is not the record of epoch {i}")
        step = row.get("step")
        if not isinstance(step, int) or step < 0 or (i and step < history[i - 1]["step"]):
            raise ck.unusable(path, f"history row {i} has an invalid step count {step!r}")
        if not (isinstance(row.get("time_s"), float) and math.isfinite(row["time_s"]) and row["time_s"] >= 0):
            raise ck.unusable(path, f"history row {i} has an invalid time_s {row.get('time_s')!r}")
    for key in ("model", "optimizer", "tracker"):
        bad = ck.first_non_finite(payload[key], key)
        if bad is not None:
            raise ck.unusable(path, f"{bad} contains NaN or Inf")
    if not isinstance(payload["rng"].get("torch"), torch.Tensor) or payload["rng"]["torch"].dtype != torch.uint8:
        raise ck.unusable(path, "the RNG state is missing or not a byte tensor")
    check_history(path, cfg, history)
    check_optimizer(path, cfg, payload["optimizer"])
    return payload


def check_history(path: str, cfg: RunConfig, history: list) -> None:
    """The history agrees with itself and with the config: only the last row may say "diverged", and
    then its train loss is not finite; every other number is finite (the loss change of epoch 0, which
    has no step, is NaN); the step counts advance by the same number of steps each epoch (one in full
    batch)."""
    for i, row in enumerate(history):
        if row.get("diverged"):
            if i != len(history) - 1:
                raise ck.unusable(path, f"history row {i} says the run diverged, yet epochs follow it")
            if isinstance(row.get("train_loss"), float) and math.isfinite(row["train_loss"]):
                raise ck.unusable(path, f"history row {i} says the run diverged, but its train loss "
                                        f"{row['train_loss']!r} is finite")
            continue
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value) and not (i == 0 and key == "loss_change_pct"):
                raise ck.unusable(path, f"history row {i} has {key} = {value!r} in a run that did not diverge")
    per_epoch = history[1]["step"] if len(history) > 1 else 0
    if cfg.setting == "full" and len(history) > 1 and per_epoch != 1:
        raise ck.unusable(path, f"history row 1 counts {per_epoch} steps, a full-batch epoch is one step")
    for i, row in enumerate(history):
        if row["step"] != i * per_epoch:
            raise ck.unusable(path, f"history row {i} counts {row['step']} steps, not {i} epochs of {per_epoch}")


def check_optimizer(path: str, cfg: RunConfig, state: dict) -> None:
    """The optimizer state was made by the config's optimizer with the config's settings (a checkpoint
    whose state contradicts its own config would resume a different run)."""
    groups = state.get("param_groups")
    if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict):
        raise ck.unusable(path, "the optimizer state must hold exactly one parameter group")
    group = groups[0]
    want = {}
    if cfg.optimizer == "gn":
        want = {"target": cfg.target, "loss": cfg.loss, "solver": cfg.solver, "damping_mode": cfg.damping_mode,
                "shares": tuple([1.0 / cfg.blocks] * cfg.blocks)}
        if cfg.damping is not None:
            want["damping"] = cfg.damping
    elif cfg.optimizer == "egn":
        want = {"loss": cfg.loss}
    for key, value in want.items():
        have = group.get(key)
        if key == "shares":
            ok = isinstance(have, (list, tuple)) and len(have) == len(value) and all(
                isinstance(h, (int, float)) and abs(h - v) <= 1e-12 for h, v in zip(have, value))
        elif isinstance(value, float):
            ok = isinstance(have, (int, float)) and not isinstance(have, bool) and abs(have - value) <= 1e-12 * abs(value)
        else:
            ok = have == value
        if not ok:
            raise ck.unusable(path, f"its optimizer state has {key} = {have!r}, its config asks for {value!r}")
    if cfg.schedule == "constant" and cfg.lr is not None:
        lr = group.get("lr")
        if not (isinstance(lr, (int, float)) and abs(lr - cfg.lr) <= 1e-12 * cfg.lr):
            raise ck.unusable(path, f"its optimizer state has lr = {lr!r}, its config asks for {cfg.lr!r}")


def load(path: str, map_location=None) -> dict:
    """The verified, validated payload of a ``train`` / ``reproduce`` run's checkpoint at ``path``."""
    return ck.load(path, validate, map_location=map_location)
