"""Baselines on the same model and inputs as the path detector."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from nd_plugin.detect.detectors import _whitener
from nd_plugin.detect.features import (
    Probe,
    _first_batch,
    collect_probe,
    find_feature_layer,
    find_stage_layers,
    run_pooled,
)
from nd_plugin.errors import DetectionError, RunDirError
from nd_plugin.files import atomic_savez
from nd_plugin.utilities import eval_mode

__all__ = [
    "CONFIDENCE_FEATURES",
    "LEE_MAGNITUDES",
    "LID_KS",
    "LeeMahalanobis",
    "MahalanobisDetector",
    "confidence_features",
    "lid_scores",
    "msp_score",
]


def msp_score(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Baseline: one minus the maximum softmax probability (higher = more likely adversarial).

    Example:
        >>> msp_score(np.array([[0.0, 0.0], [10.0, 0.0]])).round(3).tolist()
        [0.5, 0.0]
    """
    t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return (1.0 - torch.softmax(t, dim=1).max(1).values).numpy()


#: The columns of :func:`confidence_features`.
CONFIDENCE_FEATURES = ("max_softmax", "entropy", "softmax_margin", "max_logit", "logit_margin", "logsumexp")


def confidence_features(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(N, 6)`` the classifier's own confidence statistics (:data:`CONFIDENCE_FEATURES`).

    Per input: the maximum softmax probability, the softmax entropy, the gap between the two
    largest probabilities, the largest logit, the gap between the two largest logits, and the
    log-sum-exp of the logits (the negative "energy").

    Example:
        >>> f = confidence_features(np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        >>> f.shape, f[1].round(3).tolist()
        ((2, 6), [0.333, 1.099, 0.0, 0.0, 0.0, 1.099])
    """
    t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    logp = torch.log_softmax(t, dim=1)
    p = logp.exp()
    top_p = p.topk(min(2, p.shape[1]), dim=1).values
    top_z = t.topk(min(2, t.shape[1]), dim=1).values
    second_p = top_p[:, 1] if top_p.shape[1] > 1 else torch.zeros_like(top_p[:, 0])
    second_z = top_z[:, 1] if top_z.shape[1] > 1 else top_z[:, 0]
    cols = [top_p[:, 0], -(p * logp).sum(1), top_p[:, 0] - second_p, top_z[:, 0], top_z[:, 0] - second_z, torch.logsumexp(t, 1)]
    return torch.stack(cols, 1).numpy()


class MahalanobisDetector:
    """Baseline: Mahalanobis distance of the penultimate features to the closest class mean.

    Class means and one shared covariance (Lee et al., 2018, without input pre-processing or
    layer ensembles) fitted on clean features; the features are the input of the classifier layer
    (the last ``nn.Linear`` that runs, found by :func:`find_feature_layer` and read with a
    forward hook that is removed after each pass). Score: ``min_c (f − μ_c)ᵀ Σ⁻¹ (f − μ_c)``.

    Args:
        ridge: ridge added to the correlation matrix.

    Example:
        >>> import nd_plugin
        >>> from nd_plugin.adapters.cifar import CifarResNet
        >>> dm = nd_plugin.wrap(CifarResNet(8, num_classes=3).eval(), torch.randn(1, 3, 16, 16)).eval()
        >>> maha = MahalanobisDetector().fit(dm, [(torch.randn(90, 3, 16, 16), torch.arange(90) % 3)])
        >>> maha.feature_layer, maha.score(torch.randn(4, 3, 16, 16)).shape
        ('linear', (4,))
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
        atomic_savez(
            path, feature_layer=np.array(self.feature_layer), ridge=np.array(self.ridge),
            means=self.means, scale=self.scale, white=self.white,
        )

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


#: Lee et al.'s input-preprocessing magnitudes (pixel units), in the order of their
#: ``ADV_Generate_LID_Mahalanobis.py``'s ``m_list``: the magnitude is chosen by the validation
#: AUROC and the first one listed wins a tie (``ADV_Regression.py``; ``evaluate_supervised`` too),
#: so the order decides between magnitudes that separate the validation part equally well.
LEE_MAGNITUDES = (0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005)


class LeeMahalanobis:
    """Lee et al. (NeurIPS 2018): a tied class-conditional Gaussian on each layer of a feature ensemble.

    The features are globally average-pooled activations of the stem and of every stage
    (:func:`~nd_plugin.detect.features.find_stage_layers`); each layer gets class means and one
    covariance shared by the classes (scikit-learn's ``EmpiricalCovariance`` of the class-centred
    features, as in the authors' ``sample_estimator``), fitted on clean training inputs. The layer
    score is the Mahalanobis distance to the closest class mean (higher = more likely adversarial:
    the negative of the paper's confidence score). With a preprocessing ``magnitude`` ε the input
    first moves by ``−ε·sign(∇ₓ distance)`` in pixel units (per layer, as in the paper); the
    per-layer scores then feed a logistic regression (:func:`~nd_plugin.detect.metrics.evaluate_supervised`).

    Args:
        layers: feature sites (default: found on the model when fitting).

    Example:
        >>> import nd_plugin
        >>> from nd_plugin.adapters.cifar import CifarResNet
        >>> dm = nd_plugin.wrap(CifarResNet(8, num_classes=3).eval(), torch.randn(1, 3, 16, 16)).eval()
        >>> x, y = torch.randn(60, 3, 16, 16), torch.arange(60) % 3
        >>> lee = LeeMahalanobis().fit(dm, [(x, y)])
        >>> lee.layers, lee.scores(dm, x[:4], (0.0, 0.01), std=(1.0,) * 3)[0.01].shape
        (['input:layer1', 'layer1', 'layer2', 'layer3'], (4, 4))
    """

    def __init__(self, layers: Sequence[str] | None = None) -> None:
        self.layers: list[str] = list(layers) if layers else []
        self.means: list[np.ndarray] = []
        self.precisions: list[np.ndarray] = []

    def fit(self, dm: nn.Module, loader: Iterable, *, device: torch.device | str | None = None) -> LeeMahalanobis:
        """Fits on clean ``(inputs, labels)`` (one forward pass each)."""
        self.layers = self.layers or find_stage_layers(dm.model)
        return self.fit_probe(collect_probe(dm, loader, stages=self.layers, device=device))

    def fit_probe(self, probe: Probe, layers: Sequence[str] | None = None) -> LeeMahalanobis:
        """Fits from a :class:`Probe` holding ``stages`` and the true labels."""
        from sklearn.covariance import EmpiricalCovariance

        if probe.stages is None:
            raise DetectionError("the probe holds no stage features; collect it with stages=find_stage_layers(...).")
        self.layers = list(layers) if layers else self.layers
        y, k = probe.labels, probe.logits.shape[1]
        self.means, self.precisions = [], []
        for f in probe.stages:
            f = f.astype(np.float64)
            mu = _class_means(f, y, k)
            self.means.append(mu)
            self.precisions.append(EmpiricalCovariance(assume_centered=True).fit(f - mu[y]).precision_)
        return self

    def score_probe(self, probe: Probe) -> np.ndarray:
        """``(N, L)`` per-layer distance to the closest class mean of the stage features in ``probe``
        (no preprocessing, no model call: the scores of magnitude 0).

        Raises:
            DetectionError: not fitted, or the probe holds no stage features of these layers.
        """
        if not self.means:
            raise DetectionError("this LeeMahalanobis is not fitted: call fit(dm, clean_loader).")
        if probe.stages is None or len(probe.stages) != len(self.means):
            raise DetectionError(f"the probe holds no stage features of {self.layers}; collect it with stages=lee.layers.")
        out = np.empty((len(probe), len(self.means)))
        for l, (f, mu, prec) in enumerate(zip(probe.stages, self.means, self.precisions)):
            f = f.astype(np.float64)
            fp = f @ prec
            d = (fp * f).sum(1)[:, None] - 2 * fp @ mu.T + np.einsum("kc,cd,kd->k", mu, prec, mu)[None]
            out[:, l] = d.min(1)
        return out

    def _distances(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer ``(N, K)`` Mahalanobis distances (torch, differentiable)."""
        out = []
        for f, mu, prec in zip(feats, self.means, self.precisions):
            mu_t, p_t = torch.as_tensor(mu, dtype=f.dtype, device=f.device), torch.as_tensor(prec, dtype=f.dtype, device=f.device)
            d = f[:, None, :] - mu_t[None]
            out.append(torch.einsum("nkc,cd,nkd->nk", d, p_t, d))
        return out

    def scores(
        self,
        dm: nn.Module,
        x: torch.Tensor,
        magnitudes: Sequence[float] = LEE_MAGNITUDES,
        *,
        std: Sequence[float],
        batch_size: int = 200,
    ) -> dict[float, np.ndarray]:
        """``{magnitude: (N, L) per-layer scores}`` of normalised inputs ``x``.

        Magnitude 0 is one forward pass for all layers; every other magnitude costs, per layer, one
        truncated forward and backward pass (shared by the magnitudes) and one truncated forward pass.

        Args:
            dm: the model (its ``model`` holds the feature sites).
            x: normalised inputs.
            magnitudes: preprocessing magnitudes in pixel units.
            std: the data normalisation's per-channel std (a pixel step ε is ``ε / std`` here).
            batch_size: inputs per pass.
        """
        if not self.means:
            raise DetectionError("this LeeMahalanobis is not fitted: call fit(dm, clean_loader).")
        net, device = dm.model, next(dm.parameters()).device
        scale = 1.0 / torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        out = {float(m): np.empty((x.shape[0], len(self.layers))) for m in magnitudes}
        with eval_mode(dm):
            for i in range(0, x.shape[0], batch_size):
                xb = x[i : i + batch_size].to(device)
                with torch.no_grad():
                    base = self._distances(run_pooled(net, xb, self.layers))
                for l in range(len(self.layers)):
                    if 0.0 in out:
                        out[0.0][i : i + xb.shape[0], l] = base[l].min(1).values.cpu().numpy()
                    moved = [m for m in out if m != 0.0]
                    if not moved:
                        continue
                    xg = xb.clone().requires_grad_(True)
                    d = self._distances(run_pooled(net, xg, self.layers, keep_grad=True, stop_at=l))[l]
                    (grad,) = torch.autograd.grad(d.min(1).values.sum(), xg)
                    # sign(0) = 0: a pixel the distance does not depend on stays put (the authors'
                    # ``(grad >= 0) * 2 - 1`` moves it by +ε; docs/notes/detect.md, "Lee et al. against the reference code")
                    step = grad.sign() * scale
                    with torch.no_grad():
                        for m in moved:
                            dm_ = self._distances(run_pooled(net, xb - m * step, self.layers, stop_at=l))[l]
                            out[m][i : i + xb.shape[0], l] = dm_.min(1).values.cpu().numpy()
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Writes the fitted Gaussians to ``.npz`` (no pickle), atomically."""
        if not self.means:
            raise DetectionError("this LeeMahalanobis is not fitted.")
        arrays = {f"mean_{l}": m for l, m in enumerate(self.means)} | {f"precision_{l}": p for l, p in enumerate(self.precisions)}
        atomic_savez(path, layers=np.array(self.layers), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LeeMahalanobis:
        """Reads Gaussians written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                det = cls([str(s) for s in z["layers"]])
                det.means = [z[f"mean_{l}"] for l in range(len(det.layers))]
                det.precisions = [z[f"precision_{l}"] for l in range(len(det.layers))]
        except (OSError, ValueError, KeyError) as exc:
            raise RunDirError(f"{path} is not a saved LeeMahalanobis ({exc}); delete it to refit.") from exc
        return det


#: Neighbour counts of Lee et al.'s LID evaluation (``ADV_Generate_LID_Mahalanobis.py``).
LID_KS = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def lid_scores(
    clean: Sequence[np.ndarray],
    adversarial: Sequence[np.ndarray],
    adv_index: np.ndarray,
    ks: Sequence[int] = LID_KS,
    *,
    batch_size: int = 100,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Local intrinsic dimensionality (Ma et al., ICLR 2018) of each layer's features.

    The maximum-likelihood estimate ``−k / Σᵢ log(dᵢ / d_k)`` over the k nearest neighbours in a
    minibatch of ``batch_size`` clean inputs, as in the authors' code: clean inputs are chunked in
    order, an attacked input is compared with the chunk of the clean input it was made from, and
    the nearest neighbour is skipped in both cases (for a clean input, itself).

    Args:
        clean: per layer ``(N, C)`` features of clean inputs.
        adversarial: per layer ``(M, C)`` features of attacked inputs.
        adv_index: ``(M,)`` the clean input each attacked one was made from.
        ks: neighbour counts (capped at the chunk size minus one).
        batch_size: clean inputs per reference minibatch.

    Returns:
        ``{k: (clean (N, L), adversarial (M, L))}`` LID per layer (higher = more likely adversarial).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> c = [rng.normal(size=(200, 2)) @ np.diag([1.0, 0.0])]  # clean: a line (dimension 1)
        >>> a = [c[0][:50] + rng.normal(size=(50, 2))]  # attacked: off the line
        >>> out = lid_scores(c, a, np.arange(50), ks=(10,))[10]
        >>> bool(np.median(out[1]) > np.median(out[0]))
        True
    """
    from scipy.spatial.distance import cdist

    n = clean[0].shape[0]
    chunk_of_adv = np.asarray(adv_index) // batch_size
    out = {k: (np.empty((n, len(clean))), np.empty((len(adv_index), len(clean)))) for k in ks}
    for start in range(0, n, batch_size):
        rows = np.flatnonzero(chunk_of_adv == start // batch_size)
        for l, (fc, fa) in enumerate(zip(clean, adversarial)):
            ref = fc[start : start + batch_size].astype(np.float64)
            for tag, q, where in (("c", ref, slice(start, start + ref.shape[0])), ("a", fa[rows].astype(np.float64), rows)):
                d = np.sort(cdist(q, ref), axis=1)[:, 1:]
                d = np.maximum(d, 1e-12)
                for k in ks:
                    kk = min(k, d.shape[1])
                    lid = -kk / np.log(d[:, :kk] / d[:, kk - 1 : kk]).sum(1).clip(max=-1e-12)
                    out[k][0 if tag == "c" else 1][where, l] = lid
    return out


def _class_means(f: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    mu = np.zeros((k, f.shape[1]))
    cnt = np.bincount(y, minlength=k)
    np.add.at(mu, y, f)
    mu /= np.maximum(cnt, 1)[:, None]
    mu[cnt == 0] = f.mean(0)
    return mu

