"""The Hopkins statistic of cluster tendency (Hopkins & Skellam, 1954).

Convention used throughout nd-plugin: **H ≈ 1 means clustered, H ≈ 0.5 means no structure**
(and H → 0 means regularly spaced). With ``m`` points ``x_i`` sampled from the data and ``m``
reference points ``r_j`` drawn from a structure-free distribution,

    H = Σ u_j / (Σ u_j + Σ w_i),

``u_j`` the distance from ``r_j`` to its nearest data point and ``w_i`` the distance from ``x_i``
to its nearest *other* data point, to the first power (the convention of ``pyclustertend``;
R's ``clustertend::hopkins`` reports ``1 − H``). Distances are Euclidean for continuous data and
Hamming (L1) for binary data.

The reference distribution matters for binary gate vectors. Uniform points in the bounding box
(the textbook choice, ``reference="uniform"``) lie inside the hypercube while binary data sit on
its corners, which makes even structure-free binary data look regular or clustered depending on
the dimension. For binary data the reference points are therefore drawn from the *product of the
data's marginals* (``reference="marginal"``: each coordinate an independent Bernoulli with the
column's observed rate). Under "no structure" (independent coordinates) data points and reference
points then come from the same distribution and H ≈ 0.5; correlated columns (groups of inputs
sharing a path) put data points closer to each other than to reference points and H → 1.
``reference="auto"`` picks ``"marginal"`` for 0/1 data and ``"uniform"`` otherwise.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["hopkins"]


def _sample_size(n: int, sample_size: int | float | None) -> int:
    if sample_size is None:
        m = min(max(n // 10, 30), 300)
    elif isinstance(sample_size, float) and 0 < sample_size <= 1:
        m = int(round(sample_size * n))
    else:
        m = int(sample_size)
    return max(1, min(m, n - 1))


def hopkins(
    x: np.ndarray,
    *,
    sample_size: int | float | None = None,
    reference: Literal["auto", "uniform", "marginal"] = "auto",
    seed: int | np.random.Generator | None = 0,
) -> float:
    """Hopkins statistic of ``x`` (rows are points): ≈1 clustered, ≈0.5 random.

    Columns that are constant over ``x`` carry no structure and are dropped first.

    Args:
        x: ``(n, d)`` data, continuous or 0/1.
        sample_size: points sampled (an int, or a fraction of ``n``); default
            ``min(max(n // 10, 30), 300)``, at most ``n − 1``.
        reference: structure-free reference distribution (see the module docstring).
        seed: seed or generator of the sampling.

    Returns:
        H in ``[0, 1]``; ``nan`` when fewer than 3 points or no column varies (then there is
        nothing to split).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> blobs = np.concatenate([rng.normal(0, 0.1, (100, 2)), rng.normal(5, 0.1, (100, 2))])
        >>> hopkins(blobs) > 0.9
        True
        >>> 0.4 < hopkins(rng.uniform(size=(400, 2))) < 0.6
        True
    """
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must be (n, d), got shape {x.shape}")
    n = x.shape[0]
    if n < 3:
        return float("nan")
    x = x[:, np.ptp(x, axis=0) > 0]
    if x.shape[1] == 0:
        return float("nan")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if reference == "auto":
        reference = "marginal" if np.isin(x, (0.0, 1.0)).all() else "uniform"
    m = _sample_size(n, sample_size)
    if reference == "marginal":
        rates = x.mean(0)
        ref = (rng.random((m, x.shape[1])) < rates).astype(np.float64)
    elif reference == "uniform":
        ref = rng.uniform(x.min(0), x.max(0), size=(m, x.shape[1]))
    else:
        raise ValueError(f"reference must be 'auto', 'uniform' or 'marginal', got {reference!r}")
    # Binary data: Hamming (L1) distances, the natural metric of bit vectors; otherwise Euclidean.
    nn = NearestNeighbors(n_neighbors=2, p=1 if reference == "marginal" else 2).fit(x)
    u = nn.kneighbors(ref, n_neighbors=1, return_distance=True)[0][:, 0]
    idx = rng.choice(n, size=m, replace=False)
    w = nn.kneighbors(x[idx], n_neighbors=2, return_distance=True)[0][:, 1]
    denom = u.sum() + w.sum()
    return float(u.sum() / denom) if denom > 0 else float("nan")
