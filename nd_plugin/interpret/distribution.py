"""Distribution of whole calculation paths over a data set (seed §D.1, Fig. D)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nd_plugin.paths import PathStats

from ._common import jsonable, require_raw

__all__ = ["PathDistribution", "path_distribution"]


def _unique_rows(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse index and counts of the distinct rows of a bool matrix."""
    packed = np.ascontiguousarray(np.packbits(bits, axis=1))
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return inverse.ravel(), counts


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) if p.size else 0.0


@dataclass(frozen=True, eq=False)
class PathDistribution:
    """How whole paths are distributed over a data set.

    Attributes:
        classes: class names.
        n: inputs.
        num_filters: path length ``F``.
        distinct: distinct whole paths.
        top_counts: inputs taking each of the most frequent paths (descending).
        entropy: entropy (bits) of the distribution of whole paths.
        class_n: ``(K,)`` inputs per class.
        class_distinct: ``(K,)`` distinct paths within each class.
        class_entropy: ``(K,)`` entropy (bits) of each class's path distribution.
        class_entropy_norm: ``(K,)`` the same divided by ``log2(n_k)`` (1: every input its own path).
        layer_distinct: ``(L,)`` distinct gate vectors per layer.
        embedding: ``(M, 2)`` PCA coordinates of (a seeded subset of) the paths.
        embedding_labels: ``(M,)`` their labels.
        explained_variance: ``(2,)`` variance ratio of the two components.
        hamming_edges: bin edges of the normalised Hamming-distance histograms.
        hamming_within: histogram of distances between random pairs of inputs of the same class.
        hamming_between: the same for pairs of different classes.
        mean_hamming_within: mean normalised Hamming distance, same class.
        mean_hamming_between: mean normalised Hamming distance, different classes.
    """

    classes: tuple[str, ...]
    layers: tuple[str, ...]
    n: int
    num_filters: int
    distinct: int
    top_counts: np.ndarray
    entropy: float
    class_n: np.ndarray
    class_distinct: np.ndarray
    class_entropy: np.ndarray
    class_entropy_norm: np.ndarray
    layer_distinct: np.ndarray
    embedding: np.ndarray
    embedding_labels: np.ndarray
    explained_variance: np.ndarray
    hamming_edges: np.ndarray
    hamming_within: np.ndarray
    hamming_between: np.ndarray
    mean_hamming_within: float
    mean_hamming_between: float

    def to_dict(self) -> dict[str, Any]:
        """Every number as plain Python (the embedding included, for re-plotting)."""
        return jsonable(
            {
                "n": self.n,
                "num_filters": self.num_filters,
                "distinct_paths": self.distinct,
                "top_path_counts": self.top_counts,
                "entropy_bits": self.entropy,
                "per_class": {
                    c: {
                        "n": self.class_n[i],
                        "distinct_paths": self.class_distinct[i],
                        "entropy_bits": self.class_entropy[i],
                        "entropy_normalised": self.class_entropy_norm[i],
                    }
                    for i, c in enumerate(self.classes)
                },
                "layer_distinct": dict(zip(self.layers, self.layer_distinct)),
                "pca": {
                    "explained_variance_ratio": self.explained_variance,
                    "x": self.embedding[:, 0],
                    "y": self.embedding[:, 1],
                    "label": self.embedding_labels,
                },
                "hamming": {
                    "edges": self.hamming_edges,
                    "within_class": self.hamming_within,
                    "between_class": self.hamming_between,
                    "mean_within_class": self.mean_hamming_within,
                    "mean_between_class": self.mean_hamming_between,
                },
            }
        )


def path_distribution(
    stats: PathStats,
    *,
    max_points: int = 3000,
    pairs: int = 20000,
    top: int = 20,
    bins: int = 40,
    seed: int = 0,
) -> PathDistribution:
    """Distinct paths, per-class path entropy, a PCA embedding and Hamming-distance histograms.

    Args:
        stats: path statistics with raw paths (``dm.paths(loader, raw=True)``).
        max_points: inputs in the 2-D embedding (a seeded random subset).
        pairs: random input pairs for each Hamming-distance histogram.
        top: how many of the most frequent paths to count.
        bins: bins of the Hamming-distance histograms over ``[0, 1]``.
        seed: seed of the subsets.

    Returns:
        A :class:`PathDistribution`.

    Raises:
        ValueError: the statistics have no raw paths.

    Example:
        >>> pd = path_distribution(stats)
        >>> 1 <= pd.distinct <= stats.n
        True
    """
    from sklearn.decomposition import PCA

    require_raw(stats, "path_distribution")
    paths = np.asarray(stats.paths, dtype=bool)
    labels = np.asarray(stats.labels, dtype=np.int64)
    n, f = paths.shape
    k = stats.num_classes
    classes = tuple(stats.classes) if stats.classes is not None else tuple(str(i) for i in range(k))
    rng = np.random.default_rng(seed)

    inverse, counts = _unique_rows(paths)
    class_n = np.bincount(labels, minlength=k)
    class_distinct = np.zeros(k, dtype=np.int64)
    class_entropy = np.zeros(k)
    for c in range(k):
        ids = inverse[labels == c]
        if ids.size:
            cnt = np.bincount(ids)
            class_distinct[c] = int((cnt > 0).sum())
            class_entropy[c] = _entropy_bits(cnt)
    norm = np.where(class_n > 1, class_entropy / np.log2(np.maximum(class_n, 2)), 0.0)
    layer_distinct = np.array([_unique_rows(part)[1].size for part in stats.split(paths)])

    sub = rng.choice(n, size=min(max_points, n), replace=False)
    x = paths[sub].astype(np.float32)
    if n >= 2 and f >= 2 and np.ptp(x, axis=0).any():
        pca = PCA(n_components=2, random_state=seed).fit(x)
        emb = pca.transform(x)
        evr = pca.explained_variance_ratio_
        if evr.shape[0] < 2:
            emb = np.pad(emb, ((0, 0), (0, 2 - emb.shape[1])))
            evr = np.pad(evr, (0, 2 - evr.shape[0]))
    else:
        emb, evr = np.zeros((sub.size, 2)), np.zeros(2)

    edges = np.linspace(0.0, 1.0, bins + 1)
    a, b = rng.integers(0, n, size=(2, pairs))
    keep = a != b
    a, b = a[keep], b[keep]
    d = (paths[a] != paths[b]).mean(1)
    same = labels[a] == labels[b]
    within, between = d[same], d[~same]
    return PathDistribution(
        classes=classes,
        layers=tuple(stats.site_names),
        n=n,
        num_filters=f,
        distinct=int(counts.size),
        top_counts=np.sort(counts)[::-1][:top],
        entropy=_entropy_bits(counts),
        class_n=class_n,
        class_distinct=class_distinct,
        class_entropy=class_entropy,
        class_entropy_norm=norm,
        layer_distinct=layer_distinct,
        embedding=emb,
        embedding_labels=labels[sub],
        explained_variance=np.asarray(evr),
        hamming_edges=edges,
        hamming_within=np.histogram(within, bins=edges)[0],
        hamming_between=np.histogram(between, bins=edges)[0],
        mean_hamming_within=float(within.mean()) if within.size else float("nan"),
        mean_hamming_between=float(between.mean()) if between.size else float("nan"),
    )
