"""The built-in detectors, registered with :func:`~nd_plugin.detect.base.register_detector` as a user's are.

In the order of ``nd detect``'s table:

==========================  ===================================================================================
name                        reads
==========================  ===================================================================================
``path``                    the path detector's score: how unlike the clean paths of its predicted class an
                            input's path is (unsupervised, one forward pass)
``path_supervised``         per-layer path features (distances to every class mean, class posteriors) into
                            the regression, optionally after Lee's preprocessing through the path score
``path_supervised_raw``     the raw soft path into the regression
``path_supervised_full``    both
``combined``                the path score, the classifier's confidence statistics and, where the probe
                            holds them, the penultimate and Lee's per-layer Mahalanobis distances, with or
                            without the per-layer path features (the set chosen on the choice part); the
                            recommended detector (:func:`combined_features`)
``mahalanobis_lee``         Lee et al. (NeurIPS 2018): feature ensemble, tied covariance, preprocessing,
                            regression
``lid``                     Ma et al. (ICLR 2018), k chosen on held-out attacked data
``mahalanobis_penultimate`` the penultimate-only, unsupervised ablation of Lee et al.
``max_softmax``             one minus the maximum softmax probability
==========================  ===================================================================================
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from nd_plugin.detect.base import Detector, DetectorInput, register_detector
from nd_plugin.detect.baselines import LEE_MAGNITUDES, LID_KS, confidence_features, lid_scores, msp_score
from nd_plugin.detect.features import Probe

if TYPE_CHECKING:
    from nd_plugin.detect.protocol import FittedDetectors

__all__ = [
    "COMBINED_SETS",
    "LID",
    "Combined",
    "MahalanobisLee",
    "MahalanobisPenultimate",
    "MaxSoftmax",
    "PathDistance",
    "PathSupervised",
    "PathSupervisedFull",
    "PathSupervisedRaw",
    "combined_features",
]

#: The feature sets of the ``combined`` detector; the regression chooses among them on the choice
#: part, as Lee's chooses a preprocessing magnitude (:func:`combined_features`).
COMBINED_SETS = ("scores", "scores+path_features", "scores+raw_path")


def combined_features(fitted: FittedDetectors, probe: Probe, path: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The features of the ``combined`` detector, all read from one forward pass: ``{set: (N, F)}``.

    ``"scores"``: the path detector's overall score, the classifier's confidence statistics
    (:func:`~nd_plugin.detect.baselines.confidence_features`: max softmax, entropy, margins, max
    logit, log-sum-exp) and, where the probe and the fitted detectors hold them, ``log(1 + d)`` of
    the penultimate Mahalanobis distance and of Lee's per-layer distances without preprocessing.
    ``"scores+path_features"``: the same and the per-layer path features of ``path_supervised``
    (:meth:`~nd_plugin.detect.detectors.PathDetector.path_features`; pass them as ``path`` when
    already computed). ``"scores+raw_path"``: the scores and the raw soft path of
    ``path_supervised_raw`` (every gated layer's gate logits). The few scores fit well on a few
    dozen attacked inputs; the path features add what they see when there are more, and on CIFAR
    ResNet-20 runs the raw soft path carries the most against FGSM (docs/notes/detect.md, issue 24).

    Example:
        >>> import torch, nd_plugin
        >>> from nd_plugin.adapters.cifar import CifarResNet
        >>> from nd_plugin.detect import collect_probe, fit_detectors
        >>> dm = nd_plugin.wrap(CifarResNet(8, num_classes=3).eval(), torch.randn(1, 3, 16, 16)).eval()
        >>> x, y = torch.randn(60, 3, 16, 16), torch.arange(60) % 3
        >>> fitted = fit_detectors(dm, [(x, y)])
        >>> probe = collect_probe(dm, x[:4], feature_layer="linear", stages=fitted.lee.layers)
        >>> {k: v.shape for k, v in combined_features(fitted, probe).items()}  # 1 + 6 + 1 + 4 stage sites; + 3 x 2 x 3; + 16 + 32 + 64
        {'scores': (4, 12), 'scores+path_features': (4, 30), 'scores+raw_path': (4, 124)}
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
    raw = np.concatenate(probe.z, axis=1)
    return dict(
        zip(COMBINED_SETS, (scores, np.concatenate([scores, path], axis=1), np.concatenate([scores, raw], axis=1)), strict=True)
    )


@register_detector("path")
class PathDistance(Detector):
    """The fitted path detector's overall score (:class:`~nd_plugin.detect.detectors.PathDetector`;
    by default the joint Mahalanobis distance of the soft path to its predicted class's clean mean)."""

    def features(self, inputs: DetectorInput) -> np.ndarray:
        return inputs.fitted.path.score_probe(inputs.probe).overall


