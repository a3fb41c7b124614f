"""The EGN paper's experiments (Korbit et al., arXiv 2405.14402): EGN and its variants against SGD, Adam,
SGN and L-BFGS on the paper's tasks, with a verdict on each of its claims.

Command line: ``python -m revgn_ext.experiments egn --help`` (:mod:`.commands`). The modules, by job:

* :mod:`.tasks` (supervised tasks: data, model, loss, metric), :mod:`.lqr` (the LQR Q-learning task),
  :mod:`.problems` (the task registry and a run's step-indexed problem);
* :mod:`.sgn` (the SGN baseline), :mod:`.training` (optimizers, one run, checkpoints, curves);
* :mod:`.tuning` (grids, choice, the rates stored in ``tuned/``), :mod:`.timing` (C4: batch size,
  time split, memory);
* :mod:`.claims` (C1-C4), :mod:`.plots` (figures), :mod:`.report` (REPORT.md).
"""
