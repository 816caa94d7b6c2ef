"""The layer-by-layer decision process of a decoupled network (seed §A.3, Fig. C).

Starting with every input in one group, layer by layer: for each current group, take its members'
gate vectors of this layer and test whether they form two groups; if they do, the group is split
in two by k-means (k = 2) and both parts go on to the next layer; otherwise the group goes on
whole. The tree groups *inputs*; classes follow them by majority: a class that is in a group goes
with the child that receives most of its inputs there, so each class ends in exactly one leaf and
two classes *part* at the split where they go different ways.

The test (``test=``):

- ``"copula"`` (default): :func:`~nd_plugin.interpret.cluster_test.cluster_test`, the cluster index
  of the best cut along PC1 against a Gaussian-copula null with the group's own per-filter on-rates
  and tetrachoric correlations; split when the Monte Carlo ``p ≤ alpha`` (0.01, 99 null draws).
  Calibrated for binary, correlated, tied paths: its false-split rate and power are measured by
  ``benchmarks/cluster_calibration.py`` (docs/benchmarks.md).
- ``"permutation"`` / ``"gaussian"``: the same statistic against a filter-wise permutation or a
  continuous normal null (kept for comparison; not calibrated on correlated binary paths).
- ``"hopkins"``: the seed's Hopkins statistic (convention: ≈1 clustered, ≈0.5 random; reference
  drawn from the product of the filters' marginals), split when ``H ≥ threshold``. Not calibrated:
  tied paths put data-to-data distances at 0 (H → 1) and correlated filters look clustered to the
  independent reference.

Every test is stored on its node (statistic, p-value, null draws, decision), and every node and
the tree say why they did not split (too few inputs, one class, no varying filter, p above alpha).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nd_plugin.paths import PathStats

from ._common import as_layer_paths, jsonable
from .cluster_test import NULLS, ClusterTest, cluster_test
from .hopkins import hopkins

__all__ = ["TreeNode", "DecisionTree", "decision_tree", "TESTS"]

TESTS = NULLS + ("hopkins",)

_DESCRIPTIONS = {
    "copula": "2-means cluster index of the inputs' first-principal-component scores (small = clustered) against a Gaussian-copula null "
              "with the group's per-filter on-rates and tetrachoric correlations; split when the Monte Carlo p <= alpha",
    "permutation": "2-means cluster index of the PC1 scores against filter-wise permutations "
                   "(marginals kept, correlations removed); split when p <= alpha",
    "gaussian": "2-means cluster index of the PC1 scores against a continuous normal with the group's mean and "
                "covariance (SigClust); split when p <= alpha",
    "hopkins": "Hopkins H (~1 clustered, ~0.5 random; reference from the product of the filters' marginals, Hamming "
               "distances); split when H >= threshold (not calibrated for tied, correlated binary paths)",
}


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
        tests: the test of every layer visited while this group stayed whole (``{layer index:
            ClusterTest}``; the last one decided the split).
        reason: why the group split where it did, or why it never split.
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
    tests: dict[int, ClusterTest] = field(default_factory=dict)
    reason: str = ""
    members: np.ndarray | None = field(default=None, repr=False)

    @property
    def statistics(self) -> dict[int, float]:
        """``{layer index: test statistic}`` (cluster index, or Hopkins H)."""
        return {i: t.statistic for i, t in self.tests.items()}


@dataclass(eq=False)
class DecisionTree:
    """Result of :func:`decision_tree`.

    Attributes:
        nodes: every group, root first.
        layers: layer names, in path order.
        classes: class names.
        test: the cluster test (one of :data:`TESTS`).
        alpha: level of the p-value tests.
        threshold: Hopkins threshold (``test="hopkins"`` only).
        parting: ``(K, K)`` index of the layer at which two classes part (``-1``: they never do);
            the diagonal is ``-1``.
        no_split_reason: why the tree made no split (``None`` when it split).
        settings: the other parameters.
    """

    nodes: list[TreeNode]
    layers: list[str]
    classes: list[str]
    test: str
    alpha: float
    threshold: float
    parting: np.ndarray
    no_split_reason: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def leaves(self) -> list[TreeNode]:
        """Nodes without children."""
        return [n for n in self.nodes if not n.children]

    @property
    def splits(self) -> list[TreeNode]:
        """Nodes that split, in the order they were made."""
        return [n for n in self.nodes if n.children]

    @property
    def description(self) -> str:
        """What the test is, in one sentence."""
        return _DESCRIPTIONS[self.test]

    @property
    def rule(self) -> str:
        """The split rule with its numbers, e.g. ``"copula null, p ≤ 0.01"``."""
        if self.test == "hopkins":
            return f"Hopkins H ≥ {self.threshold:g}"
        return f"{self.test} null, p ≤ {self.alpha:g} ({self.settings.get('n_null', '?')} draws)"

    def tested(self) -> list[ClusterTest]:
        """Every test the tree ran (untested groups left out)."""
        return [t for n in self.nodes for t in n.tests.values() if not t.reason]

    def parting_layer(self, a: str | int, b: str | int) -> str | None:
        """Name of the layer at which classes ``a`` and ``b`` part, or ``None``."""
        i = self.classes.index(a) if isinstance(a, str) else a
        j = self.classes.index(b) if isinstance(b, str) else b
        layer = int(self.parting[i, j])
        return self.layers[layer] if layer >= 0 else None

    def first_parting(self) -> tuple[str, list[list[str]]] | None:
        """The earliest layer at which some classes part, with the class groups of that split."""
        splits = [n for n in self.splits if sum(bool(self.nodes[c].classes) for c in n.children) == 2]
        if not splits:
            return None
        first = min(splits, key=lambda n: n.split_layer)
        return self.layers[first.split_layer], [
            [self.classes[k] for k in self.nodes[c].classes] for c in first.children
        ]

    def to_dict(self) -> dict[str, Any]:
        """The tree as plain Python: the test, every node's tests and reason, the parting layers."""
        nodes = []
        for nd in self.nodes:
            nodes.append(
                {
                    "id": nd.id,
                    "parent": nd.parent,
                    "depth": nd.depth,
                    "formed_at_layer": self.layers[nd.start_layer] if self.layers else None,
                    "size": nd.size,
                    "composition": dict(zip(self.classes, nd.composition)),
                    "classes": [self.classes[k] for k in nd.classes],
                    "split_layer": None if nd.split_layer is None else self.layers[nd.split_layer],
                    "split_layer_index": nd.split_layer,
                    "children": nd.children,
                    "reason": nd.reason,
                    "tests": {self.layers[i]: t.to_dict() for i, t in nd.tests.items()},
                }
            )
        first = self.first_parting()
        tested = self.tested()
        return jsonable(
            {
                "test": {"name": self.test, "description": self.description, "rule": self.rule,
                         "alpha": self.alpha, "threshold": self.threshold if self.test == "hopkins" else None,
                         "tested_groups": len(tested), "splits": len(self.splits)},
                "no_split_reason": self.no_split_reason,
                "settings": self.settings,
                "layers": self.layers,
                "classes": self.classes,
                "nodes": nodes,
                "parting_layer_index": self.parting,
                "first_parting": None if first is None else {"layer": first[0], "groups": first[1]},
            }
        )


