"""Run configuration, the paper's learning rates and per-dataset size presets.

Learning-rate convention: RevGN gives block l a share s_l = 1/L of the function-space target, while
the official code of arXiv 2411.07979 gives every block the full target. The same update therefore
needs ``lr_ours = L * lr_official`` for GN; Adam and SGD rates carry over unchanged.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

# The tuned learning rates and mini-batch lengths stored with the package (``revgn_<dataset>.json``).
TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")

OPTIMIZERS = ("gn", "adam", "sgd")           # the paper's comparison (``reproduce``)
# Every optimizer a run can use: the paper's three, EGN (exact GN / Levenberg-Marquardt on any module),
# L-BFGS (torch.optim) and Shampoo / SOAP (pytorch-optimizer) for the open-question studies.
ALL_OPTIMIZERS = OPTIMIZERS + ("egn", "lbfgs", "shampoo", "soap")
MODELS = ("revmlp", "mlp")
SCHEDULES = ("constant", "cosine", "step")
SETTINGS = ("full", "mini")
# Input standardisation: "global" is the paper's (one mean and std over all pixels, per colour channel);
# "per-pixel" standardises each input feature on its own (a robustness check of the findings).
STANDARDIZE = ("global", "per-pixel")

# Paper section 5 / appendix: official learning rates (GN in the full-target-per-block convention).
PAPER_LR = {
    "mnist": {"full": {"gn": 0.5, "adam": 1e-4, "sgd": 0.1}, "mini": {"gn": 0.1, "adam": 1e-4, "sgd": 0.1}},
    "cifar10": {"full": {"gn": 1.0, "adam": 1e-5, "sgd": 0.01}, "mini": {"gn": 0.1, "adam": 1e-4, "sgd": 0.01}},
}

# Starting rates for the optimizers the paper did not run (the centre of their tuning grids).
DEFAULT_LR = {"egn": 0.1, "lbfgs": 0.1, "shampoo": 1e-3, "soap": 1e-3}

# Sizes per dataset. mnist / fashion-mnist / cifar10 are the paper's configurations; digits is the
# demo that fits in a few CPU minutes; synthetic is for tests. ``epochs`` is the mini-batch tuning
# budget (and the length when nothing else decides it); ``max_epochs`` caps the search for the
# mini-batch length (until Adam's train loss stops improving).
PRESETS = {
    "synthetic": dict(blocks=2, hidden=64, batch_size=32, full_batch_size=256, epochs=3, full_epochs=3,
                      max_epochs=12),
    "digits": dict(blocks=2, hidden=1024, batch_size=128, full_batch_size=1024, epochs=30, full_epochs=60,
                   max_epochs=200),
    "mnist": dict(blocks=2, hidden=8000, batch_size=1024, full_batch_size=1024, epochs=100, full_epochs=100,
                  max_epochs=200),
    "fashion-mnist": dict(blocks=2, hidden=8000, batch_size=1024, full_batch_size=1024, epochs=100,
                          full_epochs=100, max_epochs=200),
    "cifar10": dict(blocks=6, hidden=8000, batch_size=1024, full_batch_size=1024, epochs=100, full_epochs=100,
                    max_epochs=200),
}


def paper_lr(dataset: str, setting: str, optimizer: str, blocks: int) -> float:
    """The paper's learning rate for this setting, converted to our convention (GN: times L)."""
    table = PAPER_LR["cifar10" if dataset == "cifar10" else "mnist"]
    if optimizer not in OPTIMIZERS:
        return DEFAULT_LR[optimizer]
    lr = table[setting][optimizer]
    return lr * blocks if optimizer == "gn" else lr


@dataclass
class RunConfig:
    """Everything that determines one training run (and must match when it is resumed)."""
    optimizer: str = "gn"
    setting: str = "mini"             # "full": the first full_batch_size samples, one step per epoch
    model: str = "revmlp"             # "mlp": plain ReLU MLP, `blocks` hidden layers of width `hidden`
    dataset: str = "digits"
    data_dir: str | None = None
    standardize: str = "global"       # STANDARDIZE: the paper's global mean/std, or per pixel
    blocks: int = 2
    hidden: int | None = 1024
    activations: tuple = ("identity", "relu")
    weight_std: float = 1e-3
    batch_size: int = 128
    full_batch_size: int = 1024
    epochs: int = 10
    lr: float | None = None           # None: paper_lr(...)
    target: str = "identity"
    damping: float | None = None      # None: the optimizer's default (RevGN 1e-4 relative, EGN 1e-3)
    damping_mode: str = "relative"    # RevGN: damping relative to mean(diag(A A^T)) or absolute
    solver: str = "cholesky"          # RevGN: "svd" is the official truncated pinv
    rtol: float = 1e-2                # RevGN "svd": singular values below rtol * s_max are dropped
    weight_decay: float = 0.0         # decoupled: theta <- (1 - lr * wd) theta after each step
    schedule: str = "constant"        # learning rate over the run's steps: constant, cosine or step
    validation: bool = False          # train on the fit part, evaluate on a split carved from train
    val_fraction: float = 0.2
    loss: str = "cross_entropy"
    seed: int = 0
    dtype: str = "float32"
    max_train: int | None = None
    max_test: int | None = None
    diag_every: int = 1
    eval_every: int = 1               # epochs between evaluations (held-out and train); the last always
    diag_samples: int = 256           # samples for CKA; NTK uses the first ntk_samples of them
    ntk_samples: int = 64
    ntk_probes: int = 4

    # Fields that may change between a run and its resumption.
    RESUMABLE_CHANGES = ("epochs", "data_dir", "eval_every")
    SPLIT_SEED = 0                    # one validation split for every run and seed

    def __post_init__(self):
        self.activations = tuple(self.activations)
        for name, allowed in (("optimizer", ALL_OPTIMIZERS), ("model", MODELS), ("schedule", SCHEDULES),
                              ("damping_mode", ("relative", "absolute")), ("solver", ("cholesky", "svd")),
                              ("standardize", STANDARDIZE)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.model == "mlp" and self.optimizer == "gn":
            raise ValueError("optimizer 'gn' (RevGN) needs model 'revmlp'; use 'egn' for exact GN on an MLP")
        if self.model == "mlp" and self.hidden is None:
            raise ValueError("model 'mlp' needs a hidden width (hidden=None is RevMLP's no-bottleneck variant)")
        if not (0.0 < self.val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        for name in ("blocks", "batch_size", "full_batch_size", "diag_every", "eval_every", "diag_samples", "ntk_samples",
                     "ntk_probes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {self.epochs!r}")
        for name in ("hidden", "max_train", "max_test"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        for name in ("lr", "damping", "rtol", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and value < float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr is None:
            self.lr = paper_lr(self.dataset, self.setting, self.optimizer, self.blocks)

    @property
    def eval_split(self) -> str:
        """Prefix of the evaluation metrics: "val" (tuning) or "test"."""
        return "val" if self.validation else "test"

    @property
    def name(self) -> str:
        return f"{self.optimizer}-{self.setting}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["activations"] = list(self.activations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def check_resumable(self, saved: "RunConfig") -> None:
        """ValueError naming the first option that differs from the checkpoint's."""
        mine, theirs = self.to_dict(), saved.to_dict()
        for key in mine:
            if key not in self.RESUMABLE_CHANGES and mine[key] != theirs[key]:
                raise ValueError(f"cannot resume: the checkpoint was made with {key}={theirs[key]!r}, "
                                 f"this run asks for {key}={mine[key]!r}")
