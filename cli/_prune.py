"""``nd prune``: remove silent filters, keep dynamic gates, measure, export.

Thin: :func:`nd_plugin.export.prune_run` does the work. Register with
``app.command("prune")(user_errors(prune_command))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["prune_command", "print_prune_table"]


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def print_prune_table(result: dict[str, Any]) -> None:
    """Prints params, static FLOPs, expected FLOPs and batch-1 latency, original vs compact."""
    from rich.console import Console
    from rich.table import Table

    flops, params, lat = result["flops"], result["params"], result["latency_ms"]
    table = Table(title=f"nd prune {result['run']} (tolerance {result['tolerance']})")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("compact", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("params", _si(params["original"]), _si(params["compact"]), f"{params['original'] / params['compact']:.2f}x")
    table.add_row(
        "static FLOPs", _si(flops["original"]), _si(flops["compact_static"]), f"{flops['original'] / flops['compact_static']:.2f}x"
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
    Console().print(table)


def prune_command(
    run: Annotated[Path, typer.Argument(help="run directory written by `nd decouple` (needs checkpoint.pt and paths.npz)")],
    export: Annotated[
        Path | None,
        typer.Option("--export", help="write the compact model here: weights + manifest, model.pt2, model.onnx, prune.json"),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(help="a filter on for at most this fraction of inputs is silent (removed), for at least 1 - it energetic (gate dropped); in [0, 1)"),
    ] = 0.0,
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty --export directory")] = False,
    check_inputs: Annotated[int, typer.Option(help="validation inputs used to check the compact and exported models")] = 64,
    repeats: Annotated[int, typer.Option(help="batch-1 calls per model for the median latency")] = 10,
    threads: Annotated[int | None, typer.Option(help="CPU threads for the latency measurement")] = None,
) -> None:
    """Remove silent filters for good, drop energetic gates, keep dynamic ones; measure and export.

    Writes RUN/prune.json (and, with --export, the export directory); prints params, FLOPs and
    batch-1 latency of the original and the compact model.
    """
    from nd_plugin.export import prune_run

    result = prune_run(
        run,
        export,
        tolerance=tolerance,
        force=force,
        check_inputs=check_inputs,
        latency_repeats=repeats,
        threads=threads,
    )
    print_prune_table(result)
    if export is not None:
        typer.echo(str(export))
