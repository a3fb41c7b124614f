"""Experiments command line: options, outputs, checkpoints / resume, and the findings logic."""
import csv
import json
import math
import os
import warnings

import pytest
import torch

from revgn_ext.experiments import cli, report
from revgn_ext.experiments.config import PRESETS, RunConfig, paper_lr
from revgn_ext.experiments.runner import CHECKPOINT, load_history, run

TINY = ["--dataset", "synthetic", "--max-train", "96", "--max-test", "64", "--hidden", "32", "--batch-size", "32",
        "--full-batch-size", "32", "--diag-samples", "32", "--ntk-samples", "8", "--ntk-probes", "2",
        "--no-progress"]


def main(*argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli.main(list(argv))


def rows_without_time(history):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in history]


# ---------------------------------------------------------------------------------------------- options

def test_paper_learning_rates_in_our_convention():
    assert paper_lr("mnist", "full", "gn", blocks=2) == 1.0       # official 0.5 x L
    assert paper_lr("fashion-mnist", "mini", "gn", blocks=2) == pytest.approx(0.2)
    assert paper_lr("cifar10", "full", "gn", blocks=6) == 6.0
    assert paper_lr("cifar10", "full", "adam", blocks=6) == 1e-5
    assert paper_lr("digits", "mini", "sgd", blocks=3) == 0.1
    assert RunConfig(optimizer="gn", setting="full", blocks=3).lr == pytest.approx(1.5)


def test_option_parsing_and_presets():
    parser = cli.build_parser()
    args = parser.parse_args(["reproduce", "--dataset", "cifar10", "--lr", "gn=2", "--lr", "gn:full=3",
                              "--lr", "adam:mini=1e-3", "--activations", "identity,tanh", "--hidden", "none",
                              "--full-epochs", "7"])
    full_gn, mini_gn = cli.make_config(args, "gn", "full"), cli.make_config(args, "gn", "mini")
    assert (full_gn.lr, mini_gn.lr) == (3.0, 2.0)                   # most specific entry wins
    assert cli.make_config(args, "adam", "mini").lr == 1e-3
    assert cli.make_config(args, "adam", "full").lr == 1e-5          # paper CIFAR full-batch Adam
    assert cli.make_config(args, "sgd", "mini").lr == 0.01
    assert full_gn.blocks == PRESETS["cifar10"]["blocks"] == 6 and full_gn.hidden is None
    assert full_gn.activations == ("identity", "tanh")
    assert (full_gn.epochs, mini_gn.epochs) == (7, PRESETS["cifar10"]["epochs"])

    args = parser.parse_args(["train", "--lr", "0.05", "--lr", "sgd=0.2", "--optimizer", "adam",
                              "--blocks", "3", "--batch-size", "64", "--epochs", "4", "--damping", "0.01",
                              "--target", "newton", "--seed", "5", "--max-train", "100"])
    cfg = cli.make_config(args, args.optimizer, args.setting)
    assert (cfg.lr, cfg.blocks, cfg.batch_size, cfg.epochs, cfg.damping, cfg.target, cfg.seed, cfg.max_train) == \
        (0.05, 3, 64, 4, 0.01, "newton", 5, 100)
    assert cfg.hidden == PRESETS["digits"]["hidden"] and cfg.dataset == "digits"


