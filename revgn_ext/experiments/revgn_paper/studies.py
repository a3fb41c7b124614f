"""The paper's open questions (arXiv 2411.07979, section 6), answered at CPU scale.

``python -m revgn_ext.experiments study NAME``, NAME one of:

* ``generalization`` (open question 1, next check 2): is poor mini-batch generalisation a property of
  exact GN or of reversible nets? Mini-batch exact GN on a plain MLP of about the same number of
  trainable parameters (EGN), on RevMLP (EGN, the Levenberg-Marquardt form, and RevGN), against Adam
  and SGD on the same models: train/test gap, NTK and CKA.
* ``regularization`` (open question 2, next check 3): which regulariser mitigates GN's overfitting?
  Sweeps of damping (relative and absolute), decoupled weight decay, lr schedule, target, SVD
  truncation threshold and batch size on mini-batch RevGN, against tuned Adam.
* ``width`` (open question 3): M in {256, 1024, 4096} on digits and a Fashion-MNIST subset; train/test
  gap and laziness (NTK, CKA) against width, GN vs Adam.
* ``second-order``: RevGN and EGN against L-BFGS (torch.optim), Shampoo and SOAP (pytorch-optimizer)
  and Adam / SGD on the same RevMLP: generalisation and time per step.

Protocol (:mod:`.protocol`): every arm's learning rate is tuned on a validation split of the training
set (log grid of at least 5 values, extended at an edge), the final runs use several seeds, and every
number is a mean ± std. Sweeps in ``regularization`` keep GN's rate at the value tuned for its
default settings, so each plot shows the effect of one knob alone.

Runs are cached under ``--out``: a run whose directory already holds a finished run of the same
configuration is read back, not repeated, so studies that share arms (generalization and
second-order) share their runs.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace

from ..common import protocol as P
from ..common.figures import pyplot
from ..common.markdown import markdown_table
from .config import RunConfig
from .plots import COLORS, LABELS
from .report import final, tuning_markdown
from .reproduction import run_seeds, tune

STUDIES = ("generalization", "regularization", "width", "second-order")


def base_config(smoke: bool = False, **kw) -> RunConfig:
    """The studies' common set-up: digits, RevMLP L = 2, M = 256, mini-batch 64, 10 epochs.
    ``smoke``: the smallest configuration (synthetic data, a few samples, 2 epochs) for tests."""
    if smoke:
        base = dict(dataset="synthetic", max_train=96, max_test=64, hidden=32, batch_size=32, full_batch_size=32,
                    epochs=2, diag_samples=32, ntk_samples=8, ntk_probes=2)
    else:
        base = dict(dataset="digits", hidden=256, batch_size=64, full_batch_size=1024, epochs=10,
                    diag_samples=256, ntk_samples=64, ntk_probes=4, diag_every=5)
    return RunConfig(**(dict(setting="mini", optimizer="gn", blocks=2) | base | kw))


def mlp_width_for(params: int, in_features: int, classes: int, layers: int = 2) -> int:
    """Hidden width w of an MLP with ``layers`` hidden layers whose parameter count
    ``(d + 1) w + (layers - 1)(w + 1) w + (w + 1) K`` is closest to ``params``."""
    count = lambda w: (in_features + 1) * w + (layers - 1) * (w + 1) * w + (w + 1) * classes
    return min(range(1, 20000), key=lambda w: abs(count(w) - params))


def revmlp_params(cfg: RunConfig, in_features: int) -> int:
    """Trainable parameters of RevMLP: per block W_F, W_G (d/2 x M) and b_F, b_G (d/2)."""
    half = (in_features + in_features % 2) // 2
    width = cfg.hidden if cfg.hidden is not None else half
    return cfg.blocks * 2 * (half * width + half)


# ---------------------------------------------------------------------------------------------- arms

@dataclass
class Arm:
    """One configuration of a study: tuned (``tune``) or at ``cfg.lr`` as given, run over the seeds."""
    name: str
    cfg: RunConfig
    tune: bool = True
    label: str = ""
    runs: list = field(default_factory=list)
    tuning: dict | None = None
    error: str = ""


CACHED_ONLY = False  # set by ``study --cached-only``: report the finished runs in --out, train nothing
ONLY_ARMS = None     # set by ``study --arms``: run just these arms (e.g. to run a study in parallel processes)


def run_arms(arms: list, seeds, tune_seeds, grid_size: int, out: str, cache: dict, log=print, progress=False):
    """Tune (where asked) and run every arm; an arm that cannot run records the reason in ``error``."""
    reuse = "only" if CACHED_ONLY else True
    for arm in arms:
        if ONLY_ARMS is not None and arm.name not in ONLY_ARMS:
            arm.error = "skipped (not in --arms)"
            continue
        t0 = time.perf_counter()
        try:
            if arm.tune:
                rates, records = tune({arm.name: replace(arm.cfg, diag_every=10 ** 6)}, tune_seeds, grid_size,
                                      os.path.join(out, "tune"), cache, progress, log=log, reuse=reuse)
                arm.tuning = records[arm.name]
                arm.cfg = replace(arm.cfg, lr=rates[arm.name])
            arm.runs = run_seeds(arm.cfg, seeds, os.path.join(out, "arms", arm.name), arm.name, cache, progress,
                                 reuse=reuse)
            log(f"{arm.name}: lr {arm.cfg.lr:g}, {time.perf_counter() - t0:.0f} s")
        except (ValueError, RuntimeError) as e:  # reported in the study's table; the other arms go on
            arm.error = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
            if type(e).__name__ == "UnsupportedModelError":
                arm.error += " (with REVGN_BACKEND=reference the coupling op supports torch.func)"
            log(f"{arm.name}: not run ({arm.error})")
    return arms


def arm_stats(arm: Arm) -> dict:
    """Mean ± std over seeds of the final numbers of an arm."""
    hs = arm.runs
    ev = "test"
    blocks = sorted({int(k[len("cka_block"):]) for k in hs[0][-1] if k.startswith("cka_block")}) if hs else []
    s = lambda fn: P.aggregate([fn(h) for h in hs])
    out = {
        "train loss": s(lambda h: final(h, "train_eval_loss")),
        "test loss": s(lambda h: final(h, f"{ev}_loss")),
        "test acc": s(lambda h: final(h, f"{ev}_acc")),
        "gap": s(lambda h: final(h, f"{ev}_loss") - final(h, "train_eval_loss")),
        "acc gap": s(lambda h: final(h, "train_eval_acc") - final(h, f"{ev}_acc")),
        "NTK sim": s(lambda h: final(h, "ntk_similarity")),
        "ms / step": s(lambda h: 1000 * final(h, "time_s") / max(1, h[-1]["step"])),
    }
    if blocks:
        out["CKA first"] = s(lambda h: final(h, f"cka_block{blocks[0]}"))
        out["CKA last"] = s(lambda h: final(h, f"cka_block{blocks[-1]}"))
    return out


def arms_table(arms: list, columns=None) -> str:
    rows = []
    for arm in arms:
        row = {"arm": arm.label or arm.name, "lr": f"{arm.cfg.lr:.3g}" + (" (tuned)" if arm.tuning else "")}
        if arm.error:
            row["note"] = arm.error
            rows.append(row)
            continue
        st = arm_stats(arm)
        row |= {k: v for k, v in st.items() if columns is None or k in columns}
        rows.append(row)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    return markdown_table([{k: r.get(k, "-") for k in keys} for r in rows])


def bar_figure(arms: list, metrics: list, path: str, title: str) -> str:
    plt = pyplot()
    ok = [a for a in arms if a.runs]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        stats = [arm_stats(a).get(metric, P.Stat(math.nan, 0, 0)) for a in ok]
        colors = [COLORS.get(a.cfg.optimizer, "gray") for a in ok]
        ax.bar(range(len(ok)), [s.mean for s in stats], yerr=[s.std for s in stats], color=colors,
               hatch=None, capsize=3, alpha=0.85)
        for i, a in enumerate(ok):
            if a.cfg.model == "mlp":
                ax.patches[i].set_hatch("//")
        ax.set_xticks(range(len(ok)))
        ax.set_xticklabels([a.label or a.name for a in ok], rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _verdict_word(o, better: str, worse: str) -> str:
    return {True: better, False: worse, None: "within noise of"}[o]


# ---------------------------------------------------------------------------------------------- 2a

def study_generalization(out: str, seeds, tune_seeds, grid_size, smoke=False, cache=None, log=print):
    from .runner import prepare_data

    # EGN on RevMLP forms per-sample Jacobians with torch.func (about 0.4 s a step here), so this study
    # trains on the first 480 training images to stay within minutes on a CPU.
    base = base_config(smoke, **({} if smoke else {"max_train": 480}))
    cache = {} if cache is None else cache
    import torch
    x_tr, y_tr, x_te, y_te = prepare_data(base, torch.device("cpu"), cache)
    classes = int(torch.cat([y_tr, y_te]).max()) + 1
    params = revmlp_params(base, x_tr.shape[1])
    width = mlp_width_for(params, x_tr.shape[1], classes, layers=base.blocks)
    mlp = replace(base, model="mlp", hidden=width, optimizer="adam")
    arms = [Arm("gen-mlp-egn", replace(mlp, optimizer="egn", lr=0.1), label="MLP, EGN"),
            Arm("gen-mlp-adam", replace(mlp, optimizer="adam", lr=1e-3), label="MLP, Adam"),
            Arm("gen-mlp-sgd", replace(mlp, optimizer="sgd", lr=0.1), label="MLP, SGD"),
            Arm("gen-revmlp-egn", replace(base, optimizer="egn", lr=0.1), label="RevMLP, EGN"),
            Arm("gen-revmlp-gn", replace(base, optimizer="gn", lr=0.2), label="RevMLP, RevGN"),
            Arm("gen-revmlp-adam", replace(base, optimizer="adam", lr=1e-3), label="RevMLP, Adam"),
            Arm("gen-revmlp-sgd", replace(base, optimizer="sgd", lr=0.1), label="RevMLP, SGD")]
    run_arms(arms, seeds, tune_seeds, grid_size, out, cache, log)
    fig = bar_figure(arms, ["test loss", "gap", "NTK sim", "CKA last"], os.path.join(out, "generalization.png"),
                     "Mini-batch exact GN vs Adam/SGD on a plain MLP and on RevMLP")
    by = {a.name[len("gen-"):]: a for a in arms}
    lines = ["## 2a. Exact GN's mini-batch generalisation: the method or the reversible net?", "",
             f"Set-up: {describe(base)}. The plain MLP has {base.blocks} hidden ReLU layers of width {width} "
             f"({mlp_params(width, x_tr.shape[1], classes, base.blocks)} trainable parameters; RevMLP {params}). "
             "EGN is exact GN with Levenberg-Marquardt damping on any module; RevGN the paper's exact GN "
             "(right inverse) on RevMLP. Gap = final test loss - final train loss (the model at the end "
             "evaluated on its whole training set).", "", arms_table(arms), f"![generalization]({os.path.basename(fig)})", ""]
    lines += ["Answer, comparison by comparison (beyond one std of the difference, else 'within noise'):", ""]
    for model, gn_arms in (("MLP", ["mlp-egn"]), ("RevMLP", ["revmlp-egn", "revmlp-gn"])):
        ref = by[f"{model.lower()}-adam"]
        for name in gn_arms:
            a = by[name]
            if a.error or ref.error:
                lines.append(f"* {a.label}: not compared ({a.error or ref.error}).")
                continue
            sa, sr = arm_stats(a), arm_stats(ref)
            lines.append(
                f"* {a.label}: gap {sa['gap']} is {_verdict_word(P.compare(sa['gap'], sr['gap'], less=False), 'larger than', 'smaller than')} "
                f"Adam's {sr['gap']}; test loss {sa['test loss']} is "
                f"{_verdict_word(P.compare(sa['test loss'], sr['test loss'], less=False), 'higher than', 'lower than')} "
                f"Adam's {sr['test loss']}; NTK similarity {sa['NTK sim']} vs Adam {sr['NTK sim']}.")
    return lines, arms


def mlp_params(width: int, d: int, k: int, layers: int) -> int:
    return (d + 1) * width + (layers - 1) * (width + 1) * width + (width + 1) * k


def describe(cfg: RunConfig) -> str:
    n = f", first {cfg.max_train} training samples" if cfg.max_train else ""
    return (f"{cfg.dataset}{n}, mini-batch {cfg.batch_size}, {cfg.epochs} epochs, RevMLP L = {cfg.blocks}, "
            f"M = {cfg.hidden}, activations {', '.join(cfg.activations)}")


# ---------------------------------------------------------------------------------------------- 2b

SWEEPS = {
    "damping (relative)": ("damping", [1e-4, 1e-3, 1e-2, 1e-1, 1.0], {"damping_mode": "relative"}),
    "damping (absolute)": ("damping", [1e-4, 1e-3, 1e-2, 1e-1, 1.0], {"damping_mode": "absolute"}),
    "weight decay": ("weight_decay", [0.0, 1e-4, 1e-3, 1e-2, 1e-1], {}),
    "lr schedule": ("schedule", ["constant", "cosine", "step"], {}),
    "target": ("target", ["identity", "newton", "damped"], {}),
    "SVD truncation rtol": ("rtol", [1e-4, 1e-3, 1e-2, 1e-1, 0.3], {"solver": "svd"}),
    "batch size": ("batch_size", [16, 32, 64, 128, 256], {}),
}
SMOKE_SWEEPS = {"damping (relative)": ("damping", [1e-4, 1e-1], {"damping_mode": "relative"}),
                "lr schedule": ("schedule", ["constant", "cosine"], {}),
                "batch size": ("batch_size", [16, 32], {})}


def study_regularization(out: str, seeds, tune_seeds, grid_size, smoke=False, cache=None, log=print):
    base = base_config(smoke)
    cache = {} if cache is None else cache
    gn = Arm("revmlp-gn", replace(base, optimizer="gn", lr=0.2), label="RevGN default")
    adam = Arm("revmlp-adam", replace(base, optimizer="adam", lr=1e-3), label="Adam")
    run_arms([gn, adam], seeds, tune_seeds, grid_size, out, cache, log)
    sweeps = SMOKE_SWEEPS if smoke else SWEEPS
    results = {}
    for title, (fieldname, values, extra) in sweeps.items():
        arms = []
        for v in values:
            cfg = replace(gn.cfg, **extra, **{fieldname: v})
            slug = f"reg-{fieldname}-{v}-" + "-".join(f"{k}{w}" for k, w in extra.items())
            arms.append(Arm(slug, cfg, tune=False, label=f"{fieldname}={v}"))
        run_arms(arms, seeds, tune_seeds, grid_size, out, cache, log)
        results[title] = (fieldname, values, arms)
    fig = regularization_figure(results, adam, gn, os.path.join(out, "regularization.png"))

    ad, df = arm_stats(adam), arm_stats(gn)
    candidates = [(title, a) for title, (_, _, arms) in results.items() for a in arms if a.runs]
    lines = ["## 2b. Which regulariser mitigates GN's overfitting?", "",
             f"Set-up: {describe(base)}; RevGN at its rate tuned for the default settings ({gn.cfg.lr:g}; relative "
             f"damping 1e-4, identity target, constant rate, Cholesky solve); each sweep changes one knob. "
             f"Adam (tuned, {adam.cfg.lr:g}): test loss {ad['test loss']}, accuracy {ad['test acc']}, gap {ad['gap']}. "
             f"RevGN default: test loss {df['test loss']}, accuracy {df['test acc']}, gap {df['gap']}.", "",
             f"![regularization]({os.path.basename(fig)})", ""]
    for title, (fieldname, values, arms) in results.items():
        lines += [f"**{title}**", "", arms_table(arms, ["test loss", "test acc", "gap", "train loss"])]
    if not (candidates and gn.runs and adam.runs):
        return lines + ["Not enough finished runs to name the best setting."], \
            [gn, adam] + [a for _, _, arms in results.values() for a in arms]
    best_title, best = min(candidates, key=lambda t: arm_stats(t[1])["test loss"].mean)
    bs = arm_stats(best)
    gap_to_adam = df["test loss"].mean - ad["test loss"].mean
    better = P.compare(bs["test loss"], df["test loss"])
    lines += [f"Best setting over all sweeps: **{best_title}, {best.label}**: test loss {bs['test loss']}, "
              f"accuracy {bs['test acc']}, gap {bs['gap']} ({_verdict_word(better, 'lower than', 'higher than')} "
              f"the default's test loss beyond one std)."]
    if gap_to_adam > 0:
        closed = (df["test loss"].mean - bs["test loss"].mean) / gap_to_adam
        lines.append(f"GN's default test loss is {gap_to_adam:.3g} above Adam's; the best setting closes "
                     f"{100 * closed:.0f}% of that gap.")
    else:
        lines.append(f"At this scale GN's default test loss is already {-gap_to_adam:.3g} below Adam's, so "
                     "there is no gap to Adam to close; the best setting changes GN's own test loss by "
                     f"{bs['test loss'].mean - df['test loss'].mean:+.3g} and its train/test gap by "
                     f"{bs['gap'].mean - df['gap'].mean:+.3g}.")
    return lines, [gn, adam] + [a for _, _, arms in results.values() for a in arms]


def regularization_figure(results: dict, adam: Arm, gn: Arm, path: str) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(results), figsize=(3.2 * len(results), 5.6), squeeze=False)
    ad = arm_stats(adam) if adam.runs else None
    for j, (title, (fieldname, values, arms)) in enumerate(results.items()):
        for i, metric in enumerate(("test loss", "test acc")):
            ax = axes[i][j]
            xs = list(range(len(values)))
            st = [arm_stats(a)[metric] if a.runs else P.Stat(math.nan, 0, 0) for a in arms]
            ax.errorbar(xs, [s.mean for s in st], yerr=[s.std for s in st], marker="o", color=COLORS["gn"],
                        capsize=3, label="RevGN")
            if ad is not None:
                ax.axhline(ad[metric].mean, color=COLORS["adam"], ls="--", label="Adam (tuned)")
                ax.axhspan(ad[metric].mean - ad[metric].std, ad[metric].mean + ad[metric].std,
                           color=COLORS["adam"], alpha=0.15)
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{v:g}" if isinstance(v, float) else str(v) for v in values], fontsize=7,
                               rotation=30)
            ax.set_title(f"{title}: {metric}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Mini-batch RevGN: one regulariser at a time (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- 2c

def study_width(out: str, seeds, tune_seeds, grid_size, smoke=False, cache=None, log=print,
                widths=(256, 1024, 4096), fashion_dir: str | None = None):
    from ..common.data import DEFAULT_DIRS

    cache = {} if cache is None else cache
    datasets = [("digits", dict(batch_size=128))]
    folder = fashion_dir or DEFAULT_DIRS["fashion-mnist"]
    have_fashion = os.path.isdir(folder) and any(f.startswith("train-images") for f in os.listdir(folder))
    if have_fashion and not smoke:
        datasets.append(("fashion-mnist", dict(batch_size=128, max_train=1024, max_test=1000, epochs=6,
                                               data_dir=fashion_dir)))
    if smoke:
        widths = (32, 64)
        datasets = [("synthetic", {})]
    results = {}
    for ds, kw in datasets:
        base = base_config(smoke, **({} if smoke else dict(dataset=ds, **kw)))
        for w in widths:
            for opt, lr in (("gn", 0.2), ("adam", 1e-3)):
                arm = Arm(f"width-{ds}-{w}-{opt}", replace(base, hidden=w, optimizer=opt, lr=lr),
                          label=f"{ds} M={w} {LABELS[opt]}")
                run_arms([arm], seeds, tune_seeds, grid_size, out, cache, log)
                results[(ds, w, opt)] = arm
    fig = width_figure(results, os.path.join(out, "width.png"))
    lines = ["## 2c. Width: generalisation and laziness against M", "",
             "Set-up: mini-batch 128 (at most M, so RevGN's step stays exact), RevMLP L = 2, each (dataset, M, "
             "optimizer) with its own rate tuned on the validation split. "
             + ("digits 10 epochs; Fashion-MNIST: first 1024 training and 1000 test images, 6 epochs."
                if have_fashion and not smoke else
                "Fashion-MNIST was not found (install the Debian package dataset-fashion-mnist); digits only."),
             "", arms_table(list(results.values()), ["test loss", "test acc", "gap", "NTK sim", "CKA first",
                                                       "CKA last", "ms / step"]),
             f"![width]({os.path.basename(fig)})", ""]
    for ds in dict.fromkeys(k[0] for k in results):
        for opt in ("gn", "adam"):
            arms = [results[(ds, w, opt)] for w in widths if results[(ds, w, opt)].runs]
            if len(arms) >= 2:
                first, last = arm_stats(arms[0]), arm_stats(arms[-1])
                lines.append(f"* {ds}, {LABELS[opt]}: from M = {arms[0].cfg.hidden} to M = {arms[-1].cfg.hidden} the "
                             f"gap goes {first['gap']} -> {last['gap']}, NTK similarity {first['NTK sim']} -> "
                             f"{last['NTK sim']}, last-block CKA {first.get('CKA last')} -> {last.get('CKA last')}.")
    return lines, list(results.values())


def width_figure(results: dict, path: str) -> str:
    plt = pyplot()
    datasets = list(dict.fromkeys(k[0] for k in results))
    metrics = ["gap", "test loss", "NTK sim", "CKA last"]
    fig, axes = plt.subplots(len(datasets), len(metrics), figsize=(3.4 * len(metrics), 3.0 * len(datasets)),
                             squeeze=False)
    for i, ds in enumerate(datasets):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            for opt in ("gn", "adam"):
                pts = [(w, arm_stats(a)[metric]) for (d, w, o), a in results.items() if d == ds and o == opt and a.runs]
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[p[1].std for p in pts],
                                marker="o", capsize=3, color=COLORS[opt], label=LABELS[opt])
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M")
            ax.set_title(f"{ds}: {metric}", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- 2d

def study_second_order(out: str, seeds, tune_seeds, grid_size, smoke=False, cache=None, log=print):
    base = base_config(smoke)
    cache = {} if cache is None else cache
    arms = [Arm("revmlp-gn", replace(base, optimizer="gn", lr=0.2), label="RevGN"),
            Arm("revmlp-lbfgs", replace(base, optimizer="lbfgs", lr=0.1), label="L-BFGS"),
            Arm("revmlp-shampoo", replace(base, optimizer="shampoo", lr=1e-3), label="Shampoo"),
            Arm("revmlp-soap", replace(base, optimizer="soap", lr=1e-3), label="SOAP"),
            Arm("revmlp-adam", replace(base, optimizer="adam", lr=1e-3), label="Adam"),
            Arm("revmlp-sgd", replace(base, optimizer="sgd", lr=0.1), label="SGD")]
    run_arms(arms, seeds, tune_seeds, grid_size, out, cache, log)
    fig = bar_figure(arms, ["test loss", "test acc", "gap", "ms / step"], os.path.join(out, "second_order.png"),
                     "Second-order and preconditioned methods on RevMLP (mini-batch)")
    lines = ["## 2d. Other second-order and preconditioned methods on the same RevMLP", "",
             f"Set-up: {describe(base)}. EGN on RevMLP is in 2a (its torch.func Gram costs about 0.4 s a step "
             "here, too slow for this study's full training set). L-BFGS: torch.optim.LBFGS, one iteration per batch, history 10, "
             "strong-Wolfe line search. Shampoo and SOAP: pytorch-optimizer with their defaults except the rate "
             "(SOAP's weight decay set to 0). K-FAC is not included: no maintained PyTorch K-FAC package "
             "installs here. Time per step is wall time of the training steps only (no evaluation), on this "
             "machine while other jobs ran, so compare ratios within the table.", "",
             arms_table(arms, ["train loss", "test loss", "test acc", "gap", "NTK sim", "ms / step"]),
             f"![second order]({os.path.basename(fig)})", ""]
    return lines, arms


STUDY_FUNCTIONS = {"generalization": study_generalization, "regularization": study_regularization,
                   "width": study_width, "second-order": study_second_order}


def run_studies(names, out: str, seeds=(0, 1, 2), tune_seeds=(0,), grid_size: int = 5, smoke: bool = False,
                command: str = "", log=print) -> str:
    """Run the named studies into ``out``; writes ``out/REPORT.md`` (one section per study) and
    returns its path."""
    os.makedirs(out, exist_ok=True)
    cache, sections, t0 = {}, [], time.perf_counter()
    for name in names:
        lines, arms = STUDY_FUNCTIONS[name](out, seeds, tune_seeds, grid_size, smoke=smoke, cache=cache, log=log)
        tuned = {a.name: a.tuning for a in arms if a.tuning}
        if tuned:
            lines += ["", "<details><summary>Tuning (final validation loss per rate)</summary>", ""]
            lines += tuning_markdown(tuned) + ["", "</details>", ""]
        sections += lines + [""]
    wall = time.perf_counter() - t0
    from ... import ops

    head = ["# RevGN open questions at CPU scale", ""]
    if command:
        head += [f"Command: `{command}`", ""]
    head += [f"Seeds {', '.join(map(str, seeds))} (every number is mean ± std over them); rates tuned on a "
             f"validation split of the training set (20%, never the test set) with seeds "
             f"{', '.join(map(str, tune_seeds))}, log grids of at least {grid_size} values. Kernels of this "
             f"invocation: {ops.backend()}; runs read back from --out keep the timings of the process that ran "
             f"them. Wall time {wall:.0f} s.", ""]
    path = os.path.join(out, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(head + sections) + "\n")
    return path
