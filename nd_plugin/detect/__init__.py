"""Adversarial samples and their detection from calculation paths (seed §C, Figs. G–H).

An attacked input is pushed into a class whose clean inputs take other paths than it does: the
attack changes the low-level statistics first, so the gates of the bottom layers already disagree
with the clean paths of the class the input ends up in. This module provides

- :func:`attack`: adversarial inputs from `torchattacks <https://github.com/Harry24k/adversarial-attacks-pytorch>`_
  (FGSM, PGD, BIM, MI-FGSM, CW, DeepFool) for a model that takes *normalised* inputs;
- :class:`PathDetector`: per-class statistics of clean paths and a score of how unlike them an
  input's path is (per layer and overall), at the cost of the forward pass that makes the
  prediction;
- baselines on the same model and inputs: :func:`msp_score` (maximum softmax probability) and
  :class:`MahalanobisDetector` (class means and a shared covariance on penultimate features);
- :func:`run_detection`: what ``nd detect`` does — attack, score, measure, write ``detect.json``
  and figures.

Scores follow one convention: higher means "more likely adversarial".

Example:
    >>> det = PathDetector().fit(dm, clean_loader)  # doctest: +SKIP
    >>> s = det.score(x)  # doctest: +SKIP
    >>> s.overall.shape, s.per_layer.shape  # doctest: +SKIP
    ((64,), (64, 18))
"""

from nd_plugin.detect.attacks import ATTACKS, PixelSpaceModel, attack, to_normalised, to_pixels
from nd_plugin.detect.baselines import MahalanobisDetector, msp_score
from nd_plugin.detect.detectors import PathDetector, PathScore, _whitener
from nd_plugin.detect.features import Probe, collect_probe, find_feature_layer
from nd_plugin.detect.metrics import detection_metrics
from nd_plugin.detect.workflow import DetectionResult, _subset_loader, attack_and_probe, run_detection

__all__ = [
    "ATTACKS",
    "DetectionResult",
    "MahalanobisDetector",
    "PathDetector",
    "PathScore",
    "PixelSpaceModel",
    "Probe",
    "attack",
    "attack_and_probe",
    "collect_probe",
    "detection_metrics",
    "find_feature_layer",
    "msp_score",
    "run_detection",
    "to_normalised",
    "to_pixels",
]
