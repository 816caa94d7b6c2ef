"""Baselines on the same model and inputs as the path detector."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nd_plugin.detect.detectors import _whitener
from nd_plugin.detect.features import _first_batch, collect_probe, find_feature_layer, Probe
from nd_plugin.errors import DetectionError, RunDirError

__all__ = ["MahalanobisDetector", "msp_score"]


def msp_score(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Baseline: one minus the maximum softmax probability (higher = more likely adversarial).

    Example:
        >>> msp_score(np.array([[0.0, 0.0], [10.0, 0.0]])).round(3).tolist()
        [0.5, 0.0]
    """
    t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return (1.0 - torch.softmax(t, dim=1).max(1).values).numpy()


class MahalanobisDetector:
    """Baseline: Mahalanobis distance of the penultimate features to the closest class mean.

    Class means and one shared covariance (Lee et al., 2018, without input pre-processing or
    layer ensembles) fitted on clean features; the features are the input of the classifier layer
    (the last ``nn.Linear`` that runs, found by :func:`find_feature_layer` and read with a
    forward hook that is removed after each pass). Score: ``min_c (f − μ_c)ᵀ Σ⁻¹ (f − μ_c)``.

    Args:
        ridge: ridge added to the correlation matrix.

    Example:
        >>> maha = MahalanobisDetector().fit(dm, train_loader)  # doctest: +SKIP
        >>> maha.score(x)  # doctest: +SKIP
    """

    def __init__(self, ridge: float = 1e-6) -> None:
        self.ridge = float(ridge)
        self.feature_layer: str | None = None
        self.means: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.white: np.ndarray | None = None
        self.model: nn.Module | None = None

    def fit(self, dm: nn.Module, loader: Iterable, *, max_samples: int | None = None) -> MahalanobisDetector:
        """Fits class means and the shared covariance on clean ``(inputs, labels)``."""
        layer = self.feature_layer or find_feature_layer(dm.model, _first_batch(loader).to(next(dm.parameters()).device))
        probe = collect_probe(dm, loader, feature_layer=layer, max_samples=max_samples)
        self.fit_probe(probe, layer)
        self.model = dm
        return self

    def fit_probe(self, probe: Probe, feature_layer: str) -> MahalanobisDetector:
        """Fits from a :class:`Probe` that holds features and true labels."""
        if probe.features is None:
            raise DetectionError("the probe holds no features; collect it with feature_layer=...")
        f, y, k = probe.features.astype(np.float64), probe.labels, probe.logits.shape[1]
        mu = np.zeros((k, f.shape[1]))
        cnt = np.bincount(y, minlength=k)
        np.add.at(mu, y, f)
        mu /= np.maximum(cnt, 1)[:, None]
        mu[cnt == 0] = np.inf
        self.scale, self.white = _whitener(f, f - mu[y], self.ridge)
        self.means, self.feature_layer = mu, feature_layer
        return self

    def score_probe(self, probe: Probe) -> np.ndarray:
        """``(N,)`` scores of inputs whose features are in ``probe``."""
        if self.means is None or probe.features is None:
            raise DetectionError("the Mahalanobis detector is not fitted, or the probe holds no features.")
        wf = (probe.features.astype(np.float64) / self.scale) @ self.white
        finite = np.isfinite(self.means).all(1)
        wm = (self.means[finite] / self.scale) @ self.white
        d = ((wf[:, None, :] - wm[None]) ** 2).sum(-1)
        return d.min(1)

    def score(self, x: torch.Tensor) -> np.ndarray:
        """``(N,)`` scores of normalised inputs (one forward pass)."""
        if self.model is None:
            raise DetectionError("this MahalanobisDetector has no model: fit it or attach a model.")
        return self.score_probe(collect_probe(self.model, x, feature_layer=self.feature_layer))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the fitted baseline to ``.npz`` (no pickle), atomically."""
        if self.means is None:
            raise DetectionError("the Mahalanobis detector is not fitted.")
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(
            tmp, feature_layer=np.array(self.feature_layer), ridge=np.array(self.ridge),
            means=self.means, scale=self.scale, white=self.white,
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, dm: nn.Module | None = None) -> MahalanobisDetector:
        """Reads a baseline written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                det = cls(float(z["ridge"]))
                det.feature_layer = str(z["feature_layer"])
                det.means, det.scale, det.white = z["means"], z["scale"], z["white"]
        except (OSError, ValueError, KeyError) as exc:
            raise RunDirError(f"{path} is not a saved MahalanobisDetector ({exc}); delete it to refit.") from exc
        det.model = dm
        return det
