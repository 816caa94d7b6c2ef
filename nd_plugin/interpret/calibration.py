"""Synthetic paths with known structure, and the decision tree scored on them (its calibration).

Two kinds of data, both layer by layer (``sizes`` filters per layer):

- :func:`structure_free_paths`: one population, no groups anywhere. Each layer is a thresholded
  latent vector ``z = L f + e`` (a few shared factors ``f`` plus noise, so filters are correlated
  as gates fed by one input are) with per-filter on-rates drawn U-shaped (many filters nearly
  silent or nearly energetic, as in decoupled networks) or taken from a fitted copula. The
  latent is Gaussian (``latent="normal"``) or Student-t with 3 degrees of freedom
  (``latent="t"``: heavy tails, still unimodal: a null the test was *not* built on).
- :func:`two_group_paths`: two groups of inputs that share everything below ``part_layer`` and
  differ from it on: group B's latent is shifted by ``separation`` (in latent standard
  deviations) in a random direction per filter; or, ``mode="prototypes"``, each group has its
  own on-rate per filter drawn from U(0.1, 0.9) with independent filters (the example of issue 17).

:func:`score_tree` builds the tree and counts, over every test it ran, the *false splits* (a
split of a group that holds one population at that layer) and whether the known parting was
found (the root splits at ``part_layer`` into parts that agree with the groups).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.special import ndtri

from .copula import GaussianCopula
from .tree import decision_tree

__all__ = ["structure_free_paths", "two_group_paths", "kmeans_agreement", "score_tree", "TreeScore"]


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _u_shaped_rates(d: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(rng.beta(0.5, 0.5, d), 0.02, 0.98)


def _latent(n: int, d: int, factors: int, loading: float, latent: str, rng: np.random.Generator) -> np.ndarray:
    """``(n, d)`` unit-variance latent scores with a ``factors``-factor correlation structure."""
    lam = rng.uniform(0.3, 1.0, (d, factors)) * rng.choice([-1, 1], (d, factors)) * loading
    g = rng.standard_normal((n, factors)) @ lam.T + rng.standard_normal((n, d))
    if latent == "t":  # multivariate t (3 dof): one chi-square scale per input, unit variance
        g = g / np.sqrt(rng.chisquare(3, (n, 1)) / 3) / np.sqrt(3.0)
    elif latent != "normal":
        raise ValueError(f"latent must be 'normal' or 't', got {latent!r}")
    return g / np.sqrt((lam * lam).sum(1) + 1.0)


def structure_free_paths(
    n: int,
    sizes: Sequence[int],
    *,
    factors: int = 2,
    loading: float = 1.0,
    latent: Literal["normal", "t"] = "normal",
    copulas: Sequence[GaussianCopula] | None = None,
    seed: int | np.random.Generator | None = 0,
) -> np.ndarray:
    """``(n, Σ sizes)`` bool paths of one population (no groups), correlated filters.

    Args:
        n: inputs.
        sizes: filters per layer.
        factors: latent factors per layer (correlation structure).
        loading: factor strength (0: independent filters; 1: pairwise latent correlations up to ~0.5).
        latent: ``"normal"`` (a Gaussian copula) or ``"t"`` (heavy-tailed, unimodal).
        copulas: per-layer fitted copulas (e.g. of a real network) to sample from instead.
        seed: seed or generator.

    Returns:
        Paths, layers side by side.

    Example:
        >>> x = structure_free_paths(500, [8, 4], seed=0)
        >>> x.shape, x.dtype.name
        ((500, 12), 'bool')
    """
    rng = _rng(seed)
    if copulas is not None:
        return np.hstack([c.sample(n, seed=rng) for c in copulas])
    out = []
    for d in sizes:
        z = _latent(n, d, factors, loading, latent, rng)
        out.append(z > ndtri(1.0 - _u_shaped_rates(d, rng)))
    return np.hstack(out)


def two_group_paths(
    n: int,
    sizes: Sequence[int],
    part_layer: int,
    *,
    separation: float = 1.0,
    share: float = 0.5,
    mode: Literal["shift", "prototypes"] = "shift",
    factors: int = 2,
    loading: float = 1.0,
    seed: int | np.random.Generator | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Two groups that share their paths below ``part_layer`` and differ from it on.

    Args:
        n: inputs.
        sizes: filters per layer.
        part_layer: first layer where the groups differ.
        separation: ``mode="shift"``: latent shift of group B per filter (± at random).
        share: fraction of inputs in group B.
        mode: ``"shift"`` (correlated filters, realistic rates) or ``"prototypes"`` (independent
            filters, per-group rates from U(0.1, 0.9)).
        factors: latent factors per layer.
        loading: factor strength.
        seed: seed or generator.

    Returns:
        ``(paths, groups)``: bool ``(n, Σ sizes)`` and the 0/1 group of every input.

    Example:
        >>> x, g = two_group_paths(400, [8, 8], 1, separation=2.0, seed=0)
        >>> x.shape, int(g.sum())
        ((400, 16), 200)
    """
    rng = _rng(seed)
    groups = np.zeros(n, dtype=np.int64)
    groups[rng.choice(n, int(round(share * n)), replace=False)] = 1
    out = []
    for layer, d in enumerate(sizes):
        if mode == "prototypes" and layer >= part_layer:
            rates = rng.uniform(0.1, 0.9, (2, d))
            out.append(rng.random((n, d)) < rates[groups])
            continue
        if mode not in ("shift", "prototypes"):
            raise ValueError(f"mode must be 'shift' or 'prototypes', got {mode!r}")
        z = _latent(n, d, factors, loading, "normal", rng)
        t = ndtri(1.0 - _u_shaped_rates(d, rng))
        if layer >= part_layer:
            z = z + separation * groups[:, None] * rng.choice([-1.0, 1.0], d)  # group B's rates differ
        out.append(z > t)
    return np.hstack(out), groups


