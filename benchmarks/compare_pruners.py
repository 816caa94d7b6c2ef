"""Accuracy against FLOPs: network decoupling vs torch-pruning's own pruners (issue 7, item 2).

Everything starts from the same trained weights (default: the public CIFAR ResNet-20) and is
trained for the same ``--epochs`` E with the same trainer, optimiser, schedule, augmentation and
data order:

- **decoupling** at each ``--ratios`` R: ``decouple()`` for E epochs with the model's preset λs
  (overridable with ``--lambda-m/-k/-s``; ``--sites internal|all``). Its FLOPs are the *expected*
  (dynamic) FLOPs per input of the compact model (silent filters removed, dynamic ones gated, gate
  cost included); the static FLOPs after removal are recorded too.
- **torch-pruning** baselines, one per ``--pruners`` entry: ``l1`` = ``MagnitudeImportance(p=1)``,
  ``bn_scale`` = ``BNScaleImportance()``, ``group_norm`` = ``GroupMagnitudeImportance(p=2)`` (what
  1.6.1 has in place of ``GroupNormImportance``; ``MagnitudeImportance`` is its alias there, so
  ``l1`` is the group L1 norm), each with tp's standard ``BasePruner`` (= ``MetaPruner``), global
  pruning, one shot, the final linear layer ignored; ``taylor`` = ``GroupTaylorImportance()`` on the
  gradients of ``--taylor-batches`` training batches, one shot; ``group_sl`` = tp's sparse learning
  (its ``reproduce/main.py --method group_sl``): ``GroupNormPruner(reg=--sl-reg).regularize`` after
  every backward for ``--sl-epochs`` (default half the budget, no weight decay), then one-shot
  pruning by ``GroupMagnitudeImportance(p=2, normalizer="max")`` and fine-tuning for the rest of
  the budget. Every tp row records its classes and settings. For every FLOPs target -- the expected FLOPs
  each decoupling run reached, plus ``original / T`` for each ``--targets`` T (default 2) -- the
  global pruning ratio is bisected until the pruned model's static FLOPs (the same fvcore counter,
  ``nd_plugin.flops.count_flops``) are within ``--tol`` (2%) of the target; then the pruned model is
  fine-tuned for E epochs (wrapped, every gate forced open: exactly the plain model, exactly the
  trainer's settings, as the baseline in ``table_c.py``).
- **fine-tuned**: the unpruned model, E epochs, gates open.

Scope of the baselines (``--baseline-scope``): ``internal`` (default) lets tp prune the channels of
the internal gate sites only -- the same filters decoupling with ``--sites internal`` gates, i.e.
channels not tied to a residual addition. ``all`` is tp's unrestricted pruning (only the linear
layer ignored); it fails on the CIFAR ResNets, whose option-A shortcuts (``F.pad`` of channels) tp
cannot follow: it couples all residual stages as one group and the pruned model no longer runs.

Prints a markdown table (method, FLOPs, reduction, top-1) and, for the decoupling run nearest 2x
expected reduction, whether its top-1 is at least the best torch-pruning pruner's at the same
FLOPs (and at the fixed 2x target), by how much. Writes a JSON (environment: git commit, device,
versions, data spec, command; every row) and a figure, top-1 vs FLOPs reduction, next to it
(``<json>.png``).

Usage (GPU, CIFAR-10 JPEG copy extracted to /tmp/cifar10)::

    python benchmarks/compare_pruners.py --data imagefolder:/tmp/cifar10 --device cuda \\
        [--weights auto|PATH|none] [--epochs 2] [--ratios 0.7 0.5 0.35] [--targets 2] \\
        [--pruners l1 bn_scale group_norm] [--sites internal] [--out-dir DIR] [--json PATH]

Time: 3 decoupling runs + (3 pruners x 4 targets) fine-tunings + 1 baseline = 16 trainings of E
epochs, plus the data decoding (~1 min for the JPEG copy) and the FLOPs bisections (~5-10 s per
pruner and target, on the CPU). ResNet-20 on CIFAR-10 on an H100: 5-10 s per epoch, about 5-8 min
in all at E = 2 (measured with ``--targets`` empty, 13 trainings, batch 128, 6 workers: 172 s,
data decoding and bisections included). On a 2-core CPU an epoch takes ~2.5 min plain / ~5 min decoupled: the default
set is ~1.7 h at E = 2 and not practical; ``--epochs 1 --ratios 0.5 --pruners l1 --targets``
(one decoupling run, one pruner matched to it, the baseline) is ~10 min. Smoke test in seconds:
``--data synthetic:200 --epochs 1``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import nd_plugin
from _suite import Row, Suite, add_common_args, fmt_flops, log, markdown_table, parse_args, write_json
from _tp_baselines import (
    NEEDS_GRADIENTS,
    PRUNERS,
    SPARSE_LEARNING,
    finetune,
    match_flops,
    prunable_scope,
    sl_epochs,
    sparse_learning,
    taylor_gradients,
    tp_settings,
)
from nd_plugin.adapters import create_model
from nd_plugin.flops import count_flops
from nd_plugin.pruning import DecouplingImportance, apply_record, static_record
from nd_plugin.pruning.plan import plain_copy
from nd_plugin.run import open_run


@dataclass
class Result:
    """One point of the comparison (FLOPs per input; reduction = original / flops).

    Attributes:
        method: label for tables and the figure, e.g. ``decoupling R=0.5`` or ``tp L1``.
        family: ``decoupling``, ``fine-tuned`` or a key of :data:`PRUNERS`.
        flops: the FLOPs compared: expected (dynamic) for decoupling, static otherwise.
        static_flops: static FLOPs (decoupling: after removing silent filters).
        reduction: original / ``flops``.
        top1: validation top-1 after training.
        target: the FLOPs target (torch-pruning rows), else None.
        target_of: what set the target: a decoupling run's name or ``"<T>x"``.
        pruning_ratio: the bisected global pruning ratio (torch-pruning rows).
        matched: whether ``flops`` is within the tolerance of ``target``.
        seconds: wall time of training (and, for tp rows, the bisection).
        settings: the torch-pruning classes and settings (tp rows).
    """

    method: str
    family: str
    flops: float
    static_flops: float
    reduction: float
    top1: float
    target: float | None = None
    target_of: str | None = None
    pruning_ratio: float | None = None
    matched: bool | None = None
    seconds: float = 0.0
    settings: dict[str, Any] | None = None


def training_paths(row: Row, n: int, batch_size: int) -> tuple[nd_plugin.DecoupledModel, nd_plugin.PathStats]:
    """A decoupling run's model and its path statistics on ``n`` *training* images.

    The validation split stays unseen by the pruning decisions made from them.
    """
    run = open_run(row.run_dir)
    dm = run.build_model().eval()
    data = run.data()
    subset = torch.utils.data.Subset(data.train, range(min(n, len(data.train))))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size)
    return dm, dm.paths(loader, num_classes=data.num_classes)


def decoupled_importance(dm: nd_plugin.DecoupledModel, stats: nd_plugin.PathStats) -> tuple[nn.Module, DecouplingImportance]:
    """The plain network of a decoupling run and a :class:`DecouplingImportance` from its paths."""
    return dm.unwrapped().eval(), DecouplingImportance(stats)


def decoupled_static(dm: nd_plugin.DecoupledModel, stats: nd_plugin.PathStats, round_to: int = 1) -> nn.Module:
    """The run's own static compact network: every gate dropped, filters on for > half the inputs kept.

    Unlike ``decoupling_importance`` the kept set is the decoupled model's (no FLOPs matching) and
    the weights are its trained ones, norms included (:func:`nd_plugin.pruning.static_record`).
    """
    compact = apply_record(dm, static_record(dm, stats, round_to=round_to))
    return plain_copy(compact.model).train()


def reused_rows(paths: list[Path]) -> list[Result]:
    """The rows of earlier calls' results files (missing files are skipped), first file first, no duplicates.

    A row is the same measurement when its method, family, FLOPs, top-1 and pruning ratio agree: the
    label of the target it counts for may differ between files (:func:`claim_row` re-points it).
    """
    rows: list[Result] = []

    def key(r: Result) -> tuple:
        return (r.method, r.family, r.flops, r.top1, r.pruning_ratio)

    for path in paths:
        if not Path(path).is_file():
            continue
        found = [Result(**r) for r in json.loads(Path(path).read_text()).get("results", [])]
        new = [r for r in found if all(key(r) != key(o) for o in rows)]
        rows += new
        log(f"[compare_pruners] --reuse: {len(new)} rows from {path} kept, not rerun")
    return rows


def claim_row(
    results: list[Result], method: str, target_of: str | None, target: float | None, tol: float, names: list[str]
) -> Result | None:
    """The row of ``method`` for ``target_of``, if one exists; else a tp row within ``tol`` of ``target``, re-pointed.

    A row measured for another target (e.g. a fixed ``1.97x`` run beside this call) counts for
    ``target`` when its FLOPs are within ``tol`` of it, unless it already counts for one of this call's
    targets (``names``): one measurement never stands for two targets. The re-pointed row records the
    new target (matched, by construction) and the target it was bisected to (``settings``).

    Example:
        >>> row = Result("tp group SL", "group_sl", 20.3, 20.3, 2.0, 0.84, 20.3, "1.97x", 0.4, True, 1.0)
        >>> claim_row([row], "tp group SL", "decoupling R=0.5", 20.5, 0.02, ["decoupling R=0.5"]).target_of
          tp group SL: its row for 1.97x is within 2% of decoupling R=0.5's FLOPs and counts for it
        'decoupling R=0.5'
        >>> row.settings["bisected_to"], row.matched
        ('1.97x', True)
        >>> claim_row([row], "tp group SL", "2x", 20.0, 0.02, ["decoupling R=0.5", "2x"]) is None  # taken
        True
    """
    same = [r for r in results if r.method == method]
    for r in same:
        if target_of is None or r.target_of == target_of:
            return r
    if target is None:
        return None
    for r in same:
        if r.target is None or r.target_of in names or abs(r.flops / target - 1) > tol:
            continue
        log(f"  {method}: its row for {r.target_of} is within {tol:.0%} of {target_of}'s FLOPs and counts for it")
        r.settings = {**(r.settings or {}), "bisected_to": r.target_of, "bisected_target": r.target}
        r.target_of, r.target, r.matched = target_of, target, True  # within tol of the new target, checked above
        return r
    return None


def targets_from(runs: list[Row], original: float, factors: list[float], tol: float) -> list[tuple[str, float]]:
    """FLOPs targets: each decoupling run's expected FLOPs, then ``original / T``; near-duplicates dropped."""
    out: list[tuple[str, float]] = []
    candidates = [(r.name, float(r.flops_expected)) for r in runs if r.flops_expected] + [
        (f"{t:g}x", original / t) for t in factors
    ]
    for name, value in candidates:
        if all(abs(value / v - 1.0) > tol for _, v in out):
            out.append((name, value))
        else:
            log(f"  target {name} ({fmt_flops(value)}) within {tol:.0%} of an earlier one, skipped")
    return out


