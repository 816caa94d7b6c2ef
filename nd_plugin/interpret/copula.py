"""A Gaussian copula for binary gate vectors: same per-filter marginals, same pairwise correlations.

A dynamic filter's gate is a threshold of a continuous score, so a natural model of binary paths
*without* cluster structure is a thresholded multivariate normal: ``x_f = [z_f > t_f]`` with
``z ~ N(0, R)``. The thresholds ``t_f = Φ⁻¹(1 − p_f)`` reproduce each filter's on-rate ``p_f``; the
latent correlation ``R_fg`` is the *tetrachoric* correlation, the one at which the thresholded pair
is on together as often as in the data, ``P(z_f > t_f, z_g > t_g) = p_fg``. Such a model is
unimodal in its latent space: whatever the marginals and correlations, it holds no groups. It is
the null of :func:`~nd_plugin.interpret.cluster_test.cluster_test`.

The orthant probability is ``P(z_f > h, z_g > k) = Φ(−h)Φ(−k) + ∫₀^ρ φ₂(h, k; r) dr`` (Plackett's
identity: its derivative in ρ is the bivariate density), integrated with Gauss–Legendre nodes and
inverted by bisection for all pairs at once. A pair whose 2×2 table has an empty cell (never on
together, or one always on with the other) has its count moved half an input away from that
boundary (the usual 0.5 correction; otherwise such pairs of rare filters would reach ``±rho_max``); a correlation matrix that is not positive semi-definite is repaired by clipping
its eigenvalues and rescaling to a unit diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri, roots_legendre

__all__ = ["GaussianCopula", "orthant_probability", "tetrachoric"]

_NODES, _WEIGHTS = roots_legendre(24)
_U = (_NODES + 1.0) / 2.0  # nodes on [0, 1]
_W = _WEIGHTS / 2.0


def orthant_probability(h: np.ndarray, k: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """``P(z1 > h, z2 > k)`` for a standard bivariate normal with correlation ``rho`` (broadcast).

    Example:
        >>> float(orthant_probability(np.array(0.0), np.array(0.0), np.array(0.5))).__round__(6)  # 1/4 + asin(.5)/2π
        0.333333
    """
    h, k, rho = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (h, k, rho)))
    r = rho[..., None] * _U  # (..., nodes)
    one = 1.0 - r * r
    dens = np.exp(-(h[..., None] ** 2 - 2 * r * h[..., None] * k[..., None] + k[..., None] ** 2) / (2 * one))
    dens /= 2 * np.pi * np.sqrt(one)
    return ndtr(-h) * ndtr(-k) + rho * (dens * _W).sum(-1)


def tetrachoric(x: np.ndarray, *, rho_max: float = 0.995, iterations: int = 30) -> np.ndarray:
    """Tetrachoric correlation matrix of the columns of a 0/1 array.

    Args:
        x: ``(n, d)`` 0/1 data; every column must vary (a constant column has no threshold).
        rho_max: bound of the correlations (pairs never or always on together reach it).
        iterations: bisection steps (2⁻³⁰ of the interval: far below sampling noise).

    Returns:
        ``(d, d)`` latent correlations, unit diagonal.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> z = rng.multivariate_normal([0, 0], [[1, 0.6], [0.6, 1]], size=20000)
        >>> round(float(tetrachoric(z > [0.0, 0.5])[0, 1]), 1)
        0.6
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    p = x.mean(0)
    if ((p <= 0) | (p >= 1)).any():
        raise ValueError("tetrachoric needs columns that vary; drop the constant ones first")
    t = ndtri(1.0 - p)
    iu, ju = np.triu_indices(d, 1)
    both = (x.T @ x)[iu, ju]
    ones = x.sum(0)
    # a 2x2 table with an empty cell (never / always on together) would put rho at +-rho_max: move the
    # count half an input away from that boundary (the usual 0.5 correction of empty cells)
    lo_b = np.maximum(0.0, ones[iu] + ones[ju] - n)
    hi_b = np.minimum(ones[iu], ones[ju])
    both = np.where(both <= lo_b, lo_b + 0.5, np.where(both >= hi_b, hi_b - 0.5, both))
    target = both / n
    lo = np.full(iu.size, -rho_max)
    hi = np.full(iu.size, rho_max)
    h, k = t[iu], t[ju]
    for _ in range(iterations):
        mid = (lo + hi) / 2
        above = orthant_probability(h, k, mid) > target
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    r = np.eye(d)
    r[iu, ju] = r[ju, iu] = (lo + hi) / 2
    return r


def _nearest_correlation(r: np.ndarray, floor: float = 1e-4) -> np.ndarray:
    """Eigenvalues clipped at ``floor``, rescaled to a unit diagonal (positive definite)."""
    vals, vecs = np.linalg.eigh(r)
    if vals.min() >= floor:
        return r
    fixed = (vecs * np.maximum(vals, floor)) @ vecs.T
    s = 1.0 / np.sqrt(np.diag(fixed))
    return fixed * s[:, None] * s[None, :]


@dataclass(frozen=True, eq=False)
class GaussianCopula:
    """A thresholded multivariate normal over binary columns.

    Attributes:
        rates: ``(d,)`` on-rate of each column.
        corr: ``(d, d)`` latent (tetrachoric) correlation, positive definite.
    """

    rates: np.ndarray
    corr: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, *, rho_max: float = 0.995) -> GaussianCopula:
        """Fits marginals and tetrachoric correlations to ``(n, d)`` 0/1 data whose columns all vary.

        Example:
            >>> rng = np.random.default_rng(0)
            >>> cop = GaussianCopula.fit(rng.random((500, 3)) < [0.2, 0.5, 0.7])
            >>> np.round(cop.rates, 1).tolist()
            [0.2, 0.5, 0.7]
        """
        x = np.asarray(x, dtype=np.float64)
        return cls(rates=x.mean(0), corr=_nearest_correlation(tetrachoric(x, rho_max=rho_max)))

    def sample(self, n: int, draws: int | None = None, *, seed: int | np.random.Generator | None = 0) -> np.ndarray:
        """``(n, d)`` bool samples, or ``(draws, n, d)`` when ``draws`` is given.

        Example:
            >>> cop = GaussianCopula(np.array([0.1, 0.9]), np.eye(2))
            >>> np.round(cop.sample(20000, seed=1).mean(0), 2).tolist()
            [0.1, 0.9]
        """
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        d = self.rates.size
        vals, vecs = np.linalg.eigh(self.corr)
        root = (vecs * np.sqrt(np.maximum(vals, 0.0))).T.astype(np.float32)
        t = ndtri(1.0 - self.rates).astype(np.float32)
        shape = (n, d) if draws is None else (draws, n, d)
        g = rng.standard_normal(shape, dtype=np.float32)
        return (g @ root) > t
