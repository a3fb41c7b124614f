"""The one verdict rule of both reproductions (the RevGN paper's findings F1-F4, the EGN paper's claims
C1-C4), stated once here.

A claim is decided by a list of *tests*, each comparing two mean ± std numbers over seeds (or a mean
± std against a threshold). Each test has one of three outcomes:

* **holds** (``True``): the difference of the means is in the claimed direction and larger than the
  noise, one standard deviation of the difference ``sqrt(s_a^2 + s_b^2)``;
* **fails** (``False``): the difference is against the claim and larger than the noise;
* **inside the noise** (``None``): neither; also when a side has no finite value to compare.

The claim's verdict:

* **REPRODUCED** when every test holds beyond the noise;
* **NOT REPRODUCED** when any test fails beyond the noise (whatever the others say);
* **MIXED** only when some test is inside the noise and none fails beyond it;
* **NOT RUN** when there is no test.

A claim made on several tasks (or settings) lists every task's tests and their outcomes; it is
decided on all of them together, so one task that fails beyond the noise makes the claim NOT
REPRODUCED and one task inside the noise (none failing) makes it MIXED.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

REPRODUCED = "REPRODUCED"
NOT_REPRODUCED = "NOT REPRODUCED"
MIXED = "MIXED"
NOT_RUN = "NOT RUN"

RULE = ("Verdict rule (both papers): a test holds when the difference of the means is in the claimed "
        "direction by more than one standard deviation of the difference, sqrt(s_a^2 + s_b^2); it fails "
        "when it is against the claim by more than that; otherwise it is inside the noise. A claim is "
        "REPRODUCED when every test holds, NOT REPRODUCED when any test fails, MIXED when some test is "
        "inside the noise and none fails.")


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def compare(a, b, less: bool = True):
    """Whether ``a < b`` (or ``a > b`` with ``less=False``) beyond the noise.

    ``a`` and ``b`` have ``.mean`` and ``.std`` (a :class:`.protocol.Stat`). True: the difference of
    the means is in the claimed direction and larger than ``sqrt(a.std^2 + b.std^2)``; False: the same
    against it; None: inside the noise, or either side has no finite mean.
    """
    if not (_finite(a.mean) and _finite(b.mean)):
        return None
    diff = (b.mean - a.mean) if less else (a.mean - b.mean)
    noise = math.sqrt((a.std if _finite(a.std) else 0.0) ** 2 + (b.std if _finite(b.std) else 0.0) ** 2)
    if diff > noise:
        return True
    if diff < -noise:
        return False
    return None


def verdict(outcomes) -> str:
    """The rule on a list of test outcomes (True / False / None): REPRODUCED if every one is True,
    NOT REPRODUCED if any is False, MIXED otherwise; NOT RUN for an empty list."""
    outcomes = list(outcomes)
    for o in outcomes:
        if o not in (True, False, None):
            raise ValueError(f"a test outcome is True, False or None, got {o!r}")
    if not outcomes:
        return NOT_RUN
    if any(o is False for o in outcomes):
        return NOT_REPRODUCED
    if all(o is True for o in outcomes):
        return REPRODUCED
    return MIXED


def outcome_text(outcome) -> str:
    return {True: "holds", False: "fails", None: "inside the noise"}[outcome]


@dataclass
class Test:
    """One test of a claim: on which task (or setting), what it compares, and its outcome."""
    task: str
    name: str
    outcome: object          # True, False or None
    detail: str = ""

    def line(self) -> str:
        return f"{self.name}: {outcome_text(self.outcome)}" + (f" ({self.detail})" if self.detail else "")


def claim_verdict(tests: list) -> str:
    """The verdict of a claim from its :class:`Test` list (every task's tests together)."""
    return verdict(t.outcome for t in tests)


def per_task(tests: list) -> list:
    """``[(task, verdict of its tests, [Test])]`` in the order the tasks first appear: each task's own
    result, listed under the claim."""
    order, groups = [], {}
    for t in tests:
        if t.task not in groups:
            order.append(t.task)
            groups[t.task] = []
        groups[t.task].append(t)
    return [(task, claim_verdict(groups[task]), groups[task]) for task in order]


def per_task_lines(tests: list) -> list:
    """One markdown-ready line per task: ``task: VERDICT; test: outcome (detail); ...``."""
    return [f"{task}: {v}; " + "; ".join(t.line() for t in ts) for task, v, ts in per_task(tests)]
