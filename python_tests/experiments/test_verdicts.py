"""The one verdict rule of both reports, the extended learning-rate grids, the EGN claims' time-to-target
rules, the C4 length and the LSTD baseline of the LQR task."""
import math

import numpy as np
import pytest

from revgn_ext.experiments.common import protocol as P
from revgn_ext.experiments.common import verdicts as V
from revgn_ext.experiments.egn_paper import claims, lqr, timing, training


def S(mean, std=0.0, n=3):
    return P.Stat(mean, std, n)


# ------------------------------------------------------------------------------------------- the rule

def test_compare_holds_fails_or_is_inside_the_noise():
    assert V.compare(S(1.0, 0.1), S(2.0, 0.1)) is True                 # lower beyond sqrt(0.02)
    assert V.compare(S(2.0, 0.1), S(1.0, 0.1)) is False
    assert V.compare(S(1.0, 0.5), S(1.5, 0.5)) is None                 # 0.5 apart, noise 0.71
    assert V.compare(S(2.0, 0.1), S(1.0, 0.1), less=False) is True
    assert V.compare(S(math.nan), S(1.0)) is None
    assert P.compare is V.compare and P.verdict is V.verdict           # stated once


@pytest.mark.parametrize("outcomes,expected", [
    ([True, True, True], V.REPRODUCED),
    ([True, True, False], V.NOT_REPRODUCED),       # one failure beyond the noise decides
    ([True, None, True], V.MIXED),                 # inside the noise, none failing
    ([None, None], V.MIXED),
    ([None, False], V.NOT_REPRODUCED),             # a failure outranks the noise
    ([False, False], V.NOT_REPRODUCED),
    ([], V.NOT_RUN),
])
def test_the_verdict_rule_on_constructed_outcomes(outcomes, expected):
    assert V.verdict(outcomes) == expected
    assert V.claim_verdict([V.Test(f"t{i}", "x", o) for i, o in enumerate(outcomes)]) == expected


def test_verdict_refuses_an_outcome_that_is_not_a_test_result():
    with pytest.raises(ValueError, match="True, False or None"):
        V.verdict([True, 0.3])


def test_per_task_results_are_listed_under_the_claim():
    tests = [V.Test("a", "final", True), V.Test("b", "final", None), V.Test("a", "steps", False, "3 vs 2")]
    rows = V.per_task(tests)
    assert [(t, v) for t, v, _ in rows] == [("a", V.NOT_REPRODUCED), ("b", V.MIXED)]
    lines = V.per_task_lines(tests)
    assert lines[0].startswith("a: NOT REPRODUCED; final: holds; steps: fails (3 vs 2)")


# ------------------------------------------------------------------------------------------- grids

def synthetic(best_log10, diverge_above=None):
    """A validation loss with its minimum at 10**best_log10; NaN above ``diverge_above``."""
    calls = []

    def score(lr):
        calls.append(lr)
        if diverge_above is not None and lr > diverge_above:
            return [math.nan]
        return [(math.log10(lr) - best_log10) ** 2]
    return score, calls


def test_grid_extends_upwards_until_the_choice_is_interior():
    score, calls = synthetic(best_log10=1.0)                          # best rate 10, centre 0.01
    found = P.extend_grid(score, 0.01, num=5)
    assert found.stop == P.STOP_INTERIOR and not found.at_edge
    assert found.chosen == pytest.approx(10.0, rel=0.01)
    assert found.chosen not in (found.grid[0], found.grid[-1])
    assert len(found.grid) == 5 + 5 and len(calls) == len(set(calls)) == 10  # 0.316, 1, 3.16, 10, 31.6 added


def test_grid_extends_downwards_until_the_choice_is_interior():
    score, _ = synthetic(best_log10=-5.0)
    found = P.extend_grid(score, 1e-2, num=5)
    assert found.stop == P.STOP_INTERIOR and found.chosen == pytest.approx(1e-5, rel=0.01)
    assert min(found.grid) < found.chosen < max(found.grid)


def test_grid_extension_stops_when_the_next_rate_diverges():
    score, _ = synthetic(best_log10=2.0, diverge_above=1.5)            # improving upwards, diverges past 1.5
    found = P.extend_grid(score, 0.01, num=5)
    assert found.stop == P.STOP_DIVERGED and found.at_edge
    assert found.chosen == pytest.approx(1.0, rel=0.01) and found.beyond == pytest.approx(3.16, rel=0.01)
    assert "next rate 3.16 diverged" in found.stop_text()
    assert found.record()["stop"] == P.STOP_DIVERGED


