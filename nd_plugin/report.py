"""The analyses of ``nd analyze`` as one object, and its offline HTML report.

:func:`analyze_paths` takes :class:`~nd_plugin.paths.PathStats` and returns an :class:`Analysis`;
:meth:`Analysis.save` writes its figures, ``analysis.json`` and ``index.html`` into a folder. Plot
functions take an analysis result and return a :class:`matplotlib.figure.Figure`; they never
touch pyplot or the global backend: figures are created with :class:`~matplotlib.figure.Figure`
and rendered by the Agg canvas, so importing this module changes nothing for a user's own plots.
The numbers behind every figure are in the analysis objects (``to_dict()``) and in
``analysis.json``. The workflow on a run directory,
:func:`~nd_plugin.commands.analyze.build_report`, lives in :mod:`nd_plugin.commands.analyze`.

Example:
    >>> a = analyze_paths(stats, n_permutations=0)
    >>> a.save(tmp / "report", figures=False).name
    'index.html'
    >>> sorted(p.name for p in (tmp / "report").iterdir())
    ['analysis.json', 'index.html']
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nd_plugin.errors import DataError
from nd_plugin.files import atomic_write_json, atomic_write_text
from nd_plugin.interpret import (
    ClassPaths,
    DecisionTree,
    FilterStates,
    OcclusionConcepts,
    PathDistribution,
    class_paths,
    concept_consistency,
    decision_tree,
    filter_states,
    path_distribution,
)
from nd_plugin.interpret._common import jsonable
from nd_plugin.path_figures import (
    plot_class_paths,
    plot_class_stats,
    plot_filter_states,
    plot_layer_histograms,
    plot_path_distribution,
)
from nd_plugin.paths import PathStats
from nd_plugin.report_figures import plot_decision_tree, plot_occlusion

__all__ = [
    "Analysis",
    "analyze_paths",
    "load_images",
    "plot_class_paths",
    "plot_class_stats",
    "plot_decision_tree",
    "plot_filter_states",
    "plot_layer_histograms",
    "plot_occlusion",
    "plot_path_distribution",
    "write_report",
]

ANALYSIS_JSON = "analysis.json"
INDEX_HTML = "index.html"



@dataclass
class Analysis:
    """Every analysis of one set of path statistics (and, optionally, occlusion on some images).

    Attributes:
        stats: the path statistics analysed.
        states: filter states.
        classes: class paths.
        tree: decision tree (``None`` without raw paths).
        distribution: path distribution (``None`` without raw paths).
        occlusion: occlusion concepts (``None`` without images).
        images: display copies of the occluded images, ``(H, W, 3)`` floats in ``[0, 1]``.
        image_groups: ``{class name: indices of its occluded images}`` (concept consistency is per group).
        timings: seconds per step.
        meta: where the analysis comes from (run, data, settings), shown on the report page.
        detections: ``nd detect`` results (``detect.json`` records) shown as tables in the report.
        dynamic_value: :meth:`nd_plugin.pruning.DynamicValue.to_dict` of the model (plus ``source``:
            where it was measured), or None.
    """

    stats: PathStats
    states: FilterStates
    classes: ClassPaths
    tree: DecisionTree | None = None
    distribution: PathDistribution | None = None
    occlusion: OcclusionConcepts | None = None
    images: list[np.ndarray] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)
    image_groups: dict[str, list[int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    detections: list[dict[str, Any]] = field(default_factory=list)
    dynamic_value: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every number of every analysis, as plain Python."""
        s = self.stats
        out: dict[str, Any] = {
            "meta": self.meta,
            "paths": {
                "n": s.n,
                "accuracy": s.accuracy,
                "density": s.density,
                "layers": s.site_names,
                "filters_per_layer": s.site_channels,
                "num_filters": s.num_filters,
                "classes": s.classes,
                "class_n": s.class_n,
            },
            "filter_states": self.states.to_dict(),
            "class_paths": self.classes.to_dict(),
            "decision_tree": None if self.tree is None else self.tree.to_dict(),
            "path_distribution": None if self.distribution is None else self.distribution.to_dict(),
            "occlusion": None if self.occlusion is None else {
                **self.occlusion.to_dict(), "image_names": self.image_names,
                "concept_consistency": {
                    g: concept_consistency(self.occlusion, idx).to_dict(
                        lambda f: "{}[{}]".format(*self.occlusion.filter_name(f)))
                    for g, idx in (self.image_groups or {"all images": list(range(len(self.images)))}).items()
                },
            },
            "dynamic_value": self.dynamic_value,
            "timings_s": self.timings,
        }
        return jsonable(out)

    def save(self, out: str | os.PathLike, *, title: str = "nd analyze", dpi: int = 110, figures: bool = True) -> Path:
        """Writes the report into folder ``out``: PNG figures, ``analysis.json``, an offline ``index.html``.

        Args:
            out: the folder (created; files in it are replaced one by one, each atomically).
            title: page title.
            dpi: resolution of the PNGs.
            figures: render the figures (``False``: numbers only, much faster).

        Returns:
            The path of ``index.html``.
        """
        return write_report(self, out, title=title, dpi=dpi, figures=figures)

    def save_json(self, out: str | os.PathLike) -> Path:
        """Writes :meth:`to_dict` to ``out/analysis.json`` (atomically); returns its path."""
        file = Path(out) / ANALYSIS_JSON
        atomic_write_json(file, self.to_dict(), indent=1)
        return file


