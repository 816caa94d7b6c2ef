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

Detector names (:data:`DETECTORS`): ``path`` (unsupervised, one forward pass), ``path_supervised``
(logistic regression over per-layer path features: distances to every class mean and class
posteriors), ``path_supervised_raw`` (the same regression over the raw soft path),
``path_supervised_full`` (over both: the per-layer path features and the raw soft path),
``combined`` (the path score, the classifier's confidence statistics and, where the probe holds
them, the penultimate and Lee's per-layer Mahalanobis distances, with or without the per-layer
path features, the set chosen on the choice part: every one-pass detector's evidence in one
regression; :func:`combined_features`),
``mahalanobis_lee`` (Lee et al.: feature ensemble, tied covariance, preprocessing, regression),
``lid`` (Ma et al., ICLR 2018, k chosen on held-out attacked data), ``mahalanobis_penultimate``
(the penultimate-only, unsupervised ablation of Lee et al.), ``max_softmax``.
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
from nd_plugin.detect.baselines import (
    LEE_MAGNITUDES,
    LID_KS,
    LeeMahalanobis,
    MahalanobisDetector,
    confidence_features,
    lid_scores,
    msp_score,
)
from nd_plugin.detect.detectors import PathDetector
from nd_plugin.detect.features import (
    Probe,
    collect_probe,
    find_feature_layer,
    find_stage_layers,
)
from nd_plugin.detect.metrics import (
    Splits,
    evaluate_supervised,
    evaluate_unsupervised,
    lee_splits,
    plan_splits,
)
from nd_plugin.errors import ConfigError, DetectionError, RunDirError

__all__ = [
    "COMBINED_SETS",
    "DETECTORS",
    "PATH_ONLY",
    "AttackedSet",
    "FittedDetectors",
    "UnknownDetectorError",
    "attack_set",
    "check_detectors",
    "combined_features",
    "detector_features",
    "evaluate",
    "fit_detectors",
    "plan",
    "recommend",
]

#: Every detector :func:`evaluate` measures, in the order of the tables.
DETECTORS = (
    "path", "path_supervised", "path_supervised_raw", "path_supervised_full", "combined",
    "mahalanobis_lee", "lid", "mahalanobis_penultimate", "max_softmax",
)  # fmt: skip
#: Detectors with a logistic regression fitted on attacked inputs (Lee's protocol).
SUPERVISED = ("path_supervised", "path_supervised_raw", "path_supervised_full", "combined", "mahalanobis_lee", "lid")
#: The detector a report recommends when it was measured (:func:`recommend`).
RECOMMENDED = "combined"
#: Detectors that read only the forward pass's path and logits (no extra pass, no features).
PATH_ONLY = ("path", "path_supervised", "path_supervised_raw", "path_supervised_full", "max_softmax")

PATH_FILE, PENULTIMATE_FILE, LEE_FILE = "detector.npz", "detector_mahalanobis.npz", "detector_lee.npz"


class UnknownDetectorError(ConfigError):
    """A detector name that :data:`DETECTORS` does not hold."""


def check_detectors(names: Iterable[str] | None) -> list[str]:
    """The detector names, checked (``None``: all of :data:`DETECTORS`).

    Example:
        >>> check_detectors(["path", "lid"])
        ['path', 'lid']
        >>> check_detectors(["odin"])
        Traceback (most recent call last):
        ...
        nd_plugin.detect.protocol.UnknownDetectorError: unknown detector 'odin'; known detectors: path, path_supervised, path_supervised_raw, path_supervised_full, combined, mahalanobis_lee, lid, mahalanobis_penultimate, max_softmax.
    """
    out = list(DETECTORS) if names is None else [str(n).strip() for n in names]
    for n in out:
        if n not in DETECTORS:
            raise UnknownDetectorError(f"unknown detector {n!r}; known detectors: {', '.join(DETECTORS)}.")
    if not out:
        raise UnknownDetectorError(f"no detector named; known detectors: {', '.join(DETECTORS)}.")
    return out


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
        """Writes the three detectors to ``folder`` (``detector.npz``, ``detector_mahalanobis.npz``, ``detector_lee.npz``)."""
        folder = Path(folder)
        self.path.save(folder / PATH_FILE, **self.meta)
        self.penultimate.save(folder / PENULTIMATE_FILE)
        self.lee.save(folder / LEE_FILE)

    @classmethod
    def load(cls, folder: str | Path, dm: nn.Module) -> FittedDetectors:
        """Reads what :meth:`save` wrote; the path detector is attached to ``dm`` (its layers checked).

        Raises:
            RunDirError: a file is missing or unreadable.
            DetectionError: the saved detector's gated layers are not the model's.
        """
        folder = Path(folder)
        for name in (PATH_FILE, PENULTIMATE_FILE, LEE_FILE):
            if not (folder / name).is_file():
                raise RunDirError(f"{folder / name} does not exist.")
        path = PathDetector.load(folder / PATH_FILE, dm)
        pen = MahalanobisDetector.load(folder / PENULTIMATE_FILE, dm)
        return cls(path, pen, LeeMahalanobis.load(folder / LEE_FILE), dict(path.meta))


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
    spec = attack_name if isinstance(attack_name, AttackSpec) else resolve_attack(
        attack_name, eps, steps=steps, attack_kwargs=attack_kwargs
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
            f"attack {key} at eps={eps:.4g} succeeded on none of the {correct} correctly classified inputs "
            "(success rate 0): nothing to detect; raise eps (--eps) or use a stronger attack (e.g. pgd)."
        )
    return AttackedSet(
        key, float(eps), int(spec.user_kwargs.get("steps", steps)), drawn, correct, Probe.concat(clean_parts),
        Probe.concat(adv_parts), np.concatenate(index), torch.cat(xs_clean), torch.cat(xs_adv), spec,
    )


