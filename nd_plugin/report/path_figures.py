"""Figures of the path analyses: filter states, class paths, path distribution (seed Figs. A, E, F).

Each function takes an analysis result and returns a :class:`matplotlib.figure.Figure` built
without pyplot (the Agg canvas renders it), so nothing changes for a user's own plots.
"""

from __future__ import annotations

import numpy as np

from nd_plugin.interpret import ClassPaths, FilterStates, PathDistribution
from nd_plugin.interpret.states import DYNAMIC, ENERGETIC, SILENT
from nd_plugin.report.plotting import figure, layer_ticks, short_name

__all__ = [
    "STATE_COLOURS",
    "plot_class_paths",
    "plot_class_stats",
    "plot_filter_states",
    "plot_layer_histograms",
    "plot_path_distribution",
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
    fig = figure(12, height)
    grid = fig.add_gridspec(2, 2, width_ratios=[1.1, 1])
    ax = fig.add_subplot(grid[:, 0])
    shares = np.array([fs[n].shares() for n in names] + [fs.overall.shares()])
    labels = [short_name(n) for n in names] + ["ALL"]
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
        axh.set_title("all gated layers" if layer is None else f"last gated layer: {short_name(layer, 40)}", fontsize=9)
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
    fig = figure(2.2 * cols, height, dpi=100, layout=None)
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
        ax.set_title(f"{short_name(names[i], 26)}\nS{s} D{d} E{e}", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_xlim(0, 1)
    fig.suptitle(
        "Per layer: histogram of the fraction of inputs for which each filter is on (S/D/E: silent/dynamic/energetic)",
        fontsize=9,
        y=1 - 0.15 / height,
        va="top",
    )
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
    fig = figure(13, 3.0 + 0.32 * k * 3)
    grid = fig.add_gridspec(3, 2, height_ratios=[1.1, 1.1, 1], width_ratios=[40, 1])
    ax = fig.add_subplot(grid[0, 0])
    im = ax.imshow(cp.means[:, order], aspect="auto", interpolation="antialiased", cmap="viridis", vmin=0, vmax=1)
    for o in offsets[1:-1]:
        ax.axvline(o - 0.5, color="white", lw=0.6)
    ax.set_yticks(range(k), cp.classes, fontsize=8)
    mids = (offsets[:-1] + offsets[1:]) / 2
    step = max(1, int(np.ceil(len(mids) / 30)))
    ax.set_xticks(mids[::step], [short_name(n, 18) for n in cp.names][::step], rotation=90, fontsize=6)
    ax.set_title(
        f"Class calculation paths: share of a class's inputs for which each filter is on ({sum(cp.sizes)} filters, sorted within each layer)",
        fontsize=9,
    )
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
        axd.text(
            0.5, 0.5, "no dynamic filter: every class takes the same path", ha="center", va="center", transform=axd.transAxes
        )
        fig.add_subplot(grid[1, 1]).set_axis_off()
    axd.set_yticks(range(k), cp.classes, fontsize=8)
    axd.set_title(f"Deviation of each class's on-rate from the overall on-rate ({varying.size} filters that vary)", fontsize=9)
    ax2 = fig.add_subplot(grid[2, 0])
    im2 = ax2.imshow(cp.width_share, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    ax2.set_yticks(range(k), [f"{c} ({w:.0f})" for c, w in zip(cp.classes, cp.total_width)], fontsize=8)
    layer_ticks(ax2, list(cp.names), axis="x")
    if len(cp.names) * k <= 400:
        for (r, c), v in np.ndenumerate(cp.width_share):
            ax2.text(
                c,
                r,
                f"{v:.2f}"[1:] if v < 1 else "1",
                ha="center",
                va="center",
                fontsize=5.5,
                color="white" if v < 0.6 else "black",
            )
    ax2.set_title(
        "Path width per class and layer (share of the layer's filters on, mean over the class); in brackets: filters on over all layers",
        fontsize=9,
    )
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
    fig = figure(15, 4.8)
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
    layer_ticks(a2, list(cp.names), axis="x", max_ticks=30)
    a2.set_ylabel("η² (path variance explained by class)")
    p = "n/a" if cp.permutation_p is None else f"{cp.permutation_p:.3g}"
    a2.set_title(
        f"Class dependence per layer; permutation p = {p}; {cp.class_dependent}/{cp.tested} varying filters class-dependent",
        fontsize=9,
    )
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

    fig = figure(15, 4.8)
    a1, a2, a3 = fig.subplots(1, 3, width_ratios=[1.2, 1, 1])
    cmap = matplotlib.colormaps["tab10" if len(pd.classes) <= 10 else "tab20"]
    for c, name in enumerate(pd.classes):
        sel = pd.embedding_labels == c
        if sel.any():
            a1.scatter(
                pd.embedding[sel, 0], pd.embedding[sel, 1], s=4, alpha=0.5, color=cmap(c % cmap.N), label=name, linewidths=0
            )
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
