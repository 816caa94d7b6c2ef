"""The pyplot-free figure helpers that the report's figures share.

Figures are created with :class:`matplotlib.figure.Figure` and rendered by the Agg canvas: no
pyplot, no backend change, so drawing a report changes nothing for a user's own plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["figure", "layer_ticks", "short_name"]


def figure(width: float, height: float, dpi: int = 110, layout: str | None = "constrained") -> Any:
    """A :class:`matplotlib.figure.Figure` of ``width`` x ``height`` inches on the Agg canvas (no pyplot).

    Example:
        >>> fig = figure(2, 1)
        >>> type(fig).__name__, [round(v) for v in fig.get_size_inches()]
        ('Figure', [2, 1])
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def short_name(name: str, keep: int = 22) -> str:
    """``name`` cut to its last ``keep`` characters (an ellipsis first) when longer.

    Example:
        >>> short_name("layer4.1.conv1"), short_name("features.denseblock4.denselayer16.conv2", 12)
        ('layer4.1.conv1', '…yer16.conv2')
    """
    return name if len(name) <= keep else "…" + name[-(keep - 1) :]


def layer_ticks(ax: Any, names: Sequence[str], axis: str = "y", max_ticks: int = 40) -> None:
    """Labels an axis with (at most ``max_ticks`` of) the layer ``names``, shortened by :func:`short_name`.

    Args:
        ax: a matplotlib Axes.
        names: one name per position 0, 1, ... of the axis.
        axis: ``"y"`` or ``"x"`` (labels turned upright).
        max_ticks: the most labels shown; every n-th name is labelled beyond that.
    """
    step = max(1, int(np.ceil(len(names) / max_ticks)))
    idx = list(range(0, len(names), step))
    labels = [short_name(names[i]) for i in idx]
    fs = 7 if len(names) > 20 else 8
    if axis == "y":
        ax.set_yticks(idx, labels, fontsize=fs)
    else:
        ax.set_xticks(idx, labels, fontsize=fs, rotation=90)