def test_grid_extension_limit_and_all_diverged():
    score, _ = synthetic(best_log10=6.0)
    found = P.extend_grid(score, 0.01, num=5, max_extend=2)
    assert found.stop == P.STOP_LIMIT and found.at_edge and len(found.grid) == 7
    found = P.extend_grid(lambda lr: [math.nan] if lr > 1e-5 else [1.0 / lr], 1.0, num=5, max_extend=4)
    assert found.stop == P.STOP_ALL_DIVERGED                           # 4 steps down still above 1e-5
    found = P.extend_grid(lambda lr: [math.nan] if lr > 1e-3 else [lr], 1.0, num=5, max_extend=6)
    assert found.stop == P.STOP_LIMIT and found.chosen == min(found.grid) == pytest.approx(1e-4, rel=0.01)
    assert math.isfinite(found.stats[found.chosen].mean)               # searched down to finite rates


def test_egn_tuning_uses_the_shared_extension(monkeypatch):
    from revgn_ext.experiments.egn_paper import tuning

    def run(lr):   # accuracy (higher is better) peaking at lr = 30 from a centre of 0.3
        return [1.0 - (math.log10(lr) - math.log10(30.0)) ** 2 / 100], [0.0]
    info = tuning.search("wine", "egn", run)
    assert info["lr"] == pytest.approx(30.0, rel=0.01) and info["stop"] == P.STOP_INTERIOR
    assert len(info["grid"]) > 5


# ------------------------------------------------------------------------------------------- time to target

def history(metrics, step=10, cpu=0.5, n_eval=None):
    rows = [{"step": 0, "time_s": 0.0, "cpu_s": 0.0, "metric": 9.0}]
    for i, m in enumerate(metrics, start=1):
        rows.append({"step": i * step, "time_s": 99.0 * i, "cpu_s": cpu * i, "metric": m,
                     **({"n_eval": n_eval} if n_eval else {})})
    return rows


def test_time_to_target_in_steps_and_cpu_time_with_the_censoring_rule():
    h = history([5.0, 3.0, 1.0])
    assert training.time_to_target(h, 3.0, True, "step") == 20
    assert training.time_to_target(h, 3.0, True, "cpu_s") == 1.0
    assert training.censored_time_to_target(h, 0.5, True, "step") == (30.0, False)   # never: the run length
    with pytest.raises(ValueError, match="key"):
        training.time_to_target(h, 3.0, True, "wall")


def results_for(egn_hists, base_hists, task="diabetes"):
    def entry(hs):
        return {"histories": hs, "final": P.aggregate([h[-1]["metric"] for h in hs]), "lr": 0.1}
    return {(task, "egn"): entry(egn_hists), (task, "adam"): entry(base_hists)}


def c1(results, task="diabetes"):
    return next(c for c in claims.claims(results, (task,), None, task) if c.name == "C1")


def test_c1_holds_when_egn_reaches_the_target_sooner_in_steps_and_cpu():
    egn = [history([50.0, 49.0, 48.0 + 0.1 * s]) for s in range(3)]
    adam = [history([60.0, 55.0, 52.0 + 0.1 * s], cpu=0.6) for s in range(3)]
    # target = Adam's mean final 52.1: EGN reaches it at step 10 (0.5 CPU s); Adam at step 30 in 1 seed
    # and never in the other two (counted at 30 steps): EGN wins on both.
    c = c1(results_for(egn, adam))
    assert c.verdict == V.REPRODUCED, c.evidence
    assert {t.name for t in c.tests} == {"final test RMSE not worse than Adam", "steps to target",
                                         "process CPU s to target"}


def test_c1_fails_when_egn_misses_the_target_in_more_seeds_whatever_the_times():
    egn = [history([50.0, 49.0, 48.0]), history([50.0, 49.0, 48.0]), history([70.0, 70.0, 70.0])]
    adam = [history([60.0, 55.0, 56.0]) for _ in range(3)]
    c = c1(results_for(egn, adam))
    steps = next(t for t in c.tests if t.name == "steps to target")
    assert steps.outcome is False and c.verdict == V.NOT_REPRODUCED


def test_c1_is_mixed_when_the_times_are_inside_the_noise():
    egn = [history([60.0, 50.0, 50.0], cpu=0.5), history([50.0, 50.0, 50.0], cpu=0.5), history([70, 70, 50.0])]
    adam = [history([60.0, 50.0, 50.0], cpu=0.5) for _ in range(3)]
    c = c1(results_for(egn, adam))
    assert c.verdict == V.MIXED and all(t.outcome is not False for t in c.tests)