def analyze_paths(
    stats: PathStats,
    *,
    tolerance: float = 0.0,
    threshold: float = 0.75,
    max_tree_samples: int | None = 5000,
    n_permutations: int = 99,
    tree_test: str = "copula",
    alpha: float = 0.01,
    seed: int = 0,
) -> Analysis:
    """Runs every path analysis on one :class:`PathStats` (tree and distribution need raw paths).

    Args:
        stats: path statistics.
        tolerance: filter-state tolerance (fraction of inputs).
        threshold: Hopkins threshold of the decision tree (``tree_test="hopkins"`` only).
        max_tree_samples: inputs used by the decision tree (stratified subset).
        n_permutations: permutations of the class-dependence test.
        tree_test: the decision tree's cluster test (:data:`~nd_plugin.interpret.tree.TESTS`).
        alpha: its level.
        seed: seed of every random step.

    Returns:
        An :class:`Analysis` (without occlusion).

    Example:
        >>> a = analyze_paths(dm.paths(loader, raw=True))  # doctest: +SKIP
        >>> a.states.shares, a.classes.eta2  # doctest: +SKIP
    """
    t = {}
    t0 = time.perf_counter()
    states = filter_states(stats, tolerance)
    t["filter_states"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cp = class_paths(stats, n_permutations=n_permutations, seed=seed)
    t["class_paths"] = time.perf_counter() - t0
    tree = dist = None
    if stats.paths is not None and stats.labels is not None:
        t0 = time.perf_counter()
        tree = decision_tree(stats, test=tree_test, alpha=alpha, threshold=threshold, max_samples=max_tree_samples, seed=seed)
        t["decision_tree"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dist = path_distribution(stats, seed=seed)
        t["path_distribution"] = time.perf_counter() - t0
    return Analysis(stats=stats, states=states, classes=cp, tree=tree, distribution=dist, timings=t)


# --------------------------------------------------------------------------------------- images


def load_images(
    paths: Sequence[str | os.PathLike],
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
):
    """Reads image files for occlusion: resized to ``size`` (H, W), RGB, normalised.

    Args:
        paths: image files (anything PIL reads).
        size: ``(H, W)`` the model takes.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.

    Returns:
        ``(batch, display)``: a ``(B, 3, H, W)`` float tensor and a list of ``(H, W, 3)`` arrays in ``[0, 1]``.

    Raises:
        DataError: a file that does not exist or is not an image.
    """
    import torch
    from PIL import Image, UnidentifiedImageError

    batch, display = [], []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DataError(f"image {p} does not exist; pass existing image files to --images.")
        try:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{p} is not an image PIL can read ({type(exc).__name__}); pass PNG/JPEG files to --images.") from None
        display.append(arr)
        m = np.asarray(mean, dtype=np.float32)[:, None, None]
        s = np.asarray(std, dtype=np.float32)[:, None, None]
        batch.append(torch.from_numpy((arr.transpose(2, 0, 1) - m) / s))
    return torch.stack(batch), display


# ---------------------------------------------------------------------------------------- output

_FIGURES = [
    ("filter_states.png", "Filter states",
     "Share of silent (never on), dynamic and energetic (always on) filters per gated layer, and how often filters are on "
     "(seed Fig. A, Table C)."),
    ("layer_histograms.png", "Activation counts per layer",
     "For every gated layer, the histogram of the fraction of inputs for which each filter is on."),
    ("class_paths.png", "Class calculation paths",
     "Per class, how often each filter is on (filters grouped by layer, sorted within a layer), and the path width per "
     "class and layer (seed Fig. F)."),
    ("class_stats.png", "How much paths differ between classes",
     "Path width per class; η², the share of path variance explained by the class, per layer (with a label-permutation "
     "p-value); the similarity of class mean paths."),
    ("decision_tree.png", "Decision process",
     "Layer by layer, a group of inputs is split in two by k-means when a cluster test on its gate vectors rejects "
     "'one population' (the test and its rule are in the table above and in analysis.json, with every node's statistic "
     "and p-value); classes follow the majority of their inputs (seed Fig. C)."),
    ("path_distribution.png", "Distribution of whole paths",
     "Paths projected on their first two principal components, coloured by class; Hamming distances between paths of "
     "the same and of different classes; per-class path diversity (seed Fig. D)."),
    ("occlusion.png", "Semantic concepts by occlusion",
     "Black patches slide over several images of a class; for the filters whose concept is most consistent (turned off "
     "by some, at most half, of the patches on the most images of the class), the bright region on each image is where "
     "blacking-out silences the filter (seed Fig. B)."),
]


def _key_numbers(a: Analysis) -> list[tuple[str, str]]:
    s, cp = a.stats, a.classes
    sh = a.states.shares
    rows = [
        ("inputs analysed", f"{s.n}"),
        ("top-1 accuracy on them", f"{s.accuracy:.2%}"),
        ("gated layers / filters", f"{len(s.site_names)} / {s.num_filters}"),
        ("gate density (mean share of filters on)", f"{s.density:.3f}"),
        ("silent / dynamic / energetic filters", f"{sh['silent']:.2%} / {sh['dynamic']:.2%} / {sh['energetic']:.2%}"),
        ("η² (path variance explained by class)", f"{cp.eta2:.4f}"
         + ("" if cp.permutation_p is None else f" (permutation p = {cp.permutation_p:.3g}, {cp.n_permutations} permutations)")),
        ("class-dependent filters (χ², Bonferroni, α = " + f"{cp.alpha:g})", f"{cp.class_dependent} of {cp.tested} varying filters"),
    ]
    if cp.centroid_accuracy is not None:
        rows.append(("class from path alone (nearest centroid, 2-fold)", f"{cp.centroid_accuracy:.2%} (chance {1 / len(cp.classes):.0%})"))
    widest, thinnest = int(np.argmax(cp.total_width)), int(np.argmin(cp.total_width))
    rows.append(("widest / thinnest class path", f"{cp.classes[widest]} ({cp.total_width[widest]:.1f}) / {cp.classes[thinnest]} ({cp.total_width[thinnest]:.1f}) filters on"))
    if a.tree is not None:
        first = a.tree.first_parting()
        rows.append(("decision-tree test", f"{a.tree.description} (split when {a.tree.rule})"))
        rows.append(("decision tree", f"{len(a.tree.splits)} splits, {len(a.tree.leaves)} leaves, {len(a.tree.tested())} groups tested"
                     + (f"; no split: {a.tree.no_split_reason}" if a.tree.no_split_reason else "")))
        rows.append(("first layer where classes part", "none" if first is None else f"{first[0]}: " + " | ".join(", ".join(g) for g in first[1])))
    if a.distribution is not None:
        d = a.distribution
        rows.append(("distinct whole paths", f"{d.distinct} of {d.n}"))
        rows.append(("mean Hamming distance same / different class", f"{d.mean_hamming_within:.4f} / {d.mean_hamming_between:.4f}"))
    if a.dynamic_value is not None:
        from nd_plugin.pruning.value import describe

        dv = a.dynamic_value
        where = f"; {dv['source']}" if dv.get("source") else ""
        rows.append(("dynamic value (gated top-1 − top-1 of the static network of the same FLOPs)", describe(dv) + where))
    return rows


def write_report(
    analysis: Analysis, out: str | os.PathLike, *, title: str = "nd analyze", dpi: int = 110, figures: bool = True
) -> Path:
    """Writes the PNG figures, ``analysis.json`` and an offline ``index.html`` into ``out``.

    Args:
        analysis: the analyses.
        out: directory (created).
        title: page title.
        dpi: resolution of the PNGs.
        figures: render the figures (``False``: numbers only, much faster).

    Returns:
        The path of ``index.html``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Any] = {
        "filter_states.png": lambda: plot_filter_states(analysis.states),
        "layer_histograms.png": lambda: plot_layer_histograms(analysis.states),
        "class_paths.png": lambda: plot_class_paths(analysis.classes),
        "class_stats.png": lambda: plot_class_stats(analysis.classes),
    }
    if analysis.tree is not None:
        plots["decision_tree.png"] = lambda: plot_decision_tree(analysis.tree)
    if analysis.distribution is not None:
        plots["path_distribution.png"] = lambda: plot_path_distribution(analysis.distribution)
    if analysis.occlusion is not None:
        plots["occlusion.png"] = lambda: plot_occlusion(analysis.occlusion, analysis.images, groups=analysis.image_groups,
                                                        classes=analysis.stats.classes)
    if not figures:
        plots = {}
    t0 = time.perf_counter()
    for name, make in plots.items():
        fig = make()
        fig.savefig(out / name, dpi=dpi)
    analysis.timings["figures"] = time.perf_counter() - t0
    analysis.save_json(out)

    esc = html.escape
    rows = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _key_numbers(analysis))
    sections = []
    for name, head, caption in _FIGURES:
        if name in plots:
            sections.append(
                f'<figure id="{name[:-4]}"><h2>{esc(head)}</h2><img src="{name}" alt="{esc(head)}">'
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
    meta = analysis.meta
    from nd_plugin.detect.figures import detection_section_html

    sections.append(detection_section_html(analysis.detections))  # nd detect's tables, when the run has them
    source = esc(", ".join(f"{k}: {v}" for k, v in meta.items() if isinstance(v, (str, int, float))))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border-bottom: 1px solid #ddd; padding: .3em .8em; text-align: left; }}
th {{ font-weight: 600; }} figure {{ margin: 2em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; max-width: 60em; }} .meta {{ color: #666; font-size: .9em; }}
</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="meta">{source}</p>
<table>{rows}</table>
<p>Every number behind the figures: <a href="{ANALYSIS_JSON}">{ANALYSIS_JSON}</a>.</p>
{''.join(sections)}
</body></html>
"""
    index = out / INDEX_HTML
    atomic_write_text(index, page)
    return index
