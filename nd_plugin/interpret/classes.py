"""Class calculation paths: per-class mean paths, widths, similarities (seed §A.4, Fig. F).

How much paths differ between classes is measured by the *share of path variance explained by the
class*, pooled over filters (η², "between-class over total sum of squares")::

    η² = Σ_f Σ_k n_k (p_kf − p_f)²  /  Σ_f N p_f (1 − p_f)

with ``p_kf`` the rate at which filter ``f`` is on for class ``k`` and ``p_f`` its overall rate. It
is 0 when every class uses every filter at the same rate and 1 when each class has one fixed path
of its own. It needs only the counts. For a single filter ``N·η²_f`` is exactly Pearson's χ² of the
2 × K table (on/off × class), so each dynamic filter also gets a χ² test of "its rate does not
depend on the class" (``K − 1`` degrees of freedom); ``class_dependent`` counts the filters that
reject it at ``alpha`` after a Bonferroni correction. When raw paths are available, a label
permutation test (on at most ``permutation_samples`` inputs) gives a p-value for the pooled η², and a nearest-centroid classifier (2-fold,
stratified) says how often a path alone names its class (chance ``1/K``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nd_plugin.paths import PathStats

from ._common import jsonable

__all__ = ["ClassPaths", "class_paths", "eta_squared"]


def _between_total(class_sums: np.ndarray, class_n: np.ndarray, sums: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-filter between-class and total sums of squares of binary data."""
    seen = class_n > 0
    between = (class_sums[seen] ** 2 / class_n[seen, None]).sum(0) - sums**2 / n
    total = sums - sums**2 / n
    return np.maximum(between, 0.0), np.maximum(total, 0.0)


def eta_squared(class_counts: np.ndarray, class_n: np.ndarray) -> float:
    """Share of the variance of binary paths explained by the class, pooled over filters.

    Args:
        class_counts: ``(K, F)`` on-counts per class.
        class_n: ``(K,)`` inputs per class.

    Returns:
        η² in ``[0, 1]``; ``nan`` when no filter varies.

    Example:
        >>> eta_squared(np.array([[2, 1], [0, 1]]), np.array([2, 2]))
        0.5
    """
    cc = np.asarray(class_counts, dtype=np.float64)
    cn = np.asarray(class_n, dtype=np.float64)
    between, total = _between_total(cc, cn, cc.sum(0), float(cn.sum()))
    t = total.sum()
    return float(between.sum() / t) if t > 0 else float("nan")


