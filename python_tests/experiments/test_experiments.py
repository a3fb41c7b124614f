"""Experiments command line: options, outputs, checkpoints / resume, and the findings logic."""
import csv
import json
import math
import os
import warnings

import pytest
import torch

from revgn_ext.experiments import cli
from revgn_ext.experiments.revgn_paper import commands, report
from revgn_ext.experiments.revgn_paper.config import PRESETS, RunConfig, paper_lr
from revgn_ext.experiments.revgn_paper.resume import load as load_checkpoint
from revgn_ext.experiments.common.records import CHECKPOINT, load_history
from revgn_ext.experiments.revgn_paper.runner import run

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
    full_gn, mini_gn = commands.make_config(args, "gn", "full"), commands.make_config(args, "gn", "mini")
    assert (full_gn.lr, mini_gn.lr) == (3.0, 2.0)                   # most specific entry wins
    assert commands.make_config(args, "adam", "mini").lr == 1e-3
    assert commands.make_config(args, "adam", "full").lr == 1e-5          # paper CIFAR full-batch Adam
    assert commands.make_config(args, "sgd", "mini").lr == 0.01
    assert full_gn.blocks == PRESETS["cifar10"]["blocks"] == 6 and full_gn.hidden is None
    assert full_gn.activations == ("identity", "tanh")
    assert (full_gn.epochs, mini_gn.epochs) == (7, PRESETS["cifar10"]["epochs"])

    args = parser.parse_args(["train", "--lr", "0.05", "--lr", "sgd=0.2", "--optimizer", "adam",
                              "--blocks", "3", "--batch-size", "64", "--epochs", "4", "--damping", "0.01",
                              "--target", "newton", "--seed", "5", "--max-train", "100"])
    cfg = commands.make_config(args, args.optimizer, args.setting)
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
    (["train", "--lr", "0"], "learning rate must be a positive finite number"),
    (["train", "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "none of train-images"),
])
def test_invalid_values_are_reported(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(*argv, "--out", str(tmp_path / "out"), "--no-progress")
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- runs

@pytest.mark.slow
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
    ckpt = load_checkpoint(str(out / CHECKPOINT))
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
    a = load_checkpoint(os.path.join(whole, CHECKPOINT))
    b = load_checkpoint(os.path.join(split, CHECKPOINT))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["rng"]["torch"].equal(b["rng"]["torch"])


@pytest.mark.slow
def test_resume_through_the_command_line(tmp_path):
    out = str(tmp_path / "r")
    main("train", *TINY, "--optimizer", "adam", "--epochs", "1", "--out", out)
    main("train", *TINY, "--optimizer", "adam", "--epochs", "2", "--out", out, "--resume")
    assert [r["epoch"] for r in load_history(out)] == [0, 1, 2]
    state = load_checkpoint(os.path.join(out, CHECKPOINT))["optimizer"]["state"]
    assert int(state[0]["step"]) == 2 * 3                              # Adam's state carried over


@pytest.mark.slow
def test_resume_refuses_mismatch_and_missing_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "r")
    run(tiny_config(optimizer="sgd", epochs=1), out, progress=False)
    with pytest.raises(SystemExit):
        main("train", *TINY, "--optimizer", "sgd", "--epochs", "2", "--out", out, "--resume", "--seed", "3")
    assert "checkpoint was made with seed=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main("train", *TINY, "--epochs", "2", "--out", str(tmp_path / "none"), "--resume")
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_small(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main("reproduce", *TINY, "--epochs", "1", "--full-epochs", "2", "--settings", "full,mini",
                "--seeds", "0,1", "--paper-rates", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    for opt in ("gn", "adam", "sgd"):
        for seed in (0, 1):
            assert len(load_history(str(out / f"{opt}-full" / f"seed{seed}"))) == 3
            assert len(load_history(str(out / f"{opt}-mini" / f"seed{seed}"))) == 2
    assert load_history(str(out / "gn-mini" / "seed0")) != load_history(str(out / "gn-mini" / "seed1"))
    assert "GN is fastest in full batch." in printed and "figures:" in printed
    text = (out / "REPORT.md").read_text()
    assert text.count("| full batch |") == 3 and text.count("| mini-batch |") == 3
    assert "## Paper findings" in text and " ± " in text and "not tuned for this set-up" in text


# ---------------------------------------------------------------------------------------------- findings

def history(train, test, change, ntk=None, cka=None, jitter=0.0):
    rows = []
    for e, (tr, te) in enumerate(zip(train, test)):
        j = 1.0 + jitter * (e > 0)
        row = {"epoch": e, "step": e, "train_loss": tr * j, "test_loss": te * j, "test_acc": 0.5,
               "loss_change_pct": None if e == 0 else change * j}
        if ntk is not None:
            row.update({"ntk_similarity": ntk * j, "cka_block1": cka[0] * j, "cka_block2": cka[1] * j})
        rows.append(row)
    return rows


def seeds(make, n=3, spread=0.01):
    """n seed histories from make(jitter): a small relative spread between seeds."""
    return [make(spread * (i - (n - 1) / 2)) for i in range(n)]


def paper_like_runs(swap=False, spread=0.01):
    fast, slow = [2.0, 0.3, 0.2, 0.19, 0.18], [2.0, 1.5, 1.0, 0.5, 0.3]
    runs = {("gn", "full"): seeds(lambda j: history(fast, fast, -40.0, jitter=j), spread=spread),
            ("adam", "full"): seeds(lambda j: history(slow, slow, -2.0, jitter=j), spread=spread),
            ("sgd", "full"): seeds(lambda j: history(slow, slow, -5.0, jitter=j), spread=spread),
            ("gn", "mini"): seeds(lambda j: history([2.0, 0.8, 0.75, 0.74, 0.74], [2.0, 0.9, 0.9, 0.9, 0.9], -30.0,
                                                    0.95, (0.99, 0.97), jitter=j), spread=spread),
            ("adam", "mini"): seeds(lambda j: history([2.0, 1.2, 0.6, 0.4, 0.3], [2.0, 1.2, 0.8, 0.6, 0.5], -3.0,
                                                      0.6, (0.8, 0.5), jitter=j), spread=spread),
            ("sgd", "mini"): seeds(lambda j: history(slow, slow, -4.0, 0.7, (0.9, 0.8), jitter=j), spread=spread)}
    if swap:
        runs[("gn", "full")], runs[("adam", "full")] = runs[("adam", "full")], runs[("gn", "full")]
        runs[("gn", "mini")], runs[("adam", "mini")] = runs[("adam", "mini")], runs[("gn", "mini")]
    return runs


def test_findings_reproduced_not_reproduced_and_mixed():
    verdicts = [f.verdict for f in report.findings(paper_like_runs())]
    assert verdicts == ["REPRODUCED"] * 4
    verdicts = [f.verdict for f in report.findings(paper_like_runs(swap=True))]
    assert verdicts == ["NOT REPRODUCED"] * 4
    partial = {k: v for k, v in paper_like_runs().items() if k[1] == "full"}
    assert [f.verdict for f in report.findings(partial)] == ["REPRODUCED", "NOT RUN", "REPRODUCED", "NOT RUN"]
    # Seeds spread so wide that the differences sit inside one std: no claim is supported or refuted.
    noisy = [f.verdict for f in report.findings(paper_like_runs(spread=0.6))]
    assert noisy[1] == noisy[3] == "MIXED"


def test_findings_use_every_seed():
    runs = paper_like_runs()
    one_bad = dict(runs)
    # One of three Adam mini-batch seeds ends above GN: the mean still favours Adam, but the spread
    # now covers GN's value, so "Adam ends lower" is no longer beyond noise.
    bad = history([2.0, 1.2, 0.9, 0.85, 0.84], [2.0, 1.2, 1.0, 0.99, 0.99], -3.0, 0.6, (0.8, 0.5))
    one_bad[("adam", "mini")] = runs[("adam", "mini")][:2] + [bad]
    f2 = report.findings(one_bad)[1]
    assert f2.verdict == "MIXED" and "inside the noise" in f2.evidence
    rows = report.summary_rows(runs, {k: RunConfig(optimizer=k[0], setting=k[1]) for k in runs})
    assert all(r["seeds"] == 3 and r["train loss"].n == 3 for r in rows)
    assert rows[0]["train loss"].mean == pytest.approx(sum(h[-1]["train_loss"] for h in runs[("gn", "full")]) / 3)


def test_saturation_and_epochs_to_reach():
    h = history([2.0, 1.0, 0.5, 0.4, 0.0], [0] * 5, -1.0)
    assert report.saturation(h) == pytest.approx(0.5)                  # epoch 1 of 4: (2 - 1) / (2 - 0)
    assert report.epochs_to_reach(h, "train_loss", 0.45) == 3
    assert report.epochs_to_reach(h, "train_loss", -1.0) is None


# ---------------------------------------------------------------------------------------------- fair protocol

def poisoned_test_set(monkeypatch):
    """Make the loader return a test set of NaNs: any tuning score computed on it would be NaN."""
    from revgn_ext.experiments.revgn_paper import runner

    real = runner.load_dataset

    def load(name, data_dir=None, standardize="global"):
        x_tr, y_tr, x_te, y_te = real(name, data_dir, standardize)
        return x_tr, y_tr, torch.full_like(x_te, math.nan), y_te
    monkeypatch.setattr(runner, "load_dataset", load)


def test_validation_runs_evaluate_on_a_split_of_the_training_set(monkeypatch):
    from revgn_ext.experiments.revgn_paper import runner

    poisoned_test_set(monkeypatch)
    cfg = tiny_config(validation=True, max_train=80)
    x_fit, y_fit, x_val, y_val = runner.prepare_data(cfg, torch.device("cpu"))
    x_tr, y_tr, _, _ = runner.load_dataset("synthetic")
    assert len(x_fit) == 64 and len(x_val) == 16
    rows = {tuple(r.tolist()) for r in x_tr[:80]}
    assert all(tuple(r.tolist()) in rows for r in torch.cat([x_fit, x_val]))       # only training rows
    assert not {tuple(r.tolist()) for r in x_fit} & {tuple(r.tolist()) for r in x_val}
    assert torch.isfinite(x_val).all()


def test_tuning_never_touches_the_test_set(monkeypatch, tmp_path):
    from revgn_ext.experiments.revgn_paper import reproduction

    poisoned_test_set(monkeypatch)
    configs = {("gn", "mini"): tiny_config(optimizer="gn", epochs=1, lr=0.2),
               ("adam", "full"): tiny_config(optimizer="adam", setting="full", epochs=2, lr=1e-2)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rates, records = reproduction.tune(configs, seeds=(0, 1), grid_size=5, out_dir=str(tmp_path), log=lambda m: None)
    for key, rec in records.items():
        assert len(rec["grid"]) >= 5 and rec["chosen"] in rec["grid"] and rates[key] == rec["chosen"]
        assert all(s.n == 2 for s in rec["scores"].values() if s.diverged == 0)
        assert any(math.isfinite(s.mean) for s in rec["scores"].values())       # NaN test data never entered
    h = load_history(str(tmp_path / "gn-mini" / f"lr{rates[('gn', 'mini')]:g}" / "seed0"))
    assert "val_loss" in h[-1] and "test_loss" not in h[-1]


def test_tuning_extends_a_grid_whose_best_rate_is_at_the_edge(tmp_path):
    from revgn_ext.experiments.revgn_paper import reproduction

    cfg = tiny_config(optimizer="sgd", epochs=1, lr=1e-4)                        # far too small a centre
    _, records = reproduction.tune({("sgd", "mini"): cfg}, out_dir=str(tmp_path), max_extend=2, log=lambda m: None)
    rec = records[("sgd", "mini")]
    assert len(rec["grid"]) == 7 and max(rec["grid"]) == pytest.approx(1e-4 * 10 ** 2.0, rel=0.01)


def test_plateau_stops_when_the_train_loss_stops_improving():
    from revgn_ext.experiments.revgn_paper.reproduction import plateau

    stop = plateau(window=2, abs_tol=1e-3)
    rows = lambda ys: [{"epoch": e, "train_loss": y} for e, y in enumerate([9.0] + ys)]
    assert not stop(rows([1.0, 0.5, 0.25]))                                      # too few epochs
    assert not stop(rows([1.0, 0.5, 0.25, 0.12]))
    assert stop(rows([1.0, 0.5, 0.4999, 0.4998]))
    assert stop(rows([0.1, 0.05, 0.0503, 0.0501]))                                # noise, no progress


@pytest.mark.slow
def test_stored_tuning_applies_only_to_its_setup(tmp_path, capsys):
    from revgn_ext.experiments.common import protocol as P
    from revgn_ext.experiments.revgn_paper import reproduction

    configs = {("gn", "mini"): tiny_config(optimizer="gn"), ("adam", "mini"): tiny_config(optimizer="adam")}
    path = str(tmp_path / "t.json")
    details = {"setup": {reproduction.key_name(k): reproduction.setup_of(c) for k, c in configs.items()},
               "epochs": {"gn-mini": 4, "adam-mini": 4}, "records": {}}
    P.save_tuned(path, {"gn-mini": 0.5, "adam-mini": 3e-3}, "python -m revgn_ext.experiments reproduce --tune", details)
    payload, why = reproduction.stored_plan(path, configs)
    assert payload["rates"]["adam-mini"] == 3e-3 and why == ""
    other = {k: tiny_config(optimizer=k[0], hidden=48) for k in configs}
    payload, why = reproduction.stored_plan(path, other)
    assert payload is None and "hidden=32" in why and "hidden=48" in why
    # The command line uses the stored rates and lengths (an explicit --lr still wins).
    out = tmp_path / "rep"
    assert main("reproduce", *TINY, "--settings", "mini", "--optimizers", "gn,adam", "--seeds", "0",
                "--tuned-file", path, "--lr", "gn=0.3", "--out", str(out)) == 0
    assert json.loads((out / "gn-mini" / "seed0" / "config.json").read_text())["lr"] == 0.3
    adam = json.loads((out / "adam-mini" / "seed0" / "config.json").read_text())
    assert adam["lr"] == 3e-3 and adam["epochs"] == 4
    assert "stored tuning" in (out / "REPORT.md").read_text()


@pytest.mark.slow
def test_reproduce_tune_writes_the_stored_file(tmp_path):
    out, path = tmp_path / "rep", tmp_path / "tuned.json"
    assert main("reproduce", *TINY, "--settings", "mini", "--optimizers", "gn,adam", "--seeds", "0,1", "--tune",
                "--epochs", "1", "--max-epochs", "3", "--plateau-window", "1", "--tuned-file", str(path),
                "--out", str(out)) == 0
    payload = json.loads(path.read_text())
    assert payload["command"].startswith("python -m revgn_ext.experiments reproduce") and "--tune" in payload["command"]
    assert set(payload["rates"]) == {"gn-mini", "adam-mini"}
    length = payload["details"]["length"]
    assert 1 <= length["epochs"] <= 3 and payload["details"]["epochs"]["gn-mini"] == length["epochs"]
    assert all(len(r["grid"]) >= 5 for r in payload["details"]["records"].values())
    text = (out / "REPORT.md").read_text()
    assert "## Protocol" in text and "stopped improving its train loss after" in text and "**" in text
    for seed in (0, 1):
        h = load_history(str(out / "adam-mini" / f"seed{seed}"))
        assert h[-1]["epoch"] == length["epochs"] and "test_loss" in h[-1]


@pytest.mark.slow
def test_combined_report_over_reproduce_folders_with_a_robustness_row(tmp_path):
    from revgn_ext.experiments.revgn_paper import report

    full, mini, pixel = tmp_path / "full", tmp_path / "mini", tmp_path / "pixel"
    assert main("reproduce", *TINY, "--full-epochs", "2", "--settings", "full", "--seeds", "0,1", "--paper-rates",
                "--out", str(full)) == 0
    assert main("reproduce", *TINY, "--epochs", "2", "--settings", "mini", "--seeds", "0,1", "--paper-rates",
                "--out", str(mini)) == 0
    tiny_digits = [a if a != "synthetic" else "digits" for a in TINY]
    assert main("reproduce", *tiny_digits, "--epochs", "2", "--settings", "mini", "--optimizers", "gn,adam",
                "--standardize", "per-pixel", "--seeds", "0,1", "--paper-rates", "--out", str(pixel)) == 0
    path = report.combined_report([str(full), str(mini)], str(tmp_path / "all"), robustness=str(pixel))
    text = open(path).read()
    for f in ("F1", "F2", "F3", "F4"):
        assert f"**{f}: " in text
    assert "NOT RUN" not in text.split("## Paper findings")[1].split("##")[0]     # both settings present
    assert "under `per-pixel` standardisation" in text
    assert "GN's target: `identity`" in text and "(inputs standardised: global)" in text
    robust = text.split("## Robustness")[1]
    assert "| mini-batch | GN (RevGN) | " in robust and "| mini-batch | Adam | " in robust   # its final numbers
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        report.read_runs(str(tmp_path))
    # An interrupted run is refused by name, never read as a result.
    metrics = pixel / "adam-mini" / "seed1" / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match=r"adam-mini/seed1 is unfinished \(epoch 1 of 2\)"):
        report.combined_report([str(full), str(mini)], str(tmp_path / "again"), robustness=str(pixel))


def test_eval_every_evaluates_on_its_epochs_and_the_last(tmp_path, monkeypatch):
    """Held-out and train evaluations only every eval_every epochs and at the end; checkpoints at every
    evaluation (and at least every CHECKPOINT_SECONDS between); a resumed run continues identically,
    and the readers take the rows that hold each key."""
    from revgn_ext.experiments.revgn_paper import runner

    saved = []
    real_save = runner.checkpoint.save
    monkeypatch.setattr(runner.checkpoint, "save", lambda path, payload: (saved.append(payload["epoch"]),
                                                                          real_save(path, payload)))
    whole = str(tmp_path / "whole")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = run(tiny_config(optimizer="adam", epochs=7, eval_every=3), whole, progress=False)
    evaluated = [r["epoch"] for r in h if "test_loss" in r]
    assert evaluated == [0, 3, 6, 7] and saved == [3, 6, 7]
    assert all(("train_eval_loss" in r) == (r["epoch"] in evaluated) for r in h)
    assert all(math.isfinite(r["train_loss"]) for r in h[1:])
    assert report.final(h, "test_loss") == h[-1]["test_loss"]
    assert [r["epoch"] for r in load_history(whole)] == list(range(8))
    # Between evaluations a checkpoint is written once CHECKPOINT_SECONDS have passed (here: always).
    saved.clear()
    monkeypatch.setattr(runner, "CHECKPOINT_SECONDS", 0.0)
    split = str(tmp_path / "split")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(tiny_config(optimizer="adam", epochs=2, eval_every=3), split, progress=False)
        assert saved == [1, 2] and load_checkpoint(os.path.join(split, CHECKPOINT))["epoch"] == 2
        h2 = run(tiny_config(optimizer="adam", epochs=7, eval_every=3), split, resume=True, progress=False)
    assert [r["epoch"] for r in h2 if "test_loss" in r] == [0, 2, 3, 6, 7]
    assert [r["train_loss"] for r in h2] == [r["train_loss"] for r in h]
    assert h2[-1]["test_loss"] == h[-1]["test_loss"]


def test_eval_every_is_refused_below_one_and_may_change_on_resume():
    with pytest.raises(ValueError, match="eval_every must be a positive int"):
        tiny_config(eval_every=0)
    tiny_config(eval_every=5).check_resumable(tiny_config(eval_every=1))


def test_optimizer_stats_keep_finite_scalars_only():
    """A refused step's non-finite direction norm stays out of the history row (as None does), so that a
    run that goes on can be resumed (its rows hold finite numbers)."""
    from revgn_ext.experiments.revgn_paper.runner import _scalar_stats
    stats = {"direction_norm": float("inf"), "refused": True, "loss": torch.tensor(2.5), "rho": None,
             "alpha": float("nan"), "time": {"solve": 0.1}, "lr": 0.1}
    assert _scalar_stats(stats) == {"refused": 1.0, "loss": 2.5, "lr": 0.1}
