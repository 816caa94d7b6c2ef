"""The layer-by-layer decision process of a decoupled network (seed §A.3, Fig. C).

Starting with every input in one group, layer by layer: for each current group, take its members'
gate vectors of this layer; if their Hopkins statistic (:func:`~nd_plugin.interpret.hopkins.hopkins`,
≈1 clustered, ≈0.5 random) reaches ``threshold`` the group is split in two by k-means (k = 2) and
both parts go on to the next layer; otherwise the group goes on whole. The tree groups *inputs*;
classes follow them by majority: a class that is in a group goes with the child that receives most
of its inputs there, so each class ends in exactly one leaf and two classes *part* at the split
where they go different ways.

A caveat that matters in practice: for bit vectors the Hopkins reference is the product of the
filters' marginals (see :mod:`~nd_plugin.interpret.hopkins`), so H measures departure from
*independent* filters. Gates of a real network are correlated through their shared input, so H is
often near 1 in many layers and the tree then splits until ``min_size`` / ``max_leaves`` stop it;
read the splits together with their class composition (and raise ``threshold`` to see only the
strongest ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nd_plugin.paths import PathStats

from ._common import as_layer_paths, jsonable
from .hopkins import hopkins

__all__ = ["TreeNode", "DecisionTree", "decision_tree"]


@dataclass
class TreeNode:
    """A group of inputs in the decision tree.

    Attributes:
        id: node index in :attr:`DecisionTree.nodes` (the root is 0).
        parent: parent id (``None`` for the root).
        depth: splits above this node.
        start_layer: index of the layer at which this group was formed (0 for the root).
        size: inputs in the group.
        composition: ``(K,)`` inputs per true class.
        classes: class indices assigned to this node by majority.
        split_layer: index of the layer where the group splits (``None`` for a leaf).
        children: ids of the two parts.
        hopkins: Hopkins statistic per layer visited while this group stayed whole
            (``{layer index: H}``; the last one decided the split).
        members: indices of the inputs (not serialised).
    """

    id: int
    parent: int | None
    depth: int
    start_layer: int
    size: int
    composition: np.ndarray
    classes: list[int]
    split_layer: int | None = None
    children: list[int] = field(default_factory=list)
    hopkins: dict[int, float] = field(default_factory=dict)
    members: np.ndarray | None = field(default=None, repr=False)


@dataclass(eq=False)
class DecisionTree:
    """Result of :func:`decision_tree`.

    Attributes:
        nodes: every group, root first.
        layers: layer names, in path order.
        classes: class names.
        threshold: Hopkins threshold used.
        parting: ``(K, K)`` index of the layer at which two classes part (``-1``: they never do);
            the diagonal is ``-1``.
    """

    nodes: list[TreeNode]
    layers: list[str]
    classes: list[str]
    threshold: float
    parting: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def leaves(self) -> list[TreeNode]:
        """Nodes without children."""
        return [n for n in self.nodes if not n.children]

    @property
    def splits(self) -> list[TreeNode]:
        """Nodes that split, in the order they were made."""
        return [n for n in self.nodes if n.children]

    def parting_layer(self, a: str | int, b: str | int) -> str | None:
        """Name of the layer at which classes ``a`` and ``b`` part, or ``None``."""
        i = self.classes.index(a) if isinstance(a, str) else a
        j = self.classes.index(b) if isinstance(b, str) else b
        layer = int(self.parting[i, j])
        return self.layers[layer] if layer >= 0 else None

    def first_parting(self) -> tuple[str, list[list[str]]] | None:
        """The earliest layer at which some classes part, with the class groups of that split."""
        splits = [n for n in self.splits if any(self.nodes[c].classes for c in n.children)]
        splits = [n for n in splits if sum(bool(self.nodes[c].classes) for c in n.children) == 2]
        if not splits:
            return None
        first = min(splits, key=lambda n: n.split_layer)
        return self.layers[first.split_layer], [
            [self.classes[k] for k in self.nodes[c].classes] for c in first.children
        ]

    def to_dict(self) -> dict[str, Any]:
        """The tree as plain Python (node composition per class, Hopkins values, parting layers)."""
        nodes = []
        for nd in self.nodes:
            nodes.append(
                {
                    "id": nd.id,
                    "parent": nd.parent,
                    "depth": nd.depth,
                    "formed_at_layer": self.layers[nd.start_layer],
                    "size": nd.size,
                    "composition": dict(zip(self.classes, nd.composition)),
                    "classes": [self.classes[k] for k in nd.classes],
                    "split_layer": None if nd.split_layer is None else self.layers[nd.split_layer],
                    "split_layer_index": nd.split_layer,
                    "children": nd.children,
                    "hopkins": {self.layers[i]: h for i, h in nd.hopkins.items()},
                }
            )
        first = self.first_parting()
        return jsonable(
            {
                "convention": "Hopkins H: ~1 clustered, ~0.5 random; split when H >= threshold",
                "threshold": self.threshold,
                "settings": self.settings,
                "layers": self.layers,
                "classes": self.classes,
                "nodes": nodes,
                "parting_layer_index": self.parting,
                "first_parting": None if first is None else {"layer": first[0], "groups": first[1]},
            }
        )


def decision_tree(
    paths: PathStats | Mapping[str, Any] | np.ndarray,
    labels: np.ndarray | None = None,
    *,
    threshold: float = 0.75,
    min_size: int | None = None,
    max_leaves: int = 16,
    max_samples: int | None = 5000,
    layer_sizes: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    sample_size: int | float | None = None,
    seed: int = 0,
) -> DecisionTree:
    """Builds the layer-by-layer Hopkins + k-means decision tree (METHOD.md §3).

    Args:
        paths: a :class:`PathStats` with raw paths, ``{layer: (N, C) gates}``, or an ``(N, F)``
            0/1 array (then give ``layer_sizes``).
        labels: ``(N,)`` true labels (taken from ``paths`` when it is a PathStats).
        threshold: split a group when its Hopkins statistic reaches this (0.75 by default: well
            above the 0.5 of structure-free data, as in common practice).
        min_size: groups smaller than this are not split, nor are splits that would leave a part
            smaller (default ``max(10, N // 100)``).
        max_leaves: stop splitting when the tree has this many leaves.
        max_samples: analyse a class-stratified random subset of at most this many inputs (None: all).
        layer_sizes: filters per layer, for an array input.
        classes: class names.
        sample_size: Hopkins sample size (see :func:`hopkins`).
        seed: seed of the subset, Hopkins and k-means.

    Returns:
        A :class:`DecisionTree`.

    Example:
        >>> tree = decision_tree(stats)  # doctest: +SKIP
        >>> tree.first_parting()  # doctest: +SKIP
        ('layer2.1.conv1', [['airplane', 'automobile', 'ship', 'truck'], ['bird', 'cat', ...]])
    """
    from sklearn.cluster import KMeans

    lp = as_layer_paths(paths, labels, layer_sizes=layer_sizes, classes=classes)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    rng = np.random.default_rng(seed)
    n_all = lp.paths.shape[0]
    index = np.arange(n_all)
    if max_samples is not None and n_all > max_samples:
        from sklearn.model_selection import train_test_split

        strat = lp.labels if np.bincount(lp.labels).min(initial=n_all) >= 2 else None
        index, _ = train_test_split(index, train_size=max_samples, stratify=strat, random_state=seed)
        index = np.sort(index)
    x_all, y = lp.paths[index], lp.labels[index]
    n = x_all.shape[0]
    k = len(lp.classes)
    if min_size is None:
        min_size = max(10, n // 100)

    def comp(members: np.ndarray) -> np.ndarray:
        return np.bincount(y[members], minlength=k)

    root = TreeNode(0, None, 0, 0, n, comp(np.arange(n)), [c for c in range(k) if (y == c).any()], members=np.arange(n))
    nodes = [root]
    active = [root]
    parting = np.full((k, k), -1, dtype=np.int64)
    offsets = lp.offsets
    for layer in range(len(lp.sizes)):
        nxt = []
        for node in active:
            members = node.members
            if len(members) < 2 * min_size or len(nodes) - len([n for n in nodes if n.children]) >= max_leaves:
                nxt.append(node)
                continue
            x = x_all[members, offsets[layer] : offsets[layer + 1]]
            h = hopkins(x, sample_size=sample_size, seed=rng)
            node.hopkins[layer] = h
            if not np.isfinite(h) or h < threshold:
                nxt.append(node)
                continue
            xv = x[:, x.min(0) != x.max(0)].astype(np.float32)
            km = KMeans(n_clusters=2, n_init=3, random_state=int(rng.integers(2**31))).fit(xv)
            parts = [members[km.labels_ == c] for c in (0, 1)]
            if min(len(p) for p in parts) < min_size:
                nxt.append(node)
                continue
            comps = [comp(p) for p in parts]
            owner = {c: int(comps[1][c] > comps[0][c]) for c in node.classes}
            node.split_layer = layer
            for c, part in enumerate(parts):
                child = TreeNode(
                    len(nodes), node.id, node.depth + 1, layer, len(part), comps[c],
                    [cl for cl in node.classes if owner[cl] == c], members=part,
                )
                node.children.append(child.id)
                nodes.append(child)
                nxt.append(child)
            for a in node.classes:
                for b in node.classes:
                    if owner[a] != owner[b]:
                        parting[a, b] = layer
        active = nxt
    for nd in nodes:
        nd.members = index[nd.members]
    return DecisionTree(
        nodes=nodes,
        layers=lp.names,
        classes=lp.classes,
        threshold=float(threshold),
        parting=parting,
        settings={"min_size": min_size, "max_leaves": max_leaves, "samples": n, "seed": seed, "k": 2},
    )
