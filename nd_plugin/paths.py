"""Calculation paths: recording gate vectors and accumulating their statistics.

The calculation path of an input is the concatenation of the binary gate vectors of every gated
site, in execution order. :class:`GateRecorder` is the one owner of the hooks that read them;
:class:`PathStats` holds what a pass over a data set leaves: per-filter on-counts, per-class
on-counts, and (on request) the raw paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nd_plugin._hooks import HookOwner
from nd_plugin.errors import ConfigError
from nd_plugin.files import atomic_savez
from nd_plugin.gates import GatedSite

__all__ = ["GateRecorder", "PathStats", "check_tolerance"]


class GateRecorder(HookOwner):
    """Context manager that records each site's gates (and pre-gate GAP) during forward passes.

    It owns the hooks it registers and removes them on exit, also when the forward raises.

    Args:
        sites: the gated sites, in path order.
        pre_gate: also record the global average pool of each site's output *before* the gate
            (what the KL loss aligns the gate with).
        after_activation: at sites whose output goes straight into a ReLU, pool the output after
            that ReLU (``relu(α ⊙ o) = α ⊙ relu(o)``: the activation the gate scales), as the authors'
            release does for its ``L_kl`` target.

    Attributes:
        gates: per site, the gate values ``α`` of the last forward pass.
        logits: per site, the ACM logits ``z`` (``α = 1[z > 0]`` in eval).
        pre_gate: per site, GAP of the output before the gate (with ``pre_gate=True``).

    Example:
        >>> with GateRecorder(dm.sites()) as rec:
        ...     logits = dm.model(x)
        >>> rec.gates[0].shape
        torch.Size([32, 16])
    """

    def __init__(self, sites: Sequence[GatedSite], *, pre_gate: bool = False, after_activation: bool = False) -> None:
        super().__init__()
        self.sites = list(sites)
        self.pre_gate_enabled = pre_gate
        self.after_activation = after_activation
        self.gates: list[torch.Tensor | None] = [None] * len(self.sites)
        self.logits: list[torch.Tensor | None] = [None] * len(self.sites)
        self.pre_gate: list[torch.Tensor | None] = [None] * len(self.sites)

    def register(self) -> None:
        for i, site in enumerate(self.sites):
            self.keep(site.gate.register_forward_hook(self._store_gate(i)))
            if self.pre_gate_enabled:
                relu = self.after_activation and getattr(site, "activation", None) == "relu"
                self.keep(site.norm.register_forward_hook(self._store(self.pre_gate, i, pool=True, relu=relu)))

    def _store_gate(self, index: int):
        def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.logits[index] = inputs[0]  # the ACM's logits z, before noise and binarisation
            self.gates[index] = output

        return hook

    @staticmethod
    def _store(target: list, index: int, pool: bool = False, relu: bool = False):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            if relu:
                output = torch.relu(output)
            target[index] = output.mean(dim=tuple(range(2, output.ndim))) if pool else output

        return hook

    def path(self, batch_size: int, device: torch.device) -> list[torch.Tensor]:
        """Gate vectors per site; a site whose gates were forced open reads as all ones."""
        return [
            g if g is not None else torch.ones(batch_size, site.out_channels, device=device)
            for g, site in zip(self.gates, self.sites)
        ]


@dataclass
class PathStats:
    """Statistics of calculation paths over a data set.

    Attributes:
        site_names: gated layers, in path order.
        site_channels: filters per gated layer.
        n: number of inputs seen.
        counts: ``(F,)`` how often each filter's gate was on (``F = sum(site_channels)``).
        class_counts: ``(K, F)`` the same per true class.
        class_n: ``(K,)`` inputs per class.
        correct: inputs classified correctly.
        classes: class names, when known.
        paths: ``(n, F)`` raw binary paths, when recorded.
        labels: ``(n,)`` true labels, with ``paths``.
        preds: ``(n,)`` predicted labels, with ``paths``.

    Example:
        >>> stats = dm.paths(loader)
        >>> stats.frequency().shape, stats.n
        ((336,), 32)
    """

    site_names: list[str]
    site_channels: list[int]
    n: int
    counts: np.ndarray
    class_counts: np.ndarray
    class_n: np.ndarray
    correct: int = 0
    classes: list[str] | None = None
    paths: np.ndarray | None = None
    labels: np.ndarray | None = None
    preds: np.ndarray | None = None
    _offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._offsets = np.concatenate([[0], np.cumsum(self.site_channels)]).astype(np.int64)

    @property
    def num_filters(self) -> int:
        """Total number of gated filters ``F``."""
        return int(self._offsets[-1])

    @property
    def num_classes(self) -> int:
        """Number of classes ``K``."""
        return int(self.class_n.shape[0])

    @property
    def density(self) -> float:
        """Mean fraction of gates that are on, over inputs and filters."""
        return float(self.counts.sum() / max(self.n * self.num_filters, 1))

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy of the pass that produced these statistics."""
        return self.correct / max(self.n, 1)

    def layer_slice(self, layer: int | str) -> slice:
        """Slice of the filter axis that belongs to one layer (index or name)."""
        i = self.site_names.index(layer) if isinstance(layer, str) else layer
        return slice(int(self._offsets[i]), int(self._offsets[i + 1]))

    def split(self, values: np.ndarray) -> list[np.ndarray]:
        """Splits the last axis of ``values`` (length ``F``) into per-layer arrays."""
        return [values[..., self.layer_slice(i)] for i in range(len(self.site_names))]

    def frequency(self) -> np.ndarray:
        """``(F,)`` fraction of inputs for which each filter was on."""
        return self.counts / max(self.n, 1)

    def class_means(self) -> np.ndarray:
        """``(K, F)`` per-class mean path (classes never seen are all zero)."""
        return self.class_counts / np.maximum(self.class_n, 1)[:, None]

    def merge(self, other: PathStats) -> PathStats:
        """Sums two statistics over disjoint inputs of the same model (raw paths concatenated)."""
        if self.site_names != other.site_names or self.num_classes != other.num_classes:
            raise ValueError("cannot merge path statistics of different models or class sets")

        def cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else np.concatenate([a, b])

        return PathStats(
            site_names=self.site_names,
            site_channels=self.site_channels,
            n=self.n + other.n,
            counts=self.counts + other.counts,
            class_counts=self.class_counts + other.class_counts,
            class_n=self.class_n + other.class_n,
            correct=self.correct + other.correct,
            classes=self.classes,
            paths=cat(self.paths, other.paths),
            labels=cat(self.labels, other.labels),
            preds=cat(self.preds, other.preds),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Writes the statistics to ``.npz`` (raw paths bit-packed), atomically."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "site_names": np.array(self.site_names),
            "site_channels": np.array(self.site_channels, dtype=np.int64),
            "n": np.array(self.n),
            "counts": self.counts,
            "class_counts": self.class_counts,
            "class_n": self.class_n,
            "correct": np.array(self.correct),
        }
        if self.classes is not None:
            arrays["classes"] = np.array(self.classes)
        if self.paths is not None:
            arrays["paths_packed"] = np.packbits(self.paths.astype(bool), axis=1)
            arrays["labels"] = self.labels
            arrays["preds"] = self.preds
        atomic_savez(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PathStats:
        """Reads statistics written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            channels = [int(c) for c in z["site_channels"]]
            paths = None
            if "paths_packed" in z:
                paths = np.unpackbits(z["paths_packed"], axis=1, count=sum(channels)).astype(bool)
            return cls(
                site_names=[str(s) for s in z["site_names"]],
                site_channels=channels,
                n=int(z["n"]),
                counts=z["counts"],
                class_counts=z["class_counts"],
                class_n=z["class_n"],
                correct=int(z["correct"]),
                classes=[str(c) for c in z["classes"]] if "classes" in z else None,
                paths=paths,
                labels=z["labels"] if "labels" in z else None,
                preds=z["preds"] if "preds" in z else None,
            )


def check_tolerance(tolerance: float, *, upper: float = 0.5) -> float:
    """Returns ``tolerance`` as a float, or raises ConfigError when it is outside ``[0, upper)``.

    A filter on for at most ``tolerance`` of the inputs counts as silent and one on for at least
    ``1 - tolerance`` as energetic, so the two classes overlap from 0.5 on: ``upper`` is 0.5 for a
    tolerance (pruning and interpretation alike) and 1 for an on-frequency threshold.
    """
    try:
        value = float(tolerance)
    except (TypeError, ValueError):
        raise ConfigError(f"tolerance must be a number in [0, {upper:g}), got {tolerance!r}.") from None
    if not 0.0 <= value < upper:
        raise ConfigError(
            f"tolerance must be in [0, {upper:g}) (fraction of inputs a filter may be on and still count as silent), got {value}."
        )
    return value
