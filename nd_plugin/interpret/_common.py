"""Helpers shared by the analyses: JSON conversion, input checks, per-layer views of raw paths."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nd_plugin.paths import PathStats

__all__ = ["jsonable", "require_raw", "LayerPaths", "as_layer_paths"]


def jsonable(value: Any) -> Any:
    """Converts numpy scalars/arrays (nested in dicts, lists, tuples) into plain Python for ``json``."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if np.isfinite(v) else None
    return value


def require_raw(stats: PathStats, what: str) -> None:
    """Raises ``ValueError`` unless ``stats`` carries raw paths and labels."""
    if stats.paths is None or stats.labels is None:
        raise ValueError(
            f"{what} needs every input's path; collect the statistics with dm.paths(loader, raw=True)."
        )


class LayerPaths:
    """Raw binary paths with their layer layout: what the sample-level analyses read.

    Attributes:
        paths: ``(N, F)`` bool.
        labels: ``(N,)`` int.
        names: layer names, in path order.
        sizes: filters per layer.
        classes: class names (``None`` → ``"0"``, ``"1"``, ...).
    """

    def __init__(
        self,
        paths: np.ndarray,
        labels: np.ndarray,
        names: Sequence[str],
        sizes: Sequence[int],
        classes: Sequence[str] | None = None,
    ) -> None:
        paths = np.asarray(paths)
        labels = np.asarray(labels).astype(np.int64)
        if paths.ndim != 2:
            raise ValueError(f"paths must be (N, F), got shape {paths.shape}")
        if labels.shape != (paths.shape[0],):
            raise ValueError(f"labels must be ({paths.shape[0]},), got shape {labels.shape}")
        if sum(sizes) != paths.shape[1]:
            raise ValueError(f"layer sizes sum to {sum(sizes)} but paths have {paths.shape[1]} filters")
        self.paths = paths.astype(bool, copy=False)
        self.labels = labels
        self.names = list(names)
        self.sizes = [int(s) for s in sizes]
        k = int(labels.max()) + 1 if labels.size else 0
        self.classes = list(classes) if classes is not None else [str(i) for i in range(k)]
        if k > len(self.classes):
            raise ValueError(f"labels go up to {k - 1} but only {len(self.classes)} class names were given")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def layer(self, i: int) -> np.ndarray:
        """``(N, C_i)`` gates of layer ``i``."""
        return self.paths[:, self.offsets[i] : self.offsets[i + 1]]


def as_layer_paths(
    data: PathStats | Mapping[str, Any] | np.ndarray,
    labels: np.ndarray | None = None,
    *,
    layer_sizes: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
) -> LayerPaths:
    """Normalises the accepted inputs of the sample-level analyses to :class:`LayerPaths`.

    Accepts a :class:`PathStats` with raw paths, a ``{layer: (N, C) gates}`` mapping (what
    ``dm(x, return_path=True)`` returns; tensors are fine), or an ``(N, F)`` array with
    ``layer_sizes`` (one layer when omitted).
    """
    if isinstance(data, PathStats):
        require_raw(data, "this analysis")
        return LayerPaths(
            data.paths,
            data.labels if labels is None else labels,
            data.site_names,
            data.site_channels,
            classes if classes is not None else data.classes,
        )
    if labels is None:
        raise ValueError("labels are required when paths are not a PathStats")
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    if isinstance(data, Mapping):
        arrays = [np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) > 0.5 for v in data.values()]
        return LayerPaths(np.concatenate(arrays, axis=1), labels, list(data), [a.shape[1] for a in arrays], classes)
    arr = np.asarray(data.detach().cpu() if hasattr(data, "detach") else data) > 0.5
    sizes = list(layer_sizes) if layer_sizes is not None else [arr.shape[1]]
    return LayerPaths(arr, labels, [f"layer{i}" for i in range(len(sizes))], sizes, classes)
