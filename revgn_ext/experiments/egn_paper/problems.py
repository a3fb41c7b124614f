"""The tasks of the EGN comparison as runs see them: the task registry (supervised tasks of
:mod:`.tasks` and LQR plants of :mod:`.lqr`), and a step-indexed problem per run (:class:`Supervised`,
:class:`LQRRun`) that draws batches, evaluates and checkpoints its own state."""
from __future__ import annotations

import torch

from ..common import protocol
from . import lqr, tasks


TASKS = tuple(tasks.SUPERVISED) + tuple(lqr.PLANTS)
ALIASES = {"lqr": tuple(lqr.PLANTS), "all": TASKS}
DEFAULT_TASKS = ("diabetes", "diamonds", "breast-cancer", "wine", "lqr-stable", "lqr-unstable")
DAMPING = 1.0             # lambda of the GN methods: the authors' default ...
LQR_DAMPING = 1e-3        # ... except on the TD regression of the LQR task (see :func:`damping_for`)
VAL_FRACTION = 0.2


def damping_for(task: str) -> float:
    """lambda for the GN methods. The LQR task's TD regression has quadratic features whose covariance
    spans many orders of magnitude; lambda = 1 damps its small directions so much that policy
    evaluation has not converged when the policy is improved, and every GN variant diverges."""
    return LQR_DAMPING if task in lqr.PLANTS else DAMPING


def task_dtype(task: str, dtype: str) -> torch.dtype:
    """The LQR task always runs in float64: its Gram is rank-deficient with entries over six orders of
    magnitude, and in float32 the Cholesky jitter swamps the damping."""
    return torch.float64 if task in lqr.PLANTS else getattr(torch, dtype)


def expand_tasks(names) -> tuple:
    out = []
    for name in names:
        for t in ALIASES.get(name, (name,)):
            if t not in TASKS:
                raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS + tuple(ALIASES))}")
            if t not in out:
                out.append(t)
    return tuple(out)


def lower_is_better(task: str) -> bool:
    return True if task in lqr.PLANTS else tasks.SUPERVISED[task].lower_is_better


def metric_name(task: str) -> str:
    if task in lqr.PLANTS:
        return "||H* - H||_F"
    spec = tasks.SUPERVISED[task]
    units = f" ({spec.units})" if spec.units else ""
    return ("test RMSE" if spec.metric == "rmse" else "test accuracy") + units


class Supervised:
    """A supervised task's run: fixed data, batches drawn from a per-epoch permutation of (seed, epoch)."""

    def __init__(self, task: str, data: tasks.TaskData, batch_size: int, seed: int, split: str):
        self.spec = tasks.SUPERVISED[task]
        self.loss = self.spec.loss
        self.lower_is_better = self.spec.lower_is_better
        x, y = data.x_train, data.y_train
        if split == "val":
            x, y, self.x_eval, self.y_eval = protocol.split_train(x, y, VAL_FRACTION, seed=0)
        else:
            self.x_eval, self.y_eval = data.x_test, data.y_test
        if batch_size > len(x):
            raise ValueError(f"--batch-size {batch_size} is larger than the {len(x)} training samples of task "
                             f"{task!r}{' after the validation split' if split == 'val' else ''}; use a smaller "
                             "batch")
        self.x, self.y, self.data, self.task = x, y, data, task
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = len(x) // batch_size  # drop the last partial batch: every step sees b samples

    def make_model(self, seed: int):
        return tasks.make_model(self.task, self.data, seed)

    def next_batch(self, model, step: int):
        epoch, k = divmod(step, self.per_epoch)
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        idx = order[k * self.batch_size:(k + 1) * self.batch_size].to(self.x.device)
        return self.x[idx], self.y[idx]

    def after_update(self, model) -> None:
        pass

    def evaluate(self, model) -> dict:
        return tasks.evaluate(self.spec, model, self.x_eval, self.y_eval, self.data.y_scale)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LQRRun:
    """The LQR task's run: :class:`.lqr.LQRProblem` with the step-indexed interface of :class:`Supervised`.
    Tuning ("val") uses independent episodes (another environment seed)."""
    loss = "mse"
    lower_is_better = True

    def __init__(self, task: str, batch_size: int, seed: int, split: str, dtype, device):
        self.problem = lqr.LQRProblem(lqr.PLANTS[task], batch_size, seed + (7919 if split == "val" else 0),
                                    dtype=dtype, device=device)
        self.task = task

    def make_model(self, seed: int):
        return self.problem.make_model(seed)

    def next_batch(self, model, step: int):
        return self.problem.next_batch(model)

    def after_update(self, model) -> None:
        self.problem.after_update(model)

    def evaluate(self, model) -> dict:
        return self.problem.evaluate(model)

    def state_dict(self) -> dict:
        return self.problem.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.problem.load_state_dict(state)


def make_problem(spec, device, cache: dict):
    """The problem of a :class:`.training.RunSpec` (task, batch size, seed, split, dtype) on ``device``."""
    dtype = task_dtype(spec.task, spec.dtype)
    if spec.task in lqr.PLANTS:
        return LQRRun(spec.task, spec.batch_size, spec.seed, spec.split, dtype, device)
    data = tasks.load_task_data(spec.task, cache.get("data_dir"), spec.max_train, spec.max_test, dtype, device,
                            cache.setdefault("arrays", {}))
    return Supervised(spec.task, data, spec.batch_size, spec.seed, spec.split)
