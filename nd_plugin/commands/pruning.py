"""``nd prune``: prune a run's model, decide per layer what to skip at run time, measure, export.

:func:`prune_run` reads ``checkpoint.pt`` and ``paths.npz``, and

1. checks the exact compact model (silent filters removed, energetic gates dropped) against the
   gated one, so statistics from another checkpoint are caught;
2. decides per gated layer, by measured batch-1 cost, whether the eager runtime keeps its gate
   (:func:`~nd_plugin.pruning.deploy.plan_deployment`), and builds the static compact model for the
   engines that cannot skip per input (``static_match``: about the gated FLOPs, or the gated top-1);
3. measures accuracy, FLOPs, and dense vs compact latency in every requested engine, side by side,
   each engine as deployed: ONNX Runtime in a process of its own, at the requested threads
   (spinning on and off) and at 1 thread (:func:`engine_latency`);
4. measures the *dynamic value* on the whole validation split: the gated model's top-1 minus that
   of the static network with the same FLOPs (:func:`~nd_plugin.pruning.dynamic_value`);
5. exports (optionally) and writes ``RUN/prune.json``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from nd_plugin.errors import ConfigError, ExportError
from nd_plugin.files import atomic_write_json
from nd_plugin.paths import check_tolerance
from nd_plugin.pruning.engines import (
    check_engines,
    check_spinning,
    check_threads,
    engine_runner,
    onnx_latency,
    onnx_settings,
    side_by_side,
)
from nd_plugin.run import PRUNE, open_run
from nd_plugin.utilities import accuracy

__all__ = ["STATIC_MATCHES", "check_static_match", "engine_latency", "prune_run", "spread_batches"]


STATIC_MATCHES = ("frequency", "accuracy")


def check_static_match(static_match: str) -> str:
    """Returns ``static_match``, or raises ConfigError unless it is one of :data:`STATIC_MATCHES`.

    Example:
        >>> check_static_match("accuracy")
        'accuracy'
    """
    if static_match not in STATIC_MATCHES:
        raise ConfigError(
            f"static_match must be one of {', '.join(STATIC_MATCHES)}, got {static_match!r}.", params=("static_match",)
        )
    return static_match


def spread_batches(dataset: torch.utils.data.Dataset, n: int, batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` items spread evenly over ``dataset`` (image folders are sorted by class), in batches."""
    total = len(dataset)
    index = torch.linspace(0, total - 1, min(n, total)).round().long().unique().tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, index), batch_size=batch_size, shuffle=False)
    return [(x, y) for x, y in loader]


