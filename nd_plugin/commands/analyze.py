"""``nd analyze``: analyse a run directory's calculation paths and write its report.

Reads the run (:mod:`nd_plugin.run`): its config, model, ``paths.npz`` or data, and
the results of earlier ``nd detect`` runs; analyses with :func:`nd_plugin.report.analyze_paths`
and :func:`nd_plugin.interpret.occlusion_concepts`; writes ``RUN/report/`` through
:meth:`nd_plugin.report.Analysis.save`, complete or not at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nd_plugin import run as rundir
from nd_plugin.errors import DataError, InputShapeError
from nd_plugin.files import atomic_dir
from nd_plugin.interpret import occlusion_concepts
from nd_plugin.report import analyze_paths, load_images

__all__ = ["build_report"]


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

                return DataBundle(
                    train=val,
                    val=val,
                    num_classes=len(val_classes),
                    classes=list(val_classes),
                    mean=IMAGENET_MEAN,
                    std=IMAGENET_STD,
                    input_size=tuple(x.shape),
                    name=spec,
                )
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
        raise DataError(f"the validation split has no image of {', '.join(wanted)}; pass images instead.", params=("images",))
    return picked, names, groups


def _dynamic_value(
    run: Any, dm: Any, stats: Any, bundle: Any, data: str | None, batch_size: int, timings: dict[str, float]
) -> dict[str, Any] | None:
    """The run's recorded dynamic value (its own paths analysed), else one measured on ``bundle``'s validation split."""
    recorded = run.dynamic_value() if data is None else None
    if recorded is not None:
        return {**recorded[0], "source": f"recorded in {recorded[1]}"}
    if bundle is None:
        try:
            bundle = _analysis_data(run, data)
        except DataError:
            return None
    from nd_plugin.pruning import dynamic_value

    t0 = time.perf_counter()
    value = dynamic_value(dm, stats, bundle.loader("val", batch_size=batch_size, shuffle=False))
    timings["dynamic_value"] = time.perf_counter() - t0
    return {**value.to_dict(), "source": f"measured by nd analyze on the validation split of {data or run.config.get('data')}"}


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
    dynamic_value: bool = True,
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
        dynamic_value: show the dynamic value (gated top-1 minus that of the static network of
            the same FLOPs): the one ``summary.json`` or ``prune.json`` records when the run's own
            paths are analysed, otherwise measured here on the validation split
            (:func:`nd_plugin.pruning.dynamic_value`; two passes over it).

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
    t_start = time.perf_counter()
    run = run if isinstance(run, rundir.Run) else rundir.open_run(run)
    cfg = run.config
    out = Path(out) if out is not None else run.path / rundir.REPORT
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
        raise InputShapeError(
            f"occlusion patch {patch} px does not fit the run's {h}x{w} inputs; use a patch between 1 and {min(h, w)}.",
            params=("patch",),
        )

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
        _check_classes(run_classes, stats.classes, rundir.PATHS, run.path)
    mean = cfg.get("mean") or (list(bundle.mean) if bundle is not None else None)
    std = cfg.get("std") or (list(bundle.std) if bundle is not None else None)
    occ_images = display = None
    names: list[str] = []
    groups: dict[str, list[int]] = {}
    if images:
        if mean is None or std is None:
            raise DataError(
                "the run's config has no normalisation (mean/std); pass data so the images can be normalised.", params=("data",)
            )
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
        stats = dm.paths(
            loader,
            raw=True,
            classes=list(bundle.classes),
            num_classes=bundle.num_classes,
            progress=progress,
            device=device,
            max_batches=max_batches,
        )
        timings["collect_paths"] = time.perf_counter() - t0
        source = f"collected on the validation split of {data or cfg.get('data')}"
    else:
        source = f"{run.path / rundir.PATHS}"
    if stats.classes is None and run_classes is not None:
        stats.classes = list(run_classes)

    analysis = analyze_paths(
        stats,
        tolerance=tolerance,
        threshold=threshold,
        max_tree_samples=max_tree_samples,
        n_permutations=n_permutations,
        tree_test=tree_test,
        alpha=alpha,
        seed=seed,
    )
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
    analysis.detections = run.detections()  # nd detect's tables, when the run has them
    if dynamic_value:
        analysis.dynamic_value = _dynamic_value(run, dm, stats, bundle, data, batch_size, analysis.timings)
    with atomic_dir(out, marker=rundir.ANALYSIS_JSON) as tmp:  # the report appears complete or not at all
        analysis.save(tmp, title=f"nd analyze: {cfg.get('model', run.path.name)}", figures=figures)
        analysis.timings["total"] = time.perf_counter() - t_start
        analysis.save_json(tmp)  # again, now with the total time
    return out / rundir.INDEX_HTML
