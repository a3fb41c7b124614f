"""The RevGN paper's sub-commands (arXiv 2411.07979): ``train``, ``reproduce`` and ``study``.

* ``train`` runs one optimizer in one setting (``--optimizer``, ``--setting``).
* ``reproduce`` runs GN, Adam and SGD in full batch and mini-batch over several seeds (``--seeds``),
  then writes figures and REPORT.md with mean ± std and the paper's findings. Learning rates and the
  mini-batch length come from the tuning stored in the package for this set-up
  (``experiments/revgn_paper/tuned/revgn_<dataset>.json``); ``--tune`` re-derives it on a validation
  split of the training set, ``--paper-rates`` uses the paper's rates instead.
* ``study`` answers the paper's open questions (:mod:`.studies`).

Sizes left unset come from the dataset's preset (:data:`.config.PRESETS`); learning rates left unset
are the paper's, with GN's converted to this package's convention (official x L).

``--distributed`` (GN only) runs data-parallel under torchrun, e.g.
``torchrun --nproc_per_node=2 -m revgn_ext.experiments train --optimizer gn --distributed``: each rank
takes its share of every batch, the step is that of the whole batch, and only rank 0 writes outputs
and shows progress (docs/distributed.md).
"""
from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

from ..common.data import DATASETS
from ..common.markdown import markdown_table
from ..common.options import (HelpFormatter, command_line, csv_choices, distinct_ints, plain, positive_int,
                              seconds)
from ..common.records import CHECKPOINT, resolve_device
from ...revgn.targets import TARGETS
from .config import OPTIMIZERS, PRESETS, SETTINGS, STANDARDIZE, RunConfig


TRAIN_DESCRIPTION = """Train RevMLP with one optimizer (GN = RevGN, Adam or SGD) in one setting (full: the first
--full-batch-size samples, one step per epoch; mini: mini-batches of --batch-size), recording losses,
accuracy, the loss change on the step's own batch, NTK similarity, CKA per block and weight change per
epoch, with a checkpoint per epoch (--resume continues it), figures and REPORT.md in --out.
Sizes left unset come from the dataset's preset; learning rates left unset are the paper's."""

REPRODUCE_DESCRIPTION = """Run GN (RevGN), Adam and SGD in full batch and mini-batch over several seeds, with learning
rates and the mini-batch length from the tuning stored in the package (--tune re-derives it on a
validation split of the training set, --paper-rates uses the paper's rates), then write figures and
REPORT.md with mean +- std and a verdict on each of the paper's findings."""


def hidden_width(text: str):
    """Type of ``--hidden``: a positive int, or "none" (no bottleneck)."""
    if text.lower() == "none":
        return "none"  # kept distinct from an unset option (None), which means the preset
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int or 'none', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive int or 'none'")
    return value


def learning_rate(text: str):
    """``VALUE``, ``OPT=VALUE`` or ``OPT:SETTING=VALUE``."""
    key, _, value = text.rpartition("=")
    opt, _, setting = key.partition(":")
    if opt and opt not in OPTIMIZERS or setting and setting not in SETTINGS:
        raise argparse.ArgumentTypeError(f"expected VALUE, OPT=VALUE or OPT:SETTING=VALUE with OPT in "
                                         f"{OPTIMIZERS} and SETTING in {SETTINGS}, got {text!r}")
    try:
        lr = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"learning rate must be a number, got {value!r}") from None
    if not lr > 0 or lr == float("inf"):
        raise argparse.ArgumentTypeError(f"learning rate must be a positive finite number, got {value!r}")
    return (opt or None, setting or None, lr)


