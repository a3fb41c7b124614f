"""The fair protocol: tuning split, grids, selection, seed aggregation, verdicts, stored rates."""
import json
import math

import pytest
import torch

from revgn_ext.experiments.common import protocol as P


def test_validation_split_partitions_the_training_set_reproducibly():
    fit, val = P.validation_split(100, fraction=0.2, seed=3)
    assert len(val) == 20 and len(fit) == 80
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(100))   # a partition, nothing else
    fit2, val2 = P.validation_split(100, fraction=0.2, seed=3)
    assert torch.equal(fit, fit2) and torch.equal(val, val2)
    assert not torch.equal(val, P.validation_split(100, fraction=0.2, seed=4)[1])


def test_split_train_only_uses_the_training_tensors():
    x = torch.arange(50.0)[:, None]
    y = torch.arange(50)
    xf, yf, xv, yv = P.split_train(x, y, fraction=0.3, seed=0)
    assert len(xv) == 15 and len(xf) == 35
    assert set(yf.tolist()).isdisjoint(yv.tolist())
    assert torch.equal(xf[:, 0].long(), yf) and torch.equal(xv[:, 0].long(), yv)


@pytest.mark.parametrize("args", [(1,), (10, 0.0), (10, 1.0)])
def test_validation_split_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        P.validation_split(*args)


def test_log_grids():
    g = P.log_grid(1e-4, 1e-2, 5)
    assert g == pytest.approx([1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2])
    c = P.lr_grid(1e-3, num=5, factor=10)
    assert c == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2, 1e-1]) and len(P.lr_grid(0.1, 7)) == 7
    with pytest.raises(ValueError, match="at least 5"):
        P.log_grid(1e-3, 1e-1, 4)
    with pytest.raises(ValueError):
        P.log_grid(1e-1, 1e-3, 5)
    assert P.at_grid_edge(g, 1e-4) and not P.at_grid_edge(g, 1e-3)


def test_select_best_skips_diverged_runs():
    best, stats = P.select_best({0.1: [0.5, 0.6], 1.0: [0.2, math.nan], 0.01: [0.9, 0.8]})
    assert best == 0.1                        # 1.0 has the lowest finite score but one seed diverged
    assert stats[1.0].diverged == 1
    assert P.select_best({"a": 0.7, "b": 0.9}, lower_is_better=False)[0] == "b"
    with pytest.raises(ValueError, match="diverged"):
        P.select_best({0.1: [math.inf], 1.0: [None]})


def test_aggregate_mean_and_sample_std():
    s = P.aggregate([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n, s.diverged) == (2.0, 1.0, 3, 0)
    assert format(s, ".2f") == "2.00 ± 1.00"
    one = P.aggregate([4.0])
    assert (one.mean, one.std) == (4.0, 0.0)
    d = P.aggregate([1.0, math.nan, None])
    assert d.n == 1 and d.diverged == 2 and "2 diverged" in str(d)
    assert P.fmt_pm(math.nan, 1.0) == "-"
    rows = P.aggregate_rows([{"a": 1, "b": 2.0, "name": "x"}, {"a": 3, "b": 4.0, "name": "y"}])
    assert set(rows) == {"a", "b"} and rows["a"].mean == 2.0 and rows["b"].std == pytest.approx(math.sqrt(2))


def test_compare_and_verdict_use_the_spread():
    low, high = P.Stat(1.0, 0.1, 3), P.Stat(2.0, 0.1, 3)
    assert P.compare(low, high) is True and P.compare(high, low) is False
    assert P.compare(high, low, less=False) is True
    noisy = P.Stat(1.5, 0.6, 3)
    assert P.compare(noisy, high) is None          # 0.5 apart, one std of the difference is 0.61
    assert P.compare(P.Stat(math.nan, 0, 0), high) is None
    assert P.verdict([True, True]) == P.REPRODUCED
    assert P.verdict([True, None]) == P.MIXED
    assert P.verdict([True, None, False]) == P.NOT_REPRODUCED
    assert P.verdict([]) == P.NOT_RUN


def test_tuned_rates_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "rates.json")
    P.save_tuned(path, {"mini": {"adam": 1e-3}}, "python -m x --tune",
                 {"scores": {"0.1": P.aggregate([0.5, math.nan])}, "grid": (1, 2)})
    payload = P.load_tuned(path)
    assert payload["rates"] == {"mini": {"adam": 1e-3}} and payload["command"] == "python -m x --tune"
    assert payload["details"]["scores"]["0.1"]["values"] == [0.5, None]          # strict JSON
    json.loads(open(path).read())
    with pytest.raises(ValueError, match="command"):
        P.save_tuned(path, {}, "")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        P.load_tuned(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError):
        P.load_tuned(str(tmp_path / "missing.json"))
    assert P.tuned_path("/pkg/tuned", "revgn_digits") == "/pkg/tuned/revgn_digits.json"
    with pytest.raises(ValueError):
        P.tuned_path("/pkg/tuned", "../x")
