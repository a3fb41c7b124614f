"""What an EGN step reports: the phases' seconds (``stats["time"]``) and the stats record."""
from __future__ import annotations

import time

import torch

__all__ = ["Clock", "step_record"]


class Clock:
    """Wall seconds per phase of a step; on CUDA through events, read once at the end."""

    def __init__(self, like: torch.Tensor):
        self.cuda = isinstance(like, torch.Tensor) and like.is_cuda
        self.times: dict[str, float] = {}
        self._last = self._now()

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def lap(self, name: str) -> None:
        now = self._now()
        if self.cuda:
            now.synchronize()
            self.times[name] = self._last.elapsed_time(now) / 1e3
        else:
            self.times[name] = now - self._last
        self._last = now


def step_record(sol, group: dict, lam: float, scale: float, method: str) -> dict:
    """The stats of a step before its update (docs/api.md); the update fills in the rest."""
    loss = float(sol.loss) if sol.loss_value is None else sol.loss_value   # read with the solve's verdicts
    return {"loss": loss * scale, "refused": False, "reason": None, "lr": float(group["lr"]),
            "direction_norm": None, "batch_size": sol.b, "new_loss": None, "damping": lam, "alpha": 0.0,
            "line_search_tries": 0, "accepted": False, "cholesky_retries": sol.retries,
            "cholesky_jitter": sol.jitter, "rho": None, "gram": method, "time": sol.time}