def common_options() -> argparse.ArgumentParser:
    """The options ``train`` and ``reproduce`` share (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("data")
    g.add_argument("--dataset", default="digits", choices=DATASETS)
    g.add_argument("--data-dir", default=None, help="folder with the dataset files (default per dataset)")
    g.add_argument("--max-train", type=int, default=None, help="use only the first N training samples")
    g.add_argument("--max-test", type=int, default=None, help="use only the first N test samples")
    g.add_argument("--standardize", default="global", choices=STANDARDIZE,
                   help="input standardisation: global (one mean and std, the paper's; default) or per-pixel")
    g = common.add_argument_group("model (RevMLP)")
    g.add_argument("--blocks", type=int, default=None, help="L, number of coupling blocks")
    g.add_argument("--hidden", type=hidden_width, default=None,
                   help="bottleneck width M ('none': no bottleneck)")
    g.add_argument("--activations", type=csv_choices(None), default=("identity", "relu"),
                   help="comma-separated, one per block; the last repeats (default identity,relu)")
    g.add_argument("--weight-std", type=float, default=1e-3, help="std of the initial W (paper 1e-3)")
    g = common.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=None, help="mini-batch size")
    g.add_argument("--full-batch-size", type=int, default=None,
                   help="full-batch setting trains on the first N samples (paper 1024)")
    g.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs (reproduce: of the mini-batch runs; with --tune, the budget of the mini-batch "
                        "tuning runs, the final length then comes from Adam's plateau)")
    g.add_argument("--lr", type=learning_rate, action="append", default=[], metavar="[OPT[:SETTING]=]LR",
                   help="learning rate, repeatable: 0.01 (train), adam=1e-3, gn:full=1.0. Default: the "
                        "paper's (MNIST full GN 0.5 / Adam 1e-4 / SGD 0.1, mini GN 0.1 / Adam 1e-4 / SGD 0.1; "
                        "CIFAR full GN 1.0 / Adam 1e-5 / SGD 0.01, mini GN 0.1 / Adam 1e-4 / SGD 0.01), "
                        "GN's times L for this package's target-share convention")
    g.add_argument("--target", default="identity", choices=TARGETS,
                   help="RevGN function-space target: 'damped' is per sample, (H_i + mu I)^-1 g_i; "
                        "'damped-batch' the official code's form, the batch mean of (H_i + mu I)^-1 applied to g_i")
    g.add_argument("--damping", type=float, default=None, help="RevGN damping (relative; default RevGN's)")
    g.add_argument("--loss", default="cross_entropy", choices=("cross_entropy", "mse"))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    g.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    g = common.add_argument_group("diagnostics and output")
    g.add_argument("--diag-every", type=positive_int, default=None,
                   help="NTK/CKA/weight diagnostics every N epochs (default: train 1, reproduce epochs / 25)")
    g.add_argument("--eval-every", type=positive_int, default=None,
                   help="held-out and train evaluations every N epochs, and at the last (default: train 1, "
                        "reproduce epochs / 25; tuning runs evaluate at their end only)")
    g.add_argument("--diag-samples", type=int, default=256, help="training samples for CKA")
    g.add_argument("--ntk-samples", type=int, default=64, help="training samples for the NTK")
    g.add_argument("--ntk-probes", type=int, default=4, help="random output-space probes for the NTK")
    g.add_argument("--out", default=None, help="output folder (default runs/<...>)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument("--distributed", action="store_true",
                   help="data-parallel GN over the ranks started by torchrun (gloo on CPU, NCCL on GPU)")
    g.add_argument("--dist-timeout", type=seconds, default=300.0, metavar="SECONDS",
                   help="with --distributed: how long a rank waits for a stuck peer before it raises "
                        "(the process group's timeout; default 300)")
    return common


def add_parsers(sub) -> None:
    """Add ``train``, ``reproduce`` and ``study`` to the sub-command parsers ``sub``."""
    common = common_options()
    t = sub.add_parser("train", parents=[common], help="one optimizer in one setting",
                       description=TRAIN_DESCRIPTION, formatter_class=HelpFormatter)
    t.add_argument("--optimizer", default="gn", choices=OPTIMIZERS)
    t.add_argument("--setting", default="mini", choices=SETTINGS,
                   help="full: first --full-batch-size samples, one step per epoch; mini: --batch-size")
    t.set_defaults(execute=execute)
    r = sub.add_parser("reproduce", parents=[common], help="GN, Adam and SGD in both settings, plus REPORT.md",
                       description=REPRODUCE_DESCRIPTION, formatter_class=HelpFormatter)
    r.add_argument("--optimizers", type=csv_choices(OPTIMIZERS), default=OPTIMIZERS)
    r.add_argument("--settings", type=csv_choices(SETTINGS), default=SETTINGS)
    r.add_argument("--full-epochs", type=positive_int, default=None, help="epochs (= steps) of the full-batch runs")
    add_protocol_options(r)
    r.set_defaults(execute=execute)
    add_study_parser(sub)


def add_study_parser(sub) -> None:
    from . import studies

    STUDIES = studies.STUDIES
    s = sub.add_parser("study", help="the RevGN paper's open questions: " + ", ".join(STUDIES),
                       description=plain(studies.__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("studies", nargs="+", choices=STUDIES + ("all",), metavar="STUDY",
                   help=f"one or more of {', '.join(STUDIES)}, or all")
    s.add_argument("--out", default="runs/studies", help="output folder (runs are reused from it)")
    s.add_argument("--seeds", type=distinct_ints, default=(0, 1, 2), help="seeds of the final runs (default 0,1,2)")
    s.add_argument("--tune-seeds", type=distinct_ints, default=(0,), help="seeds of each tuning run (default 0)")
    s.add_argument("--grid-size", type=positive_int, default=5, help="rates per log grid (>= 5, default 5)")
    s.add_argument("--smoke", action="store_true", help="the smallest configuration (synthetic data), for tests")
    s.add_argument("--cached-only", action="store_true",
                   help="train nothing: report the runs already finished in --out (the others as not run)")
    s.add_argument("--arms", type=csv_choices(None), default=None,
                   help="run only these arms (names as in the run folders), e.g. to split a study over processes")
    s.set_defaults(execute=study)


def add_protocol_options(r) -> None:
    g = r.add_argument_group("fair protocol")
    g.add_argument("--seeds", type=distinct_ints, default=(0, 1, 2), help="seeds of the final runs (default 0,1,2)")
    g.add_argument("--tune", action="store_true",
                   help="tune every rate on a validation split of the training set and the mini-batch length "
                        "on Adam's plateau, store them in --tuned-file, then run")
    g.add_argument("--tune-seeds", type=distinct_ints, default=(0,), help="seeds of each tuning run (default 0)")
    g.add_argument("--grid-size", type=positive_int, default=5, help="rates per log grid (>= 5, default 5)")
    g.add_argument("--tuned-file", default=None,
                   help="tuned-rates JSON (default: the one stored in the package for the dataset)")
    g.add_argument("--paper-rates", action="store_true", help="ignore stored tuning, use the paper's rates")
    g.add_argument("--max-epochs", type=positive_int, default=None,
                   help="cap of the mini-batch length search (default: the preset's max_epochs)")
    g.add_argument("--plateau-window", type=positive_int, default=5,
                   help="epochs without improvement that end Adam's length run (default 5)")


def pick_lr(entries, optimizer: str, setting: str, allow_bare: bool):
    """The most specific ``--lr`` entry for (optimizer, setting), or None for the paper's default."""
    best, rank = None, -1
    for opt, st, lr in entries:
        if opt is None and not allow_bare:
            raise ValueError("reproduce runs several optimizers: give learning rates as OPT=LR or "
                             "OPT:SETTING=LR, e.g. --lr gn=1.0")
        if (opt in (None, optimizer)) and (st in (None, setting)):
            r = (opt is not None) + 2 * (st is not None)
            if r >= rank:
                best, rank = lr, r
    return best