def test_c1_leaves_out_a_classification_task_with_too_few_test_samples():
    egn = [history([0.5, 0.9, 0.95], n_eval=36) for _ in range(2)]
    adam = [history([0.5, 0.9, 0.94], n_eval=36) for _ in range(2)]
    c = c1(results_for(egn, adam, task="wine"), task="wine")
    assert c.verdict == V.NOT_RUN and not c.tests
    assert any("left out of C1" in e and "2.8 percentage points" in e for e in c.evidence)


def test_c3_is_decided_on_every_variant_and_task_together():
    def r(final):
        return {"histories": [history([final])], "final": S(final, 0.1), "lr": 0.1}
    results = {("diabetes", "egn"): r(50.0), ("diabetes", "egn-ls"): r(40.0), ("diabetes", "egn-ad"): r(50.05),
               ("diabetes", "egn-mom"): r(60.0)}
    c3 = next(c for c in claims.claims(results, ("diabetes",), None, "diabetes") if c.name == "C3")
    assert c3.verdict == V.NOT_REPRODUCED                       # momentum hurts beyond the noise
    assert any(e.startswith("diabetes: NOT REPRODUCED") for e in c3.evidence)


def test_c4_length_defaults_to_300_steps_and_names_a_demo_length():
    assert timing.c4_length(None) == (300, "")
    steps, note = timing.c4_length(20)
    assert steps == 20 and "demo length" in note


# ------------------------------------------------------------------------------------------- LSTD

def small_plant():
    return lqr.Plant("small", "a small stable plant", Ac=((0.0, 1.0), (-2.0, -0.3)), Bc=((0.0,), (1.0,)),
                     Qc=((1.0, 0.0), (0.0, 0.5)), Rc=((0.2,),))


def test_lstd_is_the_policy_q_function_of_the_lyapunov_equation():
    plant = small_plant()
    problem = lqr.LQRProblem(plant, batch_size=16, seed=3)
    K = np.array([[0.3, -0.2]])
    problem.K = K
    batches = [problem.transitions() for _ in range(10)]
    z, c, xn = (np.concatenate([b[i] for b in batches]) for i in range(3))
    H = lqr.lstd_q(z, c, xn, K, gamma=0.9)
    A, B, Qc, Rc = plant.matrices()
    H_K = lqr.policy_q(A, B, Qc, Rc, K, 0.9)                    # scipy's discrete Lyapunov solve
    assert np.abs(H - H_K).max() < 1e-8 * np.abs(H_K).max()
    assert lqr.bellman_residual(H, A, B, Qc, Rc, K, 0.9) < 1e-8


def test_lstd_policy_iteration_reaches_the_riccati_optimum():
    plant = small_plant()
    out = lqr.lstd_run(plant, batch_size=8, seed=0, steps=500)
    A, B, Qc, Rc = plant.matrices()
    H_star = lqr.optimal_q(A, B, Qc, Rc, lqr.LQRSetup().gamma)   # scipy's discrete Riccati solve
    assert out["improvements"] == 5 and out["cpu_s"] >= 0
    assert np.abs(out["H"] - H_star).max() < 1e-7 * np.abs(H_star).max()
    assert out["metric"] == pytest.approx(np.linalg.norm(H_star - out["H"]))


def test_lstd_draws_the_same_transitions_as_the_td_runs():
    a = lqr.LQRProblem(lqr.PLANTS["lqr-stable"], 4, seed=1)
    b = lqr.LQRProblem(lqr.PLANTS["lqr-stable"], 4, seed=1)
    model = a.make_model(0)
    phi, _ = a.next_batch(model)
    z, _, _ = b.transitions()
    assert np.allclose(phi.double().numpy(), lqr.quadratic_features(__import__("torch").from_numpy(z)).numpy(),
                       rtol=1e-6)


def test_c1_counts_a_task_where_every_baseline_diverged():
    egn = [history([50.0, 49.0, 48.0]) for _ in range(2)]
    bad = [history([math.nan])[:1] + [{"step": 10, "time_s": 1.0, "cpu_s": 0.1, "metric": math.nan, "diverged": 1}]
           for _ in range(2)]
    c = c1(results_for(egn, bad))
    assert [t.outcome for t in c.tests] == [True] and "diverged" in c.tests[0].detail
