"""The open-question studies in their smallest configuration (synthetic data, a few samples)."""
import math
import os
import warnings

import pytest

from revgn_ext.experiments import cli
from revgn_ext.experiments.revgn_paper import studies
from revgn_ext.experiments.common.records import load_history


def run(*names, out, seeds="0,1"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli.main(["study", *names, "--smoke", "--seeds", seeds, "--out", str(out)])


def test_mlp_width_matches_the_parameter_count():
    w = studies.mlp_width_for(10_000, in_features=64, classes=10, layers=2)
    assert abs(studies.mlp_params(w, 64, 10, 2) - 10_000) <= studies.mlp_params(w + 1, 64, 10, 2) - studies.mlp_params(w, 64, 10, 2)
    cfg = studies.base_config(smoke=True)
    assert studies.revmlp_params(cfg, 16) == 2 * 2 * (8 * 32 + 8)


@pytest.mark.slow
def test_generalization_study_smallest(tmp_path):
    assert run("generalization", out=tmp_path) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "## 2a." in text and (tmp_path / "generalization.png").stat().st_size > 1000
    for arm in ("gen-mlp-egn", "gen-mlp-adam", "gen-revmlp-gn", "gen-revmlp-adam", "gen-revmlp-sgd"):
        for seed in (0, 1):
            h = load_history(str(tmp_path / "arms" / arm / f"seed{seed}"))
            assert h[-1]["epoch"] == 2 and math.isfinite(h[-1]["test_loss"]) and "train_eval_loss" in h[-1]
            assert "cka_block2" in h[-1] and "ntk_similarity" in h[-1]
    assert "| MLP, EGN |" in text and "(tuned)" in text and " ± " in text
    assert "gap" in text and "Tuning (final validation loss per rate)" in text


@pytest.mark.slow
def test_regularization_study_smallest(tmp_path):
    assert run("regularization", out=tmp_path, seeds="0") == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "## 2b." in text and "Best setting over all sweeps" in text
    assert (tmp_path / "regularization.png").stat().st_size > 1000
    cosine = load_history(str(tmp_path / "arms" / "reg-schedule-cosine-" / "seed0"))
    assert cosine[-1]["epoch"] == 2
    assert "**batch size**" in text and "damping=0.1" in text


@pytest.mark.slow
def test_width_study_smallest(tmp_path):
    assert run("width", out=tmp_path, seeds="0") == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "## 2c." in text and "M=32" in text and "M=64" in text
    assert (tmp_path / "width.png").stat().st_size > 1000


@pytest.mark.slow
def test_second_order_study_smallest(tmp_path):
    pytest.importorskip("pytorch_optimizer")
    assert run("second-order", out=tmp_path, seeds="0") == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "## 2d." in text
    for label in ("| L-BFGS |", "| Shampoo |", "| SOAP |", "| RevGN |", "| Adam |"):
        assert label in text
    assert (tmp_path / "second_order.png").stat().st_size > 1000


@pytest.mark.slow
def test_study_runs_are_reused(tmp_path):
    assert run("generalization", out=tmp_path, seeds="0") == 0
    first = {p: load_history(os.path.dirname(p)) for p in _metrics(tmp_path / "arms")}
    assert run("generalization", out=tmp_path, seeds="0") == 0
    # A rerun would record other wall times: equal histories (time_s included) mean they were read back.
    assert first and all(load_history(os.path.dirname(p)) == h for p, h in first.items())


@pytest.mark.slow
def test_cached_only_trains_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["study", "width", "--smoke", "--seeds", "0", "--cached-only", "--out", str(tmp_path)]) == 0
    studies.CACHED_ONLY = False
    text = (tmp_path / "REPORT.md").read_text()
    assert "NotCached" in text and not _metrics(tmp_path)


@pytest.mark.slow
def test_arms_runs_only_the_named_arms(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["study", "width", "--smoke", "--seeds", "0", "--arms", "width-synthetic-32-adam",
                         "--out", str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path / "arms")) == ["width-synthetic-32-adam"]
    assert "skipped (not in --arms)" in (tmp_path / "REPORT.md").read_text()


def _metrics(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f == "metrics.jsonl"]


def test_bad_study_options(capsys):
    for argv in (["study", "nonsense"], ["study", "width", "--seeds", "0,0"], ["study", "width", "--grid-size", "3"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