def _hopkins_test(x: np.ndarray, threshold: float, min_samples: int, sample_size, rng) -> ClusterTest:
    """Hopkins H wrapped as a :class:`ClusterTest` (``reject``: H ≥ threshold; no p-value)."""
    nan = float("nan")
    varying = int((x.min(0) != x.max(0)).sum()) if x.shape[0] else 0
    if x.shape[0] < max(min_samples, 3):
        return ClusterTest(nan, nan, False, nan, "hopkins", 0, nan, nan, x.shape[0], varying,
                           f"{x.shape[0]} inputs, fewer than the {max(min_samples, 3)} the test needs")
    if varying == 0:
        return ClusterTest(nan, nan, False, nan, "hopkins", 0, nan, nan, x.shape[0], 0, "no filter varies over the group's inputs")
    h = hopkins(x, sample_size=sample_size, seed=rng)
    return ClusterTest(h, nan, bool(h >= threshold), nan, "hopkins", 0, nan, nan, x.shape[0], varying)


def _kmeans_split(x: np.ndarray, seed: int) -> np.ndarray:
    """k-means (k = 2) labels of the rows; identical rows are fitted once, weighted by their count."""
    from sklearn.cluster import KMeans

    xv = x[:, x.min(0) != x.max(0)]
    rows, inverse, counts = np.unique(xv, axis=0, return_inverse=True, return_counts=True)
    km = KMeans(n_clusters=2, n_init=3, random_state=seed).fit(rows.astype(np.float32), sample_weight=counts)
    return km.labels_[inverse.reshape(-1)]