def kmeans_agreement(x: np.ndarray, groups: np.ndarray, seed: int = 0) -> float:
    """Share of inputs k-means (k = 2, sklearn) puts with their group, up to relabelling."""
    from sklearn.cluster import KMeans

    lab = KMeans(n_clusters=2, n_init=3, random_state=seed).fit(np.asarray(x, dtype=np.float32)).labels_
    agree = float((lab == groups).mean())
    return max(agree, 1.0 - agree)


@dataclass(frozen=True)
class TreeScore:
    """What the tree did on data with known structure.

    Attributes:
        tested: tests run on groups that hold one population at that layer.
        false_splits: of those, the ones that split.
        structured_tests: tests run on groups that hold both populations at or after ``part_layer``.
        split_layer: layer of the root's split (``None``: no split).
        found: the root split exactly at ``part_layer`` into parts agreeing with the groups ≥ 95%.
        split_agreement: agreement of the root's split with the groups (``nan``: no split).
    """

    tested: int
    false_splits: int
    structured_tests: int
    split_layer: int | None
    found: bool
    split_agreement: float

    def to_dict(self) -> dict[str, Any]:
        """Plain fields."""
        return dict(self.__dict__)


def score_tree(
    paths: np.ndarray,
    sizes: Sequence[int],
    groups: np.ndarray | None = None,
    part_layer: int | None = None,
    **tree_options: Any,
) -> TreeScore:
    """Builds the decision tree on synthetic paths and scores its splits against the known structure.

    A test on a group is *structure-free* when the layer is below ``part_layer`` or the group
    holds fewer than ``min_size`` inputs of one of the two populations; every split of such a
    group is false. Labels given to the tree are the groups (or all 0 and 1 alternating when no
    groups: the classes play no part in the splits).

    Args:
        paths: ``(n, F)`` bool.
        sizes: filters per layer.
        groups: known 0/1 group per input (``None``: one population).
        part_layer: first layer where the groups differ.
        **tree_options: passed to :func:`~nd_plugin.interpret.decision_tree`.

    Returns:
        A :class:`TreeScore`.

    Example:
        >>> score_tree(structure_free_paths(400, [16, 16], seed=1), [16, 16]).false_splits
        0
    """
    n = paths.shape[0]
    labels = groups if groups is not None else np.arange(n) % 2
    tree_options.setdefault("max_samples", None)
    tree = decision_tree(paths, labels, layer_sizes=list(sizes), **tree_options)
    min_size = tree.settings["min_size"]
    tested = false = structured = 0
    for node in tree.nodes:
        members = node.members
        g = groups[members] if groups is not None else np.zeros(len(members), int)
        mixed = min(int((g == 0).sum()), int((g == 1).sum())) >= min_size
        for layer, t in node.tests.items():
            if t.reason:
                continue
            if groups is not None and part_layer is not None and layer >= part_layer and mixed:
                structured += 1
                continue
            tested += 1
            false += int(node.split_layer == layer)
    root = tree.nodes[0]
    agreement = float("nan")
    if root.children and groups is not None:
        part = np.zeros(n, dtype=np.int64)
        part[tree.nodes[root.children[1]].members] = 1
        agreement = max(float((part == groups).mean()), float((part != groups).mean()))
    found = bool(part_layer is not None and root.split_layer == part_layer and agreement >= 0.95)
    return TreeScore(tested, false, structured, root.split_layer, found, agreement)