@pytest.mark.parametrize("argv", [
    ["train", "--dataset", "imagenet"],
    ["train", "--optimizer", "lbfgs"],
    ["train", "--lr", "rmsprop=0.1"],
    ["train", "--lr", "gn:half=0.1"],
    ["train", "--lr", "fast"],
    ["train", "--hidden", "0"],
    ["reproduce", "--optimizers", "gn,lbfgs"],
])
def test_bad_options_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(*argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "--lr", "0.1"], "OPT=LR"),
    (["train", "--batch-size", "0"], "batch_size must be a positive int"),
    (["train", "--lr", "-1"], "learning rate must be a positive finite number"),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "none of train-images"),
])
def test_invalid_values_are_reported(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(*argv, "--out", str(tmp_path / "out"), "--no-progress")
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- runs

@pytest.mark.parametrize("optimizer", ["gn", "adam"])
def test_train_writes_metrics_figures_report(tmp_path, optimizer, capsys):
    out = tmp_path / "run"
    assert main("train", *TINY, "--optimizer", optimizer, "--epochs", "2", "--out", str(out)) == 0
    history = load_history(str(out))
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert history[-1]["step"] == 2 * 3                                # 96 samples / batch 32
    first = history[0]
    assert first["ntk_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert first["cka_block1"] == pytest.approx(1.0, abs=1e-6) and first["cka_block2"] == pytest.approx(1.0, abs=1e-6)
    assert first["weight_cosine"] == pytest.approx(1.0) and first["loss_change_pct"] is None
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["test_acc"] <= 1 for r in history)
    assert history[-1]["loss_change_pct"] < 0                           # a step lowers its own batch's loss
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and float(rows[2]["test_loss"]) == pytest.approx(history[2]["test_loss"])
    for name in ("losses", "loss_change", "ntk_similarity", "cka", "weight_change"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
    text = (out / "REPORT.md").read_text()
    assert "| setting |" in text and "figures/losses.png" in text
    assert json.loads((out / "config.json").read_text())["optimizer"] == optimizer
    assert "report:" in capsys.readouterr().out
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == 2 and set(ckpt) >= {"model", "optimizer", "rng", "history", "config"}


def tiny_config(**kw):
    base = dict(dataset="synthetic", max_train=96, max_test=64, hidden=32, batch_size=32, full_batch_size=32,
                diag_samples=32, ntk_samples=8, ntk_probes=2)
    return RunConfig(**(base | kw))


@pytest.mark.parametrize("optimizer,setting", [("adam", "mini"), ("gn", "mini"), ("sgd", "full")])
def test_resume_continues_identically(tmp_path, optimizer, setting):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(tiny_config(optimizer=optimizer, setting=setting, epochs=3), whole, progress=False)
        run(tiny_config(optimizer=optimizer, setting=setting, epochs=1), split, progress=False)
        assert len(load_history(split)) == 2
        torch.manual_seed(1234)  # the global RNG state must come from the checkpoint, not from here
        run(tiny_config(optimizer=optimizer, setting=setting, epochs=3), split, resume=True, progress=False)
    assert rows_without_time(load_history(split)) == rows_without_time(load_history(whole))
    a = torch.load(os.path.join(whole, CHECKPOINT), weights_only=True)
    b = torch.load(os.path.join(split, CHECKPOINT), weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["rng"]["torch"].equal(b["rng"]["torch"])


def test_resume_through_the_command_line(tmp_path):
    out = str(tmp_path / "r")
    main("train", *TINY, "--optimizer", "adam", "--epochs", "1", "--out", out)
    main("train", *TINY, "--optimizer", "adam", "--epochs", "2", "--out", out, "--resume")
    assert [r["epoch"] for r in load_history(out)] == [0, 1, 2]
    state = torch.load(os.path.join(out, CHECKPOINT), weights_only=True)["optimizer"]["state"]
    assert int(state[0]["step"]) == 2 * 3                              # Adam's state carried over


def test_resume_refuses_mismatch_and_missing_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "r")
    run(tiny_config(optimizer="sgd", epochs=1), out, progress=False)
    with pytest.raises(SystemExit):
        main("train", *TINY, "--optimizer", "sgd", "--epochs", "2", "--out", out, "--resume", "--seed", "3")
    assert "checkpoint was made with seed=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main("train", *TINY, "--epochs", "2", "--out", str(tmp_path / "none"), "--resume")
    assert "no checkpoint" in capsys.readouterr().err


def test_reproduce_small(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main("reproduce", *TINY, "--epochs", "1", "--full-epochs", "2", "--settings", "full,mini",
                "--out", str(out)) == 0
    printed = capsys.readouterr().out
    for opt in ("gn", "adam", "sgd"):
        assert len(load_history(str(out / f"{opt}-full"))) == 3
        assert len(load_history(str(out / f"{opt}-mini"))) == 2
    assert "GN is fastest in full batch." in printed and "figures:" in printed
    text = (out / "REPORT.md").read_text()
    assert text.count("| full batch |") == 3 and text.count("| mini-batch |") == 3
    assert "## Paper findings" in text


# ---------------------------------------------------------------------------------------------- findings

def history(train, test, change, ntk=None, cka=None):
    rows = []
    for e, (tr, te) in enumerate(zip(train, test)):
        row = {"epoch": e, "step": e, "train_loss": tr, "test_loss": te, "test_acc": 0.5,
               "loss_change_pct": None if e == 0 else change}
        if ntk is not None:
            row.update({"ntk_similarity": ntk, "cka_block1": cka[0], "cka_block2": cka[1]})
        rows.append(row)
    return rows


def paper_like_runs(swap=False):
    fast, slow = [2.0, 0.3, 0.2, 0.19, 0.18], [2.0, 1.5, 1.0, 0.5, 0.3]
    runs = {("gn", "full"): history(fast, fast, -40.0), ("adam", "full"): history(slow, slow, -2.0),
            ("sgd", "full"): history(slow, slow, -5.0),
            ("gn", "mini"): history([2.0, 0.8, 0.75, 0.74, 0.74], [2.0, 0.9, 0.9, 0.9, 0.9], -30.0, 0.95, (0.99, 0.97)),
            ("adam", "mini"): history([2.0, 1.2, 0.6, 0.4, 0.3], [2.0, 1.2, 0.8, 0.6, 0.5], -3.0, 0.6, (0.8, 0.5)),
            ("sgd", "mini"): history(slow, slow, -4.0, 0.7, (0.9, 0.8))}
    if swap:
        runs[("gn", "full")], runs[("adam", "full")] = runs[("adam", "full")], runs[("gn", "full")]
        runs[("gn", "mini")], runs[("adam", "mini")] = runs[("adam", "mini")], runs[("gn", "mini")]
    return runs


def test_findings_reproduced_and_not():
    verdicts = [f.verdict for f in report.findings(paper_like_runs())]
    assert verdicts == ["reproduced"] * 4
    verdicts = [f.verdict for f in report.findings(paper_like_runs(swap=True))]
    assert verdicts == ["not reproduced"] * 4
    partial = {k: v for k, v in paper_like_runs().items() if k[1] == "full"}
    assert [f.verdict for f in report.findings(partial)] == ["reproduced", "not run", "reproduced", "not run"]


def test_saturation_and_epochs_to_reach():
    h = history([2.0, 1.0, 0.5, 0.4, 0.0], [0] * 5, -1.0)
    assert report.saturation(h) == pytest.approx(0.5)                  # epoch 1 of 4: (2 - 1) / (2 - 0)
    assert report.epochs_to_reach(h, "train_loss", 0.45) == 3
    assert report.epochs_to_reach(h, "train_loss", -1.0) is None