def make_config(args, optimizer: str, setting: str) -> RunConfig:
    preset = PRESETS[args.dataset]

    def pick(name):
        value = getattr(args, name)
        return preset[name] if value is None else value

    epochs = pick("epochs")
    if setting == "full" and getattr(args, "full_epochs", None) is not None:
        epochs = args.full_epochs
    elif setting == "full" and args.command == "reproduce" and args.epochs is None:
        epochs = preset["full_epochs"]
    return RunConfig(optimizer=optimizer, setting=setting, dataset=args.dataset, data_dir=args.data_dir,
                     standardize=getattr(args, "standardize", "global"),
                     blocks=pick("blocks"), hidden=None if args.hidden == "none" else pick("hidden"),
                     activations=args.activations, weight_std=args.weight_std, batch_size=pick("batch_size"),
                     full_batch_size=pick("full_batch_size"), epochs=epochs,
                     lr=pick_lr(args.lr, optimizer, setting, allow_bare=args.command == "train"),
                     target=args.target, damping=args.damping, loss=args.loss, seed=args.seed,
                     dtype=args.dtype, max_train=args.max_train, max_test=args.max_test,
                     diag_every=1 if args.diag_every is None else args.diag_every,
                     eval_every=1 if getattr(args, "eval_every", None) is None else args.eval_every, diag_samples=args.diag_samples, ntk_samples=args.ntk_samples,
                     ntk_probes=args.ntk_probes)


def init_distributed(args) -> int:
    """Join the torchrun job (backend from --device: NCCL for CUDA, else gloo); returns this rank.

    With CUDA every rank takes the GPU ``cuda:LOCAL_RANK``.
    """
    import torch
    import torch.distributed as dist

    optimizers = [args.optimizer] if args.command == "train" else list(args.optimizers)
    if any(o != "gn" for o in optimizers):
        raise ValueError(f"--distributed runs the exact GN step only; got optimizer(s) {optimizers}")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--distributed needs the environment set up by torchrun (RANK, WORLD_SIZE, "
                         "MASTER_ADDR, MASTER_PORT); launch with `torchrun --nproc_per_node=N -m "
                         "revgn_ext.experiments ...`")
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=args.dist_timeout))
    return dist.get_rank()


