"""What ``nd detect`` measures, as an object, and the helpers of its workflow.

:class:`DetectionResult` holds one attack's results (:meth:`DetectionResult.save` writes them as
JSON); :func:`path_variants` and :func:`mi_weights_of` work on fitted detectors and checkpoints.
The workflow on a run directory, :func:`~nd_plugin.commands.detect.run_detection`, lives in
:mod:`nd_plugin.commands.detect`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from nd_plugin.detect.features import Probe
from nd_plugin.detect.protocol import FittedDetectors
from nd_plugin.files import atomic_write_json
from nd_plugin.utilities import auroc

__all__ = ["DetectionResult", "mi_weights_of", "path_variants"]


@dataclass
class DetectionResult:
    """What :func:`~nd_plugin.commands.detect.run_detection` measured (also written as ``detect.json``).

    Attributes:
        attack, eps, steps: the attack (a short name or a torchattacks class name in lower case);
        attack_class, attack_args: the torchattacks class and every keyword argument it was built
        with (``torchattacks.<attack_class>(model, **attack_args)``); n: clean inputs drawn; correct: of those, correctly
        classified (the negatives); successful: of those, misclassified after the attack (the
        positives); success_rate: ``successful / correct``; clean_accuracy: ``correct / n``.
        detectors: ``{name: {"auroc", "auroc_std", "tpr_at_5fpr", "tpr_at_5fpr_std", "seeds"[,
        "chosen"]}}`` (names: the registered detectors, :func:`~nd_plugin.detect.base.list_detectors`; ``seeds``: the number of
        test parts the mean and std are over).
        protocol: ``"lee-5/5/90"`` (Lee et al.'s 5% fit / 5% choice / 90% test, one split per seed)
        or ``"stratified-kfold-K"`` (cross-validation over all inputs, when Lee's 5% fit part
        cannot hold enough attacked inputs); protocol_info: its ``name``, ``splits``, ``repeats``,
        ``reason`` and ``description``.
        recommended: the detector to use (``combined`` when measured, else the highest AUROC;
        :func:`~nd_plugin.detect.protocol.recommend`).
        transfer: ``{"fitted_on": TAG, "protocol": ..., "detectors": {...}}`` for the supervised
        detectors fitted on another attack of the same clean inputs, or ``None``.
        path_variants: AUROC of every score of :class:`PathDetector` on all inputs (no split).
        per_layer: per gated layer, the mean standardised path score of clean and attacked inputs
        and the layer's AUROC. detector: the path detector's settings and fit (``fit_n``,
        ``fit_seconds``); out_dir: where the files went.
    """

    attack: str
    eps: float
    steps: int
    n: int
    correct: int
    successful: int
    success_rate: float
    clean_accuracy: float
    detectors: dict[str, dict[str, Any]]
    path_variants: dict[str, dict[str, float]]
    per_layer: list[dict[str, Any]]
    detector: dict[str, Any]
    out_dir: str
    transfer: dict[str, Any] | None = None
    protocol: str = "lee-5/5/90"
    protocol_info: dict[str, Any] = field(default_factory=dict)
    attack_class: str = ""
    attack_args: dict[str, Any] = field(default_factory=dict)
    recommended: str | None = None
    figures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Every field, as plain Python (what :meth:`save` writes)."""
        return asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Writes :meth:`to_dict` as indented JSON to file ``path`` (atomically)."""
        atomic_write_json(path, self.to_dict())


def mi_weights_of(checkpoint: dict[str, Any]) -> list[np.ndarray] | None:
    """The ``L_mi`` classifiers' weights ``(K, C_l)`` saved in a run's checkpoint (``None`` when absent)."""
    loss = checkpoint.get("loss") or {}
    keys = sorted((k for k in loss if k.startswith("classifiers.") and k.endswith(".weight")), key=lambda k: int(k.split(".")[1]))
    return [loss[k].float().cpu().numpy() for k in keys] or None


def path_variants(fitted: FittedDetectors, clean: Probe, adv: Probe) -> dict[str, dict[str, float]]:
    """AUROC of every path score and layer combination on all inputs (a diagnostic, no split)."""
    det = fitted.path
    out = {}
    for m in det.METHODS:
        if m == "mi" and "mi_w_0" not in det.arrays:
            continue
        for c in det.COMBINES if m not in det.OVERALL_ONLY else ("mean",):
            name = m if m in det.OVERALL_ONLY else f"{m}/{c}"
            cs, as_ = det.score_probe(clean, method=m, combine=c).overall, det.score_probe(adv, method=m, combine=c).overall
            out[name] = {"auroc": round(auroc(cs, as_), 4)}
    return out
