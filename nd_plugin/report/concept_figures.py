"""Figures of the decision tree (seed Fig. C) and of occlusion concepts (seed Fig. B).

Every function returns a :class:`matplotlib.figure.Figure` on the Agg canvas (no pyplot, no
backend change; :mod:`nd_plugin.report.plotting`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import numpy as np

from nd_plugin.interpret import DecisionTree, OcclusionConcepts, concept_consistency
from nd_plugin.report.plotting import figure, layer_ticks, short_name

__all__ = ["plot_decision_tree", "plot_occlusion"]


def _tree_layout(tree: DecisionTree) -> dict[int, float]:
    xs: dict[int, float] = {}
    counter = [0]

    def visit(node_id: int) -> float:
        node = tree.nodes[node_id]
        if not node.children:
            xs[node_id] = float(counter[0])
            counter[0] += 1
        else:
            xs[node_id] = float(np.mean([visit(c) for c in node.children]))
        return xs[node_id]

    visit(0)
    return xs


def _split_label(tree: DecisionTree, node) -> str:
    t = node.tests.get(node.split_layer)
    if t is None:
        return ""
    if tree.test == "hopkins":
        return f"H={t.statistic:.2f}"
    return f"p={t.p_value:.2g}\nindex {t.statistic:.2f}\n(null {t.null_mean:.2f})"


def plot_decision_tree(tree: DecisionTree):
    """The decision process as a tree over layers (seed Fig. C).

    Depth runs downwards through the gated layers. A group of inputs splits (k-means, k = 2) at
    the layer where its cluster test rejects (annotated: p-value and cluster index against the
    null's mean, or Hopkins H); each leaf lists the classes that end there by majority, its size
    and its purity. The title names the test; without splits it says why.

    Args:
        tree: result of :func:`~nd_plugin.interpret.decision_tree`.

    Returns:
        The Figure.

    Example:
        >>> from nd_plugin.interpret import decision_tree
        >>> rng = np.random.default_rng(0)
        >>> fig = plot_decision_tree(decision_tree(rng.random((60, 8)) < 0.5, np.arange(60) % 2))
        >>> " ".join(fig.axes[0].get_title().splitlines()[1:])
        'no split: no layer showed two groups at alpha = 0.01 (smallest p = 0.7, at layer0; 1 layer tested)'
    """
    xs = _tree_layout(tree)
    n_leaves = len(tree.leaves)
    n_layers = max(len(tree.layers), 1)
    fig = figure(min(max(7.0, 1.1 * n_leaves + 3), 22.0), max(5.0, 0.2 * n_layers + 3.2))
    ax = fig.add_subplot()
    bottom = n_layers
    cmap = __import__("matplotlib").colormaps["tab10" if len(tree.classes) <= 10 else "tab20"]
    for node in tree.nodes:
        x = xs[node.id]
        top = -0.5 if node.parent is None else tree.nodes[node.parent].split_layer
        end = node.split_layer if node.children else bottom
        ax.plot([x, x], [top, end], color="#555", lw=1.2 + 2.5 * node.size / max(tree.nodes[0].size, 1))
        if n_leaves <= 4:  # few branches: room to show the test of every layer the group stayed whole
            for layer, t in node.tests.items():
                if layer != node.split_layer:
                    if t.reason:
                        text = "not tested: " + ("no varying filter" if "varies" in t.reason else "too few inputs")
                    else:
                        text = f"H={t.statistic:.2f}" if tree.test == "hopkins" else f"p={t.p_value:.2g}"
                    ax.annotate(text, (x, layer), xytext=(4, -3), textcoords="offset points", fontsize=6, color="#777")
        if node.children:
            cx = [xs[c] for c in node.children]
            ax.plot([min(cx), max(cx)], [end, end], color="#555", lw=1.2)
            ax.annotate(
                _split_label(tree, node), (x, end), xytext=(3, -14), textcoords="offset points", fontsize=6.5, color="#b22"
            )
            ax.plot([x], [end], "o", color="#b22", ms=4)
        else:
            comp = node.composition
            dom = int(np.argmax(comp)) if comp.size else 0
            purity = comp[dom] / max(comp.sum(), 1) if comp.size else 0.0
            names = [tree.classes[c] for c in node.classes] or ["(no class)"]
            dom_name = tree.classes[dom] if tree.classes else ""
            text = "\n".join(names[:6] + (["…"] if len(names) > 6 else [])) + f"\nn={node.size}\n{purity:.0%} {dom_name}"
            ax.text(
                x,
                bottom + 0.4,
                text,
                ha="center",
                va="top",
                fontsize=7 if n_leaves <= 16 else 5.5,
                color=cmap(dom % cmap.N) if node.classes else "#777",
            )
    ax.set_ylim(bottom + 0.3 + 0.35 * 9, -1)
    ax.set_xlim(-0.8, max(n_leaves - 0.2, 0.8))
    if tree.layers:
        layer_ticks(ax, tree.layers, axis="y", max_ticks=60)
    ax.set_xticks([])
    for spine in ("top", "right", "bottom"):
        ax.spines[spine].set_visible(False)
    first = tree.first_parting()
    if tree.no_split_reason:
        sub = f"no split: {tree.no_split_reason}"
    elif first is None:
        sub = "splits group inputs, but no two classes part (every class follows its majority)"
    else:
        sub = f"first parting at {first[0]}: " + " | ".join(", ".join(g) for g in first[1])
    sub = "\n".join(textwrap.wrap(sub, int(fig.get_figwidth() * 12)))
    ax.set_title(f"Decision process: split when {tree.rule} → k-means (k = 2)\n{sub}", fontsize=9)
    return fig


def _display(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.float64)
    return img / 255.0 if img.max() > 1.0 else img


def plot_occlusion(
    oc: OcclusionConcepts,
    images: Sequence[np.ndarray],
    *,
    groups: Mapping[str, Sequence[int]] | None = None,
    filters: int = 3,
    max_images: int = 6,
    cols: int = 6,
    classes: Sequence[str] | None = None,
):
    """Seed Fig. B: per group of images (a class), its most consistent filters and, on each image
    where the filter has a localised concept, the region whose occlusion silences it.

    For each group, :func:`~nd_plugin.interpret.concept_consistency` ranks the filters by the share
    of the group's images on which some, but at most half, of the patches turn them off. Every
    panel is one (filter, image) pair: the image dimmed outside the filter's silencing region
    (outlined red), titled with the filter, its consistency and the prediction. Panels of one
    filter follow each other, filters in order of consistency, groups one after the other, in rows
    of ``cols``: only the last row can hold empty places.

    Args:
        oc: result of :func:`~nd_plugin.interpret.occlusion_concepts`.
        images: the images as ``(H, W, 3)`` arrays in ``[0, 1]`` (or uint8), for display.
        groups: ``{label: image indices}`` (default: all images in one group).
        filters: top filters shown per group.
        max_images: panels per filter at most.
        cols: panels per row.
        classes: class names for the predictions.

    Returns:
        The Figure.
    """
    groups = dict(groups) if groups else {"images": list(range(len(images)))}
    sil = oc.silenced
    limit = 0.5 * len(oc.boxes)
    cells = []  # (label, filter, image, consistency text)
    for label, idx in groups.items():
        cc = concept_consistency(oc, idx)
        for f in cc.top(filters):
            shown = [i for i in idx if 0 < sil[i, :, f].sum() <= limit][:max_images]
            cells += [(label, f, i, f"{int(cc.localised[f])} of {len(cc.images)}") for i in shown]
    if not cells:
        fig = figure(6.0, 2.0)
        ax = fig.add_subplot()
        ax.text(
            0.5,
            0.5,
            "no filter is turned off by a single patch on any of the\n"
            f"{len(images)} occluded images (or every patch turns it off)",
            ha="center",
            va="center",
            fontsize=9,
        )
        ax.set_axis_off()
        return fig
    cols = max(1, min(cols, len(cells)))
    rows = int(np.ceil(len(cells) / cols))
    fig = figure(1.75 * cols, 1.95 * rows + 0.55)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (label, f, i, consistent) in zip(axes, cells):
        img = _display(images[i])
        region = oc.region(i, f)
        ax.imshow(img * (0.3 + 0.7 * region[..., None]), interpolation="nearest")
        ax.contour(region > 0, levels=[0.5], colors="red", linewidths=0.8)
        layer, ch = oc.filter_name(f)
        pred = int(oc.base_pred[i])
        name = classes[pred] if classes is not None and pred < len(classes) else str(pred)
        ax.set_title(
            f"{short_name(layer, 15)}[{ch}] ({consistent} {label})\nimage {groups[label].index(i) + 1}, pred {name}, "
            f"{int(sil[i, :, f].sum())} patches",
            fontsize=6,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(cells) :]:
        ax.set_visible(False)
    fig.suptitle(
        "Semantic concepts by occlusion: per class, the filters whose concept is most consistent (localised on\n"
        "the most images of the class); bright = region whose blacking-out turns the filter off",
        fontsize=8,
    )
    return fig
