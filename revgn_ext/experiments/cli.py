"""``python -m revgn_ext.experiments`` (or ``revgn-experiments``): the command line of both papers'
experiments.

This module only assembles the sub-commands and dispatches to them; each paper's package owns its
options and its work:

* ``train``, ``reproduce``, ``study``: the RevGN paper (:mod:`.revgn_paper.commands`);
* ``egn``: the EGN paper (:mod:`.egn_paper.commands`).

Before any work it checks the optional dependencies the command needs, the output folder, and sets
torch's thread count (``--threads``, default 1), which it prints. Every refusal (a bad option, a
missing package or file, an unwritable folder, an unusable checkpoint, a full disk) ends with a
one-line error and exit status 2; Ctrl-C says which checkpoint is on disk and exits with 130.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .common.options import PROG, plain, positive_int

DESCRIPTION = """Reproduce the experiments of two papers with this package's optimizers.

  train      one optimizer (RevGN, Adam or SGD) in one setting on RevMLP
  reproduce  RevGN, Adam and SGD in full batch and mini-batch over seeds, figures and REPORT.md
  study      the RevGN paper's open questions
  egn        EGN vs SGD, Adam, SGN and L-BFGS on the EGN paper's tasks, figures and REPORT.md

Run `{prog} COMMAND --help` for a command's options. The commands need the [experiments] extra:
pip install 'revgn_ext[experiments]'.
"""

EXTRA = "pip install 'revgn_ext[experiments]'"
# (module, package on PyPI) each command imports while it works.
NEEDS = {
    "train": (("tqdm", "tqdm"), ("matplotlib", "matplotlib"), ("sklearn", "scikit-learn")),
    "reproduce": (("tqdm", "tqdm"), ("matplotlib", "matplotlib"), ("sklearn", "scikit-learn")),
    "study": (("tqdm", "tqdm"), ("matplotlib", "matplotlib"), ("sklearn", "scikit-learn")),
    "egn": (("tqdm", "tqdm"), ("matplotlib", "matplotlib"), ("sklearn", "scikit-learn"), ("scipy.linalg", "scipy")),
}
# Threads of torch's intra-op pool. The experiments' models are small (a batch of 32 through an MLP of
# width 64, or RevMLP on digits), where more threads only add synchronisation: on a loaded 2-core
# machine EGN's step took 15.4 ms at torch's default of 2 threads against 1.34 ms at 1.
DEFAULT_THREADS = 1


def build_parser() -> argparse.ArgumentParser:
    from .egn_paper import commands as egn_commands
    from .revgn_paper import commands as revgn_commands

    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION.format(prog=PROG),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,reproduce,study,egn}")
    revgn_commands.add_parsers(sub)
    e = sub.add_parser("egn", help="EGN vs SGD, Adam, SGN and L-BFGS on the EGN paper's tasks "
                       "(arXiv 2405.14402), plus REPORT.md", description=plain(egn_commands.__doc__),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    egn_commands.add_arguments(e)
    e.set_defaults(execute=egn_commands.execute)
    for name, command in sub.choices.items():
        command.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS, metavar="N",
                             help=f"torch threads (torch.set_num_threads) for the whole run (default "
                                  f"{DEFAULT_THREADS}: the experiments' small models run fastest on one)")
    return parser


def missing_dependency(command: str, studies=()) -> str | None:
    """The one-line refusal for the first package ``command`` needs that cannot be imported, or None."""
    needs = list(NEEDS[command])
    if command == "study" and ({"second-order", "all"} & set(studies)):
        needs.append(("pytorch_optimizer", "pytorch-optimizer"))
    for module, package in needs:
        try:
            importlib.import_module(module)
        except ImportError as e:
            return (f"the {command} command needs the package '{package}', which cannot be imported "
                    f"({type(e).__name__}: {e}); install the experiments' dependencies with: {EXTRA}")
    return None


def check_out(path) -> None:
    """ValueError naming ``--out`` unless it is a folder this process can create and write."""
    if path is None:
        return
    if not str(path).strip():
        raise ValueError(f"--out must name an output folder, got {path!r}")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path} exists and is not a folder; name a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {path}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: the folder is not writable")


def set_threads(n: int) -> int:
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = missing_dependency(args.command, getattr(args, "studies", ()))
    if problem:
        parser.exit(2, f"{parser.prog}: error: {problem}\n")
    from .common.checkpoint import CheckpointError
    from .common.records import RunInterrupted

    try:
        check_out(args.out)
        print(f"torch threads: {set_threads(args.threads)} (--threads)", flush=True)
        return args.execute(args, argv)
    except (ValueError, FileNotFoundError, CheckpointError) as e:  # CheckpointError: any unusable checkpoint
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except OSError as e:  # a file or folder the run cannot read or write
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        parser.exit(2, f"{parser.prog}: error:{where} {e.strerror or e}\n")
    except KeyboardInterrupt as e:
        where = e.message if isinstance(e, RunInterrupted) else "stopped"
        print(f"\n{where}; rerun with --resume to continue", file=sys.stderr)
        return 130
