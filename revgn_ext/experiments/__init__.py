"""Reproduce the experiments of arXiv 2411.07979 (RevGN vs Adam vs SGD on RevMLP).

Command line: ``python -m revgn_ext.experiments {train,reproduce} --help``. From Python:
:class:`RunConfig` describes one run and :func:`run` trains it, writing metrics (JSONL and CSV) and a
checkpoint per epoch; :func:`~.plots.make_figures` and :func:`~.report.write_report` turn runs into
figures and REPORT.md.
"""
from .cli import main
from .config import PAPER_LR, PRESETS, RunConfig, paper_lr
from .runner import load_history, run

__all__ = ["main", "run", "load_history", "RunConfig", "PAPER_LR", "PRESETS", "paper_lr"]
