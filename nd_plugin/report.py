"""Figures (matplotlib) and the offline HTML report of ``nd analyze``.

Plot functions take an analysis result and return a :class:`matplotlib.figure.Figure`; they never
touch pyplot or the global backend: figures are created with :class:`~matplotlib.figure.Figure`
and rendered by the Agg canvas, so importing this module changes nothing for a user's own plots.
The numbers behind every figure are in the analysis objects (``to_dict()``) and in
``analysis.json``.

Example:
    >>> from nd_plugin.report import build_report  # doctest: +SKIP
    >>> build_report("runs/resnet20")  # doctest: +SKIP
    PosixPath('runs/resnet20/report/index.html')
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nd_plugin.errors import DataError, InputShapeError
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
    occlusion_concepts,
    path_distribution,
)
from nd_plugin.interpret._common import jsonable
from nd_plugin.path_figures import (
    plot_class_paths,
    plot_class_stats,
    plot_filter_states,
    plot_layer_histograms,
    plot_path_distribution,
)
from nd_plugin.paths import PathStats
from nd_plugin.report_figures import plot_decision_tree, plot_occlusion

__all__ = [
    "Analysis",
    "analyze_paths",
    "build_report",
    "load_images",
    "plot_class_paths",
    "plot_class_stats",
    "plot_decision_tree",
    "plot_filter_states",
    "plot_layer_histograms",
    "plot_occlusion",
    "plot_path_distribution",
    "write_report",
]

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
            "occlusion": None if self.occlusion is None else {
                **self.occlusion.to_dict(), "image_names": self.image_names,
                "concept_consistency": {
                    g: concept_consistency(self.occlusion, idx).to_dict(
                        lambda f: "{}[{}]".format(*self.occlusion.filter_name(f)))
                    for g, idx in (self.image_groups or {"all images": list(range(len(self.images)))}).items()
                },
            },
            "timings_s": self.timings,
        }
        return jsonable(out)


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


# --------------------------------------------------------------------------------------- images


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
            raise DataError(f"image {p} does not exist; pass existing image files to --images.")
        try:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{p} is not an image PIL can read ({type(exc).__name__}); pass PNG/JPEG files to --images.") from None
        display.append(arr)
        m = np.asarray(mean, dtype=np.float32)[:, None, None]
        s = np.asarray(std, dtype=np.float32)[:, None, None]
        batch.append(torch.from_numpy((arr.transpose(2, 0, 1) - m) / s))
    return torch.stack(batch), display


# ---------------------------------------------------------------------------------------- output

_FIGURES = [
    ("filter_states.png", "Filter states",
     "Share of silent (never on), dynamic and energetic (always on) filters per gated layer, and how often filters are on "
     "(seed Fig. A, Table C)."),
    ("layer_histograms.png", "Activation counts per layer",
     "For every gated layer, the histogram of the fraction of inputs for which each filter is on."),
    ("class_paths.png", "Class calculation paths",
     "Per class, how often each filter is on (filters grouped by layer, sorted within a layer), and the path width per "
     "class and layer (seed Fig. F)."),
    ("class_stats.png", "How much paths differ between classes",
     "Path width per class; η², the share of path variance explained by the class, per layer (with a label-permutation "
     "p-value); the similarity of class mean paths."),
    ("decision_tree.png", "Decision process",
     "Layer by layer, a group of inputs is split in two by k-means when a cluster test on its gate vectors rejects "
     "'one population' (the test and its rule are in the table above and in analysis.json, with every node's statistic "
     "and p-value); classes follow the majority of their inputs (seed Fig. C)."),
    ("path_distribution.png", "Distribution of whole paths",
     "Paths projected on their first two principal components, coloured by class; Hamming distances between paths of "
     "the same and of different classes; per-class path diversity (seed Fig. D)."),
    ("occlusion.png", "Semantic concepts by occlusion",
     "Black patches slide over several images of a class; for the filters whose concept is most consistent (turned off "
     "by some, at most half, of the patches on the most images of the class), the bright region on each image is where "
     "blacking-out silences the filter (seed Fig. B)."),
]


def _key_numbers(a: Analysis) -> list[tuple[str, str]]:
    s, cp = a.stats, a.classes
    sh = a.states.shares
    rows = [
        ("inputs analysed", f"{s.n}"),
        ("top-1 accuracy on them", f"{s.accuracy:.2%}"),
        ("gated layers / filters", f"{len(s.site_names)} / {s.num_filters}"),
        ("gate density (mean share of filters on)", f"{s.density:.3f}"),
        ("silent / dynamic / energetic filters", f"{sh['silent']:.2%} / {sh['dynamic']:.2%} / {sh['energetic']:.2%}"),
        ("η² (path variance explained by class)", f"{cp.eta2:.4f}"
         + ("" if cp.permutation_p is None else f" (permutation p = {cp.permutation_p:.3g}, {cp.n_permutations} permutations)")),
        ("class-dependent filters (χ², Bonferroni, α = " + f"{cp.alpha:g})", f"{cp.class_dependent} of {cp.tested} varying filters"),
    ]
    if cp.centroid_accuracy is not None:
        rows.append(("class from path alone (nearest centroid, 2-fold)", f"{cp.centroid_accuracy:.2%} (chance {1 / len(cp.classes):.0%})"))
    widest, thinnest = int(np.argmax(cp.total_width)), int(np.argmin(cp.total_width))
    rows.append(("widest / thinnest class path", f"{cp.classes[widest]} ({cp.total_width[widest]:.1f}) / {cp.classes[thinnest]} ({cp.total_width[thinnest]:.1f}) filters on"))
    if a.tree is not None:
        first = a.tree.first_parting()
        rows.append(("decision-tree test", f"{a.tree.description} (split when {a.tree.rule})"))
        rows.append(("decision tree", f"{len(a.tree.splits)} splits, {len(a.tree.leaves)} leaves, {len(a.tree.tested())} groups tested"
                     + (f"; no split: {a.tree.no_split_reason}" if a.tree.no_split_reason else "")))
        rows.append(("first layer where classes part", "none" if first is None else f"{first[0]}: " + " | ".join(", ".join(g) for g in first[1])))
    if a.distribution is not None:
        d = a.distribution
        rows.append(("distinct whole paths", f"{d.distinct} of {d.n}"))
        rows.append(("mean Hamming distance same / different class", f"{d.mean_hamming_within:.4f} / {d.mean_hamming_between:.4f}"))
    return rows


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def write_report(
    analysis: Analysis, out: str | os.PathLike, *, title: str = "nd analyze", dpi: int = 110, figures: bool = True
) -> Path:
    """Writes the PNG figures, ``analysis.json`` and an offline ``index.html`` into ``out``.

    Args:
        analysis: the analyses.
        out: directory (created).
        title: page title.
        dpi: resolution of the PNGs.
        figures: render the figures (``False``: numbers only, much faster).

    Returns:
        The path of ``index.html``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Any] = {
        "filter_states.png": lambda: plot_filter_states(analysis.states),
        "layer_histograms.png": lambda: plot_layer_histograms(analysis.states),
        "class_paths.png": lambda: plot_class_paths(analysis.classes),
        "class_stats.png": lambda: plot_class_stats(analysis.classes),
    }
    if analysis.tree is not None:
        plots["decision_tree.png"] = lambda: plot_decision_tree(analysis.tree)
    if analysis.distribution is not None:
        plots["path_distribution.png"] = lambda: plot_path_distribution(analysis.distribution)
    if analysis.occlusion is not None:
        plots["occlusion.png"] = lambda: plot_occlusion(analysis.occlusion, analysis.images, groups=analysis.image_groups,
                                                        classes=analysis.stats.classes)
    if not figures:
        plots = {}
    t0 = time.perf_counter()
    for name, make in plots.items():
        fig = make()
        fig.savefig(out / name, dpi=dpi)
    analysis.timings["figures"] = time.perf_counter() - t0
    _write_json(out / "analysis.json", analysis.to_dict())

    esc = html.escape
    rows = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _key_numbers(analysis))
    sections = []
    for name, head, caption in _FIGURES:
        if name in plots:
            sections.append(
                f'<figure id="{name[:-4]}"><h2>{esc(head)}</h2><img src="{name}" alt="{esc(head)}">'
                f"<figcaption>{esc(caption)}</figcaption></figure>"
            )
    meta = analysis.meta
    from nd_plugin.detect_figures import detection_section_html

    sections.append(detection_section_html(meta.get("run")))  # nd detect's tables, when the run has them
    source = esc(", ".join(f"{k}: {v}" for k, v in meta.items() if isinstance(v, (str, int, float))))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} th, td {{ border-bottom: 1px solid #ddd; padding: .3em .8em; text-align: left; }}
th {{ font-weight: 600; }} figure {{ margin: 2em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; max-width: 60em; }} .meta {{ color: #666; font-size: .9em; }}
</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="meta">{source}</p>
<table>{rows}</table>
<p>Every number behind the figures: <a href="analysis.json">analysis.json</a>.</p>
{''.join(sections)}
</body></html>
"""
    index = out / "index.html"
    tmp = out / "index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, index)
    return index


# ----------------------------------------------------------------------------------- entry point


def _check_classes(run_classes: Sequence[str] | None, classes: Sequence[str] | None, what: str, run_path: Path) -> None:
    if run_classes is None or classes is None:
        return
    if list(run_classes) != list(classes):
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(run_classes, classes)) if a != b][:3]
        raise DataError(
            f"{what} has {len(classes)} classes that do not match the run's {len(run_classes)} "
            f"({'; '.join(diff) or 'different number'}); pass data with the classes the run {run_path} was trained on."
        )


def _analysis_data(run: Any, spec: str | None) -> Any:
    """The data bundle to analyse; for ``imagefolder:`` specs with a ``train/`` + ``val/``/``test/``
    layout only the validation folder is decoded (the analysis never reads the training split)."""
    from nd_plugin.data import DataBundle, load_image_folder

    spec = spec or run.config["data"]
    kind, _, arg = spec.strip().partition(":")
    if kind.lower() == "imagefolder" and arg:
        root = Path(arg).expanduser()
        val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
        if (root / "train").is_dir() and val_dir is not None:
            train_classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
            val_classes = sorted(d.name for d in val_dir.iterdir() if d.is_dir())
            if train_classes == val_classes:  # same folders: the labels index the same classes
                val = load_image_folder(val_dir)
                x, _ = val[0]
                cfg = run.config
                if len(val_classes) != cfg["num_classes"]:
                    raise DataError(
                        f"data {spec!r} has {len(val_classes)} classes but the run was trained on "
                        f"{cfg['num_classes']} ({cfg['data']!r}); pass data with the run's classes."
                    )
                from nd_plugin.data import IMAGENET_MEAN, IMAGENET_STD

                return DataBundle(train=val, val=val, num_classes=len(val_classes), classes=list(val_classes),
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=tuple(x.shape), name=spec)
    return run.data(spec)


def _pick_occlusion_images(bundle: Any, wanted: Sequence[str] | int, total: int):
    """The first validation images of each wanted class: ``(tensors, names, {class: indices})``."""
    classes = list(bundle.classes)
    if isinstance(wanted, int):
        wanted = classes[: max(1, wanted)]
    unknown = [c for c in wanted if c not in classes]
    if unknown:
        raise DataError(f"occlusion class {unknown[0]!r} is not a class of the data ({', '.join(classes[:10])}...).")
    per_class = max(1, total // len(wanted))
    targets = getattr(bundle.val, "targets", None)
    targets = np.asarray(targets) if targets is not None else np.array([int(bundle.val[i][1]) for i in range(len(bundle.val))])
    picked, names, groups = [], [], {}
    for c in wanted:
        for i in np.flatnonzero(targets == classes.index(c))[:per_class]:
            groups.setdefault(c, []).append(len(picked))
            picked.append(bundle.val[int(i)][0])
            names.append(f"validation image {int(i)} ({c})")
    if not picked:
        raise DataError(f"the validation split has no image of {', '.join(wanted)}; pass --images instead.")
    return picked, names, groups


def build_report(
    run: str | os.PathLike | Any,
    data: str | None = None,
    images: Sequence[str | os.PathLike] = (),
    out: str | os.PathLike | None = None,
    *,
    patch: int | None = None,
    stride: int | None = None,
    tolerance: float = 0.0,
    threshold: float = 0.75,
    tree_test: str = "copula",
    alpha: float = 0.01,
    max_tree_samples: int | None = 5000,
    n_permutations: int = 99,
    batch_size: int = 256,
    max_batches: int | None = None,
    num_occlusion_images: int = 12,
    occlusion_classes: Sequence[str] | int = 2,
    device: str = "cpu",
    progress: bool = False,
    figures: bool = True,
    seed: int = 0,
) -> Path:
    """Analyses a run directory and writes ``report/`` (figures, ``analysis.json``, ``index.html``).

    Path statistics come from the run's ``paths.npz`` when it holds every input's path and no
    ``data`` is given; otherwise they are collected with ``dm.paths(loader, raw=True)`` over the
    validation split of ``data`` (default: the run's data set). Occlusion runs on ``images``, or,
    when none are given, on the first validation images of a few classes.

    Args:
        run: a run directory (or an opened :class:`~nd_plugin.run.Run`).
        data: data spec to analyse instead of the run's ``paths.npz``.
        images: image files for the occlusion analysis.
        out: output directory (default ``RUN/report``).
        patch: occlusion patch side in pixels (default a quarter of the image side: 7 × 7 patches
            with the default stride).
        stride: occlusion stride (default half the patch).
        tolerance: filter-state tolerance.
        threshold: Hopkins threshold of the decision tree (``tree_test="hopkins"`` only).
        tree_test: the decision tree's cluster test (``"copula"``, calibrated; or ``"hopkins"``, ...).
        alpha: level of the tree's test.
        max_tree_samples: inputs used by the decision tree.
        n_permutations: permutations of the class-dependence test.
        batch_size: batch size of path collection.
        max_batches: collect paths over at most this many batches.
        num_occlusion_images: validation images occluded when ``images`` is empty, split evenly over
            ``occlusion_classes`` (0: no occlusion).
        occlusion_classes: class names whose validation images are occluded, or how many classes
            (the first ones in class order); the figure ranks filters by concept consistency per class.
        device: where the model runs.
        progress: show progress bars.
        figures: render the figures (``False``: ``analysis.json`` and a table of numbers only).
        seed: seed of every random step.

    Returns:
        The path of ``index.html``.

    Raises:
        RunDirError: not a run directory, or no checkpoint.
        DataError: data whose classes differ from the run's, images that are missing or unreadable.
        InputShapeError: an occlusion patch larger than the images.

    Example:
        >>> build_report("runs/r20", images=["cat.png"])  # doctest: +SKIP
        PosixPath('runs/r20/report/index.html')
    """
    import torch

    from nd_plugin.run import Run, atomic_dir, open_run

    t_start = time.perf_counter()
    run = run if isinstance(run, Run) else open_run(run)
    cfg = run.config
    out = Path(out) if out is not None else run.path / "report"
    timings: dict[str, float] = {}
    # Cheap checks first, so that bad input fails before any expensive step.
    if not run.checkpoint_path.is_file():
        run.load_checkpoint()  # raises RunDirError, saying what to do
    run_classes = cfg.get("classes")
    dm = None
    input_size = tuple(cfg.get("input_size") or ())
    if len(input_size) != 3:
        dm = run.build_model(device)
        input_size = tuple(dm.input_size)
    h, w = int(input_size[1]), int(input_size[2])
    patch = patch if patch is not None else max(2, round(min(h, w) / 4))
    if patch > min(h, w) or patch < 1:
        raise InputShapeError(f"occlusion patch {patch} px does not fit the run's {h}x{w} inputs; use --patch between 1 and {min(h, w)}.")

    stats = None
    if data is None:
        try:
            stats = run.stats()
        except Exception:  # noqa: BLE001 - missing or unreadable: collect below
            stats = None
        if stats is not None and (stats.paths is None or stats.labels is None):
            stats = None
    bundle = None
    if stats is None or (not images and num_occlusion_images > 0):
        try:
            bundle = _analysis_data(run, data)
        except DataError:
            if stats is None or data is not None:
                raise
            bundle = None  # paths are there; only the default occlusion images are lost
    what = f"data {data or cfg.get('data')!r}"
    if bundle is not None:
        _check_classes(run_classes, bundle.classes, what, run.path)
        if tuple(bundle.input_size) != tuple(input_size):
            raise DataError(f"{what} yields {tuple(bundle.input_size)} inputs but the run takes {tuple(input_size)}.")
    if stats is not None:
        _check_classes(run_classes, stats.classes, "paths.npz", run.path)
    mean = cfg.get("mean") or (list(bundle.mean) if bundle is not None else None)
    std = cfg.get("std") or (list(bundle.std) if bundle is not None else None)
    occ_images = display = None
    names: list[str] = []
    groups: dict[str, list[int]] = {}
    if images:
        if mean is None or std is None:
            raise DataError("the run's config has no normalisation (mean/std); pass --data so the images can be normalised.")
        occ_images, display = load_images(images, (h, w), mean, std)
        names = [str(p) for p in images]
        groups = {"given images": list(range(len(names)))}
    elif bundle is not None and num_occlusion_images > 0:
        picked, names, groups = _pick_occlusion_images(bundle, occlusion_classes, num_occlusion_images)
        occ_images = torch.stack(picked)
        m = torch.tensor(bundle.mean).view(-1, 1, 1)
        s = torch.tensor(bundle.std).view(-1, 1, 1)
        display = [(x * s + m).clamp(0, 1).permute(1, 2, 0).numpy() for x in picked]

    if dm is None:
        t0 = time.perf_counter()
        dm = run.build_model(device)
        timings["build_model"] = time.perf_counter() - t0
    if stats is None:
        t0 = time.perf_counter()
        loader = bundle.loader("val", batch_size=batch_size, shuffle=False)
        stats = dm.paths(loader, raw=True, classes=list(bundle.classes), num_classes=bundle.num_classes,
                         progress=progress, device=device, max_batches=max_batches)
        timings["collect_paths"] = time.perf_counter() - t0
        source = f"collected on the validation split of {data or cfg.get('data')}"
    else:
        source = f"{run.path / 'paths.npz'}"
    if stats.classes is None and run_classes is not None:
        stats.classes = list(run_classes)

    analysis = analyze_paths(stats, tolerance=tolerance, threshold=threshold, max_tree_samples=max_tree_samples,
                             n_permutations=n_permutations, tree_test=tree_test, alpha=alpha, seed=seed)
    analysis.timings = {**timings, **analysis.timings}
    if occ_images is not None:
        t0 = time.perf_counter()
        fill = (-np.asarray(mean) / np.asarray(std)).tolist() if mean is not None else 0.0
        analysis.occlusion = occlusion_concepts(dm, occ_images, patch=patch, stride=stride, fill=fill, device=device)
        analysis.images, analysis.image_names, analysis.image_groups = list(display), names, groups
        analysis.timings["occlusion"] = time.perf_counter() - t0
    analysis.meta = {
        "run": str(run.path),
        "model": cfg.get("model"),
        "data": cfg.get("data") if data is None else data,
        "paths": source,
        "occlusion_patch": patch,
        "occlusion_stride": stride if stride is not None else max(patch // 2, 1),
        "tree_test": tree_test,
        "tree_alpha": alpha,
        "hopkins_threshold": threshold if tree_test == "hopkins" else None,
        "occlusion_groups": {g: len(i) for g, i in groups.items()},
        "seed": seed,
    }
    with atomic_dir(out, marker="analysis.json") as tmp:  # the report appears complete or not at all
        write_report(analysis, tmp, title=f"nd analyze: {cfg.get('model', run.path.name)}", figures=figures)
        analysis.timings["total"] = time.perf_counter() - t_start
        _write_json(tmp / "analysis.json", analysis.to_dict())  # again, now with the total time
    return out / "index.html"
