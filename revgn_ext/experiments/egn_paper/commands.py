"""``python -m revgn_ext.experiments egn``: the EGN paper's comparison (Korbit et al., arXiv 2405.14402).

For every task and optimizer it tunes the learning rate on a validation split carved from the training
data, trains ``--seeds`` seeds on the full training split at the chosen rate, records the test metric
against steps and wall time (``DIR/<task>/<optimizer>/seed<k>/metrics.{jsonl,csv}``), times EGN's step
at several batch sizes, and writes ``DIR/figures/*.png`` and ``DIR/REPORT.md`` with a verdict on each
of the paper's claims C1-C4.

Wall time counts the optimizer steps only (not batch assembly or evaluation). Runs write a checkpoint
at every evaluation; ``--resume`` continues each run from it and skips finished runs, and because the
batch order depends only on (seed, step) a resumed run ends with the same metrics as an uninterrupted
one.
"""
from __future__ import annotations

import math
import os
import sys
import time

from ..common import protocol
from ..common.options import command_line
from ..common.records import machine, resolve_device
from . import lqr
from .tasks import SUPERVISED
from .claims import claims, target_times
from .plots import figure_batch, figure_lqr, figure_metric
from .problems import DEFAULT_TASKS, TASKS, VAL_FRACTION, damping_for, expand_tasks, make_problem
from .report import write_report
from .timing import C4_BATCHES, batch_size_study, c4_length
from .training import OPTIMIZERS, RunSpec, final_value, run_one, step_time
from .tuning import GRID_CENTRES, search, stored_path, stored_rates

