"""``nd prune``: remove silent filters, decide per layer which gates pay, measure every engine, export.

Thin: :func:`nd_plugin.commands.pruning.prune_run` does the work. Register with
``app.command("prune")(user_errors(prune_command))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["prune_command", "print_dynamic_value", "print_prune_table", "settings_note", "static_note"]


def print_prune_table(result: dict[str, Any]) -> None:
    """Prints params, static FLOPs, expected FLOPs and batch-1 latency, original vs compact."""
    from rich.console import Console
    from rich.table import Table

    from nd_plugin.flops import format_si as _si

    flops, params, lat = result["flops"], result["params"], result["latency_ms"]
    table = Table(title=f"nd prune {result['run']} (tolerance {result['tolerance']})")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("compact", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("params", _si(params["original"]), _si(params["compact"]), f"{params['original'] / params['compact']:.2f}x")
    table.add_row(
        "static FLOPs",
        _si(flops["original"]),
        _si(flops["compact_static"]),
        f"{flops['original'] / flops['compact_static']:.2f}x",
    )
    note = " (indep.)" if flops.get("independence_assumed") else ""
    table.add_row(
        "expected FLOPs", _si(flops["original"]), _si(flops["compact_expected"]) + note, f"{flops['expected_reduction']:.2f}x"
    )
    table.add_row(
        f"batch-1 latency ({lat['threads']} threads)",
        f"{lat['original']:.2f} ms",
        f"{lat['compact_dynamic']:.2f} ms",
        f"{lat['speedup']:.2f}x",
    )
    f = result["filters"]
    caption = f"filters: {f['removed']} removed, {f['static']} static, {f['dynamic']} dynamic of {f['filters']}"
    if "checks" in result:
        caption += "; export checks: " + ", ".join(f"{c['format']} {'ok' if c['ok'] else 'FAILED'}" for c in result["checks"])
    table.caption = caption
    console = Console()
    console.print(table)
    print_decisions(result, console)
    print_engines(result, console)
    print_dynamic_value(result, console)


def print_dynamic_value(result: dict[str, Any], console: Any) -> None:
    """One line: gated top-1 minus the top-1 of the static network of the same FLOPs, and the dynamic share."""
    from nd_plugin.pruning.value import describe

    if "dynamic_value" in result:
        console.print(
            "dynamic value (gated minus static top-1 at the same FLOPs, whole validation split): "
            + describe(result["dynamic_value"]),
            highlight=False,
        )


def print_decisions(result: dict[str, Any], console: Any) -> None:
    """Per gated layer: dynamic or static in the eager runtime, and the measured reason."""
    from rich.table import Table

    decisions = result.get("deployment", {}).get("decisions", [])
    if not decisions:
        return
    table = Table(title=f"per-layer decision (batch 1, {result['deployment'].get('threads')} threads)")
    for col in ("layer", "runs", "filters", "why"):
        table.add_column(col)
    for d in decisions:
        kept = d["kept_dynamic"] if d["mode"] == "dynamic" else d["kept_static"]
        table.add_row(d["site"], d["mode"], str(kept), d["reason"])
    dep = result["deployment"]
    if dep.get("gated_top1") is not None:
        points = 100 * dep.get("match_tolerance", 0.003)
        table.caption = (
            f"a gate is dropped only if top-1 stays within {points:g} points of the gated {dep['gated_top1']:.2%} "
            f"on {dep['guard_inputs']} validation images: {dep['top1']:.2%} as decided"
        )
    console.print(table)


def print_engines(result: dict[str, Any], console: Any) -> None:
    """Dense vs compact latency in each engine measured, and the accuracy of each form."""
    from rich.table import Table

    engines = result.get("engines", {})
    if not engines:
        return
    from nd_plugin.pruning.engines import describe_settings

    acc = result.get("accuracy", {})
    lat = result["latency_ms"]
    table = Table(title=f"dense vs compact per engine (medians of {lat.get('repeats')} alternating calls)")
    for col in ("engine", "batch", "timed with", "form", "dense", "compact", "speed-up", "top-1"):
        table.add_column(col, justify="left" if col in ("engine", "timed with", "form") else "right")
    notes = []
    for row in engines.values():
        form = "dynamic runtime" if row["engine"] == "eager" else "static compact"
        top1 = acc.get("eager" if row["engine"] == "eager" else "static")
        settings = row.get("settings") or {"threads": lat.get("threads")}  # a prune.json from before the settings
        table.add_row(
            row["engine"],
            str(row["batch"]),
            describe_settings(settings),
            form,
            f"{row['dense_ms']:.2f} ms",
            f"{row['compact_ms']:.2f} ms",
            f"{row['speedup']:.2f}x",
            f"{top1:.2%}" if top1 is not None else "",
        )
        if row.get("measured"):
            notes.append(settings_note(row))
    if "gated" in acc:
        notes.append(f"gated model top-1 {acc['gated']:.2%} on {acc['inputs']} validation images")
    notes.extend(static_note(row, result) for row in engines.values() if "static_ms" in row)
    table.caption = "\n".join(notes) or None
    console.print(table)


def static_note(row: dict[str, Any], result: dict[str, Any]) -> str:
    """One line: the eager runtime against the static compact model in the same engine, and how that one was chosen.

    Example:
        >>> row = {"engine": "eager", "batch": 1, "compact_ms": 2.0, "static_ms": 2.5, "vs_static": 1.25}
        >>> static_note(row, {"accuracy": {"static": 0.9}, "static_match": {"by": "accuracy", "matched": True}})
        'eager b1: dynamic runtime 2.00 ms vs static compact 2.50 ms (1.25x; static top-1 90.00%, the gated top-1 matched)'
    """
    how = result.get("static_match", {})
    if how.get("by") == "accuracy":
        chosen = "the gated top-1 matched" if how.get("matched") else "the best static model scanned, gated top-1 not matched"
    else:
        chosen = "filters on for more than half the inputs"
    top1 = result.get("accuracy", {}).get("static")
    acc = f"static top-1 {top1:.2%}, " if top1 is not None else ""
    return (
        f"{row['engine']} b{row['batch']}: dynamic runtime {row['compact_ms']:.2f} ms vs static compact "
        f"{row['static_ms']:.2f} ms ({row['vs_static']:.2f}x; {acc}{chosen})"
    )


def settings_note(row: dict[str, Any]) -> str:
    """One line: the compact model's latency in each setting measured, and the fastest.

    Example:
        >>> row = {"engine": "onnx", "batch": 1, "measured": [
        ...     {"threads": 2, "spinning": True, "dense_ms": 0.6, "compact_ms": 0.4, "speedup": 1.5},
        ...     {"threads": 1, "spinning": None, "dense_ms": 0.5, "compact_ms": 0.35, "speedup": 1.43}]}
        >>> row["fastest"] = row["measured"][1]
        >>> settings_note(row)
        'onnx b1, compact model per setting: 2 threads, spinning: 0.40 ms; 1 thread: 0.35 ms. Fastest: 1 thread (dense 0.50 ms, 1.43x)'
    """
    from nd_plugin.pruning.engines import describe_settings

    def words(m: dict[str, Any]) -> str:
        return describe_settings({"threads": m["threads"], "spinning": m["spinning"]})

    each = "; ".join(f"{words(m)}: {m['compact_ms']:.2f} ms" for m in row["measured"])
    best = row["fastest"]
    return (
        f"{row['engine']} b{row['batch']}, compact model per setting: {each}. "
        f"Fastest: {words(best)} (dense {best['dense_ms']:.2f} ms, {best['speedup']:.2f}x)"
    )


def prune_command(
    run: Annotated[Path, typer.Argument(help="run directory written by `nd decouple` (needs checkpoint.pt and paths.npz)")],
    export: Annotated[
        Path | None,
        typer.Option("--export", help="write the compact model here: weights + manifest, model.pt2, model.onnx, prune.json"),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            help="a filter on for at most this fraction of inputs is silent (removed), for at least 1 - it energetic (gate dropped); in [0, 0.5)"
        ),
    ] = 0.0,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="comma-separated engines to measure and export for: eager, onnx (ort), compile, aoti (AOTInductor: minutes to compile)",
        ),
    ] = "eager,onnx",
    round_to: Annotated[int, typer.Option(help="channel block of static layers (8, the default, or 16 suit oneDNN and ONNX Runtime; 1: exact counts)")] = 8,
    keep_gates: Annotated[bool, typer.Option("--keep-gates", help="keep every dynamic gate (no per-layer decision)")] = False,
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty --export directory")] = False,
    check_inputs: Annotated[int, typer.Option(help="validation inputs used to check the compact and exported models")] = 64,
    repeats: Annotated[int, typer.Option(help="batch-1 calls per model for the median latency")] = 10,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for the latency measurement (ONNX Runtime: timed with these and with 1)")
    ] = None,
    onnx_spinning: Annotated[
        str,
        typer.Option(help="ONNX Runtime's idle workers spinning: on, off, or auto (both timed, the row shows the faster)"),
    ] = "auto",
    static_match: Annotated[
        str,
        typer.Option(
            help="the static model each gate must beat, ONNX gets and eager is timed beside: frequency (filters on for "
            "more than half the inputs: about the gated FLOPs) or accuracy (fewest filters within --match-tolerance of the gated top-1)"
        ),
    ] = "frequency",
    match_tolerance: Annotated[
        float,
        typer.Option(
            help="top-1 the compact model may lose against the gated one, a fraction in [0, 1) (0.003: 0.3 points): "
            "a gate is dropped for speed only within it, and the --static-match accuracy model is matched within it"
        ),
    ] = 0.003,
) -> None:
    """Remove silent filters for good; keep a gate only where skipping pays; measure and export.

    Writes RUN/prune.json (and, with --export, the export directory); prints params, FLOPs, the
    per-layer decision, dense vs compact latency in each engine, and the dynamic value (gated
    top-1 minus that of the static network with the same FLOPs, on the whole validation split).
    """
    from nd_plugin.commands.pruning import prune_run

    result = prune_run(
        run,
        export,
        tolerance=tolerance,
        engines=[e for e in engine.split(",") if e.strip()],
        round_to=round_to,
        keep_gates=keep_gates,
        force=force,
        check_inputs=check_inputs,
        latency_repeats=repeats,
        threads=threads,
        onnx_spinning=onnx_spinning,
        static_match=static_match,
        match_tolerance=match_tolerance,
    )
    print_prune_table(result)
    if export is not None:
        typer.echo(str(export))