def table(results: list[Result]) -> str:
    """The markdown table: method, FLOPs, reduction, top-1 (and what a tp row was matched to)."""
    lines = [
        [
            r.method,
            fmt_flops(r.flops) + (" (exp.)" if r.family == "decoupling" else ""),
            fmt_flops(r.static_flops),
            f"{r.reduction:.2f}x",
            f"{100 * r.top1:.2f}",
            "" if r.target_of is None else f"{r.target_of}" + ("" if r.matched else " (NOT matched)"),
        ]
        for r in sorted(results, key=lambda r: (r.reduction, r.family))
    ]
    return markdown_table(["method", "FLOPs", "static FLOPs", "reduction", "top-1 %", "matched to"], lines)


def verdict(results: list[Result], factor: float = 2.0, tol: float = 0.02) -> dict[str, Any] | None:
    """Decoupling vs the best torch-pruning pruner near ``factor``x.

    Takes the decoupling run whose expected reduction is closest to ``factor`` and compares its
    top-1 with the best tp pruner matched to its FLOPs, and -- when it is within 15% of ``factor``
    -- with the best at the fixed ``factor``x target.
    """
    dec = [r for r in results if r.family == "decoupling"]
    tps = [r for r in results if r.family in PRUNERS]
    if not dec or not tps:
        return None
    near = min(dec, key=lambda r: abs(math.log(r.reduction / factor)))
    close = abs(math.log(near.reduction / factor)) <= math.log(1.15)
    out: dict[str, Any] = {"decoupling": near.method, "reduction": near.reduction, "top1": near.top1, "within_15pct": close}
    at_its_flops = [r for r in tps if r.target is not None and abs(r.target / near.flops - 1) <= tol]
    at_factor = [r for r in tps if r.target_of == f"{factor:g}x"] if close else []
    for key, rivals in (("at_its_flops", at_its_flops), (f"at_{factor:g}x", at_factor)):
        if rivals:
            best = max(rivals, key=lambda r: r.top1)
            out[key] = {
                "best_tp": best.method,
                "tp_reduction": best.reduction,
                "tp_top1": best.top1,
                "margin": near.top1 - best.top1,
                "decoupling_at_least_as_good": near.top1 >= best.top1,
            }
    return out


