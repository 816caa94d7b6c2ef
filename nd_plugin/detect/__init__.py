"""Adversarial samples and their detection from calculation paths (seed §C, Figs. G–H).

An attacked input is pushed into a class whose clean inputs take other paths than it does: the
attack changes the low-level statistics first, so the gates of the bottom layers already disagree
with the clean paths of the class the input ends up in. The package:

- :mod:`~nd_plugin.detect.attacks`: :func:`attack`, adversarial inputs from any torchattacks
  attack, by its class name or a short name (FGSM, PGD, BIM, MI-FGSM, CW, DeepFool), its parameters
  checked against its ``__init__`` (:func:`resolve_attack`, :func:`parse_attack_args`), for a model
  that takes *normalised* inputs, budget in pixels;
- :mod:`~nd_plugin.detect.features`: :func:`collect_probe`, one forward pass giving prediction,
  path, gate logits, penultimate and pooled stage features (:class:`Probe`);
- :mod:`~nd_plugin.detect.detectors`: :class:`PathDetector`, how unlike the clean paths of its
  predicted class an input's path is (unsupervised, one forward pass), and the path features of
  the supervised path detectors;
- :mod:`~nd_plugin.detect.baselines`: :func:`msp_score`, :func:`confidence_features`, :class:`MahalanobisDetector`
  (penultimate, unsupervised), :class:`LeeMahalanobis` (Lee et al. 2018) and :func:`lid_scores`
  (Ma et al. 2018);
- :mod:`~nd_plugin.detect.metrics`: AUROC / TPR at 5% FPR, Lee's 5 / 5 / 90 protocol and, for
  sets too small for it, stratified K-fold cross-validation (:func:`plan_splits`);
- :mod:`~nd_plugin.detect.base`: the extension point: :class:`Detector` (what a detector reads,
  :class:`DetectorInput`, and how it is measured) and its registry (:func:`register_detector`,
  :func:`list_detectors`, :func:`create_detector`);
- :mod:`~nd_plugin.detect.builtin`: the built-in detectors, registered as a user's are (among
  them ``combined``, the recommended one: :func:`combined_features`);
- :mod:`~nd_plugin.detect.protocol`: fit, attack, featurise and evaluate every registered
  detector on objects;
- :mod:`~nd_plugin.detect.workflow`: :class:`DetectionResult`, what ``nd detect`` measures.
  Figures are drawn by :mod:`~nd_plugin.detect.figures`; what ``nd detect`` does on a run
  directory, :func:`~nd_plugin.commands.detect.run_detection`, is :mod:`nd_plugin.commands.detect`'s.

Scores follow one convention: higher means "more likely adversarial".

Example:
    >>> import torch, nd_plugin
    >>> from nd_plugin.adapters.cifar import CifarResNet
    >>> dm = nd_plugin.wrap(CifarResNet(8, num_classes=3).eval(), torch.randn(1, 3, 16, 16)).eval()
    >>> det = PathDetector().fit(dm, [(torch.randn(60, 3, 16, 16), torch.arange(60) % 3)])
    >>> s = det.score(torch.randn(4, 3, 16, 16))
    >>> s.overall.shape, s.per_layer.shape
    ((4,), (4, 3))
"""

from nd_plugin.detect.attacks import (
    ATTACKS,
    AttackSpec,
    PixelSpaceModel,
    attack,
    list_attacks,
    parse_attack_args,
    resolve_attack,
    to_normalised,
    to_pixels,
)
from nd_plugin.detect.base import (
    Detector,
    DetectorInput,
    create_detector,
    list_detectors,
    register_detector,
    resolve_detectors,
    unregister_detector,
)
from nd_plugin.detect.baselines import (
    LEE_MAGNITUDES,
    LID_KS,
    LeeMahalanobis,
    MahalanobisDetector,
    confidence_features,
    lid_scores,
    msp_score,
)
from nd_plugin.detect.builtin import (
    COMBINED_SETS,
    LID,
    Combined,
    MahalanobisLee,
    MahalanobisPenultimate,
    MaxSoftmax,
    PathDistance,
    PathSupervised,
    PathSupervisedFull,
    PathSupervisedRaw,
    combined_features,
)
from nd_plugin.detect.detectors import PathDetector, PathScore
from nd_plugin.detect.features import (
    PooledHooks,
    Probe,
    collect_probe,
    find_feature_layer,
    find_stage_layers,
)
from nd_plugin.detect.metrics import (
    Splits,
    detection_metrics,
    evaluate_supervised,
    evaluate_unsupervised,
    kfold_splits,
    lee_splits,
    plan_splits,
)
from nd_plugin.detect.protocol import (
    RECOMMENDED,
    AttackedSet,
    FittedDetectors,
    attack_set,
    detector_features,
    evaluate,
    fit_detectors,
    plan,
    recommend,
)
from nd_plugin.detect.workflow import (
    DetectionResult,
    mi_weights_of,
)

__all__ = [
    "ATTACKS",
    "COMBINED_SETS",
    "LEE_MAGNITUDES",
    "LID",
    "LID_KS",
    "RECOMMENDED",
    "AttackSpec",
    "AttackedSet",
    "Combined",
    "DetectionResult",
    "Detector",
    "DetectorInput",
    "FittedDetectors",
    "LeeMahalanobis",
    "MahalanobisDetector",
    "MahalanobisLee",
    "MahalanobisPenultimate",
    "MaxSoftmax",
    "PathDetector",
    "PathDistance",
    "PathScore",
    "PathSupervised",
    "PathSupervisedFull",
    "PathSupervisedRaw",
    "PixelSpaceModel",
    "PooledHooks",
    "Probe",
    "Splits",
    "attack",
    "attack_set",
    "collect_probe",
    "combined_features",
    "confidence_features",
    "create_detector",
    "detection_metrics",
    "detector_features",
    "evaluate",
    "evaluate_supervised",
    "evaluate_unsupervised",
    "find_feature_layer",
    "find_stage_layers",
    "fit_detectors",
    "kfold_splits",
    "lee_splits",
    "lid_scores",
    "list_attacks",
    "list_detectors",
    "mi_weights_of",
    "msp_score",
    "parse_attack_args",
    "plan",
    "plan_splits",
    "recommend",
    "register_detector",
    "resolve_attack",
    "resolve_detectors",
    "to_normalised",
    "to_pixels",
    "unregister_detector",
]