def execute(args, argv) -> int:
    """``train`` and ``reproduce``."""
    if not args.distributed:
        resolve_device(args.device)  # a bad --device is refused before any work
    if args.distributed:
        rank = init_distributed(args)
        try:
            return _train_or_reproduce(args, argv, rank)
        finally:
            import torch.distributed as dist
            dist.destroy_process_group()
    return _train_or_reproduce(args, argv, 0)


def _train_or_reproduce(args, argv, rank: int) -> int:
    from . import plots, report
    from .runner import run

    command = command_line(argv)
    if args.command == "reproduce" and not args.distributed:
        return reproduce(args, command)
    if args.command == "train":
        plan = [(args.optimizer, args.setting)]
        out = args.out or os.path.join("runs", f"{args.dataset}-{args.optimizer}-{args.setting}")
        run_dirs = {plan[0]: out}
    else:
        plan = [(o, s) for s in args.settings for o in args.optimizers]
        out = args.out or os.path.join("runs", f"reproduce-{args.dataset}")
        run_dirs = {k: os.path.join(out, f"{k[0]}-{k[1]}") for k in plan}
    configs = {k: make_config(args, *k) for k in plan}  # validates every option before any training
    runs, cache, t0 = {}, {}, time.perf_counter()
    for key in plan:
        resume = args.resume and os.path.lexists(os.path.join(run_dirs[key], CHECKPOINT))
        if args.resume and args.command == "train" and not resume:
            raise FileNotFoundError(f"cannot resume: no checkpoint at {os.path.join(run_dirs[key], CHECKPOINT)}")
        runs[key] = run(configs[key], run_dirs[key], device=args.device, resume=resume,
                        progress=not args.no_progress, data_cache=cache, label=f"{key[0]} {key[1]}",
                        distributed=args.distributed)
    wall = time.perf_counter() - t0
    if rank != 0:
        return 0
    title = f"{args.dataset}, L={configs[plan[0]].blocks}, M={configs[plan[0]].hidden}"
    figures = plots.make_figures(runs, os.path.join(out, "figures"), title)
    path = report.write_report(runs, configs, out, figures, command,
                               extra=f"Wall time of this invocation: {wall:.0f} s (device {args.device}).")
    print(markdown_table(report.summary_rows(runs, configs)))
    if args.command == "reproduce":
        for f in report.findings(runs):
            print(f"[{f.verdict}] {f.claim}\n    {f.evidence}")
    print(f"\nmetrics: {', '.join(os.path.join(d, 'metrics.jsonl') for d in run_dirs.values())}")
    print(f"figures: {os.path.join(out, 'figures')}/ ({', '.join(os.path.basename(p) for p in figures.values())})")
    print(f"report:  {path}")
    print(f"wall time: {wall:.1f} s")
    return 0


def study(args, argv) -> int:
    """``study``."""
    from . import studies

    if args.grid_size < 5:
        raise ValueError(f"--grid-size must be at least 5 for a fair tuning, got {args.grid_size}")
    names = studies.STUDIES if "all" in args.studies else tuple(dict.fromkeys(args.studies))
    t0 = time.perf_counter()
    studies.CACHED_ONLY = args.cached_only
    studies.ONLY_ARMS = None if args.arms is None else set(args.arms)
    path = studies.run_studies(names, args.out, args.seeds, args.tune_seeds, args.grid_size, args.smoke,
                               command_line(argv))
    print(f"report:  {path}\nwall time: {time.perf_counter() - t0:.1f} s")
    return 0


def reproduce(args, command: str) -> int:
    """``reproduce`` on one process: the fair protocol of :mod:`.reproduction`."""
    from . import reproduction, report

    if args.grid_size < 5:
        raise ValueError(f"--grid-size must be at least 5 for a fair tuning, got {args.grid_size}")
    plan = [(o, s) for s in args.settings for o in args.optimizers]
    configs = {k: make_config(args, *k) for k in plan}  # validates every option before any training
    explicit = {k for k in plan if pick_lr(args.lr, *k, allow_bare=False) is not None}
    args.out = args.out or os.path.join("runs", f"reproduce-{args.dataset}")
    if args.max_epochs is None:
        args.max_epochs = PRESETS[args.dataset].get("max_epochs", 4 * configs[plan[0]].epochs)
    result = reproduction.reproduce(args, configs, explicit, command)
    print(markdown_table(report.summary_rows(result["runs"], result["configs"])))
    for f in report.findings(result["runs"]):
        print(f"[{f.verdict}] {f.claim}\n    {f.evidence}")
    print(f"\nlearning rates: {result['source']}")
    print(f"runs:    {args.out}/<optimizer>-<setting>/seed<k>/metrics.jsonl")
    print(f"figures: {os.path.join(args.out, 'figures')}/")
    print(f"report:  {result['report']}")
    print(f"wall time: {result['wall']:.1f} s")
    return 0
