"""A run's records on disk and the facts around them: metrics files (JSON lines and CSV), the
checkpoint's name, the device a run asks for, and a one-line description of the machine."""
from __future__ import annotations

import csv
import json
import math
import os
import platform

import torch

CHECKPOINT = "checkpoint.pt"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CONFIG_JSON = "config.json"


def resolve_device(device: str | None) -> torch.device:
    """``device`` as a torch.device ("auto" or None: CUDA when available); ValueError naming it when it
    is not a device or asks for CUDA where there is none."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    return dev


def write_metrics(out_dir: str, history: list) -> None:
    """``history`` (a list of dict rows) as ``metrics.jsonl`` and ``metrics.csv`` in ``out_dir``."""
    with open(os.path.join(out_dir, METRICS_JSONL), "w") as f:
        for row in history:  # NaN (e.g. no loss change at epoch 0) is written as null: strict JSON
            f.write(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v
                                for k, v in row.items()}) + "\n")
    keys = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with open(os.path.join(out_dir, METRICS_CSV), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def load_history(out_dir: str) -> list:
    """The history rows of a finished or interrupted run, from its metrics.jsonl."""
    with open(os.path.join(out_dir, METRICS_JSONL)) as f:
        return [json.loads(line) for line in f if line.strip()]


def machine() -> str:
    """Processor, logical CPUs, torch version and threads, load average: the context of a timing."""
    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "?"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads), load average {load}")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run. ``saved`` is the last epoch (or step, per ``unit``) whose checkpoint is on disk
    at ``path`` (0: none yet); ``message`` says so in one line."""

    def __init__(self, label: str, saved: int, path: str, unit: str = "epoch", lost: int | None = None):
        super().__init__(label, saved, path)
        self.label, self.saved, self.path, self.unit = label, saved, path, unit
        if saved:
            self.message = f"stopped after {unit} {saved} of {label}; {path} holds {unit} {saved}"
        else:
            self.message = f"stopped during {label} before its first checkpoint; nothing is on disk at {path}"
        if lost is not None:
            self.message += f" ({unit} {lost} was being saved and is not on disk)"
        self.epoch = saved  # the name runs of the RevGN paper use