def verdicts(results: list[Result], margin: float = 0.005) -> list[dict[str, Any]]:
    """Per FLOPs target: the better of decoupling and ``decoupling_importance`` against the best tp pruner.

    A target is what the torch-pruning rows were matched to (a decoupling run's expected FLOPs or a
    fixed ``T``x); ``decoupling_importance`` and ``decoupling_static`` rows count there when their
    FLOPs are at most 2% above it. ``beats_by_margin`` says whether the better decoupled row is at least ``margin``
    (0.5 points) above the best tp row at that target.
    """
    out = []
    for of in dict.fromkeys(r.target_of for r in results if r.family in PRUNERS):
        tps = [r for r in results if r.family in PRUNERS and r.target_of == of]
        ours = [
            r
            for r in results
            if (r.family == "decoupling" and r.method == of)
            or (r.family in ("decoupling_importance", "decoupling_static") and r.target_of == of and r.flops <= r.target * 1.02)
        ]
        if not ours:
            continue
        best_tp, best = max(tps, key=lambda r: r.top1), max(ours, key=lambda r: r.top1)
        out.append(
            {
                "target_of": of,
                "reduction": best_tp.reduction,
                "best_tp": best_tp.method,
                "tp_top1": best_tp.top1,
                "best_decoupled": best.method,
                "decoupled_reduction": best.reduction,
                "decoupled_top1": best.top1,
                "margin": best.top1 - best_tp.top1,
                "beats_by_margin": best.top1 - best_tp.top1 >= margin,
            }
        )
    return out