def _why_not_at_all(x: np.ndarray, y: np.ndarray, min_size: int, classes: Sequence[str]) -> str | None:
    n = x.shape[0]
    present = np.unique(y)
    if n < 2 * min_size:
        return f"{n} inputs: a split needs at least 2 x min_size = {2 * min_size}"
    if present.size < 2:
        name = classes[int(present[0])] if present.size else "none"
        return f"every input is of one class ({name}): no two classes can part"
    if (x.min(0) == x.max(0)).all():
        return f"no dynamic filter: every gate is constant over the {n} inputs"
    return None


def decision_tree(
    paths: PathStats | Mapping[str, Any] | np.ndarray,
    labels: np.ndarray | None = None,
    *,
    test: str = "copula",
    alpha: float = 0.01,
    n_null: int = 99,
    test_samples: int | None = 2000,
    space: str = "pc1",
    threshold: float = 0.75,
    min_size: int | None = None,
    max_leaves: int = 16,
    max_samples: int | None = 5000,
    layer_sizes: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    sample_size: int | float | None = None,
    seed: int = 0,
) -> DecisionTree:
    """Builds the layer-by-layer cluster-test + k-means decision tree (METHOD.md §3).

    Args:
        paths: a :class:`PathStats` with raw paths, ``{layer: (N, C) gates}``, or an ``(N, F)``
            0/1 array (then give ``layer_sizes``).
        labels: ``(N,)`` true labels (taken from ``paths`` when it is a PathStats).
        test: ``"copula"`` (calibrated, default), ``"permutation"``, ``"gaussian"`` or ``"hopkins"``.
        alpha: level of the p-value tests (split when ``p ≤ alpha``).
        n_null: null draws per test.
        test_samples: each test runs on a random subsample of at most this many of the group's inputs.
        space: ``"pc1"`` (default) or ``"full"``: where the cluster index is taken
            (:func:`~nd_plugin.interpret.cluster_test.cluster_index`).
        threshold: Hopkins threshold (``test="hopkins"`` only).
        min_size: groups smaller than this are not split, nor are splits that would leave a part
            smaller (default ``max(10, N // 100)``).
        max_leaves: stop splitting when the tree has this many leaves.
        max_samples: analyse a class-stratified random subset of at most this many inputs (None: all).
        layer_sizes: filters per layer, for an array input.
        classes: class names.
        sample_size: Hopkins sample size (see :func:`~nd_plugin.interpret.hopkins.hopkins`).
        seed: seed of the subset, the tests and k-means.

    Returns:
        A :class:`DecisionTree`; bad input (one class, too few inputs, no dynamic filter) gives a
        tree without splits whose ``no_split_reason`` says why.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> labels = np.repeat([0, 1], 200)
        >>> shared = rng.random((400, 32)) < 0.5                     # layer 0: the same for both classes
        >>> rates = rng.uniform(0.1, 0.9, (2, 32))
        >>> parted = rng.random((400, 32)) < rates[labels]           # layer 1: class-specific rates
        >>> tree = decision_tree(np.hstack([shared, parted]), labels, layer_sizes=[32, 32], classes=["a", "b"])
        >>> tree.first_parting()
        ('layer1', [['b'], ['a']])
        >>> tree.nodes[0].tests[0].reject, tree.nodes[0].tests[1].reject
        (False, True)
        >>> decision_tree(shared, np.zeros(400, int), classes=["a"]).no_split_reason
        'every input is of one class (a): no two classes can part'
    """
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    if test == "hopkins" and not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if test != "hopkins" and not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    lp = as_layer_paths(paths, labels, layer_sizes=layer_sizes, classes=classes)
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

    def run_test(x: np.ndarray) -> ClusterTest:
        if test == "hopkins":
            return _hopkins_test(x, threshold, 2 * min_size, sample_size, rng)
        return cluster_test(x, null=test, n_null=n_null, alpha=alpha, max_samples=test_samples,
                            min_samples=2 * min_size, space=space, seed=rng)

    root = TreeNode(0, None, 0, 0, n, comp(np.arange(n)), [c for c in range(k) if (y == c).any()], members=np.arange(n))
    nodes = [root]
    parting = np.full((k, k), -1, dtype=np.int64)
    why = _why_not_at_all(x_all, y, min_size, lp.classes)
    active = [] if why else [root]
    root.reason = why or ""
    for layer in range(len(lp.sizes)):
        nxt = []
        for node in active:
            members = node.members
            if len(nodes) - len([m for m in nodes if m.children]) >= max_leaves:
                node.reason = f"the tree reached max_leaves = {max_leaves}"
                nxt.append(node)
                continue
            if len(members) < 2 * min_size:
                node.reason = f"{len(members)} inputs: a split needs at least 2 x min_size = {2 * min_size}"
                nxt.append(node)
                continue
            x = x_all[members, lp.offsets[layer] : lp.offsets[layer + 1]]
            result = run_test(x)
            node.tests[layer] = result
            if not result.reject:
                node.reason = result.reason or f"no layer showed two groups ({_rule_text(test, alpha, threshold)})"
                nxt.append(node)
                continue
            assign = _kmeans_split(x, int(rng.integers(2**31)))
            parts = [members[assign == c] for c in (0, 1)]
            if min(len(p) for p in parts) < min_size:
                node.reason = f"k-means left a part smaller than min_size = {min_size} at {lp.names[layer]}"
                nxt.append(node)
                continue
            comps = [comp(p) for p in parts]
            owner = {c: int(comps[1][c] > comps[0][c]) for c in node.classes}
            node.split_layer = layer
            node.reason = f"split at {lp.names[layer]}: {_result_text(result)}"
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
    if why is None and len(nodes) == 1:
        tested = [t for t in root.tests.values() if not t.reason]
        if not tested:
            why = root.reason or "no layer could be tested"
        elif test == "hopkins":
            best = max(root.tests.items(), key=lambda it: np.nan_to_num(it[1].statistic, nan=-1))
            why = f"no layer reached Hopkins H >= {threshold:g} (largest H = {best[1].statistic:.3f}, at {lp.names[best[0]]})"
        else:
            best = min(root.tests.items(), key=lambda it: np.nan_to_num(it[1].p_value, nan=2))
            why = (f"no layer showed two groups at alpha = {alpha:g} (smallest p = {best[1].p_value:.3g}, at "
                   f"{lp.names[best[0]]}; {len(tested)} layer{'s' if len(tested) != 1 else ''} tested)")
        root.reason = why
    for nd in nodes:
        nd.members = index[nd.members]
    return DecisionTree(
        nodes=nodes,
        layers=lp.names,
        classes=lp.classes,
        test=test,
        alpha=float(alpha),
        threshold=float(threshold),
        parting=parting,
        no_split_reason=why,
        settings={"min_size": min_size, "max_leaves": max_leaves, "samples": n, "seed": seed, "k": 2,
                  "n_null": n_null, "test_samples": test_samples, "space": space},
    )


def _rule_text(test: str, alpha: float, threshold: float) -> str:
    return f"Hopkins H >= {threshold:g}" if test == "hopkins" else f"p <= {alpha:g}"


def _result_text(t: ClusterTest) -> str:
    if t.null == "hopkins":
        return f"Hopkins H = {t.statistic:.3f}"
    return f"cluster index {t.statistic:.3f} vs null {t.null_mean:.3f} ± {t.null_sd:.3f}, p = {t.p_value:.3g}"
