"""``python -m revgn_ext.experiments``: the command line of both papers' experiments.

This module only assembles the sub-commands and dispatches to them; each paper's package owns its
options and its work:

* ``train``, ``reproduce``, ``study``: the RevGN paper (:mod:`.revgn_paper.commands`);
* ``egn``: the EGN paper (:mod:`.egn_paper.commands`).

Every refusal (a bad option, a missing file, an unusable checkpoint) ends with a one-line error and
exit status 2; Ctrl-C says what is on disk and exits with 130.
"""
from __future__ import annotations

import argparse
import sys

from .common.options import PROG

DESCRIPTION = """Reproduce the experiments of two papers with this package's optimizers.

  train      one optimizer (RevGN, Adam or SGD) in one setting on RevMLP
  reproduce  RevGN, Adam and SGD in full batch and mini-batch over seeds, figures and REPORT.md
  study      the RevGN paper's open questions
  egn        EGN vs SGD, Adam, SGN and L-BFGS on the EGN paper's tasks, figures and REPORT.md

Run `{prog} COMMAND --help` for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    from .egn_paper import commands as egn_commands
    from .revgn_paper import commands as revgn_commands

    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION.format(prog=PROG),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    revgn_commands.add_parsers(sub)
    e = sub.add_parser("egn", help="EGN vs SGD, Adam, SGN and L-BFGS on the EGN paper's tasks "
                       "(arXiv 2405.14402), plus REPORT.md", description=egn_commands.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    egn_commands.add_arguments(e)
    e.set_defaults(execute=egn_commands.execute)
    return parser


def main(argv=None) -> int:
    from .common.checkpoint import CheckpointError
    from .revgn_paper.runner import RunInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.execute(args, argv)
    except (ValueError, FileNotFoundError, CheckpointError) as e:  # CheckpointError: any unusable checkpoint
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt as e:
        where = f"stopped after epoch {e.epoch} of {e.label}" if isinstance(e, RunInterrupted) else "stopped"
        print(f"\n{where}; rerun with --resume to continue", file=sys.stderr)
        return 130
