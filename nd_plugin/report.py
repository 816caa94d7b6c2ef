"""Figures (matplotlib) and the offline HTML report of ``nd analyze``.

Plot functions take an analysis result and return a :class:`matplotlib.figure.Figure`; they never
touch pyplot or the global backend: figures are created with :class:`~matplotlib.figure.Figure`
and rendered by the Agg canvas, so importing this module changes nothing for a user's own plots.
The numbers behind every figure are in the analysis objects (``to_dict()``) and in
``analysis.json``.

Example:
    >>> from nd_plugin.report import build_report  # doctest: +SKIP
    >>> build_report("runs/resnet20")  # doctest: +SKIP
    PosixPath('runs/resnet20/report/index.html')
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nd_plugin.errors import DataError, InputShapeError
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
    occlusion_concepts,
    path_distribution,
)
from nd_plugin.interpret._common import jsonable
from nd_plugin.interpret.states import DYNAMIC, ENERGETIC, SILENT
from nd_plugin.paths import PathStats
from nd_plugin.report_figures import _figure, _layer_ticks, _short, plot_decision_tree, plot_occlusion

__all__ = [
    "Analysis",
    "analyze_paths",
    "build_report",
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

STATE_COLOURS = {"silent": "#9e9e9e", "dynamic": "#1f77b4", "energetic": "#ff7f0e"}


# --------------------------------------------------------------------------------------- figures


def plot_filter_states(fs: FilterStates):
    """Filter states per layer (stacked shares) and the activation-count histograms (seed Fig. A).

    Args:
        fs: result of :func:`~nd_plugin.interpret.filter_states`.

    Returns:
        The Figure: left, the share of silent/dynamic/energetic filters of every layer (and
        overall); right, histograms of how often each filter was on, for all layers and for the
        last layer (the layer the seed's Fig. A shows), silent and energetic bars in their own colours.

    Example:
        >>> from nd_plugin.interpret import filter_states
        >>> fig = plot_filter_states(filter_states(stats))
        >>> fig.savefig(tmp / "filter_states.png")
    """
    names = list(fs.names)
    height = max(4.0, 0.16 * len(names) + 1.5)
    fig = _figure(12, height)
    grid = fig.add_gridspec(2, 2, width_ratios=[1.1, 1])
    ax = fig.add_subplot(grid[:, 0])
    shares = np.array([fs[n].shares() for n in names] + [fs.overall.shares()])
    labels = [_short(n) for n in names] + ["ALL"]
    y = np.arange(len(labels))[::-1]
    left = np.zeros(len(labels))
    for j, state in enumerate(("silent", "dynamic", "energetic")):
        ax.barh(y, shares[:, j], left=left, color=STATE_COLOURS[state], label=state, height=0.85)
        left += shares[:, j]
    ax.set_yticks(y, labels, fontsize=7 if len(labels) > 20 else 8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the layer's filters")
    ax.set_title(f"Filter states over {fs.n} inputs (tolerance {fs.tolerance:g})")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    for row, layer in ((0, None), (1, names[-1])):
        axh = fig.add_subplot(grid[row, 1])
        _state_histogram(axh, fs, layer)
        axh.set_title("all gated layers" if layer is None else f"last gated layer: {_short(layer, 40)}", fontsize=9)
    return fig


def _state_histogram(ax, fs: FilterStates, layer: str | None) -> None:
    sl = slice(None) if layer is None else fs._slice(fs.names.index(layer))
    counts, states = fs.counts[sl], fs.states[sl]
    edges = fs.hist_edges
    width = edges[1] - edges[0] if len(edges) > 1 else 1.0
    dyn = np.histogram(counts[states == DYNAMIC], bins=edges)[0]
    ax.bar(edges[:-1], dyn, width=width, align="edge", color=STATE_COLOURS["dynamic"], label="dynamic")
    n_sil, n_en = int((states == SILENT).sum()), int((states == ENERGETIC).sum())
    ax.bar([-width * 0.6], [n_sil], width=width * 0.5, color=STATE_COLOURS["silent"], label=f"silent ({n_sil})")
    ax.bar([fs.n + width * 0.1], [n_en], width=width * 0.5, color=STATE_COLOURS["energetic"], label=f"energetic ({n_en})")
    ax.set_xlabel(f"times a filter was on (of {fs.n} inputs)")
    ax.set_ylabel("filters")
    ax.legend(fontsize=7)


def plot_layer_histograms(fs: FilterStates, cols: int = 6):
    """One activation-count histogram per gated layer (small multiples, seed Fig. A for every layer).

    Args:
        fs: filter states.
        cols: panels per row.

    Returns:
        The Figure.
    """
    names = list(fs.names)
    rows = int(np.ceil(len(names) / cols))
    # many panels: a fixed grid (constrained layout costs seconds here)
    height = 1.7 * rows + 0.8
    fig = _figure(2.2 * cols, height, dpi=100, layout=None)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.35 / height, top=1 - 0.85 / height, hspace=0.8, wspace=0.3)
    axes = fig.subplots(rows, cols, squeeze=False)
    edges = fs.hist_edges
    for i, ax in enumerate(axes.ravel()):
        if i >= len(names):
            ax.set_axis_off()
            continue
        h = fs.histogram(names[i])
        ax.bar(edges[:-1] / max(fs.n, 1), h, width=1 / fs.bins, align="edge", color=STATE_COLOURS["dynamic"])
        s, d, e = fs[names[i]]
        ax.set_title(f"{_short(names[i], 26)}\nS{s} D{d} E{e}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_xlim(0, 1)
    fig.suptitle("Per layer: histogram of the fraction of inputs for which each filter is on (S/D/E: silent/dynamic/energetic)",
                 fontsize=9, y=1 - 0.15 / height, va="top")
    return fig


def plot_class_paths(cp: ClassPaths, sort: str = "frequency"):
    """Per-class calculation paths in the manner of seed Fig. F, readable for thousands of filters.

    Top: classes × filters image of how often each filter is on per class, filters grouped by
    layer (white separators) and, within a layer, sorted by overall frequency (``sort=
    "frequency"``) or by variation across classes (``"variance"``), so silent and energetic
    blocks are contiguous. Middle: for the filters that vary, each class's on-rate minus the
    overall on-rate (red: the class uses the filter more), most class-dependent filters first.
    Bottom: classes × layers heatmap of path width (share of the layer's filters a class uses on
    average).

    Args:
        cp: result of :func:`~nd_plugin.interpret.class_paths`.
        sort: ``"frequency"``, ``"variance"`` or ``"none"``.

    Returns:
        The Figure.
    """
    k = len(cp.classes)
    offsets = np.concatenate([[0], np.cumsum(cp.sizes)])
    order = []
    for i in range(len(cp.sizes)):
        block = cp.means[:, offsets[i] : offsets[i + 1]]
        key = {"frequency": -block.mean(0), "variance": -block.var(0)}.get(sort)
        idx = np.arange(block.shape[1]) if key is None else np.argsort(key, kind="stable")
        order.append(offsets[i] + idx)
    order = np.concatenate(order)
    fig = _figure(13, 3.0 + 0.32 * k * 3)
    grid = fig.add_gridspec(3, 2, height_ratios=[1.1, 1.1, 1], width_ratios=[40, 1])
    ax = fig.add_subplot(grid[0, 0])
    im = ax.imshow(cp.means[:, order], aspect="auto", interpolation="antialiased", cmap="viridis", vmin=0, vmax=1)
    for o in offsets[1:-1]:
        ax.axvline(o - 0.5, color="white", lw=0.6)
    ax.set_yticks(range(k), cp.classes, fontsize=8)
    mids = (offsets[:-1] + offsets[1:]) / 2
    step = max(1, int(np.ceil(len(mids) / 30)))
    ax.set_xticks(mids[::step], [_short(n, 18) for n in cp.names][::step], rotation=90, fontsize=6)
    ax.set_title(f"Class calculation paths: share of a class's inputs for which each filter is on ({sum(cp.sizes)} filters, sorted within each layer)", fontsize=9)
    fig.colorbar(im, cax=fig.add_subplot(grid[0, 1]), label="on-rate")
    # Class differences hide among silent/energetic filters: show the varying filters' deviations.
    overall = (cp.means * cp.class_n[:, None]).sum(0) / max(cp.class_n.sum(), 1)
    varying = np.flatnonzero((overall > 0) & (overall < 1))
    axd = fig.add_subplot(grid[1, 0])
    if varying.size:
        dev = cp.means[:, varying] - overall[varying]
        dorder = np.argsort(-np.abs(dev).max(0), kind="stable")
        lim = max(float(np.abs(dev).max()), 1e-6)
        imd = axd.imshow(dev[:, dorder], aspect="auto", interpolation="antialiased", cmap="RdBu_r", vmin=-lim, vmax=lim)
        fig.colorbar(imd, cax=fig.add_subplot(grid[1, 1]), label="class − all")
        axd.set_xlabel("dynamic filters, most class-dependent first", fontsize=8)
    else:
        axd.text(0.5, 0.5, "no dynamic filter: every class takes the same path", ha="center", va="center", transform=axd.transAxes)
        fig.add_subplot(grid[1, 1]).set_axis_off()
    axd.set_yticks(range(k), cp.classes, fontsize=8)
    axd.set_title(f"Deviation of each class's on-rate from the overall on-rate ({varying.size} filters that vary)", fontsize=9)
    ax2 = fig.add_subplot(grid[2, 0])
    im2 = ax2.imshow(cp.width_share, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ax2.set_yticks(range(k), [f"{c} ({w:.0f})" for c, w in zip(cp.classes, cp.total_width)], fontsize=8)
    _layer_ticks(ax2, list(cp.names), axis="x")
    if len(cp.names) * k <= 400:
        for (r, c), v in np.ndenumerate(cp.width_share):
            ax2.text(c, r, f"{v:.2f}"[1:] if v < 1 else "1", ha="center", va="center", fontsize=5.5, color="white" if v < 0.6 else "black")
    ax2.set_title("Path width per class and layer (share of the layer's filters on, mean over the class); in brackets: filters on over all layers", fontsize=9)
    fig.colorbar(im2, cax=fig.add_subplot(grid[2, 1]), label="width")
    return fig


def plot_class_stats(cp: ClassPaths):
    """How much class paths differ: width per class, η² per layer and the class-similarity matrix.

    Args:
        cp: result of :func:`~nd_plugin.interpret.class_paths`.

    Returns:
        The Figure.
    """
    k = len(cp.classes)
    fig = _figure(15, 4.8)
    a1, a2, a3 = fig.subplots(1, 3, width_ratios=[1, 1.4, 1.1])
    order = np.argsort(cp.total_width)
    a1.barh(np.arange(k), cp.total_width[order], color="#4c72b0")
    a1.set_yticks(range(k), [cp.classes[i] for i in order], fontsize=8)
    a1.set_xlabel("filters on per input (mean over the class)")
    a1.set_title("Path width per class", fontsize=9)
    lo = cp.total_width.min()
    a1.set_xlim(lo - 0.05 * max(lo, 1), cp.total_width.max() * 1.01 + 1e-9)
    x = np.arange(len(cp.names))
    a2.plot(x, cp.eta2_layers, marker="o", ms=3)
    a2.axhline(cp.eta2, color="grey", ls="--", lw=0.8, label=f"all layers: {cp.eta2:.3f}")
    _layer_ticks(a2, list(cp.names), axis="x", max_ticks=30)
    a2.set_ylabel("η² (path variance explained by class)")
    p = "n/a" if cp.permutation_p is None else f"{cp.permutation_p:.3g}"
    a2.set_title(f"Class dependence per layer; permutation p = {p}; {cp.class_dependent}/{cp.tested} varying filters class-dependent", fontsize=9)
    a2.legend(fontsize=8)
    im = a3.imshow(cp.similarity, cmap="viridis", vmin=min(cp.similarity.min(), 0.999), vmax=1)
    a3.set_xticks(range(k), cp.classes, rotation=90, fontsize=7)
    a3.set_yticks(range(k), cp.classes, fontsize=7)
    if k <= 12:
        for (r, c), v in np.ndenumerate(cp.similarity):
            a3.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white")
    a3.set_title("Similarity of class mean paths (weighted Jaccard)", fontsize=9)
    fig.colorbar(im, ax=a3, shrink=0.8)
    return fig


def plot_path_distribution(pd: PathDistribution):
    """Distribution of whole paths (seed Fig. D): PCA of paths by class, Hamming distances, entropy.

    Args:
        pd: result of :func:`~nd_plugin.interpret.path_distribution`.

    Returns:
        The Figure.
    """
    import matplotlib

    fig = _figure(15, 4.8)
    a1, a2, a3 = fig.subplots(1, 3, width_ratios=[1.2, 1, 1])
    cmap = matplotlib.colormaps["tab10" if len(pd.classes) <= 10 else "tab20"]
    for c, name in enumerate(pd.classes):
        sel = pd.embedding_labels == c
        if sel.any():
            a1.scatter(pd.embedding[sel, 0], pd.embedding[sel, 1], s=4, alpha=0.5, color=cmap(c % cmap.N), label=name, linewidths=0)
    ev = pd.explained_variance
    a1.set_xlabel(f"PC1 ({ev[0]:.1%})")
    a1.set_ylabel(f"PC2 ({ev[1]:.1%})")
    a1.set_title(f"Whole paths, PCA ({len(pd.embedding_labels)} inputs); {pd.distinct} distinct paths of {pd.n}", fontsize=9)
    a1.legend(fontsize=6, markerscale=3, ncol=2)
    centres = (pd.hamming_edges[:-1] + pd.hamming_edges[1:]) / 2
    w = pd.hamming_edges[1] - pd.hamming_edges[0]
    for hist, lab, col in ((pd.hamming_within, "same class", "#2a9d8f"), (pd.hamming_between, "different classes", "#e76f51")):
        tot = max(hist.sum(), 1)
        a2.bar(centres, hist / tot, width=w, alpha=0.6, color=col, label=lab)
    nz = np.flatnonzero(pd.hamming_within + pd.hamming_between)
    if nz.size:
        a2.set_xlim(pd.hamming_edges[max(nz[0] - 1, 0)], pd.hamming_edges[min(nz[-1] + 2, len(pd.hamming_edges) - 1)])
    a2.set_xlabel("Hamming distance between two paths (share of filters)")
    a2.set_ylabel("share of pairs")
    a2.set_title(f"mean distance: same class {pd.mean_hamming_within:.3f}, different {pd.mean_hamming_between:.3f}", fontsize=9)
    a2.legend(fontsize=8)
    k = len(pd.classes)
    a3.barh(np.arange(k), pd.class_entropy_norm, color="#6a4c93")
    a3.set_yticks(range(k), [f"{c} ({d})" for c, d in zip(pd.classes, pd.class_distinct)], fontsize=8)
    a3.set_xlim(0, 1)
    a3.set_xlabel("path entropy / log2(inputs of the class)")
    a3.set_title("Path diversity per class (in brackets: distinct paths)", fontsize=9)
    return fig


# -------------------------------------------------------------------------------------- analyses


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
            "timings_s": self.timings,
        }
        return jsonable(out)


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
    return rows


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


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
    _write_json(out / "analysis.json", analysis.to_dict())

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
    from nd_plugin.detect_figures import detection_section_html

    sections.append(detection_section_html(meta.get("run")))  # nd detect's tables, when the run has them
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
<p>Every number behind the figures: <a href="analysis.json">analysis.json</a>.</p>
{''.join(sections)}
</body></html>
"""
    index = out / "index.html"
    tmp = out / "index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, index)
    return index


# ----------------------------------------------------------------------------------- entry point


def _check_classes(run_classes: Sequence[str] | None, classes: Sequence[str] | None, what: str, run_path: Path) -> None:
    if run_classes is None or classes is None:
        return
    if list(run_classes) != list(classes):
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(run_classes, classes)) if a != b][:3]
        raise DataError(
            f"{what} has {len(classes)} classes that do not match the run's {len(run_classes)} "
            f"({'; '.join(diff) or 'different number'}); pass data with the classes the run {run_path} was trained on."
        )