#: The two feature sets of the ``combined`` detector; the regression chooses between them on the
#: choice part, as Lee's chooses a preprocessing magnitude (:func:`combined_features`).
COMBINED_SETS = ("scores", "scores+path_features")


def combined_features(fitted: FittedDetectors, probe: Probe, path: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The features of the ``combined`` detector, all read from one forward pass: ``{set: (N, F)}``.

    ``"scores"``: the path detector's overall score, the classifier's confidence statistics
    (:func:`~nd_plugin.detect.baselines.confidence_features`: max softmax, entropy, margins, max
    logit, log-sum-exp) and, where the probe and the fitted detectors hold them, ``log(1 + d)`` of
    the penultimate Mahalanobis distance and of Lee's per-layer distances without preprocessing.
    ``"scores+path_features"``: the same and the per-layer path features of ``path_supervised``
    (:meth:`~nd_plugin.detect.detectors.PathDetector.path_features`; pass them as ``path`` when
    already computed). The few scores fit well on a few dozen attacked inputs; the per-layer
    features add what they see when there are hundreds (docs/notes/detect.md, issue 24).

    Example:
        >>> import nd_plugin
        >>> from nd_plugin.adapters.cifar import CifarResNet
        >>> dm = nd_plugin.wrap(CifarResNet(8, num_classes=3).eval(), torch.randn(1, 3, 16, 16)).eval()
        >>> x, y = torch.randn(60, 3, 16, 16), torch.arange(60) % 3
        >>> fitted = fit_detectors(dm, [(x, y)])
        >>> probe = collect_probe(dm, x[:4], feature_layer="linear", stages=fitted.lee.layers)
        >>> {k: v.shape for k, v in combined_features(fitted, probe).items()}  # 1 + 6 + 1 + 4 stage sites; + 3 x 2 x 3
        {'scores': (4, 12), 'scores+path_features': (4, 30)}
    """
    parts = [fitted.path.score_probe(probe).overall[:, None], confidence_features(probe.logits)]
    pen = fitted.penultimate
    if pen is not None and pen.means is not None and probe.features is not None:
        parts.append(np.log1p(np.maximum(pen.score_probe(probe), 0.0))[:, None])
    lee = fitted.lee
    if lee is not None and lee.means and probe.stages is not None and len(probe.stages) == len(lee.means):
        parts.append(np.log1p(np.maximum(lee.score_probe(probe), 0.0)))
    scores = np.concatenate(parts, axis=1)
    path = fitted.path.path_features(probe) if path is None else path
    return {COMBINED_SETS[0]: scores, COMBINED_SETS[1]: np.concatenate([scores, path], axis=1)}


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
    fitted: FittedDetectors,
    dm: nn.Module,
    x: torch.Tensor,
    probe: Probe,
    *,
    std: Sequence[float],
    detectors: Sequence[str] = DETECTORS,
    magnitudes: Sequence[float] = LEE_MAGNITUDES,
    path_magnitudes: Sequence[float] = (0.0,),
    batch_size: int = 200,
) -> dict[str, Any]:
    """What each detector reads of inputs ``x`` whose forward pass is ``probe``.

    ``magnitudes`` are Lee's preprocessing magnitudes for ``mahalanobis_lee``;
    ``path_magnitudes`` the same for ``path_supervised`` through the path score's gradient
    (:meth:`PathDetector.preprocess`; ``(0.0,)``, the default, is no preprocessing and no extra pass).

    Returns:
        ``{name: array}`` for the one-pass detectors (``path``, ``max_softmax``,
        ``mahalanobis_penultimate``: ``(N,)`` scores; ``path_supervised``, ``path_supervised_raw``,
        ``path_supervised_full``: ``(N, F)`` features; ``lid``: the per-layer pooled stage features) and, for
        ``mahalanobis_lee`` (and ``path_supervised`` with preprocessing), ``{magnitude: features}``,
        for ``combined`` ``{feature set: features}`` (:func:`combined_features`).
    """
    out: dict[str, Any] = {}
    cache: list[np.ndarray] = []

    def path_features() -> np.ndarray:  # shared by path_supervised, path_supervised_full and combined
        if not cache:
            cache.append(fitted.path.path_features(probe))
        return cache[0]

    for name in detectors:
        if name == "path":
            out[name] = fitted.path.score_probe(probe).overall
        elif name == "max_softmax":
            out[name] = msp_score(probe.logits)
        elif name == "mahalanobis_penultimate":
            out[name] = fitted.penultimate.score_probe(probe)
        elif name == "path_supervised" and tuple(path_magnitudes) != (0.0,):
            moved = fitted.path.preprocess(x, [m for m in path_magnitudes if m != 0.0], std=std, batch_size=batch_size)
            moved.update({0.0: probe} if 0.0 in path_magnitudes else {})
            out[name] = {m: fitted.path.path_features(p) for m, p in sorted(moved.items())}
        elif name == "path_supervised":
            out[name] = path_features()
        elif name == "path_supervised_raw":
            out[name] = np.concatenate(probe.z, axis=1)
        elif name == "path_supervised_full":
            out[name] = np.concatenate([path_features(), *probe.z], axis=1)
        elif name == "combined":
            out[name] = combined_features(fitted, probe, path_features())
        elif name == "lid":
            out[name] = probe.stages
        elif name == "mahalanobis_lee":
            out[name] = fitted.lee.scores(dm, x, magnitudes, std=std, batch_size=batch_size)
    return out


def _candidates(name: str, clean: dict[str, Any], adv: dict[str, Any], aset: AttackedSet) -> dict[Any, tuple]:
    if isinstance(clean[name], dict):  # {magnitude: features}
        return {m: (clean[name][m], adv[name][m]) for m in clean[name]}
    if name == "lid":
        return dict(lid_scores(clean[name], adv[name], aset.adv_index, LID_KS))
    return {None: (clean[name], adv[name])}


def plan(aset: AttackedSet, detectors: Iterable[str], *, seeds: int = 5, hint: str = "") -> Splits:
    """The evaluation protocol for ``aset``: Lee's 5 / 5 / 90 split, or stratified K-fold
    cross-validation when Lee's 5% fit part cannot hold enough attacked inputs
    (:func:`~nd_plugin.detect.metrics.plan_splits`; only asked when a detector of ``detectors``
    is supervised).

    Raises:
        DetectionError: too few successful attacks for any estimate (``hint`` says what to do).
    """
    supervised = any(n in SUPERVISED for n in detectors)
    return plan_splits(aset.correct, aset.adv_index, seeds=seeds, supervised=supervised, hint=hint)


def evaluate(
    clean: dict[str, Any],
    adv: dict[str, Any],
    aset: AttackedSet,
    *,
    seeds: int = 5,
    transfer: tuple[dict[str, Any], AttackedSet] | None = None,
    splits: Splits | Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every detector in ``adv`` on Lee's protocol: 5% fit, 5% choice of hyperparameter, 90% test.

    Unsupervised detectors are measured on the same test parts. With ``transfer = (adv2,
    aset2)`` (another attack on the same clean inputs) the supervised detectors are fitted and
    chosen on ``aset`` and tested on ``aset2``. ``splits`` replaces Lee's ``seeds`` splits
    (e.g. :func:`plan`'s, which falls back to stratified K-fold cross-validation on small sets).

    Returns:
        ``{name: {"auroc", "auroc_std", "tpr_at_5fpr", "tpr_at_5fpr_std", "seeds"[, "chosen"]}}``
        (``seeds``: how many test parts the mean and std are over).
    """
    if transfer is not None and transfer[1].correct != aset.correct:
        raise DetectionError("a transfer needs both attacks on the same clean inputs (same --n, --seed and data).")
    splits = lee_splits(aset.correct, seeds) if splits is None else list(splits)
    out: dict[str, dict[str, Any]] = {}
    for name in (n for n in DETECTORS if n in adv):
        if name not in SUPERVISED:
            if transfer is None:
                out[name] = evaluate_unsupervised(clean[name], adv[name], aset.adv_index, splits)
            continue
        cands = _candidates(name, clean, adv, aset)
        kw = {}
        if transfer is not None:
            kw = {"test_candidates": _candidates(name, clean, transfer[0], transfer[1]), "test_adv_index": transfer[1].adv_index}
        out[name] = evaluate_supervised(cands, aset.adv_index, splits, **kw)
    return out
