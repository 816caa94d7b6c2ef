"""The offline HTML page of ``nd analyze``: figures, the key numbers, ``nd detect``'s tables.

:func:`write_report` renders an :class:`~nd_plugin.report.analysis.Analysis`'s figures to PNG, writes
``analysis.json`` and an ``index.html`` that needs no network. Plot functions take an analysis
result and return a :class:`matplotlib.figure.Figure` without touching pyplot or the global backend
(:mod:`nd_plugin.report.plotting`), so writing a report changes nothing for a user's own plots.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nd_plugin.files import atomic_write_text
from nd_plugin.report.concept_figures import plot_decision_tree, plot_occlusion
from nd_plugin.report.path_figures import (
    plot_class_paths,
    plot_class_stats,
    plot_filter_states,
    plot_layer_histograms,
    plot_path_distribution,
)
from nd_plugin.run import ANALYSIS_JSON, INDEX_HTML

if TYPE_CHECKING:
    from nd_plugin.report.analysis import Analysis

__all__ = ["write_report"]

_FIGURES = [
    (
        "filter_states.png",
        "Filter states",
        "Share of silent (never on), dynamic and energetic (always on) filters per gated layer, and how often filters are on "
        "(seed Fig. A, Table C).",
    ),
    (
        "layer_histograms.png",
        "Activation counts per layer",
        "For every gated layer, the histogram of the fraction of inputs for which each filter is on.",
    ),
    (
        "class_paths.png",
        "Class calculation paths",
        "Per class, how often each filter is on (filters grouped by layer, sorted within a layer), and the path width per "
        "class and layer (seed Fig. F).",
    ),
    (
        "class_stats.png",
        "How much paths differ between classes",
        "Path width per class; η², the share of path variance explained by the class, per layer (with a label-permutation "
        "p-value); the similarity of class mean paths.",
    ),
    (
        "decision_tree.png",
        "Decision process",
        "Layer by layer, a group of inputs is split in two by k-means when a cluster test on its gate vectors rejects "
        "'one population' (the test and its rule are in the table above and in analysis.json, with every node's statistic "
        "and p-value); classes follow the majority of their inputs (seed Fig. C).",
    ),
    (
        "path_distribution.png",
        "Distribution of whole paths",
        "Paths projected on their first two principal components, coloured by class; Hamming distances between paths of "
        "the same and of different classes; per-class path diversity (seed Fig. D).",
    ),
    (
        "occlusion.png",
        "Semantic concepts by occlusion",
        "Black patches slide over several images of a class; for the filters whose concept is most consistent (turned off "
        "by some, at most half, of the patches on the most images of the class), the bright region on each image is where "
        "blacking-out silences the filter (seed Fig. B).",
    ),
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
        (
            "η² (path variance explained by class)",
            f"{cp.eta2:.4f}"
            + (
                "" if cp.permutation_p is None else f" (permutation p = {cp.permutation_p:.3g}, {cp.n_permutations} permutations)"
            ),
        ),
        (
            "class-dependent filters (χ², Bonferroni, α = " + f"{cp.alpha:g})",
            f"{cp.class_dependent} of {cp.tested} varying filters",
        ),
    ]
    if cp.centroid_accuracy is not None:
        rows.append(
            ("class from path alone (nearest centroid, 2-fold)", f"{cp.centroid_accuracy:.2%} (chance {1 / len(cp.classes):.0%})")
        )
    widest, thinnest = int(np.argmax(cp.total_width)), int(np.argmin(cp.total_width))
    rows.append(
        (
            "widest / thinnest class path",
            f"{cp.classes[widest]} ({cp.total_width[widest]:.1f}) / {cp.classes[thinnest]} ({cp.total_width[thinnest]:.1f}) filters on",
        )
    )
    if a.tree is not None:
        first = a.tree.first_parting()
        rows.append(("decision-tree test", f"{a.tree.description} (split when {a.tree.rule})"))
        rows.append(
            (
                "decision tree",
                f"{len(a.tree.splits)} splits, {len(a.tree.leaves)} leaves, {len(a.tree.tested())} groups tested"
                + (f"; no split: {a.tree.no_split_reason}" if a.tree.no_split_reason else ""),
            )
        )
        rows.append(
            (
                "first layer where classes part",
                "none" if first is None else f"{first[0]}: " + " | ".join(", ".join(g) for g in first[1]),
            )
        )
    if a.distribution is not None:
        d = a.distribution
        rows.append(("distinct whole paths", f"{d.distinct} of {d.n}"))
        rows.append(
            ("mean Hamming distance same / different class", f"{d.mean_hamming_within:.4f} / {d.mean_hamming_between:.4f}")
        )
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
        plots["occlusion.png"] = lambda: plot_occlusion(
            analysis.occlusion, analysis.images, groups=analysis.image_groups, classes=analysis.stats.classes
        )
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
    from nd_plugin.detect.figures import detection_section_html  # the detection package, only when drawing

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
{"".join(sections)}
</body></html>
"""
    index = out / INDEX_HTML
    atomic_write_text(index, page)
    return index
