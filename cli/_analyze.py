"""``nd analyze``: filter states, class paths, decision tree, occlusion concepts and an HTML report.

Thin: :func:`nd_plugin.commands.analyze.build_report` does the work. Register with
``app.command("analyze")(user_errors(analyze_command))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["analyze_command"]


def analyze_command(
    run: Annotated[Path, typer.Argument(help="run directory written by `nd decouple`")],
    data: Annotated[
        str | None,
        typer.Option(help="collect paths on this data set's validation split instead of reading RUN/paths.npz (same classes as the run)"),
    ] = None,
    images: Annotated[
        list[Path] | None,
        typer.Option("--images", help="image files for the occlusion analysis (repeat the option; default: a few validation images)"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output directory (default RUN/report)")] = None,
    patch: Annotated[int | None, typer.Option(help="occlusion patch side in pixels (default: a quarter of the input side)")] = None,
    stride: Annotated[int | None, typer.Option(help="occlusion stride in pixels (default: half the patch)")] = None,
    occlusion_class: Annotated[
        list[str] | None,
        typer.Option("--occlusion-class", help="occlude validation images of this class (repeat; default: the first two classes)"),
    ] = None,
    occlusion_images: Annotated[int, typer.Option(help="validation images occluded, split evenly over the classes (0: none)")] = 12,
    tolerance: Annotated[float, typer.Option(help="filter states: a filter on for at most this fraction of inputs is silent, for at least 1 - it energetic")] = 0.0,
    test: Annotated[str, typer.Option(help="decision tree: cluster test, copula (calibrated: Gaussian-copula null with the group's on-rates and correlations), permutation, gaussian, or hopkins (the seed's, not calibrated)")] = "copula",
    alpha: Annotated[float, typer.Option(help="decision tree: split when the test's p-value is at most this")] = 0.01,
    threshold: Annotated[float, typer.Option(help="decision tree, --test hopkins only: split when H (1 clustered, 0.5 random) reaches this")] = 0.75,
    tree_samples: Annotated[int, typer.Option(help="decision tree: inputs used (class-stratified subset)")] = 5000,
    batch_size: Annotated[int, typer.Option(help="inputs per forward pass when collecting paths")] = 256,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    seed: Annotated[int, typer.Option(help="seed of every random step (subsets, permutations, k-means)")] = 0,
    figures: Annotated[bool, typer.Option(help="render the PNG figures (--no-figures: analysis.json and the table only)")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
) -> None:
    """Analyse a run's calculation paths and write RUN/report/ (PNG figures, analysis.json, index.html).

    Uses RUN/paths.npz when it holds every input's path; otherwise (or with --data) collects the
    paths on the validation split. The report works offline: open index.html in any browser.
    """
    from nd_plugin.commands.analyze import build_report
    from nd_plugin.interpret.tree import TESTS

    if test not in TESTS:
        raise typer.BadParameter(f"--test must be one of {', '.join(TESTS)}, got {test!r}")
    if not 0.0 < alpha < 1.0:
        raise typer.BadParameter(f"--alpha must be between 0 and 1, got {alpha}")
    index = build_report(
        run,
        data=data,
        images=images or (),
        out=out,
        patch=patch,
        stride=stride,
        tolerance=tolerance,
        threshold=threshold,
        tree_test=test,
        alpha=alpha,
        num_occlusion_images=occlusion_images,
        occlusion_classes=occlusion_class or 2,
        max_tree_samples=tree_samples,
        batch_size=batch_size,
        device=device,
        progress=not quiet,
        figures=figures,
        seed=seed,
    )
    typer.echo(str(index))
