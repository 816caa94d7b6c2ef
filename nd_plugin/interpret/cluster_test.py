"""A calibrated test of "two groups" for binary, correlated, tied gate vectors (the decision tree's test).

**Statistic**: the 2-means *cluster index* ``CI = W / T`` of the inputs' first-principal-component
scores: rows are ordered by their PC1 score and cut in two between *distinct* scores (identical
paths always stay together: ties handled), at the cut with the largest between-groups sum of
squares; ``W = T − between``, ``T`` the total sum of squares of the scores. Small CI: two
well-separated groups (0 for two distinct paths); a Gaussian score has CI ``1 − 2/π ≈ 0.36``.
It is SigClust's index (Liu et al., JASA 2008) on the leading direction, computed for many null
draws at once. (``space="full"``, the index over all filters, dilutes the group signal with every
filter's Bernoulli noise and has less power; measured in docs/notes/analyze.md.)

**Null**: data with the same per-filter on-rates and the same pairwise correlations but no groups,
by default a Gaussian copula (:class:`~nd_plugin.interpret.copula.GaussianCopula`, tetrachoric
correlations) fitted to the group. ``null="permutation"`` permutes each filter independently
(keeps marginals exactly, removes correlations); ``null="gaussian"`` draws a continuous normal with
the group's mean and covariance (SigClust as published). Both are kept to be measured against: on
correlated structure-free paths the permutation null splits almost always, and the continuous
normal misreads binary filters (a lone filter on for half the inputs is "two groups" to it); see
docs/notes/analyze.md.

**p-value**: Monte Carlo, ``p = (1 + #{null CI ≤ observed}) / (B + 1)`` with ``B`` null draws;
the group splits when ``p ≤ alpha``. Draws come in chunks and stop as soon as rejection has become
impossible (then ``p`` is Besag & Clifford's sequential ``c / m`` after ``m`` draws with ``c``
exceedances): structure-free groups cost one chunk, groups that split cost all ``B`` draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .copula import GaussianCopula

__all__ = ["ClusterTest", "cluster_index", "cluster_test", "NULLS"]

NULLS = ("copula", "permutation", "gaussian")


def cluster_index(x: np.ndarray, space: Literal["pc1", "full"] = "pc1") -> tuple[np.ndarray, np.ndarray]:
    """Cluster index of the best cut along PC1, for one ``(n, d)`` array or a batch ``(b, n, d)``.

    Rows are ordered by their first-principal-component score and cut between two *distinct*
    scores (identical rows never part). ``space="pc1"`` (the test's statistic) scores the cut on
    the PC1 scores themselves, ``W₁ / T₁``; ``space="full"`` on all columns, ``W / T``.

    Args:
        x: data (0/1 or continuous); columns may be constant.
        space: where the sums of squares are taken.

    Returns:
        ``(ci, first)``: the index (``(b,)`` or a scalar array; 1 when nothing varies) and a bool
        ``(b, n)`` / ``(n,)`` mask of the rows on the low-score side of the cut.

    Example:
        >>> x = np.array([[0, 0], [0, 0], [1, 1], [1, 1]], dtype=float)
        >>> ci, first = cluster_index(x)
        >>> round(float(ci), 6), int(first.sum())
        (0.0, 2)
        >>> round(float(cluster_index(np.array([[0.0], [1.0], [2.0], [3.0]]))[0]), 6)  # cut 2 | 2: W = 1, T = 5
        0.2
    """
    if space not in ("pc1", "full"):
        raise ValueError(f"space must be 'pc1' or 'full', got {space!r}")
    one = np.ndim(x) == 2
    x = np.asarray(x, dtype=np.float32)
    x = x[None] if one else x
    b, n, d = x.shape
    xc = x - x.mean(1, keepdims=True)
    _, vecs = np.linalg.eigh(np.einsum("bnd,bne->bde", xc, xc))
    score = np.einsum("bnd,bd->bn", xc, vecs[:, :, -1])
    order = np.argsort(score, axis=1, kind="stable")
    srt = np.take_along_axis(score, order, 1).astype(np.float64)
    k = np.arange(1, n, dtype=np.float64)
    if space == "pc1":
        total = (srt * srt).sum(1)
        cum = np.cumsum(srt, axis=1)[:, :-1]
        between = cum * cum * n / (k * (n - k))
    else:
        total = (xc * xc).sum((1, 2)).astype(np.float64)
        cum = np.cumsum(np.take_along_axis(xc, order[:, :, None], 1), axis=1, dtype=np.float64)[:, :-1]
        between = (cum * cum).sum(2) * n / (k * (n - k))
    # only cut between distinct scores (a tolerance above float32 noise: identical rows tie exactly)
    between[np.diff(srt, axis=1) <= 1e-5 * (np.abs(srt).max(1, keepdims=True) + 1e-12)] = -np.inf
    best = between.argmax(1)
    best_between = between[np.arange(b), best]
    ok = (total > 1e-12) & np.isfinite(best_between)
    ci = np.where(ok, np.clip(1.0 - np.where(ok, best_between, 0.0) / np.where(ok, total, 1.0), 0.0, 1.0), 1.0)
    first = np.zeros((b, n), dtype=bool)
    for i in range(b):
        first[i, order[i, : best[i] + 1]] = ok[i]
    return (ci[0], first[0]) if one else (ci, first)


@dataclass(frozen=True)
class ClusterTest:
    """Outcome of :func:`cluster_test` on one group of gate vectors.

    Attributes:
        statistic: observed cluster index (small = clustered).
        p_value: Monte Carlo p-value (``nan`` when not tested).
        reject: whether the group shows two groups at level ``alpha``.
        alpha: level.
        null: null model name.
        null_draws: null data sets drawn (fewer than asked when the test stopped early).
        null_mean: mean null cluster index.
        null_sd: its standard deviation.
        n: rows tested (a subsample of at most ``max_samples``).
        filters: varying columns.
        reason: why the group was not tested (empty when it was).
    """

    statistic: float
    p_value: float
    reject: bool
    alpha: float
    null: str
    null_draws: int
    null_mean: float
    null_sd: float
    n: int
    filters: int
    reason: str = ""

    @property
    def z(self) -> float:
        """``(statistic − null mean) / null sd``: how far below the null (negative) the group lies."""
        return (self.statistic - self.null_mean) / self.null_sd if self.null_sd > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python fields (JSON: ``nan`` becomes ``null``)."""
        return {
            "statistic": self.statistic, "p_value": self.p_value, "reject": self.reject, "alpha": self.alpha,
            "null": self.null, "null_draws": self.null_draws, "null_mean": self.null_mean,
            "null_sd": self.null_sd, "z": self.z, "n": self.n, "filters": self.filters, "reason": self.reason,
        }


def _null_sampler(x: np.ndarray, null: str, rng: np.random.Generator):
    n, d = x.shape
    if null == "copula":
        cop = GaussianCopula.fit(x)
        return lambda m: cop.sample(n, m, seed=rng)
    if null == "permutation":
        return lambda m: np.stack([np.take_along_axis(x, rng.permuted(np.tile(np.arange(n), (d, 1)), axis=1).T, 0) for _ in range(m)])
    if null == "gaussian":
        mean, cov = x.mean(0), np.cov(x, rowvar=False).reshape(d, d)
        return lambda m: rng.multivariate_normal(mean, cov, size=(m, n), method="eigh").astype(np.float32)
    raise ValueError(f"null must be one of {NULLS}, got {null!r}")


def cluster_test(
    x: np.ndarray,
    *,
    null: Literal["copula", "permutation", "gaussian"] = "copula",
    n_null: int = 99,
    alpha: float = 0.01,
    max_samples: int | None = 1000,
    min_samples: int = 20,
    space: Literal["pc1", "full"] = "pc1",
    chunk: int = 10,
    seed: int | np.random.Generator | None = 0,
) -> ClusterTest:
    """Tests whether the rows of a 0/1 array form two groups beyond what marginals and correlations give.

    Args:
        x: ``(n, d)`` gate vectors of one group of inputs at one layer.
        null: null model (see the module docstring); ``"copula"`` is the calibrated one.
        n_null: null draws ``B``; the smallest attainable p-value is ``1 / (B + 1)``.
        alpha: level: reject when ``p ≤ alpha``.
        max_samples: test a random subsample of at most this many rows (``None``: all).
        min_samples: fewer rows than this are not tested.
        space: where the cluster index is taken (:func:`cluster_index`).
        chunk: null draws per batch (the test stops early between batches).
        seed: seed or generator.

    Returns:
        A :class:`ClusterTest`; untested groups (too few rows, no varying filter) have
        ``reject=False`` and say why in ``reason``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> groups = rng.integers(0, 2, 400)
        >>> rates = rng.uniform(0.1, 0.9, (2, 32))
        >>> two = rng.random((400, 32)) < rates[groups]
        >>> cluster_test(two).reject
        True
        >>> one = rng.random((400, 32)) < rates[0]
        >>> cluster_test(one).reject
        False
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_null < 1:
        raise ValueError(f"n_null must be at least 1, got {n_null}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be (n, d), got shape {x.shape}")
    n = x.shape[0]
    if max_samples is not None and n > max_samples:
        x = x[np.sort(rng.choice(n, max_samples, replace=False))]
    x = x[:, x.min(0) != x.max(0)].astype(np.float32) if n else x.astype(np.float32)
    nan = float("nan")

    def untested(reason: str) -> ClusterTest:
        return ClusterTest(nan, nan, False, alpha, null, 0, nan, nan, x.shape[0], x.shape[1], reason)

    if x.shape[0] < max(min_samples, 3):
        return untested(f"{x.shape[0]} inputs, fewer than the {max(min_samples, 3)} the test needs")
    if x.shape[1] == 0:
        return untested("no filter varies over the group's inputs")
    observed = float(cluster_index(x, space)[0])
    sample = _null_sampler(x, null, rng)
    c_max = int(np.floor(alpha * (n_null + 1) - 1 + 1e-9))  # reject iff exceedances <= c_max
    null_ci: list[np.ndarray] = []
    exceed = drawn = 0
    while drawn < n_null:
        m = min(chunk, n_null - drawn)
        ci = cluster_index(sample(m), space)[0]
        null_ci.append(ci)
        drawn += m
        exceed += int((ci <= observed).sum())
        if exceed > c_max:
            break
    allci = np.concatenate(null_ci)
    p = (1 + exceed) / (n_null + 1) if drawn == n_null else exceed / drawn
    return ClusterTest(
        statistic=observed, p_value=float(p), reject=bool(drawn == n_null and exceed <= c_max), alpha=alpha,
        null=null, null_draws=drawn, null_mean=float(allci.mean()),
        null_sd=float(allci.std(ddof=1)) if allci.size > 1 else nan, n=x.shape[0], filters=x.shape[1],
    )