def verdict_text(v: dict[str, Any] | None, factor: float = 2.0) -> str:
    """The verdict as lines for stdout."""
    if v is None:
        return "no decoupling run or no torch-pruning row: nothing to compare"
    lines = [f"~{factor:g}x: {v['decoupling']} reached {v['reduction']:.2f}x expected FLOPs reduction, top-1 {100 * v['top1']:.2f}%"]
    if not v["within_15pct"]:
        lines.append(f"  (no decoupling run is within 15% of {factor:g}x: try smaller --ratios or a larger --lambda-s)")
    for key, label in (("at_its_flops", "at its FLOPs"), (f"at_{factor:g}x", f"at the fixed {factor:g}x target")):
        if key in v:
            c = v[key]
            word = "at least as good as" if c["decoupling_at_least_as_good"] else "WORSE than"
            lines.append(
                f"  {label}: decoupling is {word} the best torch-pruning pruner ({c['best_tp']}, "
                f"{c['tp_reduction']:.2f}x, {100 * c['tp_top1']:.2f}%) by {100 * c['margin']:+.2f} points"
            )
    return "\n".join(lines)


def plot(results: list[Result] | list[dict[str, Any]]):
    """Top-1 against FLOPs reduction: one series per method family.

    Decoupling points are at their expected reduction (filled) with the static reduction after
    removing silent filters (hollow) joined to them; the fine-tuned unpruned model is a dashed line.

    Args:
        results: :class:`Result` objects or their dicts (as in the JSON).

    Returns:
        The matplotlib Figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = [r if isinstance(r, Result) else Result(**r) for r in results]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    markers = {"l1": "s", "bn_scale": "^", "group_norm": "D", "taylor": "v", "group_sl": "*"}
    for fam, (label, _) in PRUNERS.items():
        pts = sorted((r.reduction, 100 * r.top1) for r in rows if r.family == fam)
        if pts:
            ax.plot(*zip(*pts), marker=markers[fam], label=label, alpha=0.85)
    dec = sorted((r for r in rows if r.family == "decoupling"), key=lambda r: r.reduction)
    if dec:
        ax.plot([r.reduction for r in dec], [100 * r.top1 for r in dec], "o-", color="C3", lw=2, label="decoupling (expected)")
        for r in dec:
            static = r.reduction * r.flops / r.static_flops if r.static_flops else r.reduction  # original / static
            ax.plot([static, r.reduction], [100 * r.top1] * 2, ":", color="C3", lw=1)
            ax.plot([static], [100 * r.top1], "o", mfc="none", color="C3")
        ax.plot([], [], "o", mfc="none", color="C3", label="decoupling (static)")
    for fam, marker, color in (("decoupling_importance", "P", "C4"), ("decoupling_static", "X", "C5")):
        pts = sorted((r.reduction, 100 * r.top1) for r in rows if r.family == fam)
        if pts:
            ax.plot(*zip(*pts), marker=marker, ls="none", color=color, label=f"{fam} (static)")
    for r in rows:
        if r.family == "fine-tuned":
            ax.axhline(100 * r.top1, ls="--", color="gray", lw=1, label=f"fine-tuned, unpruned ({100 * r.top1:.1f}%)")
    ax.set_xlabel("FLOPs reduction (original / FLOPs per input)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Decoupling vs torch-pruning, same weights and epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument(
        "--ratios",
        type=float,
        nargs="*",
        default=[0.7, 0.5, 0.35],
        help="decoupling ratios R; none: only the tp rows at --targets (e.g. beside a decoupling call on another core)",
    )
    p.add_argument(
        "--rows-from",
        type=Path,
        nargs="*",
        default=[],
        metavar="JSON",
        help="with --reuse: also keep the rows of these results files (other calls' rows, e.g. tp rows run at a fixed "
        "--targets beside this call); a tp row counts for every target within --tol of its own",
    )
    p.add_argument("--pruners", nargs="*", choices=list(PRUNERS), default=list(PRUNERS), help="torch-pruning families")
    p.add_argument("--taylor-batches", type=int, default=10, help="taylor rows: training batches whose gradients score the channels")
    p.add_argument("--sl-epochs", type=int, default=None, help="group_sl rows: sparse-learning epochs of the budget (default: half)")
    p.add_argument("--sl-reg", type=float, default=5e-4, help="group_sl rows: GroupNormPruner's reg (tp's reproduce/main.py default 5e-4)")
    p.add_argument(
        "--targets", type=float, nargs="*", default=[2.0], help="fixed FLOPs reduction targets for tp, besides the decoupling runs' FLOPs"
    )
    p.add_argument("--tol", type=float, default=0.02, help="relative FLOPs tolerance of the matching (default 0.02)")
    p.add_argument("--baseline-scope", choices=("internal", "all"), default="internal", help="channels tp may prune")
    p.add_argument("--no-baseline", action="store_true", help="skip the unpruned fine-tuned run")
    p.add_argument(
        "--di-epochs",
        type=int,
        default=None,
        help="decoupling_importance rows: decoupling epochs before the static pruning (default: half of --epochs; "
        "the rest fine-tunes the pruned model, so the budget equals every other row's); 0 skips the family",
    )
    p.add_argument("--di-images", type=int, default=10_000, help="training images whose paths rank the filters")
    p.add_argument(
        "--static-rows",
        action="store_true",
        help="decoupling_static rows: after the same short decoupling run, its own static compact model "
        "(gates dropped, filters on for > half the training inputs kept), fine-tuned for the rest of the budget",
    )
    args = parse_args(p)
    if args.ratio is not None:
        p.error("use --ratios here")
    if not args.ratios and not args.targets:
        p.error("nothing to compare: pass --ratios (decoupling runs) or --targets (fixed tp targets), or both")
    if args.rows_from and not args.reuse:
        p.error("--rows-from keeps earlier rows: it needs --reuse")
    if missing := [str(f) for f in args.rows_from if not f.is_file()]:
        p.error(f"--rows-from: no such results file: {', '.join(missing)}")
    if "group_sl" in args.pruners and not 0 < sl_epochs(args) < args.epochs:
        p.error(f"--sl-epochs must leave fine-tuning epochs: 0 < {sl_epochs(args)} < --epochs {args.epochs}")
    suite = Suite(args, "compare_pruners")
    data = suite.data
    started = time.perf_counter()

    plain = create_model(args.model, num_classes=data.num_classes, checkpoint=suite.weights).eval()
    original = count_flops(plain, data.input_size)
    log(f"[compare_pruners] {args.model}: {fmt_flops(original)} FLOPs per input")
    results: list[Result] = []
    if args.reuse:  # rows measured by earlier calls with these options
        results = reused_rows([suite.json_path, *args.rows_from])
    targets: list[tuple[str, float]] = []  # the tp rows' FLOPs targets, known after the decoupling runs

    def done(method: str, target_of: str | None = None, target: float | None = None) -> bool:
        return claim_row(results, method, target_of, target, args.tol, names=[of for of, _ in targets]) is not None

    def save() -> None:
        payload = {
            "environment": suite.env
            | {"torch_pruning": importlib.metadata.version("torch-pruning"), "elapsed_s": time.perf_counter() - started},
            "options": vars(args),
            "original_flops": original,
            "results": [asdict(r) for r in results],
            "decoupling_runs": [asdict(r) for r in suite.rows],
            "verdict_2x": verdict(results, tol=args.tol),
            "verdicts": verdicts(results),
        }
        write_json(suite.json_path, payload)

    if not args.no_baseline and not done("fine-tuned (unpruned)"):
        log("fine-tuned, unpruned:")
        t = time.perf_counter()
        top1, _ = finetune(copy.deepcopy(plain), suite, args.progress)
        results.append(Result("fine-tuned (unpruned)", "fine-tuned", original, original, 1.0, top1, seconds=time.perf_counter() - t))
        log(f"  top-1 {top1:.4f}")
        save()

    log("decoupling:")
    runs = []
    for ratio in args.ratios:
        row = suite.run(f"decoupling R={ratio:g}", ratio=ratio, sites=args.sites)
        runs.append(row)
        if done(row.name):
            continue
        results.append(
            Result(
                row.name,
                "decoupling",
                float(row.flops_expected),
                float(row.flops_static),
                original / float(row.flops_expected),
                row.top1,
                seconds=row.seconds,
            )
        )
        if row.flops_original and abs(row.flops_original / original - 1) > 1e-6:
            log(f"  note: the run counts {fmt_flops(row.flops_original)} original FLOPs, the plain model {fmt_flops(original)}")
        save()

    targets[:] = targets_from(runs, original, args.targets, args.tol)
    example = torch.zeros(1, *data.input_size)
    scope = prunable_scope(plain, example, args.baseline_scope)
    for key in args.pruners:
        label, make = PRUNERS[key]
        todo = [(of, target) for of, target in targets if not done(label, of, target)]
        if not todo:
            continue
        source, budget, t_source = plain, None, time.perf_counter()
        if key in NEEDS_GRADIENTS:
            source = taylor_gradients(plain, suite, args.taylor_batches)
        if key in SPARSE_LEARNING:  # one regularised model, pruned to every target
            log(f"{label}: {sl_epochs(args)} sparse-learning epochs (reg {args.sl_reg:g}) ...")
            source, sl_top1 = sparse_learning(plain, suite, sl_epochs(args), scope, args.sl_reg, args.progress)
            budget = args.epochs - sl_epochs(args)
            log(f"  after sparse learning: top-1 {sl_top1:.4f}")
        t_source = time.perf_counter() - t_source
        for of, target in todo:
            t = time.perf_counter() - t_source  # every row's seconds include the whole source time (gradients, sparse learning), not a share
            pruned, ratio, flops = match_flops(source, make(), target, data.input_size, scope=scope, tol=args.tol)
            matched = abs(flops / target - 1) <= args.tol
            log(
                f"{label} -> {of}: target {fmt_flops(target)}, ratio {ratio:.3f} gives {fmt_flops(flops)} "
                f"({flops / target - 1:+.1%}{'' if matched else ', NOT within tolerance'}); fine-tuning ..."
            )
            top1, _ = finetune(pruned, suite, args.progress, epochs=budget)
            results.append(
                Result(
                    label, key, flops, flops, original / flops, top1, target, of, ratio, matched, time.perf_counter() - t,
                    settings=tp_settings(key, args),
                )
            )
            log(f"  top-1 {top1:.4f}")
            save()

    di_epochs = args.epochs // 2 if args.di_epochs is None else args.di_epochs
    if 0 < di_epochs < args.epochs:
        log(f"decoupling_importance: {di_epochs} decoupling + {args.epochs - di_epochs} fine-tuning epochs")
        for ratio, full in zip(args.ratios, runs):
            di_name, static_name = f"decoupling_importance R={ratio:g}", f"decoupling_static R={ratio:g}"
            want_di, want_static = not done(di_name), args.static_rows and not done(static_name)
            if not (want_di or want_static):
                continue
            short = suite.run(f"decoupling R={ratio:g} ({di_epochs} ep, for importance)", ratio=ratio, sites=args.sites, epochs=di_epochs)
            dm_short, train_stats = training_paths(short, args.di_images, args.batch_size)
            # the FLOPs that this ratio's full decoupling run reached (or the nearest target kept)
            of, target = min(targets, key=lambda t: abs(math.log(t[1] / float(full.flops_expected))))
            def fine_tuned(
                name: str, family: str, model: nn.Module, flops: int, pr: float | None, matched: bool, t: float,
                target: float = target, of: str = of,
            ) -> None:
                top1, _ = finetune(model, suite, args.progress, epochs=args.epochs - di_epochs)
                results.append(Result(name, family, flops, flops, original / flops, top1, target, of, pr, matched, time.perf_counter() - t))
                log(f"  top-1 {top1:.4f}")
                save()

            if want_di:
                t = time.perf_counter()
                network, importance = decoupled_importance(dm_short, train_stats)
                pruned, pr, flops = match_flops(network, importance, target, data.input_size, scope=scope, tol=args.tol)
                log(f"  R={ratio:g} -> {of}: ratio {pr:.3f} gives {fmt_flops(flops)} ({flops / target - 1:+.1%}); fine-tuning ...")
                fine_tuned(di_name, "decoupling_importance", pruned, flops, pr, abs(flops / target - 1) <= args.tol, t)
            if want_static:
                t = time.perf_counter()
                static = decoupled_static(dm_short, train_stats)
                flops = count_flops(static, data.input_size)
                log(f"  {static_name}: its own static model, {fmt_flops(flops)} ({flops / target - 1:+.1%} of {of}); fine-tuning ...")
                fine_tuned(static_name, "decoupling_static", static, flops, None, flops <= target * (1 + args.tol), t)

    save()
    print()
    print(table(results))
    print()
    print(verdict_text(verdict(results, tol=args.tol)))
    for v in verdicts(results):
        print(
            f"at {v['target_of']} ({v['reduction']:.2f}x): best decoupled {v['best_decoupled']} {100 * v['decoupled_top1']:.2f}% "
            f"vs {v['best_tp']} {100 * v['tp_top1']:.2f}%: {100 * v['margin']:+.2f} points"
        )
    fig = plot(results)
    figure = suite.json_path.with_suffix(".png")
    fig.savefig(figure, dpi=150)
    log(f"\nresults: {suite.json_path}\nfigure: {figure}")


if __name__ == "__main__":
    main()
