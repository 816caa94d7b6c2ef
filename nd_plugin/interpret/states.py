"""Filter states: silent, dynamic and energetic filters (seed §A.1, Fig. A, Table C)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from nd_plugin.paths import PathStats, check_tolerance

from ._common import jsonable

__all__ = ["LayerStates", "FilterStates", "filter_states", "SILENT", "DYNAMIC", "ENERGETIC"]

#: Codes of :attr:`FilterStates.states`.
SILENT, DYNAMIC, ENERGETIC = 0, 1, 2


class LayerStates(NamedTuple):
    """Numbers of silent, dynamic and energetic filters of one layer (unpacks as a 3-tuple)."""

    silent: int
    dynamic: int
    energetic: int

    @property
    def total(self) -> int:
        """Filters in the layer."""
        return self.silent + self.dynamic + self.energetic

    def shares(self) -> tuple[float, float, float]:
        """``(silent, dynamic, energetic)`` as fractions of the layer's filters."""
        t = max(self.total, 1)
        return self.silent / t, self.dynamic / t, self.energetic / t


@dataclass(frozen=True, eq=False)
class FilterStates(Mapping[str, LayerStates]):
    """Filter states over a data set; a read-only mapping ``{layer: LayerStates}``.

    A filter whose gate was on for ``count`` of the ``n`` inputs is *silent* when
    ``count <= tolerance·n``, *energetic* when ``count >= (1 − tolerance)·n`` and *dynamic* otherwise.

    Attributes:
        names: layers in path order.
        sizes: filters per layer.
        n: inputs the counts were taken over.
        tolerance: the tolerance, a fraction of ``n``.
        counts: ``(F,)`` activation counts.
        states: ``(F,)`` state codes (:data:`SILENT`, :data:`DYNAMIC`, :data:`ENERGETIC`).
        bins: number of equal-width histogram bins over ``[0, n]``.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    n: int
    tolerance: float
    counts: np.ndarray
    states: np.ndarray
    bins: int = 20

    def __getitem__(self, layer: str) -> LayerStates:
        i = self.names.index(layer)
        s = self.states[self._slice(i)]
        return LayerStates(int((s == SILENT).sum()), int((s == DYNAMIC).sum()), int((s == ENERGETIC).sum()))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def _slice(self, i: int) -> slice:
        start = int(sum(self.sizes[:i]))
        return slice(start, start + self.sizes[i])

    @property
    def overall(self) -> LayerStates:
        """States summed over every layer."""
        s = self.states
        return LayerStates(int((s == SILENT).sum()), int((s == DYNAMIC).sum()), int((s == ENERGETIC).sum()))

    @property
    def shares(self) -> dict[str, float]:
        """Overall shares of each state (the columns of the seed's Table C)."""
        silent, dynamic, energetic = self.overall.shares()
        return {"silent": silent, "dynamic": dynamic, "energetic": energetic}

    @property
    def hist_edges(self) -> np.ndarray:
        """``(bins + 1,)`` edges of the activation-count histogram, from 0 to ``n``."""
        return np.linspace(0.0, float(self.n), self.bins + 1)

    def histogram(self, layer: str | None = None) -> np.ndarray:
        """Histogram (``bins`` values) of the activation counts of one layer's filters (all when ``None``)."""
        counts = self.counts if layer is None else self.counts[self._slice(self.names.index(layer))]
        return np.histogram(counts, bins=self.hist_edges)[0]

    def to_dict(self) -> dict[str, Any]:
        """Every number, as plain Python (for ``json.dump``)."""
        layers = []
        for i, name in enumerate(self.names):
            st = self[name]
            layers.append(
                {
                    "layer": name,
                    "filters": self.sizes[i],
                    "silent": st.silent,
                    "dynamic": st.dynamic,
                    "energetic": st.energetic,
                    "shares": dict(zip(("silent", "dynamic", "energetic"), st.shares())),
                    "counts": self.counts[self._slice(i)],
                    "histogram": self.histogram(name),
                }
            )
        return jsonable(
            {
                "n": self.n,
                "tolerance": self.tolerance,
                "overall": self.overall._asdict(),
                "shares": self.shares,
                "hist_edges": self.hist_edges,
                "histogram": self.histogram(),
                "layers": layers,
            }
        )


def filter_states(stats: PathStats, tolerance: float = 0.0, *, bins: int = 20) -> FilterStates:
    """Classifies every gated filter as silent, dynamic or energetic (METHOD.md §3).

    Args:
        stats: path statistics over a data set (only ``counts`` and ``n`` are read).
        tolerance: a fraction of ``n`` in ``[0, 0.5)``; a filter on for at most ``tolerance·n``
            inputs counts as silent, one on for at least ``(1 − tolerance)·n`` as energetic.
            0 (the default) is the paper's definition: never on / always on.
        bins: bins of the activation-count histogram (seed Fig. A).

    Returns:
        A :class:`FilterStates`, also a mapping ``{layer: (silent, dynamic, energetic)}``.

    Raises:
        ConfigError: ``tolerance`` outside ``[0, 0.5)`` (a ``ValueError``).
        ValueError: statistics over no input.

    Example:
        >>> fs = filter_states(stats)  # a third of each layer's filters in each state (synthetic gates)
        >>> silent, dynamic, energetic = fs["layer1.0.conv1"]
        >>> sorted(fs.shares), round(sum(fs.shares.values()), 6)
        (['dynamic', 'energetic', 'silent'], 1.0)
    """
    tolerance = check_tolerance(tolerance)
    if stats.n <= 0:
        raise ValueError("path statistics over no input: nothing to classify")
    if bins < 1:
        raise ValueError(f"bins must be positive, got {bins}")
    counts = np.asarray(stats.counts, dtype=np.int64)
    n = int(stats.n)
    states = np.full(counts.shape, DYNAMIC, dtype=np.int8)
    states[counts >= (1.0 - tolerance) * n] = ENERGETIC
    states[counts <= tolerance * n] = SILENT
    return FilterStates(
        names=tuple(stats.site_names),
        sizes=tuple(int(c) for c in stats.site_channels),
        n=n,
        tolerance=float(tolerance),
        counts=counts,
        states=states,
        bins=int(bins),
    )