def _analysis_data(run: Any, spec: str | None) -> Any:
    """The data bundle to analyse; for ``imagefolder:`` specs with a ``train/`` + ``val/``/``test/``
    layout only the validation folder is decoded (the analysis never reads the training split)."""
    from nd_plugin.data import DataBundle, load_image_folder

    spec = spec or run.config["data"]
    kind, _, arg = spec.strip().partition(":")
    if kind.lower() == "imagefolder" and arg:
        root = Path(arg).expanduser()
        val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        if (root / "train").is_dir() and val_dir is not None:
            train_classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
            val_classes = sorted(d.name for d in val_dir.iterdir() if d.is_dir())
            if train_classes == val_classes:  # same folders: the labels index the same classes
                val = load_image_folder(val_dir)
                x, _ = val[0]
                cfg = run.config
                if len(val_classes) != cfg["num_classes"]:
                    raise DataError(
                        f"data {spec!r} has {len(val_classes)} classes but the run was trained on "
                        f"{cfg['num_classes']} ({cfg['data']!r}); pass data with the run's classes."
                    )
                from nd_plugin.data import IMAGENET_MEAN, IMAGENET_STD

                return DataBundle(train=val, val=val, num_classes=len(val_classes), classes=list(val_classes),
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=tuple(x.shape), name=spec)
    return run.data(spec)


