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
        RunConfig.from_dict(payload["config"])
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
    return payload




def load(path: str, map_location=None) -> dict:
    """The verified, validated payload of a ``train`` / ``reproduce`` run's checkpoint at ``path``."""
    return ck.load(path, validate, map_location=map_location)
