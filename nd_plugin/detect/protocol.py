"""The literature's detection protocol (Lee et al., NeurIPS 2018) on objects: fit, attack, featurise, evaluate.

- :func:`fit_detectors`: one forward pass over clean training inputs fits the path detector, the
  penultimate Mahalanobis baseline and Lee et al.'s feature-ensemble Gaussians
  (:class:`FittedDetectors`, with ``save`` / ``load``);
- :func:`attack_set`: clean test inputs, the correctly classified ones attacked, the successful
  attacks kept (:class:`AttackedSet`);
- :func:`detector_features`: what each detector reads of some inputs (one forward pass for the
  unsupervised ones; Lee's preprocessing adds its own passes);
- :func:`plan`: the evaluation protocol: Lee's 5 / 5 / 90 split over several seeds, or stratified
  K-fold cross-validation when the 5% fit part cannot hold enough attacked inputs (small runs);
- :func:`evaluate`: every detector on those splits, optionally fitted on one attack and tested on
  another (transfer).

The detectors are whatever the registry holds (:func:`~nd_plugin.detect.base.list_detectors`:
the built-in ones of :mod:`nd_plugin.detect.builtin`, then a user's); each is a
:class:`~nd_plugin.detect.base.Detector` that says what it reads and how it is measured, so
nothing here names one, except :data:`RECOMMENDED`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nd_plugin.detect.attacks import AttackSpec, attack, resolve_attack
from nd_plugin.detect.base import Detector, DetectorInput, list_detectors, resolve_detectors
from nd_plugin.detect.baselines import LeeMahalanobis, MahalanobisDetector
from nd_plugin.detect.detectors import PathDetector
from nd_plugin.detect.features import (
    Probe,
    collect_probe,
    find_feature_layer,
    find_stage_layers,
)
from nd_plugin.detect.metrics import Splits, lee_splits, plan_splits
from nd_plugin.errors import DetectionError, RunDirError
from nd_plugin.run import DETECTOR_LEE, DETECTOR_PATH, DETECTOR_PENULTIMATE

__all__ = [
    "RECOMMENDED",
    "AttackedSet",
    "FittedDetectors",
    "attack_set",
    "detector_features",
    "evaluate",
    "fit_detectors",
    "plan",
    "recommend",
]

#: The detector a report recommends when it was measured (:func:`recommend`).
RECOMMENDED = "combined"


@dataclass
class FittedDetectors:
    """The detectors fitted on clean training inputs (what ``RUN/detector*.npz`` hold).

    Attributes:
        path: the path detector (also the source of the supervised path features).
        penultimate: Mahalanobis on penultimate features (unsupervised ablation).
        lee: Lee et al.'s Gaussians on the stem and every stage.
        meta: strings stored with the path detector (data spec, number of fit inputs, seconds).
    """

    path: PathDetector
    penultimate: MahalanobisDetector
    lee: LeeMahalanobis
    meta: dict[str, str]

    def save(self, folder: str | Path) -> None:
        """Writes the three detectors to ``folder`` (the run-directory names :data:`~nd_plugin.run.DETECTOR_PATH`,
        :data:`~nd_plugin.run.DETECTOR_PENULTIMATE`, :data:`~nd_plugin.run.DETECTOR_LEE`)."""
        folder = Path(folder)
        self.path.save(folder / DETECTOR_PATH, **self.meta)
        self.penultimate.save(folder / DETECTOR_PENULTIMATE)
        self.lee.save(folder / DETECTOR_LEE)

    @classmethod
    def load(cls, folder: str | Path, dm: nn.Module) -> FittedDetectors:
        """Reads what :meth:`save` wrote; the path detector is attached to ``dm`` (its layers checked).

        Raises:
            RunDirError: a file is missing or unreadable.
            DetectionError: the saved detector's gated layers are not the model's.
        """
        folder = Path(folder)
        for name in (DETECTOR_PATH, DETECTOR_PENULTIMATE, DETECTOR_LEE):
            if not (folder / name).is_file():
                raise RunDirError(f"{folder / name} does not exist.")
        path = PathDetector.load(folder / DETECTOR_PATH, dm)
        pen = MahalanobisDetector.load(folder / DETECTOR_PENULTIMATE, dm)
        return cls(path, pen, LeeMahalanobis.load(folder / DETECTOR_LEE), dict(path.meta))


def fit_detectors(
    dm: nn.Module,
    loader: Iterable,
    *,
    mi_weights: Sequence[np.ndarray] | None = None,
    device: torch.device | str | None = None,
    meta: dict[str, str] | None = None,
) -> FittedDetectors:
    """Fits every detector's clean statistics with one forward pass over clean ``(inputs, labels)``.

    Args:
        dm: the decoupled model.
        loader: clean training inputs with true labels (no augmentation).
        mi_weights: the ``L_mi`` classifiers' weights, one ``(K, C_l)`` per gated layer (optional).
        device: where to run.
        meta: strings stored with the detectors (e.g. the data spec); ``fit_n`` and
            ``fit_seconds`` are added.

    Returns:
        The :class:`FittedDetectors`.
    """
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else next(dm.parameters()).device
    first = next(iter(loader))
    example = (first[0] if isinstance(first, (tuple, list)) else first)[:2].to(device)
    layer, stages = find_feature_layer(dm.model, example), find_stage_layers(dm.model)
    probe = collect_probe(dm, loader, feature_layer=layer, stages=stages, device=device)
    path = PathDetector().fit_probe(probe, dm.site_names, mi_weights=mi_weights).attach(dm)
    pen = MahalanobisDetector().fit_probe(probe, layer)
    pen.model = dm
    lee = LeeMahalanobis(stages).fit_probe(probe)
    info = dict(meta or {}) | {"fit_n": str(len(probe)), "fit_seconds": f"{time.perf_counter() - t0:.1f}"}
    return FittedDetectors(path, pen, lee, info)


@dataclass
class AttackedSet:
    """Clean test inputs the model classifies correctly, and the successful attacks on them.

    Attributes:
        attack, eps, steps: the attack (its name as filed: a short name or the lower-case
            torchattacks class name).
        drawn: test inputs drawn; correct: of those, correctly classified (the negatives).
        clean: probe of the correctly classified inputs; adv: probe of the successful attacks.
        adv_index: ``(M,)`` for each successful attack, the index in ``clean`` of its input.
        x_clean, x_adv: the normalised inputs (CPU), for detectors that run extra passes.
        spec: the attack as built (:class:`~nd_plugin.detect.attacks.AttackSpec`: class and every
            keyword argument), or ``None``.
    """

    attack: str
    eps: float
    steps: int
    drawn: int
    correct: int
    clean: Probe
    adv: Probe
    adv_index: np.ndarray
    x_clean: torch.Tensor
    x_adv: torch.Tensor
    spec: AttackSpec | None = None

    @property
    def successful(self) -> int:
        return len(self.adv)

    @property
    def tag(self) -> str:
        """``ATTACK-epsEPS[-NAME=VALUE...]`` (e.g. ``fgsm-eps0.0314``, ``apgd-eps0.0314-loss=dlr``), the
        name of its output folder; the parameters set by the caller (other than ``eps``) are appended."""
        tag = f"{self.attack}-eps{f'{self.eps:.4f}'.rstrip('0').rstrip('.')}"
        for k, v in sorted((self.spec.user_kwargs if self.spec else {}).items()):
            if k != "eps":
                tag += "-" + re.sub(r"[^A-Za-z0-9._=+-]", "", f"{k}={v}")
        return tag


def attack_set(
    dm: nn.Module,
    loader: Iterable,
    attack_name: str | AttackSpec,
    eps: float = 8 / 255,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    steps: int = 10,
    feature_layer: str | None = None,
    stages: Sequence[str] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    gate_inputs: bool = False,
    attack_kwargs: dict[str, Any] | None = None,
) -> AttackedSet:
    """Attacks the correctly classified inputs of ``loader``; keeps the successful attacks.

    ``attack_name`` is any attack :func:`~nd_plugin.detect.attacks.attack` takes (a short name, a
    torchattacks class name, or an :class:`~nd_plugin.detect.attacks.AttackSpec`);
    ``attack_kwargs`` are more keyword arguments of its ``__init__``.

    Raises:
        UnknownAttackError, AttackArgumentError, ConfigError: bad attack name, parameter or eps.
        DetectionError: no input classified correctly, or no attack succeeded.
    """
    spec = (
        attack_name
        if isinstance(attack_name, AttackSpec)
        else resolve_attack(attack_name, eps, steps=steps, attack_kwargs=attack_kwargs)
    )
    key = spec.name
    eps = float(spec.kwargs.get("eps", eps))
    clean_parts, adv_parts, xs_clean, xs_adv, index = [], [], [], [], []
    drawn = correct = 0
    kw = {"feature_layer": feature_layer, "stages": stages, "device": device, "gate_inputs": gate_inputs}
    for b, (xb, yb) in enumerate(loader):
        xb, yb = xb.to(device), yb.to(device)
        cp = collect_probe(dm, [(xb, yb)], **kw)
        ok = cp.preds == cp.labels
        drawn += len(cp)
        if ok.any():
            idx = torch.as_tensor(np.flatnonzero(ok), device=xb.device)
            adv = attack(dm, xb[idx], yb[idx], spec, mean=mean, std=std, seed=seed + b)
            ap = collect_probe(dm, [(adv, yb[idx])], **kw)
            fooled = ap.preds != ap.labels
            clean_parts.append(cp.select(ok))
            xs_clean.append(xb[idx].cpu())
            if fooled.any():
                adv_parts.append(ap.select(fooled))
                xs_adv.append(adv[torch.as_tensor(fooled, device=adv.device)].cpu())
                index.append(correct + np.flatnonzero(fooled))
            correct += int(ok.sum())
    if correct == 0:
        raise DetectionError(f"the model classifies none of the {drawn} test inputs correctly: nothing to attack.")
    if not adv_parts:
        raise DetectionError(
            f"attack {key} (budget {eps:.4g}) succeeded on none of the {correct} correctly classified inputs "
            "(success rate 0): nothing to detect; raise eps or use a stronger attack (e.g. pgd).",
            params=("eps",),
        )
    return AttackedSet(
        key,
        float(eps),
        int(spec.user_kwargs.get("steps", steps)),
        drawn,
        correct,
        Probe.concat(clean_parts),
        Probe.concat(adv_parts),
        np.concatenate(index),
        torch.cat(xs_clean),
        torch.cat(xs_adv),
        spec,
    )


def recommend(results: dict[str, dict[str, Any]]) -> str | None:
    """The detector to use: ``combined`` when it was measured, else the one with the highest AUROC.

    Example:
        >>> recommend({"path": {"auroc": 0.8}, "combined": {"auroc": 0.9}, "lid": {"auroc": 0.7}})
        'combined'
        >>> recommend({"path": {"auroc": 0.8}, "lid": {"auroc": 0.85}})
        'lid'
    """
    if RECOMMENDED in results:
        return RECOMMENDED
    return max(results, key=lambda n: results[n]["auroc"]) if results else None


def detector_features(
    fitted: FittedDetectors | None,
    dm: nn.Module | None,
    x: torch.Tensor | None,
    probe: Probe,
    *,
    std: Sequence[float] = (),
    detectors: Iterable[str | Detector] | None = None,
    batch_size: int = 200,
) -> dict[str, Any]:
    """What each detector reads of inputs ``x`` whose forward pass is ``probe``: ``{name: features}``.

    Args:
        fitted: the clean statistics (:func:`fit_detectors`).
        dm: the decoupled model, for the detectors that run extra passes (Lee's preprocessing).
        x: the normalised inputs, for the same detectors.
        probe: their forward pass.
        std: the data normalisation's per-channel std.
        detectors: names or instances (:func:`~nd_plugin.detect.base.resolve_detectors`; ``None``:
            every registered detector with its defaults).
        batch_size: inputs per extra pass.

    Returns:
        ``{name: Detector.features(...)}``: ``(N,)`` scores of the unsupervised detectors, ``(N, F)``
        features or ``{choice: (N, F)}`` of the supervised ones (per preprocessing magnitude for
        ``mahalanobis_lee``, per feature set for ``combined``); the per-layer path features are
        computed once for every detector that reads them.
    """
    inputs = DetectorInput(probe, fitted, dm, x, tuple(std), batch_size)
    return {d.name: d.features(inputs) for d in resolve_detectors(detectors)}


def plan(
    aset: AttackedSet,
    detectors: Iterable[str | Detector] | None = None,
    *,
    seeds: int = 5,
    hint: str = "",
    hint_params: Sequence[str] = (),
) -> Splits:
    """The evaluation protocol for ``aset``: Lee's 5 / 5 / 90 split, or stratified K-fold
    cross-validation when Lee's 5% fit part cannot hold enough attacked inputs
    (:func:`~nd_plugin.detect.metrics.plan_splits`; only asked when a detector of ``detectors``
    is supervised; ``None``: every registered detector).

    Raises:
        DetectionError: too few successful attacks for any estimate (``hint`` says what to do,
            naming the parameters ``hint_params``).
    """
    supervised = any(d.supervised for d in resolve_detectors(detectors))
    return plan_splits(aset.correct, aset.adv_index, seeds=seeds, supervised=supervised, hint=hint, hint_params=hint_params)


def evaluate(
    clean: dict[str, Any],
    adv: dict[str, Any],
    aset: AttackedSet,
    *,
    detectors: Iterable[str | Detector] | None = None,
    seeds: int = 5,
    transfer: tuple[dict[str, Any], AttackedSet] | None = None,
    splits: Splits | Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every detector in ``adv`` on Lee's protocol: 5% fit, 5% choice of hyperparameter, 90% test.

    Each detector measures itself (:meth:`~nd_plugin.detect.base.Detector.evaluate`): unsupervised
    ones on the test parts, supervised ones through the regression. With ``transfer = (adv2,
    aset2)`` (another attack on the same clean inputs) the supervised detectors are fitted and
    chosen on ``aset`` and tested on ``aset2``; the unsupervised ones are left out. ``splits``
    replaces Lee's ``seeds`` splits (e.g. :func:`plan`'s, which falls back to stratified K-fold
    cross-validation on small sets).

    Args:
        clean, adv: :func:`detector_features` of the clean and the attacked inputs of ``aset``.
        aset: the attacked set.
        detectors: the instances (or names) the features came from, when built with options
            (``None``: the registered detectors of the names in ``adv``, with their defaults).
        seeds, transfer, splits: see above.

    Returns:
        ``{name: {"auroc", "auroc_std", "tpr_at_5fpr", "tpr_at_5fpr_std", "seeds"[, "chosen"]}}``
        (``seeds``: how many test parts the mean and std are over), in the order of ``detectors``.
    """
    if transfer is not None and transfer[1].correct != aset.correct:
        raise DetectionError(
            "a transfer needs both attacks on the same clean inputs (same n, seed and data).", params=("n", "seed", "data")
        )
    splits = lee_splits(aset.correct, seeds) if splits is None else list(splits)
    if detectors is None:
        detectors = [n for n in list_detectors() if n in adv]
    out: dict[str, dict[str, Any]] = {}
    for det in resolve_detectors(detectors):
        if det.name not in adv or (transfer is not None and not det.supervised):
            continue
        moved = None if transfer is None else (transfer[0][det.name], transfer[1].adv_index)
        out[det.name] = det.evaluate(clean[det.name], adv[det.name], aset.adv_index, splits, transfer=moved)
    return out