def _pick_occlusion_images(bundle: Any, wanted: Sequence[str] | int, total: int):
    """The first validation images of each wanted class: ``(tensors, names, {class: indices})``."""
    classes = list(bundle.classes)
    if isinstance(wanted, int):
        wanted = classes[: max(1, wanted)]
    unknown = [c for c in wanted if c not in classes]
    if unknown:
        raise DataError(f"occlusion class {unknown[0]!r} is not a class of the data ({', '.join(classes[:10])}...).")
    per_class = max(1, total // len(wanted))
    targets = getattr(bundle.val, "targets", None)
    targets = np.asarray(targets) if targets is not None else np.array([int(bundle.val[i][1]) for i in range(len(bundle.val))])
    picked, names, groups = [], [], {}
    for c in wanted:
        for i in np.flatnonzero(targets == classes.index(c))[:per_class]:
            groups.setdefault(c, []).append(len(picked))
            picked.append(bundle.val[int(i)][0])
            names.append(f"validation image {int(i)} ({c})")
    if not picked:
        raise DataError(f"the validation split has no image of {', '.join(wanted)}; pass --images instead.")
    return picked, names, groups


def build_report(
    run: str | os.PathLike | Any,
    data: str | None = None,
    images: Sequence[str | os.PathLike] = (),
    out: str | os.PathLike | None = None,
    *,
    patch: int | None = None,
    stride: int | None = None,
    tolerance: float = 0.0,
    threshold: float = 0.75,
    tree_test: str = "copula",
    alpha: float = 0.01,
    max_tree_samples: int | None = 5000,
    n_permutations: int = 99,
    batch_size: int = 256,
    max_batches: int | None = None,
    num_occlusion_images: int = 12,
    occlusion_classes: Sequence[str] | int = 2,
    device: str = "cpu",
    progress: bool = False,
    figures: bool = True,
    seed: int = 0,
) -> Path:
    """Analyses a run directory and writes ``report/`` (figures, ``analysis.json``, ``index.html``).

    Path statistics come from the run's ``paths.npz`` when it holds every input's path and no
    ``data`` is given; otherwise they are collected with ``dm.paths(loader, raw=True)`` over the
    validation split of ``data`` (default: the run's data set). Occlusion runs on ``images``, or,
    when none are given, on the first validation images of a few classes.

    Args:
        run: a run directory (or an opened :class:`~nd_plugin.run.Run`).
        data: data spec to analyse instead of the run's ``paths.npz``.
        images: image files for the occlusion analysis.
        out: output directory (default ``RUN/report``).
        patch: occlusion patch side in pixels (default a quarter of the image side: 7 × 7 patches
            with the default stride).
        stride: occlusion stride (default half the patch).
        tolerance: filter-state tolerance.
        threshold: Hopkins threshold of the decision tree (``tree_test="hopkins"`` only).
        tree_test: the decision tree's cluster test (``"copula"``, calibrated; or ``"hopkins"``, ...).
        alpha: level of the tree's test.
        max_tree_samples: inputs used by the decision tree.
        n_permutations: permutations of the class-dependence test.
        batch_size: batch size of path collection.
        max_batches: collect paths over at most this many batches.
        num_occlusion_images: validation images occluded when ``images`` is empty, split evenly over
            ``occlusion_classes`` (0: no occlusion).
        occlusion_classes: class names whose validation images are occluded, or how many classes
            (the first ones in class order); the figure ranks filters by concept consistency per class.
        device: where the model runs.
        progress: show progress bars.
        figures: render the figures (``False``: ``analysis.json`` and a table of numbers only).
        seed: seed of every random step.

    Returns:
        The path of ``index.html``.

    Raises:
        RunDirError: not a run directory, or no checkpoint.
        DataError: data whose classes differ from the run's, images that are missing or unreadable.
        InputShapeError: an occlusion patch larger than the images.

    Example:
        >>> build_report("runs/r20", images=["cat.png"])  # doctest: +SKIP
        PosixPath('runs/r20/report/index.html')
    """
    import torch

    from nd_plugin.run import Run, atomic_dir, open_run

    t_start = time.perf_counter()
    run = run if isinstance(run, Run) else open_run(run)
    cfg = run.config
    out = Path(out) if out is not None else run.path / "report"
    timings: dict[str, float] = {}
    # Cheap checks first, so that bad input fails before any expensive step.
    if not run.checkpoint_path.is_file():
        run.load_checkpoint()  # raises RunDirError, saying what to do
    run_classes = cfg.get("classes")
    dm = None
    input_size = tuple(cfg.get("input_size") or ())
    if len(input_size) != 3:
        dm = run.build_model(device)
        input_size = tuple(dm.input_size)
    h, w = int(input_size[1]), int(input_size[2])
    patch = patch if patch is not None else max(2, round(min(h, w) / 4))
    if patch > min(h, w) or patch < 1:
        raise InputShapeError(f"occlusion patch {patch} px does not fit the run's {h}x{w} inputs; use --patch between 1 and {min(h, w)}.")

    stats = None
    if data is None:
        try:
            stats = run.stats()
        except Exception:  # noqa: BLE001 - missing or unreadable: collect below
            stats = None
        if stats is not None and (stats.paths is None or stats.labels is None):
            stats = None
    bundle = None
    if stats is None or (not images and num_occlusion_images > 0):
        try:
            bundle = _analysis_data(run, data)
        except DataError:
            if stats is None or data is not None:
                raise
            bundle = None  # paths are there; only the default occlusion images are lost
    what = f"data {data or cfg.get('data')!r}"
    if bundle is not None:
        _check_classes(run_classes, bundle.classes, what, run.path)
        if tuple(bundle.input_size) != tuple(input_size):
            raise DataError(f"{what} yields {tuple(bundle.input_size)} inputs but the run takes {tuple(input_size)}.")
    if stats is not None:
        _check_classes(run_classes, stats.classes, "paths.npz", run.path)
    mean = cfg.get("mean") or (list(bundle.mean) if bundle is not None else None)
    std = cfg.get("std") or (list(bundle.std) if bundle is not None else None)
    occ_images = display = None
    names: list[str] = []
    groups: dict[str, list[int]] = {}
    if images:
        if mean is None or std is None:
            raise DataError("the run's config has no normalisation (mean/std); pass --data so the images can be normalised.")
        occ_images, display = load_images(images, (h, w), mean, std)
        names = [str(p) for p in images]
        groups = {"given images": list(range(len(names)))}
    elif bundle is not None and num_occlusion_images > 0:
        picked, names, groups = _pick_occlusion_images(bundle, occlusion_classes, num_occlusion_images)
        occ_images = torch.stack(picked)
        m = torch.tensor(bundle.mean).view(-1, 1, 1)
        s = torch.tensor(bundle.std).view(-1, 1, 1)
        display = [(x * s + m).clamp(0, 1).permute(1, 2, 0).numpy() for x in picked]

    if dm is None:
        t0 = time.perf_counter()
        dm = run.build_model(device)
        timings["build_model"] = time.perf_counter() - t0
    if stats is None:
        t0 = time.perf_counter()
        loader = bundle.loader("val", batch_size=batch_size, shuffle=False)
        stats = dm.paths(loader, raw=True, classes=list(bundle.classes), num_classes=bundle.num_classes,
                         progress=progress, device=device, max_batches=max_batches)
        timings["collect_paths"] = time.perf_counter() - t0
        source = f"collected on the validation split of {data or cfg.get('data')}"
    else:
        source = f"{run.path / 'paths.npz'}"
    if stats.classes is None and run_classes is not None:
        stats.classes = list(run_classes)

    analysis = analyze_paths(stats, tolerance=tolerance, threshold=threshold, max_tree_samples=max_tree_samples,
                             n_permutations=n_permutations, tree_test=tree_test, alpha=alpha, seed=seed)
    analysis.timings = {**timings, **analysis.timings}
    if occ_images is not None:
        t0 = time.perf_counter()
        fill = (-np.asarray(mean) / np.asarray(std)).tolist() if mean is not None else 0.0
        analysis.occlusion = occlusion_concepts(dm, occ_images, patch=patch, stride=stride, fill=fill, device=device)
        analysis.images, analysis.image_names, analysis.image_groups = list(display), names, groups
        analysis.timings["occlusion"] = time.perf_counter() - t0
    analysis.meta = {
        "run": str(run.path),
        "model": cfg.get("model"),
        "data": cfg.get("data") if data is None else data,
        "paths": source,
        "occlusion_patch": patch,
        "occlusion_stride": stride if stride is not None else max(patch // 2, 1),
        "tree_test": tree_test,
        "tree_alpha": alpha,
        "hopkins_threshold": threshold if tree_test == "hopkins" else None,
        "occlusion_groups": {g: len(i) for g, i in groups.items()},
        "seed": seed,
    }
    with atomic_dir(out, marker="analysis.json") as tmp:  # the report appears complete or not at all
        write_report(analysis, tmp, title=f"nd analyze: {cfg.get('model', run.path.name)}", figures=figures)
        analysis.timings["total"] = time.perf_counter() - t_start
        _write_json(tmp / "analysis.json", analysis.to_dict())  # again, now with the total time
    return out / "index.html"