def engine_latency(
    dense: torch.nn.Module,
    forms: dict[str, torch.nn.Module],
    inputs: torch.Tensor,
    *,
    batch_sizes: Sequence[int] = (1,),
    repeats: int = 10,
    threads: int | None = None,
    onnx_spinning: str = "auto",
    static: torch.nn.Module | None = None,
) -> dict[str, dict[str, Any]]:
    """Dense vs compact latency per engine and batch size, each engine timed as deployed (median ms).

    Within an engine the dense and the compact model are called in turn on the same inputs.
    ``eager``, ``compile`` and ``aoti`` run in this process with ``threads`` torch threads.
    ``onnx`` runs in a process of its own (:func:`~nd_plugin.pruning.engines.onnx_latency`), once
    per setting of :func:`~nd_plugin.pruning.engines.onnx_settings`: ``threads`` intra-op threads
    with idle workers spinning or not, and 1 thread. Its row holds the ``threads`` setting
    (``onnx_spinning="auto"``: the spinning under which the compact model ran faster), every
    setting under ``measured`` and the one fastest for the compact model under ``fastest``.

    Args:
        dense: the original network (norms folded, like the compact forms).
        forms: engine -> the compact module that engine runs.
        inputs: real inputs; batch ``b`` uses consecutive slices of ``b``.
        batch_sizes: batch sizes to time.
        repeats: timed calls per model and setting.
        threads: torch threads and ONNX Runtime's intra-op threads (None: torch's setting).
        onnx_spinning: ``auto``, ``on`` or ``off`` (ONNX Runtime's idle workers spinning).
        static: the static compact model (norms folded), timed in eager torch beside the eager
            form (the dynamic runtime), in turn with it and the dense model.

    Returns:
        ``"engine/bB"`` -> ``{"engine", "batch", "dense_ms", "compact_ms", "speedup", "settings"}``
        (``settings``: ``threads``, ``spinning``, ``process``; ``onnx`` adds ``measured`` and ``fastest``;
        ``eager`` with ``static`` adds ``static_ms`` and ``vs_static``, the static model's time over
        the eager form's).

    Raises:
        ConfigError: ``threads`` not a positive integer, ``onnx_spinning`` not auto, on or off.
    """
    threads = check_threads(threads)
    onnx_spinning = check_spinning(onnx_spinning)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()
        out: dict[str, dict[str, Any]] = {}
        for engine, compact in forms.items():
            for b in batch_sizes:
                xs = [inputs[i : i + b] for i in range(0, max(len(inputs) - b, 0) + 1, max(b, 1))][:8]
                if engine == "onnx":
                    grid = onnx_settings(used, onnx_spinning)
                    measured = onnx_latency({"dense": dense, "compact": compact}, xs, grid, repeats)
                    rows = [_timing(m["ms"], {k: m[k] for k in ("threads", "spinning", "pool", "process")}) for m in measured]
                    asked = min((r for r in rows if r["threads"] == used), key=lambda r: r["compact_ms"])
                    fastest = min(rows, key=lambda r: r["compact_ms"])
                    row = {**_setting_row(asked), "measured": rows, "fastest": fastest}
                    row["settings"]["onnx_spinning"] = onnx_spinning
                else:
                    fns = {
                        "dense": engine_runner(engine, dense, xs[0], threads),
                        "compact": engine_runner(engine, compact, xs[0], threads),
                    }
                    if engine == "eager" and static is not None:
                        fns["static"] = engine_runner(engine, static, xs[0], threads)
                    ms = side_by_side(fns, xs, repeats)
                    row = _setting_row(_timing(ms, {"threads": used, "process": "caller"}))
                    if "static" in ms:
                        row.update(static_ms=ms["static"], vs_static=ms["static"] / ms["compact"])
                out[f"{engine}/b{b}"] = {"engine": engine, "batch": b, **row}
        return out
    finally:
        torch.set_num_threads(previous)


def _timing(ms: dict[str, float], settings: dict[str, Any]) -> dict[str, Any]:
    """One setting's medians: ``{**settings, "dense_ms", "compact_ms", "speedup"}``."""
    return {**settings, "dense_ms": ms["dense"], "compact_ms": ms["compact"], "speedup": ms["dense"] / ms["compact"]}


def _setting_row(timing: dict[str, Any]) -> dict[str, Any]:
    """A table row from one setting's medians: the times at the top, the setting under ``settings``."""
    times = ("dense_ms", "compact_ms", "speedup")
    return {**{k: timing[k] for k in times}, "settings": {k: v for k, v in timing.items() if k not in times}}