@register_detector("path_supervised")
class PathSupervised(Detector):
    """Per gated layer, the distances of the soft path to every class mean and its class posteriors, into the regression.

    Args:
        magnitudes: Lee's preprocessing magnitudes (pixel units) through the path score's gradient
            (:meth:`~nd_plugin.detect.detectors.PathDetector.preprocess`), one chosen per split;
            ``(0.0,)``, the default, is no preprocessing and no extra pass (with others, the
            detector needs the model and the inputs in its :class:`DetectorInput`).
    """

    supervised = True

    def __init__(self, magnitudes: Sequence[float] = (0.0,)) -> None:
        self.magnitudes = tuple(float(m) for m in magnitudes)

    def features(self, inputs: DetectorInput) -> np.ndarray | dict[float, np.ndarray]:
        if self.magnitudes == (0.0,):
            return inputs.path_features
        det = inputs.fitted.path
        moved = det.preprocess(inputs.x, [m for m in self.magnitudes if m != 0.0], std=inputs.std, batch_size=inputs.batch_size)
        moved.update({0.0: inputs.probe} if 0.0 in self.magnitudes else {})
        return {m: det.path_features(p) for m, p in sorted(moved.items())}


@register_detector("path_supervised_raw")
class PathSupervisedRaw(Detector):
    """The raw soft path (every gated layer's gate logits), into the regression."""

    supervised = True

    def features(self, inputs: DetectorInput) -> np.ndarray:
        return np.concatenate(inputs.probe.z, axis=1)


@register_detector("path_supervised_full")
class PathSupervisedFull(Detector):
    """The per-layer path features of ``path_supervised`` and the raw soft path, into the regression."""

    supervised = True

    def features(self, inputs: DetectorInput) -> np.ndarray:
        return np.concatenate([inputs.path_features, *inputs.probe.z], axis=1)


@register_detector("combined")
class Combined(Detector):
    """Every one-pass detector's evidence in one regression (:func:`combined_features`); the recommended detector."""

    supervised = True
    reads = frozenset({"features", "stages"})  # where the probe holds them

    def features(self, inputs: DetectorInput) -> dict[str, np.ndarray]:
        return combined_features(inputs.fitted, inputs.probe, inputs.path_features)


@register_detector("mahalanobis_lee")
class MahalanobisLee(Detector):
    """Lee et al.'s per-layer Mahalanobis scores (:class:`~nd_plugin.detect.baselines.LeeMahalanobis`), into the regression.

    Args:
        magnitudes: the preprocessing magnitudes (pixel units) to choose from, one per split.
    """

    supervised = True
    reads = frozenset({"stages", "model"})

    def __init__(self, magnitudes: Sequence[float] = LEE_MAGNITUDES) -> None:
        self.magnitudes = tuple(float(m) for m in magnitudes)

    def features(self, inputs: DetectorInput) -> dict[float, np.ndarray]:
        return inputs.fitted.lee.scores(inputs.dm, inputs.x, self.magnitudes, std=inputs.std, batch_size=inputs.batch_size)


@register_detector("lid")
class LID(Detector):
    """Local intrinsic dimensionality of the pooled stage features (:func:`~nd_plugin.detect.baselines.lid_scores`), into the regression.

    Its features are the stage features themselves: the estimate compares each attacked input
    with the minibatch of clean inputs it came from, so it is made in :meth:`candidates`.

    Args:
        ks: the neighbour counts to choose from, one per split.
    """

    supervised = True
    reads = frozenset({"stages"})

    def __init__(self, ks: Sequence[int] = LID_KS) -> None:
        self.ks = tuple(int(k) for k in ks)

    def features(self, inputs: DetectorInput) -> list[np.ndarray]:
        return inputs.probe.stages

    def candidates(
        self, clean: list[np.ndarray], adv: list[np.ndarray], adv_index: np.ndarray
    ) -> dict[Hashable, tuple[np.ndarray, np.ndarray]]:
        return dict(lid_scores(clean, adv, adv_index, self.ks))


@register_detector("mahalanobis_penultimate")
class MahalanobisPenultimate(Detector):
    """Mahalanobis distance of the penultimate features to the closest class mean (:class:`~nd_plugin.detect.baselines.MahalanobisDetector`)."""

    reads = frozenset({"features"})

    def features(self, inputs: DetectorInput) -> np.ndarray:
        return inputs.fitted.penultimate.score_probe(inputs.probe)


@register_detector("max_softmax")
class MaxSoftmax(Detector):
    """One minus the maximum softmax probability (:func:`~nd_plugin.detect.baselines.msp_score`)."""

    def features(self, inputs: DetectorInput) -> np.ndarray:
        return msp_score(inputs.probe.logits)