@dataclass(frozen=True, eq=False)
class ClassPaths:
    """Per-class calculation paths and how much they differ.

    Attributes:
        names: layers in path order.
        sizes: filters per layer.
        classes: class names.
        class_n: ``(K,)`` inputs per class.
        means: ``(K, F)`` per-class mean path (rate at which each filter is on).
        widths: ``(K, L)`` expected number of active filters per layer and class.
        width_share: ``(K, L)`` the same as a fraction of the layer's filters.
        total_width: ``(K,)`` expected number of active filters over all layers.
        similarity: ``(K, K)`` weighted Jaccard (Ruzicka) similarity of mean paths,
            ``Σ min(a, b) / Σ max(a, b)``; 1 for identical paths.
        centred_cosine: ``(K, K)`` cosine of mean paths minus the overall mean path (which classes
            deviate from the average path in the same direction).
        eta2: pooled η² (see the module docstring).
        eta2_layers: ``(L,)`` η² per layer (``nan`` where no filter varies).
        chi2: ``(F,)`` per-filter Pearson χ² (0 for filters that never vary).
        p_values: ``(F,)`` per-filter p-values (1 for filters that never vary).
        alpha: significance level of ``class_dependent``.
        tested: filters that vary over the data (the χ² is defined).
        class_dependent: tested filters whose rate depends on the class (Bonferroni over ``tested``).
        permutation_p: p-value of η² under label permutation (``None`` without raw paths).
        n_permutations: permutations drawn.
        centroid_accuracy: 2-fold nearest-centroid accuracy of paths → class (``None`` without raw paths).
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    classes: tuple[str, ...]
    class_n: np.ndarray
    means: np.ndarray
    widths: np.ndarray
    width_share: np.ndarray
    total_width: np.ndarray
    similarity: np.ndarray
    centred_cosine: np.ndarray
    eta2: float
    eta2_layers: np.ndarray
    chi2: np.ndarray
    p_values: np.ndarray
    alpha: float
    tested: int
    class_dependent: int
    permutation_p: float | None
    n_permutations: int
    centroid_accuracy: float | None

    def most_similar(self) -> tuple[str, str, float]:
        """The two distinct classes whose mean paths are most alike."""
        s = self.similarity.copy()
        np.fill_diagonal(s, -np.inf)
        i, j = np.unravel_index(int(np.argmax(s)), s.shape)
        return self.classes[i], self.classes[j], float(s[i, j])

    def to_dict(self) -> dict[str, Any]:
        """Every number, as plain Python (per-filter arrays included)."""
        return jsonable(
            {
                "classes": self.classes,
                "layers": self.names,
                "filters_per_layer": self.sizes,
                "class_n": self.class_n,
                "widths": self.widths,
                "width_share": self.width_share,
                "total_width": self.total_width,
                "similarity": self.similarity,
                "centred_cosine": self.centred_cosine,
                "statistic": {
                    "name": "eta2 (share of path variance explained by class, pooled over filters)",
                    "eta2": self.eta2,
                    "eta2_layers": self.eta2_layers,
                    "permutation_p": self.permutation_p,
                    "n_permutations": self.n_permutations,
                    "chi2_alpha": self.alpha,
                    "filters_tested": self.tested,
                    "filters_class_dependent": self.class_dependent,
                    "centroid_accuracy": self.centroid_accuracy,
                    "chance_accuracy": 1.0 / max(len(self.classes), 1),
                },
                "means": self.means,
                "chi2": self.chi2,
                "p_values": self.p_values,
            }
        )


def _pairwise(means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mins = np.minimum(means[:, None, :], means[None, :, :]).sum(-1)
    maxs = np.maximum(means[:, None, :], means[None, :, :]).sum(-1)
    ruzicka = np.where(maxs > 0, mins / np.where(maxs > 0, maxs, 1), 1.0)
    centred = means - means.mean(0, keepdims=True)
    norm = np.linalg.norm(centred, axis=1)
    cos = centred @ centred.T / np.maximum(norm[:, None] * norm[None, :], 1e-12)
    return ruzicka, cos


def _permutation_p(paths: np.ndarray, labels: np.ndarray, k: int, n_perm: int, seed: int, max_samples: int) -> float:
    rng = np.random.default_rng(seed)
    if paths.shape[0] > max_samples:  # a seeded random subset keeps the test cheap for large N
        keep = np.sort(rng.choice(paths.shape[0], size=max_samples, replace=False))
        paths, labels = paths[keep], labels[keep]
    sums = paths.sum(0, dtype=np.float64)
    vary = (sums > 0) & (sums < paths.shape[0])
    x = paths[:, vary].astype(np.float32)
    n = x.shape[0]
    s = x.sum(0, dtype=np.float64)
    total = float(np.maximum(s - s**2 / n, 0).sum())
    if total <= 0:
        return 1.0
    class_n = np.bincount(labels, minlength=k).astype(np.float64)
    onehot = np.zeros((k, n), dtype=np.float32)
    onehot[labels, np.arange(n)] = 1.0
    observed = _between_total((onehot @ x).astype(np.float64), class_n, s, n)[0].sum() / total
    exceed = 0
    for _ in range(n_perm):
        perm = rng.permutation(labels)
        onehot = np.zeros((k, n), dtype=np.float32)
        onehot[perm, np.arange(n)] = 1.0
        between, _ = _between_total((onehot @ x).astype(np.float64), class_n, s, n)
        exceed += between.sum() / total >= observed - 1e-12
    return (exceed + 1) / (n_perm + 1)


def _centroid_accuracy(paths: np.ndarray, labels: np.ndarray, seed: int) -> float | None:
    """2-fold (stratified) accuracy of assigning each path to the nearest class mean path."""
    from sklearn.model_selection import StratifiedKFold

    _, counts = np.unique(labels, return_counts=True)
    if counts.size < 2 or counts.min() < 2:
        return None
    x = paths.astype(np.float32)
    correct = 0
    for train, test in StratifiedKFold(n_splits=2, shuffle=True, random_state=seed).split(x, labels):
        ks = np.unique(labels[train])
        centroids = np.stack([x[train][labels[train] == c].mean(0) for c in ks])
        d = (x[test] ** 2).sum(1)[:, None] - 2 * x[test] @ centroids.T + (centroids**2).sum(1)[None, :]
        correct += int((ks[d.argmin(1)] == labels[test]).sum())
    return correct / len(labels)


def class_paths(
    stats: PathStats,
    *,
    alpha: float = 0.01,
    n_permutations: int = 99,
    permutation_samples: int = 2000,
    seed: int = 0,
) -> ClassPaths:
    """Per-class mean paths, path widths, pairwise similarity and a test of class dependence.

    Args:
        stats: path statistics (``class_counts``/``class_n``; raw paths enable the permutation
            test and the centroid accuracy).
        alpha: level of the per-filter χ² tests (Bonferroni-corrected over the tested filters).
        n_permutations: label permutations for the p-value of η² (0 skips the test).
        permutation_samples: the test runs on a seeded random subset of at most this many inputs
            (its p-value is that of the subset's η²; with thousands of inputs any class structure
            gives the smallest p-value the permutations can show).
        seed: seed of the permutations and the cross-validation split.

    Returns:
        A :class:`ClassPaths`.

    Example:
        >>> cp = class_paths(stats)  # doctest: +SKIP
        >>> cp.eta2, cp.permutation_p  # doctest: +SKIP
        (0.21, 0.01)
        >>> dict(zip(cp.classes, cp.total_width.round()))  # doctest: +SKIP
        {'airplane': 410.0, 'automobile': 431.0, 'bird': 388.0, ...}
    """
    from scipy.stats import chi2 as chi2_dist

    cc = np.asarray(stats.class_counts, dtype=np.float64)
    cn = np.asarray(stats.class_n, dtype=np.float64)
    k = cc.shape[0]
    classes = tuple(stats.classes) if stats.classes is not None else tuple(str(i) for i in range(k))
    means = cc / np.maximum(cn, 1)[:, None]
    widths = np.stack([m.sum(-1) for m in stats.split(means)], axis=1)
    sizes = np.asarray(stats.site_channels, dtype=np.float64)
    n = float(cn.sum())
    between, total = _between_total(cc, cn, cc.sum(0), n)
    layer_b = np.array([b.sum() for b in stats.split(between)])
    layer_t = np.array([t.sum() for t in stats.split(total)])
    eta2_layers = np.where(layer_t > 0, layer_b / np.where(layer_t > 0, layer_t, 1), np.nan)
    eta2 = float(between.sum() / total.sum()) if total.sum() > 0 else float("nan")
    tested_mask = total > 1e-12
    chi2 = np.zeros_like(total)
    chi2[tested_mask] = n * between[tested_mask] / total[tested_mask]
    dof = max(int((cn > 0).sum()) - 1, 1)
    p_values = np.ones_like(total)
    p_values[tested_mask] = chi2_dist.sf(chi2[tested_mask], dof)
    tested = int(tested_mask.sum())
    class_dependent = int((p_values[tested_mask] < alpha / max(tested, 1)).sum())
    ruzicka, cos = _pairwise(means)

    perm_p = acc = None
    if stats.paths is not None and stats.labels is not None:
        labels = np.asarray(stats.labels, dtype=np.int64)
        if n_permutations > 0 and np.isfinite(eta2):
            perm_p = _permutation_p(stats.paths, labels, k, n_permutations, seed, permutation_samples)
        acc = _centroid_accuracy(stats.paths, labels, seed)
    return ClassPaths(
        names=tuple(stats.site_names),
        sizes=tuple(int(c) for c in stats.site_channels),
        classes=classes,
        class_n=cn.astype(np.int64),
        means=means,
        widths=widths,
        width_share=widths / np.maximum(sizes, 1)[None, :],
        total_width=widths.sum(1),
        similarity=ruzicka,
        centred_cosine=cos,
        eta2=eta2,
        eta2_layers=eta2_layers,
        chi2=chi2,
        p_values=p_values,
        alpha=float(alpha),
        tested=tested,
        class_dependent=class_dependent,
        permutation_p=perm_p,
        n_permutations=int(n_permutations) if perm_p is not None else 0,
        centroid_accuracy=acc,
    )