def prune_run(
    run_dir: str | os.PathLike,
    export_dir: str | os.PathLike | None = None,
    *,
    tolerance: float = 0.0,
    force: bool = False,
    check_inputs: int = 64,
    latency_repeats: int = 10,
    threads: int | None = None,
    engines: Sequence[str] = ("eager", "onnx"),
    round_to: int = 8,
    keep_gates: bool = False,
    accuracy_inputs: int = 2000,
    onnx_spinning: str = "auto",
    static_match: str = "frequency",
    match_tolerance: float = 0.003,
) -> dict[str, Any]:
    """``nd prune``: prunes a run's model with its path statistics, measures it, optionally exports.

    Args:
        run_dir: a run directory with ``checkpoint.pt`` and ``paths.npz``.
        export_dir: where to export (None: measure only, write ``RUN/prune.json``).
        tolerance: see :func:`nd_plugin.prune`, in ``[0, 0.5)``.
        force: replace a non-empty ``export_dir``.
        check_inputs: validation inputs used for the equality and export checks and the timing.
        latency_repeats: calls per model for the median latency.
        threads: CPU threads for the decision and the latency (None: leave as is); ONNX Runtime
            is timed with this many intra-op threads and with 1 (:func:`engine_latency`).
        engines: engines to measure and export for (``eager``, ``onnx``/``ort``, ``compile``,
            ``aoti``: AOTInductor, compiled at export, minutes on a small CPU).
        round_to: channel block of the static layers; 8 (the default) or 16 suit oneDNN and ONNX
            Runtime (timed as deployed, a compact ResNet-20 rounded to 1 ran 0.82-0.97x dense in
            ONNX Runtime, rounded to 8 1.14-1.35x; docs/benchmarks.md, Issue 14); 1 keeps the
            exact filter counts.
        keep_gates: keep every dynamic layer's gate (skip the per-layer decision).
        accuracy_inputs: validation images for the accuracy of each form (the dynamic value uses
            the whole validation split).
        onnx_spinning: ONNX Runtime's idle workers spinning (``on``, ``off``) or ``auto``: both
            timed, the row shows the faster for the compact model.
        static_match: the static compact model (every gate dropped) that each gate is timed
            against, that the engines which cannot skip get, and that the eager runtime is timed
            beside: ``frequency``, the filters on for more than half of the inputs (about the
            gated model's FLOPs), or ``accuracy``, the fewest filters whose top-1 on the
            ``accuracy_inputs`` is within ``match_tolerance`` of the gated model's
            (:func:`~nd_plugin.pruning.match_accuracy`): a gate is kept only where it beats the
            static layers that do as well.
        match_tolerance: top-1 the ``accuracy`` static model may lose, a fraction in ``[0, 1)``;
            also what a gate dropped for speed may cost: a layer goes static only if the model
            stays within it of the gated top-1 on the ``accuracy_inputs`` (``plan_deployment``'s
            ``guard``), so a network that needs its paths keeps its gates.

    Returns:
        The content of ``prune.json`` (also written to ``RUN/prune.json``).

    Raises:
        ConfigError: tolerance outside ``[0, 0.5)``, a bad ``round_to``, an unknown engine,
            ``threads`` not a positive integer, ``onnx_spinning`` not auto, on or off,
            ``static_match`` not frequency or accuracy, ``match_tolerance`` outside ``[0, 1)``.
        RunDirError: no run, no checkpoint, or no ``paths.npz`` (the message says how to make it).
        ExportError: an engine is not installed; ``export_dir`` not empty without ``force``; a
            check failed (nothing is written).
    """
    from nd_plugin.flops import count_flops, expected_flops
    from nd_plugin.pruning import apply_record, check_round_to, dynamic_runtime, dynamic_value, fold_batchnorm, prune
    from nd_plugin.pruning.deploy import plan_deployment
    from nd_plugin.pruning.export import agreement, check_export_dir, export
    from nd_plugin.pruning.plan import analyse, plain_copy
    from nd_plugin.pruning.static_match import check_match_tolerance, match_accuracy
    from nd_plugin.pruning.value import StaticFlops
    from nd_plugin.training.optim import gate_parameters

    tolerance = check_tolerance(tolerance)
    round_to = check_round_to(round_to)
    engines = check_engines(engines)
    threads = check_threads(threads)
    onnx_spinning = check_spinning(onnx_spinning)
    static_match = check_static_match(static_match)
    match_tolerance = check_match_tolerance(match_tolerance)
    if export_dir is not None:
        check_export_dir(export_dir, force)
    run = open_run(run_dir)
    stats = run.stats()
    cfg = run.config
    dm = run.build_model()
    # torch-pruning traces each network once (wrap() above traced the model it wrapped): the gated
    # network, whose graph decides and removes the filters of every record (each applied to a
    # copy), and its gate-free twin, whose plan (consumers, foldable norms) serves every compact
    # model, the dense baseline and the FLOPs counts.
    dg = dm.dependency_graph()
    net = analyse(dm.model, dm.site_names, dm.input_size)
    exact = prune(dm, stats, tolerance, dg=dg)
    data = run.data()
    batches = spread_batches(data.val, max(accuracy_inputs, check_inputs))
    inputs = torch.cat([x for x, _ in batches])[:check_inputs]
    with torch.no_grad():
        gated = dm(inputs)
        equality = {"format": "compact vs gated", **agreement(gated, exact(inputs), strict=tolerance == 0.0)}
    if not equality["ok"]:
        raise ExportError(
            f"the compact model differs from the gated model on validation inputs (max rel. error "
            f"{equality['max_rel_err']:.2e}); were paths.npz collected with this checkpoint? Rerun `nd analyze {run.path}`."
        )
    gated_top1 = accuracy(dm, batches)  # once: the match, the guard and prune.json use it
    match = None
    if static_match == "accuracy":
        match = match_accuracy(
            dm, stats, batches, match_tolerance=match_tolerance, round_to=round_to, gated_top1=gated_top1, dg=dg
        )
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        margin = -math.inf if keep_gates else 0.0
        plan = plan_deployment(
            dm,
            stats,
            inputs[:8],
            tolerance=tolerance,
            round_to=round_to,
            repeats=latency_repeats,
            margin=margin,
            dg=dg,
            plan=net,
            static=match.record if match is not None else None,
            guard=batches,
            match_tolerance=match_tolerance,
            gated_top1=gated_top1,
        )
    finally:
        torch.set_num_threads(previous)
    compact = apply_record(dm, plan.record, dg=dg)
    static = apply_record(dm, plan.static, dg=dg)
    with dm.gates_open():
        original_flops = count_flops(dm, dm.input_size)
    exp_exact, exp_eager = expected_flops(exact, stats, plan=net), expected_flops(compact, stats, plan=net)
    static_flops = count_flops(static, static.input_size)
    dense = fold_batchnorm(plain_copy(dm.model), inputs[:1], inplace=True, norms=net.norms)
    forms = {"eager": dynamic_runtime(compact, plan=net)}
    static_plain = fold_batchnorm(plain_copy(static.model), inputs[:1], norms=net.norms)
    forms.update({e: static_plain for e in engines if e != "eager"})
    forms = {e: forms[e] for e in engines}
    latency = engine_latency(
        dense, forms, inputs, repeats=latency_repeats, threads=threads, onnx_spinning=onnx_spinning, static=static_plain
    )
    # the gated model (tolerance 0: the exact compact model's expected FLOPs) against the static
    # network of the same FLOPs, on the whole validation split
    gated_flops = exp_exact if tolerance == 0.0 else expected_flops(prune(dm, stats, dg=dg), stats, plan=net)
    value = dynamic_value(
        dm,
        stats,
        data.loader("val", batch_size=256, shuffle=False),
        gated_flops=gated_flops.total,
        counter=StaticFlops(dm, plan=net),
    )
    orig_params = sum(p.numel() for p in dm.parameters()) - sum(p.numel() for p in gate_parameters(dm))
    eager_key = "eager/b1"
    result: dict[str, Any] = {
        "run": str(run.path),
        "tolerance": tolerance,
        "round_to": round_to,
        "filters": compact.record.summary(),
        "equality": equality,
        "accuracy": {
            "inputs": sum(len(y) for _, y in batches),
            "gated": gated_top1,
            "eager": accuracy(compact, batches),
            "static": accuracy(static, batches),
        },
        "params": {
            "original": orig_params,
            "compact": sum(p.numel() for p in compact.parameters()),
            "static": sum(p.numel() for p in static.parameters()),
        },
        "flops": {
            "original": original_flops,
            "compact_static": exp_eager.static,
            "compact_expected": exp_eager.total,
            "exact_expected": exp_exact.total,
            "static_model": static_flops,
            "independence_assumed": exp_eager.independence_assumed,
            "expected_reduction": original_flops / max(exp_eager.total, 1e-9),
            "static_reduction": original_flops / max(static_flops, 1e-9),
        },
        "dynamic_value": value.to_dict(),
        "static_match": {
            "by": static_match,
            **(match.to_dict() if match is not None else {"threshold": 0.5, "tolerance": match_tolerance}),
        },
        "deployment": plan.to_dict(),
        "engines": latency,
        "latency_ms": {
            "threads": threads or torch.get_num_threads(),
            "repeats": latency_repeats,
            **(
                {
                    "original": latency[eager_key]["dense_ms"],
                    "compact_dynamic": latency[eager_key]["compact_ms"],
                    "speedup": latency[eager_key]["speedup"],
                }
                if eager_key in latency
                else {}
            ),
        },
    }
    if export_dir is not None:
        spec = {
            "name": cfg["model"],
            "num_classes": cfg["num_classes"],
            "input_size": list(cfg["input_size"]),
            "noise_std": cfg.get("noise_std", 1.0),
        }
        formats = ("weights", "pt2") + tuple(e for e in ("onnx", "aoti") if e in engines)
        result = export(compact, export_dir, inputs, static=static, model_spec=spec, extra=result, force=force, formats=formats)
        result["export"] = str(export_dir)
    atomic_write_json(run.path / PRUNE, result)
    return result
