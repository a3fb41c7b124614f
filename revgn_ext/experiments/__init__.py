"""The paper reproductions, one sub-package per paper, on top of the core package.

* :mod:`.revgn_paper`: arXiv 2411.07979, RevGN vs Adam vs SGD on RevMLP (``train``, ``reproduce``,
  ``study``);
* :mod:`.egn_paper`: arXiv 2405.14402, EGN vs SGD, Adam, SGN and L-BFGS (``egn``);
* :mod:`.common`: what both share (protocol, checkpoints, datasets, diagnostics, records, figures).

Command line: ``python -m revgn_ext.experiments --help`` or the ``revgn-experiments`` entry point
(:mod:`.cli`). They need the ``[experiments]`` extra: ``pip install 'revgn_ext[experiments]'``.
Importing this package imports nothing beyond the core; the sub-packages load on use.
"""
