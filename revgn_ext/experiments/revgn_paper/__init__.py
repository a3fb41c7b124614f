"""The RevGN paper's experiments (arXiv 2411.07979): RevGN vs Adam vs SGD on RevMLP, and the paper's
open questions.

Command line: ``python -m revgn_ext.experiments {train,reproduce,study} --help`` (:mod:`.commands`).
From Python: :class:`RunConfig` describes one run and :func:`run` trains it, writing metrics (JSONL and
CSV) and a checkpoint per epoch; :func:`.plots.make_figures` and :func:`.report.write_report` turn
runs into figures and REPORT.md; :mod:`.reproduction` is the fair protocol (tuning, length, seeds),
:mod:`.studies` the open questions. The tuned rates of ``reproduce`` are stored in ``tuned/``.
"""
from ..common.records import load_history
from .config import PAPER_LR, PRESETS, RunConfig, paper_lr
from .runner import run

__all__ = ["run", "load_history", "RunConfig", "PAPER_LR", "PRESETS", "paper_lr"]