# The folder that holds the revgn_ext package, for the paths written in reports.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def add_arguments(p) -> None:
    """The ``egn`` subcommand's options."""
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated from {', '.join(TASKS)}; 'lqr' = both plants, 'all' = every task "
                        f"(default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated from {', '.join(OPTIMIZERS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds per optimizer and task (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="mini-batch size, or transitions per LQR update "
                                                              "(default 32, the paper's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default per task)")
    g.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="seconds of optimizer steps per run instead of a step count")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default steps/25)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--tune", dest="tune", action="store_true", default=True,
                   help="search each optimizer's learning rate on a validation split (default)")
    p.add_argument("--no-tune", dest="tune", action="store_false",
                   help="use the stored rates (revgn_ext/experiments/egn_paper/tuned/egn_tasks.json)")
    p.add_argument("--tune-seeds", type=int, default=1, help="seeds per grid value when tuning (default 1)")
    p.add_argument("--batch-sizes", default=",".join(map(str, C4_BATCHES)),
                   help="C4: EGN batch sizes to time and train ('none' to skip; default 32,128,512,2048)")
    p.add_argument("--c4-task", default="diamonds", help="task of the batch-size study (default diamonds)")
    p.add_argument("--c4-steps", type=int, default=None, help="steps per batch-size run (default 300)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--max-train", type=int, default=None, help="keep the first N training samples of each task")
    p.add_argument("--max-test", type=int, default=None, help="keep the first N test samples of each task")
    p.add_argument("--out", default=None, help="output folder (default runs/egn)")
    p.add_argument("--resume", action="store_true", help="continue the runs in --out from their checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_positive(name: str, value, kind=int) -> None:
    if value is not None and (not isinstance(value, kind) or value <= 0 or
                              (isinstance(value, float) and not math.isfinite(value))):
        raise ValueError(f"{name} must be a positive {'int' if kind is int else 'number'}, got {value!r}")


def csv_items(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse(args) -> dict:
    """Validate every option (ValueError naming it) before any training."""
    tasks = expand_tasks(csv_items(args.tasks))
    if not tasks:
        raise ValueError("--tasks is empty")
    optimizers = tuple(csv_items(args.optimizers))
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad or not optimizers:
        raise ValueError(f"unknown optimizer(s) {bad or args.optimizers!r} in --optimizers; choose from "
                         f"{', '.join(OPTIMIZERS)}")
    check_positive("--seeds", args.seeds)
    check_positive("--batch-size", args.batch_size)
    check_positive("--steps", args.steps)
    check_positive("--eval-every", args.eval_every)
    check_positive("--tune-seeds", args.tune_seeds)
    check_positive("--c4-steps", args.c4_steps)
    check_positive("--max-train", args.max_train)
    check_positive("--max-test", args.max_test)
    if args.time_budget is not None and not (args.time_budget > 0 and math.isfinite(args.time_budget)):
        raise ValueError(f"--time-budget must be a positive number of seconds, got {args.time_budget!r}")
    batches = () if args.batch_sizes.strip().lower() == "none" else tuple(int(b) for b in csv_items(args.batch_sizes)
                                                                         if b.lstrip("-").isdigit())
    if args.batch_sizes.strip().lower() != "none" and len(batches) != len(csv_items(args.batch_sizes)):
        raise ValueError(f"--batch-sizes must be comma-separated positive ints or 'none', got {args.batch_sizes!r}")
    for b in batches:
        check_positive("--batch-sizes entry", b)
    if batches and args.c4_task not in SUPERVISED:
        raise ValueError(f"--c4-task must be a supervised task ({', '.join(SUPERVISED)}), got {args.c4_task!r}")
    return {"tasks": tasks, "optimizers": optimizers, "batches": batches}


def execute(args, argv) -> int:
    from tqdm.auto import tqdm

    opts = parse(args)
    tasks, optimizers, batches = opts["tasks"], opts["optimizers"], opts["batches"]
    command = command_line(argv)
    out = args.out or os.path.join("runs", "egn")
    device = resolve_device(args.device)
    seeds = list(range(args.seeds))
    # Bars only on a terminal; in a log (CI, nohup) one line per task and optimizer instead.
    interactive = not args.no_progress and sys.stderr.isatty()
    lines = not args.no_progress and not interactive
    progress = interactive
    cache = {"data_dir": args.data_dir}
    t_start = time.perf_counter()
    ctx = {"command": command, "machine_start": machine(), "tasks": tasks, "optimizers": optimizers,
           "seeds": seeds, "batch_size": args.batch_size, "device": str(device), "dtype": args.dtype,
           "tune_seeds": args.tune_seeds, "notes": []}

    def steps_for(task):
        return None if args.time_budget is not None else (args.steps or
                                                            (500 if task in lqr.PLANTS else SUPERVISED[task].steps))

    def eval_every(task):
        n = steps_for(task)
        return args.eval_every or max(1, (n or 500) // 25)

    # Load every task's data and check the batch size against it before any training.
    for task in set(tasks) | ({args.c4_task} if batches else set()):
        for b in ({args.batch_size} | (set(batches) if task == args.c4_task else set())):
            for split in ("test", "val") if args.tune else ("test",):
                make_problem(RunSpec(task, "egn", 0.1, 0, b, steps=1, dtype=args.dtype, split=split,
                                     max_train=args.max_train, max_test=args.max_test), device, cache)
    stored = None
    try:
        stored = stored_rates()
        ctx["defaults_command"] = stored.get("command")
    except (FileNotFoundError, ValueError) as e:
        if not args.tune:
            raise type(e)(f"--no-tune needs the stored rates: {e}. Run `python -m revgn_ext.experiments egn "
                          "--tune` to derive rates") from None
        ctx["notes"].append(f"no stored rates ({e}); grids centred on built-in values")
    ctx["defaults_path"] = os.path.relpath(stored_path(), PACKAGE_ROOT)
    if args.time_budget is not None:
        ctx["steps_desc"] = f"each run has {args.time_budget:g} s of optimizer steps"
    else:
        ctx["steps_desc"] = "steps per run: " + ", ".join(f"{t} {steps_for(t)}" for t in tasks)

    os.makedirs(out, exist_ok=True)
    rates, tuning = {}, {}
    plan = [(t, o) for t in tasks for o in optimizers]
    if args.tune:
        bar = tqdm(plan, desc="tuning", disable=not progress, dynamic_ncols=True)
        for task, opt in bar:
            def tune_run(lr, task=task, opt=opt):
                hs = [run_one(RunSpec(task, opt, lr, seed, args.batch_size, steps_for(task), args.time_budget,
                                      args.dtype, "val", eval_every(task), args.max_train, args.max_test,
                                      damping_for(task)),
                              os.path.join(out, "tuning", task, opt, f"lr{lr:g}", f"seed{seed}"), device,
                              args.resume, progress, cache) for seed in range(args.tune_seeds)]
                return [final_value(h) for h in hs], [final_value(h, "loss") for h in hs]
            tuning[(task, opt)] = search(task, opt, tune_run)
            rates.setdefault(task, {})[opt] = tuning[(task, opt)]["lr"]
        protocol.save_tuned(os.path.join(out, "tuned_rates.json"), rates, command,
                     {"grids": {f"{t}/{o}": v["grid"] for (t, o), v in tuning.items()},
                      "stops": {f"{t}/{o}": v["search"].stop_text() for (t, o), v in tuning.items()},
                      "scores": {f"{t}/{o}": {str(k): s for k, s in v["stats"].items()} for (t, o), v in tuning.items()},
                      "batch_size": args.batch_size, "steps": {t: steps_for(t) for t in tasks},
                      "validation_fraction": VAL_FRACTION, "tune_seeds": args.tune_seeds})
    else:
        for task, opt in plan:
            lr = stored["rates"].get(task, {}).get(opt)
            if lr is None:
                raise ValueError(f"no stored learning rate for {opt} on {task} in {stored_path()}; "
                                 "run with --tune")
            rates.setdefault(task, {})[opt] = lr

    results = {}
    bar = tqdm(plan, desc="runs", disable=not progress, dynamic_ncols=True)
    for task, opt in bar:
        hs = []
        for seed in seeds:
            spec = RunSpec(task, opt, rates[task][opt], seed, args.batch_size, steps_for(task), args.time_budget,
                           args.dtype, "test", eval_every(task), args.max_train, args.max_test, damping_for(task))
            hs.append(run_one(spec, os.path.join(out, task, opt, f"seed{seed}"), device, args.resume, progress, cache))
        if lines:
            print(f"{task} {opt}: {len(hs)} seeds, lr {rates[task][opt]:g}, final metric "
                  f"{protocol.aggregate([final_value(h) for h in hs])}", file=sys.stderr, flush=True)
        results[(task, opt)] = {"histories": hs, "lr": rates[task][opt],
                                "final": protocol.aggregate([final_value(h) for h in hs]),
                                "train_loss": protocol.aggregate([final_value(h, "train_loss") for h in hs]),
                                "ms_step": protocol.aggregate([1e3 * step_time(h) for h in hs]),
                                "steps": "/".join(sorted({str(h[-1]["step"]) for h in hs}))}
    target_times(results, tasks)   # time to the baseline's final level, in steps and process CPU time
    ctx["lstd"] = {t: lqr.lstd_summary(t, args.batch_size, seeds, steps_for(t) or 500) for t in tasks if t in lqr.PLANTS}

    study = None
    if batches:
        c4_lr = rates.get(args.c4_task, {}).get("egn")
        if c4_lr is None:
            c4_lr = (stored or {}).get("rates", {}).get(args.c4_task, {}).get("egn", GRID_CENTRES["egn"])
        c4_steps, ctx["c4_note"] = c4_length(args.c4_steps)
        ctx.update(c4_task=args.c4_task, c4_lr=c4_lr, c4_steps=c4_steps)
        study = batch_size_study(args.c4_task, batches, c4_lr, seeds, c4_steps, args.dtype, device, out,
                                 args.resume, progress, cache, max(1, c4_steps // 25), args.max_train, args.max_test)

    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    figures = {
        "metric vs wall time": figure_metric(results, tasks, optimizers, "time",
                                             os.path.join(fig_dir, "metric_vs_time.png"),
                                             "Test metric against wall time (mean over seeds, light band: ± one std)"),
        "metric vs steps": figure_metric(results, tasks, optimizers, "step",
                                         os.path.join(fig_dir, "metric_vs_steps.png"),
                                         "Test metric against steps (mean over seeds, light band: ± one std)"),
    }
    if any(t in lqr.PLANTS for t in tasks):
        figures["LQR error curves"] = figure_lqr(results, tasks, optimizers, os.path.join(fig_dir, "lqr_error.png"))
    if study:
        figures["batch size (C4)"] = figure_batch(study, args.c4_task, os.path.join(fig_dir, "batch_size.png"))
    claim_list = claims(results, tasks, study, args.c4_task)
    ctx["wall"] = time.perf_counter() - t_start
    if not args.tune:
        ctx["notes"].append("Rates from the stored file, not tuned in this invocation.")
    path = write_report(out, ctx, results, tuning, study, figures, claim_list)
    for c in claim_list:
        print(f"[{c.verdict}] {c.name}: {c.claim}")
    print(f"report:  {path}\nfigures: {fig_dir}/\nwall time: {ctx['wall']:.1f} s")
    return 0
