"""The analyses of ``nd analyze`` as one object.

:func:`analyze_paths` takes :class:`~nd_plugin.paths.PathStats` and returns an :class:`Analysis`;
:meth:`Analysis.save` writes its figures, ``analysis.json`` and ``index.html`` into a folder
(:func:`nd_plugin.report.page.write_report`). The numbers behind every figure are in the analysis
objects (``to_dict()``) and in ``analysis.json``. The workflow on a run directory,
:func:`~nd_plugin.commands.analyze.build_report`, lives in :mod:`nd_plugin.commands.analyze`.

Example:
    >>> a = analyze_paths(stats, n_permutations=0)
    >>> a.save(tmp / "report", figures=False).name
    'index.html'
    >>> sorted(p.name for p in (tmp / "report").iterdir())
    ['analysis.json', 'index.html']
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nd_plugin.errors import DataError
from nd_plugin.files import atomic_write_json
from nd_plugin.interpret import (
    ClassPaths,
    DecisionTree,
    FilterStates,
    OcclusionConcepts,
    PathDistribution,
    class_paths,
    concept_consistency,
    decision_tree,
    filter_states,
    path_distribution,
)
from nd_plugin.interpret._common import jsonable
from nd_plugin.paths import PathStats
from nd_plugin.report.page import write_report
from nd_plugin.run import ANALYSIS_JSON

__all__ = ["Analysis", "analyze_paths", "load_images"]


@dataclass
class Analysis:
    """Every analysis of one set of path statistics (and, optionally, occlusion on some images).

    Attributes:
        stats: the path statistics analysed.
        states: filter states.
        classes: class paths.
        tree: decision tree (``None`` without raw paths).
        distribution: path distribution (``None`` without raw paths).
        occlusion: occlusion concepts (``None`` without images).
        images: display copies of the occluded images, ``(H, W, 3)`` floats in ``[0, 1]``.
        image_groups: ``{class name: indices of its occluded images}`` (concept consistency is per group).
        timings: seconds per step.
        meta: where the analysis comes from (run, data, settings), shown on the report page.
        detections: ``nd detect`` results (``detect.json`` records) shown as tables in the report.
        dynamic_value: :meth:`nd_plugin.pruning.DynamicValue.to_dict` of the model (plus ``source``:
            where it was measured), or None.
    """

    stats: PathStats
    states: FilterStates
    classes: ClassPaths
    tree: DecisionTree | None = None
    distribution: PathDistribution | None = None
    occlusion: OcclusionConcepts | None = None
    images: list[np.ndarray] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)
    image_groups: dict[str, list[int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    detections: list[dict[str, Any]] = field(default_factory=list)
    dynamic_value: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every number of every analysis, as plain Python."""
        s = self.stats
        out: dict[str, Any] = {
            "meta": self.meta,
            "paths": {
                "n": s.n,
                "accuracy": s.accuracy,
                "density": s.density,
                "layers": s.site_names,
                "filters_per_layer": s.site_channels,
                "num_filters": s.num_filters,
                "classes": s.classes,
                "class_n": s.class_n,
            },
            "filter_states": self.states.to_dict(),
            "class_paths": self.classes.to_dict(),
            "decision_tree": None if self.tree is None else self.tree.to_dict(),
            "path_distribution": None if self.distribution is None else self.distribution.to_dict(),
            "occlusion": None
            if self.occlusion is None
            else {
                **self.occlusion.to_dict(),
                "image_names": self.image_names,
                "concept_consistency": {
                    g: concept_consistency(self.occlusion, idx).to_dict(lambda f: "{}[{}]".format(*self.occlusion.filter_name(f)))
                    for g, idx in (self.image_groups or {"all images": list(range(len(self.images)))}).items()
                },
            },
            "dynamic_value": self.dynamic_value,
            "timings_s": self.timings,
        }
        return jsonable(out)

    def save(self, out: str | os.PathLike, *, title: str = "nd analyze", dpi: int = 110, figures: bool = True) -> Path:
        """Writes the report into folder ``out``: PNG figures, ``analysis.json``, an offline ``index.html``.

        Args:
            out: the folder (created; files in it are replaced one by one, each atomically).
            title: page title.
            dpi: resolution of the PNGs.
            figures: render the figures (``False``: numbers only, much faster).

        Returns:
            The path of ``index.html``.
        """
        return write_report(self, out, title=title, dpi=dpi, figures=figures)

    def save_json(self, out: str | os.PathLike) -> Path:
        """Writes :meth:`to_dict` to ``out/analysis.json`` (atomically); returns its path."""
        file = Path(out) / ANALYSIS_JSON
        atomic_write_json(file, self.to_dict(), indent=1)
        return file


def analyze_paths(
    stats: PathStats,
    *,
    tolerance: float = 0.0,
    threshold: float = 0.75,
    max_tree_samples: int | None = 5000,
    n_permutations: int = 99,
    tree_test: str = "copula",
    alpha: float = 0.01,
    seed: int = 0,
) -> Analysis:
    """Runs every path analysis on one :class:`PathStats` (tree and distribution need raw paths).

    Args:
        stats: path statistics.
        tolerance: filter-state tolerance (fraction of inputs).
        threshold: Hopkins threshold of the decision tree (``tree_test="hopkins"`` only).
        max_tree_samples: inputs used by the decision tree (stratified subset).
        n_permutations: permutations of the class-dependence test.
        tree_test: the decision tree's cluster test (:data:`~nd_plugin.interpret.tree.TESTS`).
        alpha: its level.
        seed: seed of every random step.

    Returns:
        An :class:`Analysis` (without occlusion).

    Example:
        >>> a = analyze_paths(dm.paths(loader, raw=True))  # doctest: +SKIP
        >>> a.states.shares, a.classes.eta2  # doctest: +SKIP
    """
    t = {}
    t0 = time.perf_counter()
    states = filter_states(stats, tolerance)
    t["filter_states"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cp = class_paths(stats, n_permutations=n_permutations, seed=seed)
    t["class_paths"] = time.perf_counter() - t0
    tree = dist = None
    if stats.paths is not None and stats.labels is not None:
        t0 = time.perf_counter()
        tree = decision_tree(stats, test=tree_test, alpha=alpha, threshold=threshold, max_samples=max_tree_samples, seed=seed)
        t["decision_tree"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dist = path_distribution(stats, seed=seed)
        t["path_distribution"] = time.perf_counter() - t0
    return Analysis(stats=stats, states=states, classes=cp, tree=tree, distribution=dist, timings=t)


def load_images(
    paths: Sequence[str | os.PathLike],
    size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
):
    """Reads image files for occlusion: resized to ``size`` (H, W), RGB, normalised.

    Args:
        paths: image files (anything PIL reads).
        size: ``(H, W)`` the model takes.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.

    Returns:
        ``(batch, display)``: a ``(B, 3, H, W)`` float tensor and a list of ``(H, W, 3)`` arrays in ``[0, 1]``.

    Raises:
        DataError: a file that does not exist or is not an image.
    """
    import torch
    from PIL import Image, UnidentifiedImageError

    batch, display = [], []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DataError(f"image {p} does not exist; images must name existing image files.", params=("images",))
        try:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(
                f"{p} is not an image PIL can read ({type(exc).__name__}); images must be PNG/JPEG files.",
                params=("images",),
            ) from None
        display.append(arr)
        m = np.asarray(mean, dtype=np.float32)[:, None, None]
        s = np.asarray(std, dtype=np.float32)[:, None, None]
        batch.append(torch.from_numpy((arr.transpose(2, 0, 1) - m) / s))
    return torch.stack(batch), display
